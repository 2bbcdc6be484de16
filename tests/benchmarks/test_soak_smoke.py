"""CI version of the soak: ``python -m benchmarks.soak --quick`` on real servers (vanilla, then
FlashCache; tiny random-weight Qwen2.5-VL, two live-paced streams for 40 s each, questions all
along), then the report over its JSON.

It checks the tool and the properties that do not depend on the machine's speed: no failed
ingest, question or stream on either server, no leaked KV slot, FlashCache's memory reached its
cap and then stayed flat (within the 5% target) while vanilla's kept every token of the horizon.
TTFT ratios are recorded, not asserted (CI machines are shared).
"""

from __future__ import annotations

import json
import time

import pytest

pytestmark = [pytest.mark.server, pytest.mark.timeout(900)]



def test_quick_soak_holds_flashcache_memory_flat_without_errors_or_leaks(run_benchmark, tmp_path, redis_url):
    output = tmp_path / "soak_quick.json"
    started = time.monotonic()
    result = run_benchmark("soak", ["--quick", "--redis-url", redis_url, "--output", str(output)], timeout=780)
    print(f"\nquick soak, both servers: {time.monotonic() - started:.0f} s")
    assert result.returncode == 0, result.stdout[-4000:]
    assert "[soak] flashcache" in result.stdout  # the live progress line

    report = json.loads(output.read_text())
    assert report["benchmark"] == "soak" and report["quick"] and report["ok"]
    assert report["errors"] == 0 and report["failed_checks"] == []
    assert report["settings"]["metadata_store"] == "redis"
    for key in ("cpu_model", "cores", "torch", "sglang"):
        assert report["machine"][key] is not None, key
    settings = report["settings"]
    for name in ("vanilla", "flashcache"):
        run = report["backends"][name]
        summary = run["summary"]
        assert summary["errors"] == 0 and summary["questions"] >= 3 and summary["chunks_ingested"] >= 8, summary
        assert summary["median_ttft_ms"] is not None and summary["median_ingest_latency_ms"] is not None
        assert run["leak_check"]["ok"] and run["leak_check"]["leaked_kv_slots"] == 0, run["leak_check"]
        assert len(run["samples"]) >= 10
    flush = report["backends"]["flashcache"]["leak_check"]["last_flush"]
    assert flush["available_after_evict"] == flush["allocator_size"]

    flash = report["backends"]["flashcache"]["summary"]
    vanilla = report["backends"]["vanilla"]["summary"]
    for flat in flash["memory_flatness"]:
        assert flat["settled_at_s"] is not None, f"stream {flat['stream']} never reached the cap: {flat}"
        assert flat["samples_after_cap"] >= 5 and flat["met"], flat
    # Vanilla holds every token of its horizon; FlashCache the cap (plus the text around it).
    assert vanilla["final_kv_slots_per_stream"] > 2 * flash["final_kv_slots_per_stream"]
    assert flash["final_kv_slots_per_stream"] < settings["kv_cap"] + 64
    assert report["targets"]["kv_slots_per_stream_ratio"] < 0.5
    assert flash["question_cached_token_share"] > 0.5  # questions read the cached compressed memory
    assert output.with_suffix(".png").stat().st_size > 0

    from benchmarks.make_report import build_report

    text, used = build_report(tmp_path)
    assert used["soak"] == [output.name]
    assert "### Soak" in text and "memory spread after reaching the cap" in text
