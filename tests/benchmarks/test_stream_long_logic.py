"""The long-stream benchmark's analysis and report rendering, on synthetic per-append records."""

from __future__ import annotations

import json

import pytest

from benchmarks import make_report, stream_long
from benchmarks.stream_long import LongStreamSettings


def test_settings_are_validated_by_name():
    with pytest.raises(ValueError, match="kv_cap=0"):
        LongStreamSettings(kv_cap=0)
    with pytest.raises(ValueError, match="planted_at_s=3599"):
        LongStreamSettings(planted_at_s=3599)
    with pytest.raises(ValueError, match="chunk_frames=3"):
        LongStreamSettings(chunk_frames=3)
    settings = LongStreamSettings()
    assert settings.duration_s == 3600 and settings.chunk_seconds == 2.0
    assert "between(t,120,125.999)" in settings.planted_filter()
    _, quick = stream_long.parse_args(["--quick"])
    assert quick == stream_long.quick_settings()
    _, custom = stream_long.parse_args(["--minutes", "10", "--context-length", "512"])
    assert (custom.stream_minutes, custom.context_length) == (10, 512)


def test_segments_planted_and_neighbour_chunks():
    settings = LongStreamSettings(stream_minutes=5, planted_at_s=120, planted_s=6, segment_s=60)
    times = {k: 2.0 * k for k in range(150)}
    assert stream_long.planted_chunks(times, settings) == [60, 61, 62]
    neighbours = stream_long.neighbour_chunks(times, settings, sink=0)
    assert neighbours == list(range(30, 60)) + list(range(63, 93))
    per_segment = stream_long.segment_footprint({1: 2, 29: 1, 60: 5, 149: 3}, times, 60, 300)
    assert per_segment == [3, 0, 5, 0, 3]


def test_plateau_measures_growth_over_the_second_half():
    flat = stream_long.plateau([(t, 300.0) for t in range(0, 3600, 10)])
    assert flat["growth"] == pytest.approx(0.0) and flat["slope_per_hour_second_half"] == pytest.approx(0.0)
    growing = stream_long.plateau([(t, 300.0 + t / 36) for t in range(0, 3600, 10)])  # +100 per hour
    assert growing["growth"] > 0.05 and growing["slope_per_hour_second_half"] == pytest.approx(100.0)
    # Fills up after the cap, then flat: it grew since the cap, not over the second half.
    filling = stream_long.plateau([(t, min(600.0, 300.0 + t / 6)) for t in range(0, 3600, 10)])
    assert filling["growth_since_cap"] > 0.5 and filling["growth"] == pytest.approx(0.0)
    assert stream_long.plateau([(0, 1.0)])["growth"] is None


def synthetic_raw(settings: LongStreamSettings, planted_tokens: int = 6, empty_segment: bool = False) -> dict:
    """An hour-like stream scaled down: chunks every 2 s, cap reached after 20 chunks."""
    chunks = int(settings.duration_s / settings.chunk_seconds)
    ingests, footprint = [], {}
    for k in range(chunks):
        t = k * settings.chunk_seconds
        capped = min(settings.kv_cap, 8 * k)
        ingests.append({"t": 0.1 * k, "chunk": k, "chunk_time_s": t, "seconds": 0.1, "append_ms": 5.0,
                        "stream_id": "s", "logical_tokens": 51 if k == 0 else 28, "kept_tokens": 8,
                        "retention": 0.3, "capped_kv_slots": capped, "memory_tokens": 51 + capped,
                        "next_position": 35 + min(capped, settings.kv_cap) // 2, "planted_kept": 0, "load1": 1.0,
                        "disk_files": 2 * min(k + 1, 18), "disk_bytes": 9000 * min(k + 1, 18)})
        if k and not (empty_segment and 60 <= t < 120):
            footprint[k] = 1
    for k in stream_long.planted_chunks({i["chunk"]: i["chunk_time_s"] for i in ingests}, settings):
        footprint[k] = planted_tokens
    for ingest in ingests[61:]:
        ingest["planted_kept"], ingest["neighbour_kept"] = 3 * planted_tokens, 1.0
    stored = {"s": list(range(chunks))}
    return {"context_length": settings.context_length, "ingests": ingests, "ingest_wall_s": 0.1 * chunks,
            "final_report": {"footprint": {str(k): v for k, v in footprint.items()}, "chunks_appended": chunks},
            "probe": {"first_chunk_positions": 35, "per_chunk_positions": 12, "per_chunk_tokens": 28},
            "questions": [{"stream_s": 60.0, "ttft_s": 0.2, "prompt_tokens": 120, "request_bytes": 250}],
            "leak_check": {"ok": True, "leaked_kv_slots": 0}, "stream_status": "finished",
            "chunk_integrity": stream_long.chunk_integrity(ingests, stored, {"s": chunks})}


