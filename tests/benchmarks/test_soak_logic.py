"""The soak tool's analysis, settings and report rendering, without a server."""

from __future__ import annotations

import json

import pytest

from benchmarks import make_report, soak
from benchmarks.soak import SoakSettings


def stream(chunks=0, kv=0, capped=None, logical=0, read=0, dropped=0, status="running"):
    return {"chunks": chunks, "kv_slots": kv, "capped_kv_slots": capped, "visual_kv_slots": capped,
            "logical_tokens": logical, "frames_read": read, "frames_dropped": dropped, "status": status}


def sample(t, *streams, pool=None):
    return {"t": t, "streams": list(streams), "pool": pool or {}, "load1": 0.5}


def test_settings_are_validated_by_name():
    with pytest.raises(ValueError, match="streams=0"):
        SoakSettings(streams=0)
    with pytest.raises(ValueError, match="chunk_frames=3"):
        SoakSettings(chunk_frames=3)
    with pytest.raises(ValueError, match="base_retention=1.5"):
        SoakSettings(base_retention=1.5)
    with pytest.raises(ValueError, match="early_at_s=600"):
        SoakSettings(early_at_s=600, late_at_s=60)
    assert SoakSettings(fps=2, chunk_frames=4, pace=2).chunk_period_s == 1.0


def test_parse_args_quick_and_overrides():
    _, quick = soak.parse_args(["--quick"])
    assert quick == soak.quick_settings()
    _, settings = soak.parse_args(["--minutes", "30", "--streams", "4", "--kv-cap", "256"])
    assert (settings.duration_s, settings.streams, settings.kv_cap) == (1800, 4, 256)
    assert settings.late_at_s == SoakSettings().late_at_s
    with pytest.raises(SystemExit):
        soak.parse_args(["--streams", "-1"])


@pytest.mark.parametrize("elapsed, expected", [(1800, (60, 600, 30)), (600, (60, 570, 30)), (40, (5, 20, 7.5))],
                         ids=["long", "ten-minutes", "short"])
def test_effective_marks_clip_to_the_run(elapsed, expected):
    settings = SoakSettings(window_s=60 if elapsed > 100 else 40)
    early, late, half = soak.effective_marks(settings, elapsed)
    assert (early, late, half) == pytest.approx(expected)
    assert early + half <= late - half + 1e-9  # the windows never overlap


def test_ttft_drift_compares_window_medians_and_skips_errors():
    questions = ([{"t": t, "ttft_s": 0.1} for t in (50, 55, 60, 65, 70)]
                 + [{"t": 62, "error": "boom"}]
                 + [{"t": t, "ttft_s": v} for t, v in ((590, 0.11), (600, 0.13), (610, 0.12), (700, 9.0))])
    drift = soak.ttft_drift(questions, early_at=60, late_at=600, half_width=15)
    assert drift["early_questions"] == 5 and drift["late_questions"] == 3
    assert drift["ratio"] == pytest.approx(1.2) and drift["met"]
    assert drift["late_median_ttft_ms"] == pytest.approx(120)
    worse = soak.ttft_drift(questions, early_at=60, late_at=690, half_width=15)
    assert worse["ratio"] == pytest.approx(90) and not worse["met"]
    empty = soak.ttft_drift([], 60, 600, 15)
    assert empty["ratio"] is None and not empty["met"]


def test_memory_flatness_starts_at_the_cap():
    samples = [sample(0, stream()),  # nothing ingested yet: not a point
               sample(5, stream(kv=40, capped=20)),
               sample(10, stream(kv=70, capped=48)),  # reached the cap
               sample(15, stream(kv=72, capped=50)),
               sample(20, stream(kv=70, capped=48))]
    flat = soak.memory_flatness(samples, 0, cap=48)
    assert flat["settled_at_s"] == 10 and flat["samples_after_cap"] == 3
    assert (flat["min_kv_slots"], flat["max_kv_slots"]) == (70, 72)
    assert flat["spread"] == pytest.approx(2 / 72) and flat["met"]
    assert (flat["first_kv_slots"], flat["last_kv_slots"]) == (40, 70)
    jumpy = samples + [sample(25, stream(kv=90, capped=68))]
    assert not soak.memory_flatness(jumpy, 0, cap=48)["met"]


