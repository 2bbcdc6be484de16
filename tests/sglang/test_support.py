"""The one table of refused settings (flashcache_sglang.support), on every launch path.

- the table itself: each case is refused with its reason, allowed values pass;
- the fast pre-checks of ``flashcache_sglang.launch_server`` and ``flashcache_sglang.engine``
  read the same table, and their defaults (decode CUDA graphs on, SGLang's own attention backend
  on GPU; a bounded KV pool on CPU);
- inside the scheduler: the radix-cache factory reads SGLang's *resolved* settings;
- end to end, with real processes: ``python -m flashcache_sglang.launch_server`` and
  ``Engine(...)`` fail in about a second naming the setting; a plain
  ``python -m sglang.launch_server --radix-cache-backend flashcache`` (the plugin loaded through
  its entry point, settings in FLASHCACHE_CONFIG) fails while its scheduler starts, before it
  ever reports healthy.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from types import SimpleNamespace

import pytest
import requests

from flashcache_sglang import cpu_compat, support
from flashcache_sglang.config import FlashCacheConfig
from flashcache_sglang.engine import engine_kwargs
from flashcache_sglang.launch_server import CPU_MAX_TOTAL_TOKENS, check_sglang_args, prepare, sglang_argv

# (what a user types, what the refusal must name)
REFUSED_FLAGS = [
    (["--dcp-size", "2"], "--dcp-size 2: decode context parallelism"),
    (["--speculative-algorithm", "EAGLE"], "--speculative-algorithm EAGLE: speculative decoding"),
    (["--enable-streaming-session"], "--enable-streaming-session: streaming sessions live inside"),
    (["--page-size", "16"], "--page-size 16: only --page-size 1"),
    (["--enable-hierarchical-cache"], "--enable-hierarchical-cache: the hierarchical (host) cache"),
    (["--attention-backend", "trtllm_mha"], "--attention-backend trtllm_mha: flashcache wraps only"),
    (["--decode-attention-backend=flex_attention"], "--decode-attention-backend flex_attention"),
    (["--pp-size", "2"], "--pp-size 2: pipeline parallelism"),
    (["--kv-cache-dtype", "nvfp4"], "--kv-cache-dtype nvfp4: this KV dtype is not scored"),
    (["--disable-radix-cache"], "--disable-radix-cache: flashcache is a radix cache"),
    (["--radix-cache-backend", "flexkv"], "--radix-cache-backend flexkv: conflicts"),
    (["--cuda-graph-backend-prefill", "breakable"], "--cuda-graph-backend-prefill breakable: prefill CUDA graphs"),
    (["--enable-two-batch-overlap"], "--enable-two-batch-overlap: two-batch overlap"),
]
ALLOWED_FLAGS = [
    ["--attention-backend", "fa3"], ["--attention-backend", "triton"], ["--attention-backend", "flashinfer"],
    ["--page-size", "1"], ["--tp-size", "1"], ["--tp-size", "2"], ["--kv-cache-dtype", "bfloat16"],
    ["--kv-cache-dtype", "fp8_e4m3"], ["--kv-cache-dtype", "fp8_e5m2"],
    ["--cuda-graph-backend-prefill", "disabled"], ["--cuda-graph-backend-decode", "full"],
]


# ------------------------------------------------------------------ the table
@pytest.mark.parametrize("argv, message", REFUSED_FLAGS, ids=[case[0][0] for case in REFUSED_FLAGS])
def test_each_refused_flag_is_named_with_its_reason(argv, message):
    with pytest.raises(support.UnsupportedSetting, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_sglang_args(["--model-path", "m", *argv])


@pytest.mark.parametrize("argv", ALLOWED_FLAGS, ids=[" ".join(a) for a in ALLOWED_FLAGS])
def test_allowed_settings_pass(argv):
    check_sglang_args(["--model-path", "m", *argv])


def test_every_reason_is_reported_at_once():
    with pytest.raises(support.UnsupportedSetting) as error:
        check_sglang_args(["--page-size", "16", "--enable-hierarchical-cache", "--pp-size", "4"])
    assert str(error.value).count(": ") >= 3
    for needle in ("--page-size 16", "--enable-hierarchical-cache", "--pp-size 4"):
        assert needle in str(error.value)


def test_environment_rows():
    reasons = support.refusal_reasons(support.environment_settings({"SGLANG_ENABLE_METADATA_GLUE_GRAPH": "1"}))
    assert len(reasons) == 1 and reasons[0].startswith("SGLANG_ENABLE_METADATA_GLUE_GRAPH=1: the glue graph")
    assert not support.refusal_reasons(support.environment_settings({"SGLANG_ENABLE_METADATA_GLUE_GRAPH": "0"}))


@pytest.mark.parametrize("policy, message", [
    ("snapkv", "flashcache policy 'snapkv' needs attention queries"),
    ("tova", "flashcache policy 'tova' needs attention queries"),
    ("flashcahce", "flashcache policy 'flashcahce' is unknown"),
])
def test_policies_that_cannot_serve_are_refused_with_the_valid_list(policy, message):
    problems = support.config_problems(FlashCacheConfig(policy=policy))
    assert len(problems) == 1 and problems[0].startswith(message)
    assert "valid: flashcache, flashcache-paper, flashcache_no_dba, knorm, random, streaming_llm" in problems[0]
    with pytest.raises(support.UnsupportedSetting, match=message):
        prepare(["--model-path", "m", "--flashcache-policy", policy])
    with pytest.raises(support.UnsupportedSetting, match=message):
        engine_kwargs({"model_path": "m", "flashcache_policy": policy}, cpu=True)


@pytest.mark.parametrize("policy", ["flashcache", "flashcache_no_dba", "knorm", "random", "streaming_llm",
                                    "uniform_frames"])
def test_engine_policies_pass(policy):
    assert support.config_problems(FlashCacheConfig(policy=policy)) == []


# ------------------------------------------------------------------ launcher and Engine defaults
def test_gpu_defaults_keep_decode_graphs_and_sglangs_attention_default():
    argv = sglang_argv(["--model-path", "m"], cpu=False)
    assert "--disable-cuda-graph" not in argv
    assert "--attention-backend" not in argv  # fa3 on Hopper, wrapped
    assert argv[argv.index("--cuda-graph-backend-prefill") + 1] == "disabled"
    assert argv[argv.index("--radix-cache-backend") + 1] == "flashcache"
    # The user's own choices win.
    argv = sglang_argv(["--model-path", "m", "--disable-cuda-graph"], cpu=False)
    assert "--cuda-graph-backend-prefill" not in argv
    config, kwargs = engine_kwargs({"model_path": "m"}, cpu=False)
    assert kwargs == {"model_path": "m", "radix_cache_backend": "flashcache", "cuda_graph_backend_prefill": "disabled"}


def test_cpu_defaults_bound_the_kv_pool_unless_the_user_sizes_it():
    argv = sglang_argv(["--model-path", "m"], cpu=True)
    assert argv[argv.index("--max-total-tokens") + 1] == str(CPU_MAX_TOTAL_TOKENS)
    for own in (["--max-total-tokens", "999"], ["--mem-fraction-static=0.3"]):
        argv = sglang_argv(["--model-path", "m", *own], cpu=True)
        assert argv.count("--max-total-tokens") == (1 if own[0] == "--max-total-tokens" else 0)
    _, kwargs = engine_kwargs({"model_path": "m"}, cpu=True)
    assert kwargs["max_total_tokens"] == CPU_MAX_TOTAL_TOKENS and kwargs["attention_backend"] == "torch_native"
    _, kwargs = engine_kwargs({"model_path": "m", "mem_fraction_static": 0.2}, cpu=True)
    assert "max_total_tokens" not in kwargs


def test_engine_keywords_are_named_as_keywords():
    with pytest.raises(support.UnsupportedSetting, match="page_size=16: only --page-size 1"):
        engine_kwargs({"model_path": "m", "page_size": 16}, cpu=True)
    with pytest.raises(support.UnsupportedSetting, match="enable_streaming_session=True"):
        engine_kwargs({"model_path": "m", "enable_streaming_session": True}, cpu=False)
    config, kwargs = engine_kwargs({"model_path": "m", "attention_backend": "fa3"}, cpu=False)
    assert kwargs["attention_backend"] == "fa3"


# ------------------------------------------------------------------ inside the scheduler
def _resolved_server_args(**overrides):
    from sglang.srt.server_args import ServerArgs

    from flashcache_sglang.testing.models import tiny_llama_dir

    args = ServerArgs(model_path=str(tiny_llama_dir()), device="cpu", attention_backend="torch_native",
                      disable_cuda_graph=True, **overrides)
    args.resolve_once()
    return args


def _context(server_args, **facts):
    runner = SimpleNamespace(sliding_window_size=facts.pop("sliding_window_size", None), attn_backend=None)
    context = dict(server_args=server_args, tp_worker=SimpleNamespace(model_runner=runner),
                   model_config=SimpleNamespace(attention_arch=facts.pop("attention_arch", None)),
                   disable_radix_cache=False, enable_hierarchical_cache=False, is_hybrid_swa=False,
                   is_hybrid_ssm=False, is_dsa=False)
    return SimpleNamespace(**{**context, **facts})


def test_the_scheduler_reads_resolved_settings_and_the_models_facts():
    cpu_compat.activate()
    settings = support.settings_from_scheduler(_context(_resolved_server_args()))
    assert settings["page_size"] == 1  # resolved (raw: None)
    assert settings["cuda_graph_backend_prefill"] == "disabled"
    assert settings["attention_backend"] == "torch_native"
    assert support.refusal_reasons(settings) == []
    refused = support.settings_from_scheduler(_context(_resolved_server_args(page_size=16), is_hybrid_swa=True,
                                                       sliding_window_size=4096))
    reasons = support.refusal_reasons(refused)
    assert any(r.startswith("--page-size 16") for r in reasons)
    assert any(r.startswith("this model (hybrid sliding-window attention)") for r in reasons)
    assert any(r.startswith("this model (sliding-window layers)") for r in reasons)


def test_the_factory_refuses_without_settings_or_with_unwrapped_attention(monkeypatch):
    from flashcache_sglang import plugin

    monkeypatch.delenv("FLASHCACHE_CONFIG", raising=False)
    with pytest.raises(support.UnsupportedSetting, match="needs its settings in FLASHCACHE_CONFIG"):
        plugin.make_radix_cache(SimpleNamespace())
    monkeypatch.setenv("FLASHCACHE_CONFIG", FlashCacheConfig(retention=0.5).to_json())
    cpu_compat.activate()
    ctx = _context(_resolved_server_args())
    ctx.tp_worker.model_runner.attn_backend = SimpleNamespace()  # e.g. a backend flashcache does not wrap
    with pytest.raises(support.UnsupportedSetting, match="attention backend SimpleNamespace reads dropped tokens"):
        plugin.make_radix_cache(ctx)


# ------------------------------------------------------------------ real processes
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_launcher_cli_fails_fast_naming_the_setting():
    started = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "flashcache_sglang.launch_server", "--model-path", "m",
                          "--enable-streaming-session", "--flashcache-policy", "snapkv"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "flashcache policy 'snapkv' needs attention queries" in out.stderr
    assert "--enable-streaming-session: streaming sessions" in out.stderr
    assert time.monotonic() - started < 60


def test_engine_in_a_subprocess_fails_before_spawning(tmp_path):
    script = tmp_path / "engine.py"
    script.write_text(textwrap.dedent("""
        from flashcache_sglang.engine import Engine

        if __name__ == "__main__":
            Engine(model_path="m", page_size=16, flashcache_policy="nope")
    """))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                         start_new_session=True)
    assert out.returncode != 0
    assert "UnsupportedSetting" in out.stderr and "page_size=16" in out.stderr
    assert "flashcache policy 'nope' is unknown" in out.stderr


# Two launches: every refusal reason of the first is reported at once.
PLAIN_CASES = [
    ("refused", {"policy": "snapkv", "retention": 0.5},
     ["--page-size", "16", "--enable-streaming-session", "--enable-hierarchical-cache"],
     {"SGLANG_ENABLE_METADATA_GLUE_GRAPH": "1"},
     ["flashcache policy 'snapkv' needs attention queries", "--page-size 16: only --page-size 1",
      "--enable-streaming-session: streaming sessions", "--enable-hierarchical-cache: the hierarchical",
      "SGLANG_ENABLE_METADATA_GLUE_GRAPH=1: the glue graph"]),
    ("no-settings", None, [], {}, ["needs its settings in FLASHCACHE_CONFIG"]),
]


@pytest.mark.server
@pytest.mark.timeout(900)
def test_plain_sglang_launch_server_refuses_before_reporting_healthy(tiny_llama_dir, tmp_path):
    """Each case starts SGLang's own launcher; the scheduler (where the plugin's factory runs)
    must fail the launch with the reason, and /health must never have answered."""
    env_base = cpu_compat.environment()
    env_base.pop("FLASHCACHE_CONFIG", None)
    for name, config, flags, extra_env, messages in PLAIN_CASES:
        env = {**env_base, **extra_env}
        if config is not None:
            env["FLASHCACHE_CONFIG"] = json.dumps(config)
        port = _free_port()
        log = tmp_path / f"{name}.log"
        with open(log, "w") as sink:
            process = subprocess.Popen(
                [sys.executable, "-m", "sglang.launch_server", "--model-path", str(tiny_llama_dir), "--port", str(port),
                 "--radix-cache-backend", "flashcache", "--max-total-tokens", "4096", "--dtype", "float32",
                 "--log-level", "warning", *_cpu_flags(), *flags],
                env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
        healthy = False
        try:
            deadline = time.monotonic() + 240
            while process.poll() is None and time.monotonic() < deadline:
                try:
                    healthy |= requests.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200
                except requests.RequestException:
                    pass
                time.sleep(1)
        finally:
            if process.poll() is None:
                os.killpg(process.pid, 9)
                process.wait()
        text = log.read_text()
        assert process.returncode not in (0, None), f"{name}: the server kept running"
        assert not healthy, f"{name}: the server reported healthy"
        for message in messages:
            assert message in text, f"{name}: {message!r} not in {text[-3000:]}"


def _cpu_flags() -> list[str]:
    from flashcache_sglang.launch_server import CPU_DEFAULTS, CPU_SWITCHES

    flags = [item for pair in CPU_DEFAULTS.items() for item in pair]
    return flags + list(CPU_SWITCHES)
