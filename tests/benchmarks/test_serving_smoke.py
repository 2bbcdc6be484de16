"""CI smoke run of the serving benchmark: ``--quick`` long-prompt on real servers (vanilla, then
FlashCache), then the report over its JSON.

It checks the tool, not the speed (CI machines are shared): both servers answered every request,
the JSON carries bench_serving's metrics for both, no KV slot leaked, and make_report renders it.
"""

from __future__ import annotations

import json
import time

import pytest

pytestmark = [pytest.mark.server, pytest.mark.timeout(900)]

BENCH_SERVING_METRICS = [
    "completed", "duration", "total_input_tokens", "total_output_tokens",
    "request_throughput", "input_throughput", "output_throughput",
    *[f"{stat}_{name}_ms" for name in ("ttft", "tpot", "itl", "e2e_latency") for stat in ("mean", "median", "p99")],
]


def test_quick_long_prompt_reports_metrics_and_no_leaks(run_benchmark, tmp_path, smollm2_dir):
    output = tmp_path / "serving_quick.json"
    started = time.monotonic()
    result = run_benchmark("serving", ["--quick", "--workloads", "long-prompt", "--output", str(output)], timeout=780)
    print(f"\nquick long-prompt, both servers: {time.monotonic() - started:.0f} s")
    assert result.returncode == 0, result.stdout[-4000:]

    report = json.loads(output.read_text())
    assert report["benchmark"] == "serving" and report["quick"]
    assert report["errors"] == 0 and report["failed_leak_checks"] == 0 and report["ok"]
    for key in ("cpu_model", "cores", "torch", "sglang", "load_average_start", "load_average_end"):
        assert report["machine"][key] is not None, key
    workload = report["workloads"]["long-prompt"]
    prompts = workload["sizes"]["num_prompts"]
    for backend in ("vanilla", "flashcache"):
        metrics = workload[backend]
        missing = [key for key in BENCH_SERVING_METRICS if metrics.get(key) is None]
        assert not missing, (backend, missing)
        assert metrics["completed"] == prompts and metrics["errors"] == 0
        assert metrics["max_running_requests"] >= 1
        check = metrics["leak_check"]
        assert check["ok"] and check["leaked_kv_slots"] == 0, check
    flush = workload["flashcache"]["leak_check"]["last_flush"]
    assert flush["available_after_evict"] == flush["allocator_size"]
    # FlashCache really compressed: each prompt holds fewer KV slots than it has tokens.
    assert workload["flashcache"]["mean_prompt_kv_slots"] < 0.5 * workload["sizes"]["prompt_tokens"]
    assert workload["ratios"]["request_throughput"] is not None
    assert output.with_suffix(".png").stat().st_size > 0

    from benchmarks.make_report import build_report

    text, used = build_report(tmp_path)
    assert used["serving"] == [output.name]
    assert "max_running_requests" in text and "median_ttft_ms" in text


def test_quick_video_workloads_compress_the_shared_video_prefix(run_benchmark, tmp_path, tiny_vl_dir):
    output = tmp_path / "serving_video_quick.json"
    started = time.monotonic()
    result = run_benchmark("serving", ["--quick", "--workloads", "video-shared-prefix", "video-multi-turn",
                                       "--output", str(output)], timeout=780)
    print(f"\nquick video workloads, both servers: {time.monotonic() - started:.0f} s")
    assert result.returncode == 0, result.stdout[-4000:]
    report = json.loads(output.read_text())
    assert report["ok"] and report["errors"] == 0 and report["failed_leak_checks"] == 0
    assert report["settings"]["flashcache"]["candidates"] == "multimodal"
    shared = report["workloads"]["video-shared-prefix"]
    for backend in ("vanilla", "flashcache"):
        metrics = shared[backend]
        assert metrics["completed"] == shared["sizes"]["num_branches"] and metrics["errors"] == 0
        assert metrics["cached_token_share"] > 0.8, metrics  # every branch reuses the video prefix
        assert metrics["leak_check"]["ok"], metrics["leak_check"]
    # The video prefix is held compressed: retention 0.2 of its visual tokens.
    assert shared["flashcache"]["prefix_kv_slots"] < 0.5 * shared["vanilla"]["prefix_kv_slots"]
    turns = report["workloads"]["video-multi-turn"]
    assert turns["flashcache"]["mean_prompt_kv_slots"] < turns["vanilla"]["mean_prompt_kv_slots"]
    later = [t for t in turns["flashcache"]["per_turn"] if t["turn"] > 1]
    assert later and all(t["cached_token_share"] > 0.5 for t in later), later  # turns reuse the compressed video