def test_memory_flatness_without_a_cap_reports_growth_only():
    samples = [sample(t, stream(kv=100 * (t + 1), capped=None)) for t in range(4)]
    flat = soak.memory_flatness(samples, 0, cap=None)
    assert flat["settled_at_s"] is None and flat["spread"] is None and not flat["met"]
    assert (flat["first_kv_slots"], flat["last_kv_slots"]) == (100, 400)
    assert soak.memory_flatness(samples, 0, cap=10_000)["settled_at_s"] is None  # never reached


def test_ingest_fps_series_is_the_mean_over_streams():
    samples = [sample(0, stream(chunks=0), stream(chunks=0)),
               sample(4, stream(chunks=2), stream(chunks=1)),
               sample(4, stream(chunks=2), stream(chunks=1)),  # zero span: skipped
               sample(8, stream(chunks=4), stream(chunks=3))]
    series = soak.ingest_fps_series(samples, chunk_frames=4)
    assert series == [{"t": 4, "fps": pytest.approx(1.5)}, {"t": 8, "fps": pytest.approx(2.0)}]
    # A trailing window smooths over several samples; the post-shutdown sample is left out.
    final = dict(sample(9, stream(chunks=4), stream(chunks=3)), final=True)
    smooth = soak.ingest_fps_series(samples + [final], chunk_frames=4, window_s=8)
    assert smooth[-1] == {"t": 8, "fps": pytest.approx((4 + 3) * 4 / 8 / 2)}


def synthetic_run(backend: str, settings: SoakSettings) -> dict:
    capped = backend == "flashcache"
    samples = []
    for t in range(0, 41, 5):
        chunks = t // 2
        kv = min(70, 10 + 8 * chunks) if capped else 30 + 28 * chunks
        entry = stream(chunks=chunks, kv=kv, capped=(48 if kv >= 70 else kv - 22) if capped else None,
                       logical=30 + 28 * chunks, read=2 * t, dropped=1 if t > 30 else 0)
        samples.append(sample(t, entry, dict(entry),
                              pool={"kv_used": 0, "kv_evictable": 2 * kv, "kv_available": 1024 - 2 * kv,
                                    "evicted_total": 0 if capped else 10 * t}))
    questions = [{"t": t, "stream": t % 2, "ttft_s": 0.1 + (0 if capped else t / 200), "e2e_s": 0.2,
                  "prompt_tokens": 100, "cached_tokens": 90} for t in range(3, 40, 3)]
    ingests = [{"t": t, "seconds": 0.15} for t in range(40)] + [{"t": 20, "seconds": 1.0, "error": "x"}]
    summary = soak.summarize(samples, questions, ingests, settings, 40.0, settings.kv_cap if capped else None)
    return {"elapsed_s": 40.0, "summary": summary, "samples": samples, "questions": questions, "ingests": ingests,
            "leak_check": {"ok": True, "leaked_kv_slots": 0}}


def test_summarize_and_report_render(tmp_path):
    settings = soak.quick_settings()
    runs = {name: synthetic_run(name, settings) for name in soak.BACKENDS}
    flash, vanilla = runs["flashcache"]["summary"], runs["vanilla"]["summary"]
    assert flash["ingest_errors"] == 1 and flash["errors"] == 1 and flash["ingests"] == 41
    assert flash["median_ingest_latency_ms"] == pytest.approx(150)
    assert flash["question_cached_token_share"] == pytest.approx(0.9)
    assert flash["frames_dropped"] == 2 and flash["frames_read"] == 160
    assert flash["worst_memory_spread"] == 0 and all(f["met"] for f in flash["memory_flatness"])
    assert vanilla["worst_memory_spread"] is None and vanilla["ttft_drift"]["ratio"] > 1.5
    assert flash["final_kv_slots_per_stream"] == 70 and vanilla["final_kv_slots_per_stream"] == 30 + 28 * 20

    class Args:
        quick, backends, redis_url = True, list(soak.BACKENDS), None

    report = soak.build_report(runs, settings, "python -m benchmarks.soak --quick", "tiny-qwen2.5-vl-v1", None, 100.0, Args)
    assert report["errors"] == 2 and not report["ok"]  # the synthetic ingest errors are counted
    assert report["targets"]["kv_slots_per_stream_ratio"] == pytest.approx(70 / 590)
    assert report["targets"]["flashcache_memory_flat_met"]
    path = tmp_path / "soak_synthetic.json"
    path.write_text(json.dumps(soak.finite(report)))
    text, used = make_report.build_report(tmp_path)
    assert used["soak"] == [path.name]
    assert "### Soak" in text and "median_ingest_latency_ms" in text and "spread after reaching the cap 0.0%" in text
    assert path.with_suffix(".png").stat().st_size > 0
    block = "\n".join(make_report.readme_block(tmp_path))
    assert "**Soak**" in block and "x0.12" in block

    # The analysis is code: a saved run's summaries are recomputed from its raw series.
    redone = soak.reanalyze(path)
    assert redone["backends"]["flashcache"]["summary"]["final_kv_slots_per_stream"] == 70
    assert redone["targets"] == pytest.approx(report["targets"]) and redone["errors"] == 2 and "reanalyzed" in redone


