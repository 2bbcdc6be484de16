"""The soak tool's analysis, settings, wire recording, resend baseline and report rendering,
without a real SGLang server (a fake /generate on loopback stands in where HTTP is needed)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from benchmarks import make_report, soak
from benchmarks.soak import SoakSettings


def stream(chunks=0, kv=0, capped=None, logical=0, read=0, dropped=0, status="running"):
    return {"chunks": chunks, "kv_slots": kv, "capped_kv_slots": capped, "logical_tokens": logical,
            "frames_read": read, "frames_dropped": dropped, "status": status, "next_position": None}


def sample(t, *streams, pool=None, load1=0.5):
    return {"t": t, "streams": list(streams), "pool": pool or {}, "load1": load1}


def test_settings_are_validated_by_name():
    with pytest.raises(ValueError, match="streams=0"):
        SoakSettings(streams=0)
    with pytest.raises(ValueError, match="chunk_frames=3"):
        SoakSettings(chunk_frames=3)
    with pytest.raises(ValueError, match="base_retention=1.5"):
        SoakSettings(base_retention=1.5)
    with pytest.raises(ValueError, match="early_at_s=600"):
        SoakSettings(early_at_s=600, late_at_s=60)
    with pytest.raises(ValueError, match="video_transport='ftp'"):
        SoakSettings(video_transport="ftp")
    with pytest.raises(ValueError, match="rebuild_chunks=-1"):
        SoakSettings(rebuild_chunks=-1)
    with pytest.raises(ValueError, match="max_prompt_chunks=1"):
        SoakSettings(max_prompt_chunks=1)
    assert SoakSettings(fps=2, chunk_frames=4, pace=2).chunk_period_s == 1.0


def test_parse_args_quick_and_overrides():
    _, quick = soak.parse_args(["--quick"])
    assert quick == soak.quick_settings()
    _, settings = soak.parse_args(["--minutes", "30", "--streams", "4", "--kv-cap", "256", "--video-transport",
                                   "data_url"])
    assert (settings.duration_s, settings.streams, settings.kv_cap, settings.video_transport) == (1800, 4, 256,
                                                                                                   "data_url")
    assert settings.late_at_s == 1800 and settings.early_at_s == 60  # minute 30 vs minute 1
    with pytest.raises(SystemExit):
        soak.parse_args(["--streams", "-1"])


@pytest.mark.parametrize("elapsed, expected", [(1800, (60, 1770, 30)), (600, (60, 570, 30)), (40, (5, 20, 7.5))],
                         ids=["thirty-minutes", "ten-minutes", "short"])
def test_effective_marks_clip_to_the_run(elapsed, expected):
    settings = SoakSettings(window_s=60 if elapsed > 100 else 40)
    early, late, half = soak.effective_marks(settings, elapsed)
    assert (early, late, half) == pytest.approx(expected)
    assert early + half <= late - half + 1e-9  # the windows never overlap


def test_late_over_early_one_and_two_sided():
    events = ([{"t": t, "v": 0.1} for t in (50, 55, 60, 65, 70)] + [{"t": 62, "v": 5.0, "error": "boom"}]
              + [{"t": t, "v": x} for t, x in ((590, 0.105), (600, 0.106), (610, 0.107), (700, 9.0))])
    one = soak.late_over_early(events, "v", 60, 600, 15, target=1.1, two_sided=False)
    assert one["early_count"] == 5 and one["late_count"] == 3  # the error is skipped
    assert one["measured"] == pytest.approx(1.06) and one["met"] and one["target"] == "<= 1.1"
    two = soak.late_over_early(events, "v", 60, 600, 15, target=0.1, two_sided=True)
    assert two["met"] and two["target"] == "within 10% of early"
    faster = [{"t": 60, "v": 1.0}, {"t": 600, "v": 0.8}]
    assert not soak.late_over_early(faster, "v", 60, 600, 15, target=0.1, two_sided=True)["met"]  # 20% below
    assert soak.late_over_early(faster, "v", 60, 600, 15, target=1.1, two_sided=False)["met"]
    empty = soak.late_over_early([], "v", 60, 600, 15, target=1.1, two_sided=False)
    assert empty["measured"] is None and not empty["met"]


def test_late_over_early_by_group_reports_the_worst_comparable_group():
    events = ([{"t": 60, "kind": "a", "b": 100}, {"t": 600, "kind": "a", "b": 104},
               {"t": 61, "kind": "b", "b": 300}, {"t": 601, "kind": "b", "b": 345},
               {"t": 62, "kind": "c", "b": 999}])  # c: early only, cannot be compared
    result = soak.late_over_early(events, "b", 60, 600, 15, target=0.1, two_sided=True, by="kind")
    assert result["groups_compared"] == 2 and result["worst_group"] == "b"
    assert result["measured"] == pytest.approx(1.15) and not result["met"]


def test_ingest_spikes_ratio_and_details():
    ingests = [{"t": float(t), "seconds": 0.1, "stream_id": "s", "chunk": t, "server_e2e_s": 0.09, "append_ms": 5.0}
               for t in range(100)]
    ingests[70]["seconds"] = 0.25
    ingests[71] = dict(ingests[71], seconds=9.0, error="x")  # failed ingests are not latencies
    spikes = soak.ingest_spikes(ingests)
    assert spikes["measured"] == pytest.approx(2.5) and not spikes["met"] and spikes["over_target"] == 1
    assert spikes["slowest"][0]["chunk"] == 70 and spikes["ingests"] == 99
    assert spikes["server_e2e_max_over_median"] == pytest.approx(1.0)
    assert soak.ingest_spikes([])["measured"] is None


def test_memory_flatness_starts_at_the_cap():
    samples = [sample(0, stream()),  # nothing ingested yet: not a point
               sample(5, stream(kv=40, capped=20)),
               sample(10, stream(kv=70, capped=48)),  # reached the cap
               sample(15, stream(kv=72, capped=48)),
               sample(20, stream(kv=70, capped=48))]
    flat = soak.memory_flatness(samples, 0, cap=48)
    assert flat["settled_at_s"] == 10 and flat["samples_after_cap"] == 3
    assert (flat["min_kv_slots"], flat["max_kv_slots"]) == (70, 72)
    assert flat["spread"] == pytest.approx(2 / 72) and flat["met"]
    assert (flat["first_kv_slots"], flat["last_kv_slots"]) == (40, 70)
    jumpy = samples + [sample(25, stream(kv=90, capped=48))]
    assert not soak.memory_flatness(jumpy, 0, cap=48)["met"]
    growing = [sample(t, stream(kv=100 * (t + 1))) for t in range(4)]
    assert soak.memory_flatness(growing, 0, cap=None)["settled_at_s"] is None  # no cap: growth only


def test_ingest_fps_series_is_the_mean_over_streams():
    samples = [sample(0, stream(chunks=0), stream(chunks=0)),
               sample(4, stream(chunks=2), stream(chunks=1)),
               sample(4, stream(chunks=2), stream(chunks=1)),  # zero span: skipped
               sample(8, stream(chunks=4), stream(chunks=3))]
    series = soak.ingest_fps_series(samples, chunk_frames=4)
    assert series == [{"t": 4, "fps": pytest.approx(1.5)}, {"t": 8, "fps": pytest.approx(2.0)}]
    final = dict(sample(9, stream(chunks=4), stream(chunks=3)), final=True)
    smooth = soak.ingest_fps_series(samples + [final], chunk_frames=4, window_s=8)
    assert smooth[-1] == {"t": 8, "fps": pytest.approx((4 + 3) * 4 / 8 / 2)}


def test_chunk_integrity_finds_lost_duplicated_and_disagreeing_chunks():
    ingests = [{"stream_id": "a", "chunk": k} for k in range(5)] + [{"stream_id": "b", "chunk": k} for k in (0, 1, 1, 3)]
    ingests.append({"stream_id": "b", "chunk": 2, "error": "boom"})  # b: chunk 2 failed -> lost; 1 twice
    result = soak.chunk_integrity(ingests, {"a": [0, 1, 2, 3, 4], "b": [0, 1, 3]}, {"a": 5, "b": 4})
    rows = {row["stream_id"]: row for row in result["streams"]}
    assert rows["a"]["lost_count"] == 0 and rows["a"]["store_agrees"] and rows["a"]["server_agrees"]
    assert rows["b"]["lost"] == [2] and rows["b"]["duplicated"] == 1 and not rows["b"]["server_agrees"]
    assert result["measured"] == {"lost": 1, "duplicated": 1, "disagreements": 1} and not result["met"]
    clean = soak.chunk_integrity(ingests[:5], {"a": [0, 1, 2, 3, 4]}, {"a": 5})
    assert clean["met"]
    assert not soak.chunk_integrity(ingests[:5], {"a": [0, 1, 2, 4]}, {})["met"]  # the store lost one


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
    questions = [{"t": t, "stream": t % 2, "turn": 0, "kind": "turn0/q0", "ttft_s": 0.1 + (0 if capped else t / 200),
                  "e2e_s": 0.2, "server_e2e_s": 0.15, "request_bytes": 300 if capped else 1000 + 50 * t,
                  "prompt_tokens": 100, "cached_tokens": 90} for t in range(3, 40, 3)]
    ingests = [{"t": t, "seconds": 0.15, "stream_id": f"s{t % 2}", "chunk": t // 2, "server_e2e_s": 0.1,
                "request_bytes": 600 if capped else 800 + 30 * t} for t in range(40)]
    ingests.append({"t": 20, "seconds": 1.0, "error": "x", "stream_id": "s0", "chunk": 20})
    integrity = soak.chunk_integrity(ingests, {}, {})
    summary = soak.summarize(samples, questions, ingests, settings, 40.0, settings.kv_cap if capped else None,
                             integrity)
    return {"elapsed_s": 40.0, "summary": summary, "samples": samples, "questions": questions, "ingests": ingests,
            "chunk_integrity": integrity, "leak_check": {"ok": True, "leaked_kv_slots": 0}}


def test_summarize_acceptance_report_render_and_reanalyze(tmp_path):
    settings = soak.quick_settings()
    runs = {name: synthetic_run(name, settings) for name in soak.BACKENDS}
    flash, vanilla = runs["flashcache"]["summary"], runs["vanilla"]["summary"]
    assert flash["ingest_errors"] == 1 and flash["errors"] == 1 and flash["ingests"] == 41
    assert flash["median_ingest_latency_ms"] == pytest.approx(150)
    assert flash["median_question_request_bytes"] == 300 and flash["median_ingest_request_bytes"] == 600
    assert flash["question_cached_token_share"] == pytest.approx(0.9)
    assert flash["frames_dropped"] == 2 and flash["frames_read"] == 160
    assert flash["worst_memory_spread"] == 0 and flash["acceptance"]["memory_flat"]["met"]
    checks = flash["acceptance"]
    for name in ("question_request_bytes", "question_server_time", "question_ttft", "ingest_request_bytes",
                 "ingest_server_time", "ingest_latency", "ingest_max_over_median"):
        assert checks[name]["met"], (name, checks[name])
    assert not checks["errors"]["met"]
    assert checks["chunks"]["measured"] == {"lost": 1, "duplicated": 0, "disagreements": 0}  # the failed ingest's
    assert not vanilla["acceptance"]["question_ttft"]["met"] and not vanilla["acceptance"]["question_request_bytes"]["met"]
    assert vanilla["acceptance"]["memory_flat"]["measured"] is None

    class Args:
        quick, backends, redis_url = True, list(soak.BACKENDS), None

    report = soak.build_report(runs, settings, "python -m benchmarks.soak --quick", "tiny-qwen2.5-vl-v1", None, 100.0,
                               Args)
    assert report["design"] == soak.DESIGN and report["errors"] == 2 and not report["ok"]
    assert report["acceptance"]["leaked_kv_slots"]["met"] and not report["acceptance"]["all_met"]
    assert report["targets"]["kv_slots_per_stream_ratio"] == pytest.approx(70 / 590)
    assert report["targets"]["median_question_request_bytes_ratio"] < 0.5
    path = tmp_path / "soak_synthetic.json"
    path.write_text(json.dumps(soak.finite(report)))
    text, used = make_report.build_report(tmp_path)
    assert used["soak"] == [path.name]
    assert "server-held stream memory" in text and "| question_ttft |" in text and "resend baseline" in text
    assert path.with_suffix(".png").stat().st_size > 0
    block = "\n".join(make_report.readme_block(tmp_path))
    assert "**Soak, server-held stream memory vs resend baseline**" in block and "all acceptance checks met" in block

    redone = soak.reanalyze(path)
    assert redone["backends"]["flashcache"]["summary"]["final_kv_slots_per_stream"] == 70
    assert redone["targets"] == pytest.approx(report["targets"]) and redone["errors"] == 2 and "reanalyzed" in redone
    assert redone["acceptance"]["question_ttft"] == report["acceptance"]["question_ttft"]


def test_old_resend_design_soaks_still_render(tmp_path):
    """Soaks recorded before issue 13 (no "design") are rendered and labelled as the old design."""
    old = {"benchmark": "soak", "command": "python -m benchmarks.soak --minutes 6", "quick": False,
           "machine": {"cpu_model": "x", "cores": 2, "device": "cpu"},
           "settings": {**soak.SoakSettings().__dict__, "model": "tiny", "dtype": "float32", "metadata_store": "redis",
                        "flashcache": {}},
           "backends": {"vanilla": {"summary": {"final_kv_slots_per_stream": 618.0, "ttft_drift": {"ratio": 2.0,
                                    "late_at_s": 330, "early_at_s": 60, "met": False}},
                                    "samples": [sample(0, stream(kv=10)), sample(5, stream(chunks=2, kv=60))],
                                    "questions": [{"t": 3, "ttft_s": 0.2}], "ingests": [{"t": 1, "seconds": 0.3}]}},
           "targets": {}, "errors": 0, "failed_checks": []}
    (tmp_path / "soak_old.json").write_text(json.dumps(old))
    text, used = make_report.build_report(tmp_path)
    assert used["soak"] == ["soak_old.json"] and "OLD resend design" in text and "_skipped" not in text
    assert "OLD resend design" in "\n".join(make_report.readme_block(tmp_path))
    with pytest.raises(SystemExit, match="old resend design"):
        soak.reanalyze(tmp_path / "soak_old.json")


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


# ------------------------------------------------------------------ wire recording and the resend baseline
class FakeSGLang(BaseHTTPRequestHandler):
    """/generate as vanilla SGLang answers it: prompt_tokens = 20 + 14 per video, cached = all
    but the last video's; streamed answers as SSE events."""

    requests: list = []

    def do_POST(self):  # noqa: N802 - http.server's name
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        FakeSGLang.requests.append(body)
        videos = len(body.get("video_data") or [])
        meta = {"prompt_tokens": 20 + 14 * videos, "cached_tokens": max(0, 20 + 14 * (videos - 1)),
                "e2e_latency": 0.05, "first_token_latency": 0.02, "queue_time": 0.001,
                "request_received_ts": 100.0, "api_server_dispatch_finish_ts": 100.01,
                "forward_entry_time": 100.011, "prefill_finished_time": 100.031, "output_token_logprobs": [1, 2]}
        if body.get("stream"):
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            for text in ("a", "ab"):
                self.wfile.write(f"data: {json.dumps({'text': text, 'meta_info': meta})}\n\n".encode())
            self.wfile.write(b"data: [DONE]\n\n")
            return
        payload = json.dumps({"text": "x", "meta_info": meta}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_server():
    FakeSGLang.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeSGLang)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_server_timing_reads_sglang_meta_info():
    from benchmarks.stream_wire import server_timing

    timing = server_timing({"e2e_latency": 0.5, "first_token_latency": 0.3, "queue_time": 0.01,
                            "request_received_ts": 10.0, "api_server_dispatch_finish_ts": 10.2,
                            "forward_entry_time": 10.21, "prefill_finished_time": 10.41})
    assert timing == pytest.approx({"server_e2e_s": 0.5, "server_ttft_s": 0.3, "server_queue_s": 0.01,
                                    "server_tokenize_s": 0.2, "server_prefill_s": 0.2})
    assert server_timing({"e2e_latency": True}) == {} and server_timing(None) == {}


