"""CI version of the long-stream benchmark: ``python -m benchmarks.stream_long --quick`` (4 minutes
of a generated video with a planted scene at minute 2, unpaced, through StreamManager +
SGLangMemoryBackend into a real flashcache server with the tiny random-weight Qwen2.5-VL).

It checks what does not depend on the machine's speed: every minute keeps a visual token, the
planted scene's chunks are found and reported with an explanation, the memory is flat once at
the cap, its positions stay below the server's context length, no chunk is lost or duplicated,
no KV slot leaks. (The 10x-the-context length is the full run's: 4 minutes are ~6x.)
"""

from __future__ import annotations

import json
import time

import pytest

pytestmark = [pytest.mark.server, pytest.mark.timeout(900)]


def test_quick_long_stream_keeps_a_footprint_and_bounded_positions(run_benchmark, tmp_path):
    output = tmp_path / "stream_long_quick.json"
    started = time.monotonic()
    result = run_benchmark("stream_long", ["--quick", "--output", str(output)], timeout=780)
    print(f"\nquick long stream: {time.monotonic() - started:.0f} s")
    assert result.returncode == 0, result.stdout[-4000:]

    report = json.loads(output.read_text())
    assert report["benchmark"] == "stream_long" and report["quick"] and report["ok"], report.get("raw", {}).get("error")
    analysis, settings = report["analysis"], report["settings"]
    assert report["raw"]["stream_status"] == "finished"
    assert analysis["appends"] == settings["stream_minutes"] * 60 / 2  # one chunk per 2 s of video, none dropped
    checks = report["acceptance"]
    for name in ("footprint", "memory_flat", "errors_check", "leaked_kv_slots", "chunks"):
        assert checks[name]["met"], (name, checks[name])
    assert analysis["footprint"]["measured"]["segments"] == 4
    planted = analysis["planted_scene"]
    assert len(planted["chunks"]) == 3 and planted["explanation"] and planted["history_points"] > 0
    bounded = analysis["positions_bounded"]
    assert bounded["probe"]["steps_agree"] and bounded["probe"]["per_chunk_positions"] > 0
    assert bounded["max_next_position"] < bounded["context_length"] < bounded["unrebased_positions"]
    assert bounded["memory_tokens_after_cap"]["growth"] == pytest.approx(0.0, abs=0.05)
    assert analysis["questions"]["asked"] >= 3 and len(set(analysis["questions"]["prompt_tokens"])) <= 2
    assert output.with_suffix(".png").stat().st_size > 0