def test_video_overhead_parses_sglang_perf_lines_and_fits_a_slope(tmp_path):
    from benchmarks import video_overhead

    log = ("[2026-11-22 22:50:46] [QwenVLProcessor Perf] rid='abc', load_time: 60.13 ms, preprocess_time: 169.12 ms, "
           "process_time: 48.11 ms, get_rope_index_time: 10.95 ms, total_time: 288.31 ms\n"
           "[2026-11-22 22:50:46] unrelated line\n"
           "[2026-11-22 22:50:47] [QwenVLProcessor Perf] rid='d', load_time: 1 ms, preprocess_time: 2 ms, "
           "process_time: 3 ms, get_rope_index_time: 4 ms, total_time: 10 ms\n")
    stages = video_overhead.parse_perf_lines(log)
    assert stages == [dict(load_ms=60.13, preprocess_ms=169.12, process_ms=48.11, rope_ms=10.95, processor_total_ms=288.31),
                      dict(load_ms=1, preprocess_ms=2, process_ms=3, rope_ms=4, processor_total_ms=10)]
    assert video_overhead.slope([2, 8, 32], [12, 48, 192]) == pytest.approx(6.0)
    assert video_overhead.slope([4, 4], [1, 2]) is None
    report = {"benchmark": "video_overhead", "command": "python -m benchmarks.video_overhead",
              "machine": {"cpu_model": "x", "cores": 2, "device": "cpu"}, "settings": {"model": "tiny"},
              "rows": [{"videos": 2, "prompt_tokens": 51, "median_latency_ms": 45.0, "min_cached_share": 0.98}],
              "ms_per_video": 6.04, "processor_ms_per_video": 4.5}
    (tmp_path / "video_overhead_cpu.json").write_text(json.dumps(report))
    text, used = make_report.build_report(tmp_path)
    assert used["video_overhead"] == ["video_overhead_cpu.json"] and "6.0 ms per video" in text
    assert "4.5 ms of it in SGLang's video processor" in "\n".join(make_report.readme_block(tmp_path))


def test_a_stream_that_failed_mid_run_counts_as_an_error():
    settings = SoakSettings(streams=2)
    samples = [sample(0, stream(chunks=1, kv=10), stream(chunks=1, kv=10)),
               sample(5, stream(chunks=3, kv=10), stream(chunks=2, kv=10, status="failed")),
               sample(10, stream(chunks=5, kv=10), stream(chunks=2, kv=10, status="stopped"))]
    summary = soak.summarize(samples, [], [], settings, 10.0, None)
    assert summary["failed_streams"] == [1] and summary["errors"] == 1


def test_each_stream_gets_its_own_video(tmp_path):
    import decord

    first = soak.generate_video(tmp_path / "a.mp4", 2.0, 2.0, seed=0)
    second = soak.generate_video(tmp_path / "b.mp4", 2.0, 2.0, seed=1)
    frames = [decord.VideoReader(str(path)).get_batch([0, 1]).asnumpy() for path in (first, second)]
    assert frames[0].shape == frames[1].shape == (2, 168, 224, 3)
    assert (frames[0] != frames[1]).mean() > 0.5  # different noise and hue: no shared radix-tree prefix