def test_recording_session_keeps_each_threads_requests(fake_server):
    import requests

    from benchmarks.stream_wire import RecordingSession, sum_timings

    session = RecordingSession()
    session.post(f"{fake_server}/generate", json={"text": "unrecorded"})  # not between begin and end
    results = {}

    def worker(name, count):
        session.begin()
        for _ in range(count):
            session.post(f"{fake_server}/generate", json={"text": name, "video_data": ["v"]})
        results[name] = session.end()

    threads = [threading.Thread(target=worker, args=(name, n)) for name, n in (("a", 2), ("bb", 3))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results["a"]) == 2 and len(results["bb"]) == 3
    expected = len(json.dumps({"text": "a", "video_data": ["v"]}).encode())
    assert all(r["request_bytes"] == expected for r in results["a"])
    assert "output_token_logprobs" not in results["a"][0]["meta"]  # bulky per-token lists dropped
    total = sum_timings(results["bb"])
    assert total["requests"] == 3 and total["server_e2e_s"] == pytest.approx(0.15) and total["prompt_tokens"] == 34

    session.begin()
    with session.post(f"{fake_server}/generate", json={"text": "q", "stream": True}, stream=True) as response:
        lines = [line for line in response.iter_lines(decode_unicode=True) if line]
    streamed = session.end()
    assert lines[-1] == "data: [DONE]" and len(streamed) == 1
    assert streamed[0]["timing"]["server_ttft_s"] == pytest.approx(0.02)  # from the last event's meta_info
    assert isinstance(session, requests.Session)


