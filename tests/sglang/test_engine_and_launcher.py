"""The offline Engine and the launcher: flags validated, refusals named, compression active."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from flashcache_sglang.config import FlashCacheConfig
from flashcache_sglang.engine import engine_kwargs
from flashcache_sglang.launch_server import check_sglang_args, prepare


@pytest.mark.parametrize("flag, value, message", [
    ("--flashcache-retention", "0", "--flashcache-retention=0.0 is invalid: must be in (0, 1]"),
    ("--flashcache-retention", "1.5", "--flashcache-retention=1.5 is invalid"),
    ("--flashcache-gamma", "1", "--flashcache-gamma=1.0 is invalid: must be in (0, 1)"),
    ("--flashcache-sink-tokens", "-1", "--flashcache-sink-tokens=-1 is invalid"),
])
def test_bad_flashcache_flags_name_the_flag_and_range(flag, value, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[").replace("]", r"\]")):
        prepare(["--model-path", "m", flag, value])


@pytest.mark.parametrize("args, needle", [
    (["--page-size", "16"], "--page-size 16"),
    (["--speculative-algorithm", "EAGLE"], "--speculative-algorithm"),
    (["--disable-radix-cache"], "--disable-radix-cache"),
    (["--attention-backend", "trtllm_mha"], "--attention-backend trtllm_mha"),
    (["--radix-cache-backend", "flexkv"], "--radix-cache-backend flexkv"),
    (["--enable-hierarchical-cache"], "--enable-hierarchical-cache"),
])
def test_unsupported_sglang_settings_are_refused(args, needle):
    with pytest.raises(ValueError, match=needle):
        check_sglang_args(args)


def test_launcher_exports_settings_and_selects_backend():
    config, argv, env = prepare(["--model-path", "m", "--flashcache-retention", "0.3", "--port", "1"])
    assert config.retention == 0.3
    assert argv[argv.index("--radix-cache-backend") + 1] == "flashcache"
    assert FlashCacheConfig.from_json(env["FLASHCACHE_CONFIG"]) == config


def test_launcher_cli_exits_2_naming_the_flag():
    out = subprocess.run([sys.executable, "-m", "flashcache_sglang.launch_server", "--model-path", "m",
                          "--flashcache-gamma", "0"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "--flashcache-gamma=0.0 is invalid" in out.stderr


def test_engine_kwargs_validation():
    with pytest.raises(ValueError, match="flashcache_retenton"):
        engine_kwargs({"flashcache_retenton": 0.2}, cpu=True)
    with pytest.raises(ValueError, match="page_size=16: only --page-size 1"):
        engine_kwargs({"page_size": 16}, cpu=True)
    config, kwargs = engine_kwargs({"model_path": "m", "flashcache_retention": 0.5}, cpu=True)
    assert config.retention == 0.5 and kwargs["radix_cache_backend"] == "flashcache"
    assert kwargs["attention_backend"] == "torch_native"


@pytest.mark.server
@pytest.mark.timeout(600)
def test_offline_engine_compresses(tmp_path, tiny_llama_dir):
    script = tmp_path / "run_engine.py"
    script.write_text(textwrap.dedent(f"""
        import json
        from flashcache_sglang.engine import Engine

        if __name__ == "__main__":
            llm = Engine(model_path={str(tiny_llama_dir)!r}, dtype="float32", max_total_tokens=4096,
                         log_level="error", flashcache_retention=0.25, flashcache_candidates="text",
                         flashcache_recent_tokens=8)
            try:
                out = llm.generate(input_ids=list(range(1000, 1300)), sampling_params={{"max_new_tokens": 4, "temperature": 0}})
                print("RESULT", json.dumps(out["meta_info"].get("flashcache")))
            finally:
                llm.shutdown()
    """))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=540,
                         start_new_session=True)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, out.stdout[-2000:] + out.stderr[-4000:]
    report = json.loads(lines[0][len("RESULT "):])[0]
    candidates = 300 - 4 - 8
    assert report["candidate_tokens"] == candidates
    assert report["kept_tokens"] == round(0.25 * candidates)


def test_admission_hook_clears_batch_is_full_only_after_frees(monkeypatch):
    from types import SimpleNamespace

    from sglang.srt.managers.scheduler import Scheduler

    from flashcache_sglang import upstream

    monkeypatch.setattr(Scheduler, "process_batch_result", lambda self, batch, result: "done")
    assert upstream.install_admission_hook()
    assert not upstream.install_admission_hook()  # idempotent
    freed = [0]

    def take():
        value, freed[0] = freed[0], 0
        return value

    scheduler = SimpleNamespace(tree_cache=SimpleNamespace(take_freed_slots=take),
                                running_batch=SimpleNamespace(batch_is_full=True))
    assert Scheduler.process_batch_result(scheduler, None, None) == "done"
    assert scheduler.running_batch.batch_is_full  # nothing freed: the flag stays
    freed[0] = 120
    Scheduler.process_batch_result(scheduler, None, None)
    assert not scheduler.running_batch.batch_is_full
