"""CI version of the soak: ``python -m benchmarks.soak --quick`` on real servers (the resend
baseline on vanilla SGLang, then FlashCache's server-held memory; tiny random-weight Qwen2.5-VL,
two live-paced streams for 30 s each, questions all along), then the report over its JSON.

It checks the tool and the properties that do not depend on the machine's speed: no failed
ingest, question or stream on either server, no lost or duplicated chunk, no leaked KV slot,
FlashCache's memory reached its cap and then stayed flat, its requests carry only the new
chunk or question (bytes flat over the run and far below the baseline's, which grow with the
window). Timing ratios are recorded, not asserted (CI machines are shared).
"""

from __future__ import annotations

import json
import time

import pytest

pytestmark = [pytest.mark.server, pytest.mark.timeout(900)]


def test_quick_soak_server_memory_beside_the_resend_baseline(run_benchmark, tmp_path, redis_url):
    output = tmp_path / "soak_quick.json"
    started = time.monotonic()
    result = run_benchmark("soak", ["--quick", "--redis-url", redis_url, "--output", str(output)], timeout=780)
    print(f"\nquick soak, both servers: {time.monotonic() - started:.0f} s")
    assert result.returncode == 0, result.stdout[-4000:]
    assert "[soak] flashcache" in result.stdout and "acceptance (FlashCache" in result.stdout

    report = json.loads(output.read_text())
    assert report["benchmark"] == "soak" and report["design"] == "server-memory" and report["quick"] and report["ok"]
    assert report["errors"] == 0 and report["failed_checks"] == []
    assert report["settings"]["metadata_store"] == "redis"
    for key in ("cpu_model", "cores", "torch", "sglang", "load_average_start", "load_average_end"):
        assert report["machine"][key] is not None, key
    settings = report["settings"]
    for name in ("vanilla", "flashcache"):
        run = report["backends"][name]
        summary = run["summary"]
        assert summary["errors"] == 0 and summary["questions"] >= 3 and summary["chunks_ingested"] >= 8, summary
        assert summary["median_ttft_ms"] is not None and summary["median_ingest_latency_ms"] is not None
        assert summary["median_ingest_server_e2e_ms"] is not None  # the server's own timing was read
        assert summary["acceptance"]["chunks"]["met"], summary["acceptance"]["chunks"]
        assert run["leak_check"]["ok"] and run["leak_check"]["leaked_kv_slots"] == 0, run["leak_check"]
        assert len(run["samples"]) >= 10 and summary["load_average_1min"] is not None
    flush = report["backends"]["flashcache"]["leak_check"]["last_flush"]
    assert flush["available_after_evict"] == flush["allocator_size"]

    flash = report["backends"]["flashcache"]["summary"]
    vanilla = report["backends"]["vanilla"]["summary"]
    for flat in flash["memory_flatness"]:
        assert flat["settled_at_s"] is not None, f"stream {flat['stream']} never reached the cap: {flat}"
        assert flat["samples_after_cap"] >= 5 and flat["met"], flat
    acceptance = report["acceptance"]
    assert acceptance["memory_flat"]["met"] and acceptance["errors"]["met"] and acceptance["leaked_kv_slots"]["met"]
    # An ingest carries its chunk only: the same bytes at the end as at the start.
    assert acceptance["ingest_request_bytes"]["met"], acceptance["ingest_request_bytes"]
    # The baseline's requests resend the window: larger, and growing with it.
    assert vanilla["median_ingest_request_bytes"] > 2 * flash["median_ingest_request_bytes"]
    assert vanilla["median_question_request_bytes"] > 3 * flash["median_question_request_bytes"]
    assert vanilla["acceptance"]["ingest_request_bytes"]["measured"] > 1.1
    # The memory is the cap plus the header and the sink; the baseline holds its whole window.
    assert vanilla["final_kv_slots_per_stream"] > 2 * flash["final_kv_slots_per_stream"]
    assert flash["final_kv_slots_per_stream"] < settings["kv_cap"] + 64
    # Re-based positions: each kept video item keeps its grid offsets (up to 4 positions per token
    # on this model's 4x3 grids), so the largest position stays within the memory plus 3 per capped
    # token, far below the stream's logical length.
    assert flash["final_next_position_per_stream"] <= flash["final_kv_slots_per_stream"] + 3 * settings["kv_cap"]
    assert flash["final_next_position_per_stream"] < flash["final_logical_tokens_per_stream"] / 4
    assert flash["question_cached_token_share"] > 0.5  # questions read the cached compressed memory
    assert output.with_suffix(".png").stat().st_size > 0

    from benchmarks.make_report import build_report

    text, used = build_report(tmp_path)
    assert used["soak"] == [output.name]
    assert "server-held stream memory" in text and "| ingest_request_bytes |" in text