def make_chunk(index: int):
    from flashcache_sglang.streaming.types import Chunk, Frame

    frames = tuple(Frame(np.full((56, 56, 3), 10 * index % 250, dtype=np.uint8), 2.0 * index + 0.5 * k)
                   for k in range(4))
    return Chunk(index, frames, 0.1)


def test_resend_baseline_resends_its_window_and_keeps_the_horizon(fake_server, tmp_path):
    from benchmarks.soak_baseline import ResendBaselineBackend
    from flashcache_sglang.streaming.budget import BudgetSettings

    backend = ResendBaselineBackend(fake_server, str(tmp_path / "chunks"), max_prompt_chunks=4, max_answer_tokens=2)
    backend.open("s", BudgetSettings(kv_cap_tokens=64))
    assert backend.ask("s", "anything?", []).memory_chunks == 0  # nothing to resend yet: no request
    assert FakeSGLang.requests == []
    videos_sent = []
    for index in range(7):
        receipt = backend.append_chunk("s", make_chunk(index))
        videos_sent.append(len(FakeSGLang.requests[-1]["video_data"]))
        assert receipt.kept_tokens == receipt.logical_tokens  # vanilla keeps everything
        assert "custom_params" not in FakeSGLang.requests[-1]["sampling_params"]  # a vanilla server: no knobs
    # Two videos a chunk, the window and the new chunk each time; past 4 chunks the window keeps
    # the sink and the newest, down to half (2 chunks).
    assert videos_sent == [2, 4, 6, 8, 10, 6, 8]
    # The window (the sink + the newest since the rebase) and what that rebase dropped (1..3): a
    # question that snapshot the window just before it still sends those files.
    assert backend.needed_artifacts("s") == {0, 1, 2, 3, 4, 5, 6}
    assert backend.last_report("s")["rebases"] == 1
    usage = backend.memory_tokens("s")
    assert usage.kept_tokens == usage.total_kv_slots == 20 + 14 * 8 and usage.num_chunks == 7
    answer = backend.ask("s", "What happened?", [])
    question = FakeSGLang.requests[-1]
    assert question["stream"] and len(question["video_data"]) == 8 and question["text"].endswith(
        "What happened?<|im_end|>\n<|im_start|>assistant\n")
    assert answer.text == "ab" and answer.memory_chunks == 7 and answer.extra["prompt_tokens"] == 20 + 14 * 8
    backend.release("s")
    with pytest.raises(KeyError):
        backend.memory_tokens("s")


