"""A stream's memory held by a real SGLang server: tiny Qwen2.5-VL, flashcache, CPU, Redis metadata.

One server for the module (start-up is most of the runtime). A generated 16 s video is
ingested through StreamManager + SGLangMemoryBackend in 8 chunks of 4 frames; ingest pauses
after chunks 2 and 5 so questions land at known points of the stream. What is checked:

- every append request carries only its chunk (its prompt is the chunk's videos, never an
  earlier one) and the server prefills only that chunk after the memory it holds (cached_tokens
  = the memory's length before the append);
- a question carries only its text, is answered after the whole memory, and never enters it
  (the next append finds exactly the memory, nothing more);
- the memory's capped KV slots never exceed the cap, its positions stay contiguous, and the
  logical stream keeps growing;
- the server losing the memory (a flush) is survived: the next question rebuilds it from the
  kept chunk files and is answered;
- stream, chunk records (with the memory curve) and turns are in Redis; closing the stream
  closes its memory and a flush gets every KV slot back.

The tiny model has random weights: answers are checked for existence, not meaning.
"""

from __future__ import annotations

import json
import os
import threading
import time

import pytest

from flashcache_sglang.streaming.budget import BudgetSettings
from flashcache_sglang.streaming.chunker import ChunkSettings
from flashcache_sglang.streaming.service import StreamConfig, StreamManager
from flashcache_sglang.streaming.sglang_backend import SGLangMemoryBackend
from flashcache_sglang.streaming.sources import SamplingSettings
from flashcache_sglang.streaming.store import open_store

from .conftest import make_video

pytestmark = [pytest.mark.server, pytest.mark.timeout(600)]

FPS = 2.0
FRAMES_PER_CHUNK = 4
NUM_CHUNKS = 8
CAP = 40  # visual KV slots; a chunk keeps 12 of its 24 visual tokens, so chunk 3 reaches it
RETENTION = 0.5
PAUSE_AFTER = (2, 5)
MM_PROCESS_CONFIG = {"video": {"fps": FPS, "min_pixels": 28 * 28 * 4, "max_pixels": 28 * 28 * 16}}


@pytest.fixture(scope="module")
def vl_server(tmp_path_factory):
    from flashcache_sglang.testing.models import tiny_qwen2_5_vl_dir
    from flashcache_sglang.testing.server import SGLangServer

    server = SGLangServer(
        tiny_qwen2_5_vl_dir(),
        flashcache={"retention": 0.25, "candidates": "multimodal", "min_candidates": 8},
        extra_args=["--enable-multimodal", "--mm-process-config", json.dumps(MM_PROCESS_CONFIG)],
        max_total_tokens=8192,
        log_dir=tmp_path_factory.mktemp("server"),
    )
    server.start()
    yield server
    server.stop()


class PausingBackend(SGLangMemoryBackend):
    """Holds ingest after the chunks in ``pause_after`` until the test lets it go, and keeps
    the server's report and the request body of every append."""

    def __init__(self, *args, pause_after=(), **kwargs):
        super().__init__(*args, **kwargs)
        self.reports = []
        self.bodies = []
        self.paused = {index: threading.Event() for index in pause_after}
        self.resume = {index: threading.Event() for index in pause_after}

    def _generate(self, body):
        self.bodies.append(body)
        return super()._generate(body)

    def append_chunk(self, stream_id, chunk):
        receipt = super().append_chunk(stream_id, chunk)
        self.reports.append(self.last_report(stream_id))
        if chunk.index in self.paused:
            self.paused[chunk.index].set()
            assert self.resume[chunk.index].wait(300), "the test never resumed ingest"
        return receipt