def test_analyze_checks_every_acceptance_item():
    settings = LongStreamSettings(stream_minutes=10, kv_cap=64, context_length=256)
    analysis = stream_long.analyze(synthetic_raw(settings), settings)
    assert analysis["errors"] == 0 and analysis["stream_seconds"] == 600
    assert analysis["footprint"]["met"] and analysis["footprint"]["measured"]["segments"] == 10
    planted = analysis["planted_scene"]
    assert planted["chunks"] == [60, 61, 62] and planted["kept_at_end_total"] == 18
    assert planted["ratio_to_neighbours"] == pytest.approx(6.0) and "holds more than its neighbours" in planted["explanation"]
    assert analysis["memory_flat"]["met"] and analysis["memory_flat"]["reached_cap_at_stream_s"] == 16.0
    bounded = analysis["positions_bounded"]
    assert bounded["unrebased_positions"] == 35 + 299 * 12
    assert bounded["unrebased_positions_over_context"] == pytest.approx((35 + 299 * 12) / 256)
    assert bounded["max_next_position"] == 67 and bounded["met"]
    assert bounded["logical_over_context"] == pytest.approx((51 + 299 * 28) / 256)
    assert bounded["next_position_ceiling"] == 35 + 64 * 4  # 12 positions a chunk: 2 videos of 1 + 4 + 1
    assert analysis["positions_plateau"]["met"] and analysis["positions_plateau"]["measured"][
        "memory_tokens_growth_second_half"] == 0
    assert analysis["acceptance"]["all_met"] and analysis["speed_vs_real_time"] == pytest.approx(20.0)
    creeping = synthetic_raw(settings)
    for ingest in creeping["ingests"]:
        ingest["next_position"] += int(ingest["chunk_time_s"] // 30)  # +2 positions a minute, never settling
    crept = stream_long.analyze(creeping, settings)
    assert crept["positions_bounded"]["met"] and not crept["positions_plateau"]["met"]

    hole = stream_long.analyze(synthetic_raw(settings, empty_segment=True), settings)
    assert hole["footprint"]["measured"]["empty_segments"] == [1] and not hole["acceptance"]["all_met"]
    faint = stream_long.analyze(synthetic_raw(settings, planted_tokens=0), settings)["planted_scene"]
    assert faint["ratio_to_neighbours"] == 0 and "None of its tokens is left" in faint["explanation"]
    assert analysis["disk_bounded"]["met"] and analysis["disk_bounded"]["measured"]["max_files"] == 36
    hoarding = synthetic_raw(settings)
    for ingest in hoarding["ingests"]:  # every chunk's files kept: disk grows with the stream
        ingest["disk_files"], ingest["disk_bytes"] = 2 * (ingest["chunk"] + 1), 9000 * (ingest["chunk"] + 1)
    assert not stream_long.analyze(hoarding, settings)["disk_bounded"]["met"]
    long_context = LongStreamSettings(stream_minutes=10, kv_cap=64, context_length=1024)
    assert not stream_long.analyze(synthetic_raw(long_context), long_context)["positions_bounded"]["met"]  # 8x only


def test_report_renders_and_reanalyzes(tmp_path):
    settings = LongStreamSettings(stream_minutes=10, kv_cap=64, context_length=256)
    report = stream_long.build_report(synthetic_raw(settings), settings, "python -m benchmarks.stream_long",
                                      "tiny-qwen2.5-vl-v1", False, None, 60.0)
    assert report["ok"] and report["acceptance"]["all_met"]
    path = tmp_path / "stream_long_synthetic.json"
    path.write_text(json.dumps(stream_long.finite(report)))
    text, used = make_report.build_report(tmp_path)
    assert used["stream_long"] == [path.name] and "### Long stream" in text and "**The planted scene.**" in text
    assert path.with_suffix(".png").stat().st_size > 0
    assert "**Long stream**" in "\n".join(make_report.readme_block(tmp_path))
    redone = stream_long.reanalyze(path)
    assert redone["acceptance"] == report["acceptance"] and "reanalyzed" in redone