def test_a_backend_rerun_alone_replaces_its_part_of_a_saved_soak(tmp_path):
    from dataclasses import asdict

    from benchmarks import soak

    settings = soak.SoakSettings()
    saved = {"settings": {**asdict(settings), "model": "tiny"}, "command": "python -m benchmarks.soak --minutes 30",
             "created": "2026-12-03T10:00:00+00:00", "backends": {"vanilla": {"summary": "old"}, "flashcache": {"summary": "f"}}}
    path = tmp_path / "soak.json"
    path.write_text(json.dumps(saved))
    runs = {"vanilla": {"command": "python -m benchmarks.soak --backends vanilla"}}
    backends, merged_runs, command = soak.merge_backends(path, settings, {"vanilla": {"summary": "new"}}, runs,
                                                         "python -m benchmarks.soak --backends vanilla")
    assert backends == {"vanilla": {"summary": "new"}, "flashcache": {"summary": "f"}}
    assert merged_runs["vanilla"] == runs["vanilla"]
    assert merged_runs["flashcache"]["command"] == "python -m benchmarks.soak --minutes 30"
    assert command.startswith("python -m benchmarks.soak --minutes 30 ; then ")
    other = soak.SoakSettings(streams=settings.streams + 1)
    with pytest.raises(SystemExit, match=r"settings differ in \['streams'\]"):
        soak.merge_backends(path, other, {}, {}, "x")