def test_stream_memory_in_a_real_server(vl_server, redis_url, namespace, tmp_path):
    video = make_video(tmp_path / "stream.mp4", NUM_CHUNKS * FRAMES_PER_CHUNK / FPS, size="160x120", rate=10)
    backend = PausingBackend(
        vl_server.url, str(tmp_path / "chunks"), fps=FPS, video_transport="path",
        max_answer_tokens=8, pause_after=PAUSE_AFTER, rebuild_chunks=2,
    )
    manager = StreamManager(open_store(redis_url, namespace), backend)
    config = StreamConfig(
        sampling=SamplingSettings(fps=FPS, max_pixels=112 * 112),
        chunking=ChunkSettings(frames=FRAMES_PER_CHUNK),
        budget=BudgetSettings(kv_cap_tokens=CAP, base_retention=RETENTION, energy_exponent=0.0),
    )
    stream_id, token = manager.start_stream(str(video), config)

    answers = {}
    try:
        for index in PAUSE_AFTER:
            assert backend.paused[index].wait(120), f"chunk {index} was not ingested: {manager.progress(stream_id)}"
            memory = backend.reports[-1]
            answer = manager.ask(stream_id, token, f"What did the stream show up to chunk {index}?")
            answers[index] = (memory, answer)
            backend.resume[index].set()
    finally:
        for event in backend.resume.values():
            event.set()
    assert manager.wait(stream_id, 180)
    record = manager.store.get_stream(stream_id)
    assert record.status == "finished", record.error
    assert vl_server.alive(), vl_server.log_tail()

    reports = backend.reports
    assert len(reports) == NUM_CHUNKS and [r["version"] for r in reports] == list(range(1, NUM_CHUNKS + 1))
    # Requests carry only their own chunk: the same small prompt for every append after the first.
    video_piece = backend.template.video
    assert [len(body["video_data"]) for body in backend.bodies] == [2] * NUM_CHUNKS
    assert all(body["text"] == video_piece * 2 for body in backend.bodies[1:])
    assert backend.bodies[0]["sampling_params"]["custom_params"]["flashcache"]["stream"]["start"] is True
    # The server prefilled only the chunk after the memory it holds.
    for previous, report in zip(reports, reports[1:]):
        assert report["cached_tokens"] == previous["memory_tokens"], (previous, report)
        assert report["prompt_tokens"] > previous["memory_tokens"]
    # The cap holds; positions stay bounded by the memory's size.
    assert all(r["capped_kv_slots"] <= CAP for r in reports), [r["capped_kv_slots"] for r in reports]
    assert max(r["capped_kv_slots"] for r in reports) == CAP
    # Each kept video item keeps its own grid offsets (a side of 4 here), so positions stay
    # within a few times the memory's length however long the stream runs.
    assert all(r["next_position"] <= 2 * r["memory_tokens"] for r in reports), reports
    assert reports[-1]["chunks_held"] >= 2  # older chunks keep a footprint

    # Questions: answered after the whole memory; their tokens stay out of it.
    for index, (memory, answer) in answers.items():
        assert answer.text, f"empty answer after chunk {index}"
        assert answer.backend == "sglang" and answer.memory_chunks == index + 1
        assert answer.cached_tokens == memory["memory_tokens"], "the memory was recomputed, not reused"
        assert answer.extra["prompt_tokens"] > memory["memory_tokens"]
        assert answer.extra["request_bytes"] < 1000  # the question, not the memory
        following = reports[index + 1]
        assert following["cached_tokens"] == memory["memory_tokens"], "the question's tokens entered the memory"

    # Metadata in Redis, as another process sees it.
    store = open_store(redis_url, namespace)
    record = store.get_stream(stream_id)
    last = reports[-1]
    assert (record.chunks_ingested, record.backend) == (NUM_CHUNKS, "sglang")
    assert record.kept_tokens == last["capped_kv_slots"] <= record.cap_tokens == CAP
    chunks = store.chunks(stream_id)
    assert [c.memory_kept_tokens for c in chunks] == [r["capped_kv_slots"] for r in reports]
    assert chunks[-1].memory_logical_tokens > last["memory_tokens"]
    turns = store.turns(stream_id, "default")
    assert [t.answer for t in turns] == [answers[i][1].text for i in PAUSE_AFTER]
    # Only the sink and the rebuild set keep their files (the service rotated the others away).
    kept = {c.index for c in chunks if os.path.isdir(c.artifact)}
    assert kept == backend.needed_artifacts(stream_id) and 0 in kept and len(kept) <= 3, kept

    # The server loses every memory (a flush): the next question rebuilds it from the kept files.
    vl_server.flush_cache()
    final = manager.ask(stream_id, token, "And at the end?")
    assert final.text and final.cached_tokens > 0, final
    assert backend._state(stream_id).rebuilds == 1

    # Deleting the stream closes its memory on the server; a flush then gets every slot back.
    manager.delete_stream(stream_id, token)
    vl_server.flush_cache()
    flush = vl_server.stats()["last_flush"]
    assert flush and flush["available_after_evict"] == flush["allocator_size"], flush


def test_live_camera_and_service_restarts_keep_one_memory(vl_server, rtsp_server, redis_url, namespace, tmp_path):
    """A live RTSP camera into the server-held memory: the camera drops and comes back, then the
    service restarts; the memory continues on the server (no rebuild), chunk indices have no
    gap and no duplicate, and nothing leaks."""
    from flashcache_sglang.streaming.sources import BackoffSettings
    from flashcache_sglang.streaming.store import RedisStore

    from .test_rtsp import wait_for_chunks

    config = StreamConfig(
        sampling=SamplingSettings(fps=FPS, max_pixels=112 * 112),
        chunking=ChunkSettings(frames=FRAMES_PER_CHUNK),
        budget=BudgetSettings(kv_cap_tokens=CAP, base_retention=RETENTION, energy_exponent=0.0),
        backoff=BackoffSettings(initial_s=0.2, max_s=1.0, open_attempts=3),
    )
    chunks_dir = str(tmp_path / "chunks")
    first = StreamManager(RedisStore(redis_url, namespace=namespace),
                          SGLangMemoryBackend(vl_server.url, chunks_dir, fps=FPS, video_transport="path"))
    stream_id, token = first.start_stream(rtsp_server.url, config)
    wait_for_chunks(first, stream_id, 2, timeout_s=90)
    rtsp_server.stop()
    rtsp_server.start()
    before = first.progress(stream_id).chunks
    wait_for_chunks(first, stream_id, before + 2, timeout_s=90)
    memory = first.backend.last_report(stream_id)
    first.shutdown()  # the service restarts; the server keeps the memory

    backend = SGLangMemoryBackend(vl_server.url, chunks_dir, fps=FPS, video_transport="path")
    second = StreamManager(RedisStore(redis_url, namespace=namespace), backend)
    assert second.resume_all() == [stream_id]
    try:
        wait_for_chunks(second, stream_id, 2, timeout_s=90)
        report = backend.last_report(stream_id)
        assert report["version"] > memory["version"] and backend._state(stream_id).rebuilds == 0
        answer = second.ask(stream_id, token, "still there?")
        assert answer.text and answer.cached_tokens > 0
    finally:
        second.stop_stream(stream_id, token)
    chunks = second.store.chunks(stream_id)
    assert [c.index for c in chunks] == list(range(len(chunks))), "no gap, no duplicate"
    # One memory across both restarts: one version per appended chunk, never restarted.
    assert report["version"] == report["chunks_appended"] <= len(chunks)
    second.delete_stream(stream_id, token)
    vl_server.flush_cache()
    flush = vl_server.stats()["last_flush"]
    assert flush["available_after_evict"] == flush["allocator_size"], flush
