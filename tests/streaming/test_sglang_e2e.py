"""A stream's memory in a real SGLang server: tiny Qwen2.5-VL, flashcache, CPU, Redis metadata.

One server for the module (start-up is most of the runtime). A generated 16 s video is
ingested through StreamManager + SGLangMemoryBackend in 8 chunks of 4 frames; ingest pauses
after chunks 2 and 5 so questions land at known points of the stream. What is checked:

- every ingest reuses the memory prefix from the radix cache (cached_tokens = the previous
  ingest's whole prompt), so only the new chunk is prefilled;
- a question reuses the whole memory prefix, gets a non-empty answer, and its tokens never
  enter the memory (the next ingest matches exactly the prefix, nothing more);
- once the memory reaches ``kv_cap_tokens`` the server's in-place shrink keeps its visual KV
  slots there (``memory_cap_tokens``), while the logical prompt keeps growing;
- stream, chunk records (with the memory curve) and turns are in Redis.

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
    the server's report of every ingest."""

    def __init__(self, *args, pause_after=(), **kwargs):
        super().__init__(*args, **kwargs)
        self.reports = []
        self.paused = {index: threading.Event() for index in pause_after}
        self.resume = {index: threading.Event() for index in pause_after}

    def append_chunk(self, stream_id, chunk):
        receipt = super().append_chunk(stream_id, chunk)
        self.reports.append(self.last_ingest(stream_id))
        if chunk.index in self.paused:
            self.paused[chunk.index].set()
            assert self.resume[chunk.index].wait(300), "the test never resumed ingest"
        return receipt


def test_stream_memory_in_a_real_server(vl_server, redis_url, namespace, tmp_path):
    video = make_video(tmp_path / "stream.mp4", NUM_CHUNKS * FRAMES_PER_CHUNK / FPS, size="160x120", rate=10)
    backend = PausingBackend(
        vl_server.url, str(tmp_path / "chunks"), fps=FPS, video_transport="path",
        max_answer_tokens=8, pause_after=PAUSE_AFTER,
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
            assert memory.chunk_index == index
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
    assert [r.chunk_index for r in reports] == list(range(NUM_CHUNKS))
    chunk_video_tokens = reports[0].video_tokens
    assert chunk_video_tokens >= 8, "each chunk must have enough visual tokens to be compressed"

    # Ingest: the memory prefix is reused, only the new chunk is prefilled and compressed.
    for previous, report in zip(reports, reports[1:]):
        assert report.cached_tokens == previous.prompt_tokens, (previous, report)
        assert report.candidate_tokens == chunk_video_tokens
        assert report.kept_tokens == round(RETENTION * chunk_video_tokens)
        assert report.prompt_tokens > previous.prompt_tokens

    # Questions: answered from the reused memory; their tokens stay out of the memory.
    for index, (memory, answer) in answers.items():
        assert answer.text, f"empty answer after chunk {index}"
        assert answer.backend == "sglang" and answer.memory_chunks == index + 1
        assert answer.cached_tokens >= memory.prompt_tokens, "the memory was recomputed, not reused"
        assert answer.extra["prompt_tokens"] > memory.prompt_tokens
        following = reports[index + 1]
        assert following.cached_tokens == memory.prompt_tokens, "the question's tokens entered the memory"

    # The cap: visual KV slots stay at the cap (plus at most one chunk) once it is reached,
    # while the logical prompt keeps growing.
    per_chunk_kept = round(RETENTION * chunk_video_tokens)
    first_at_cap = next(i for i in range(NUM_CHUNKS) if (i + 1) * per_chunk_kept > CAP)
    over = [(r.chunk_index, r.visual_kv_slots) for r in reports[first_at_cap:]
            if r.visual_kv_slots > CAP + chunk_video_tokens]
    assert not over, f"memory_cap_tokens={CAP} did not hold the memory (+ one chunk): {over}"
    # What the cap counts (visual tokens + delimiters) is reported, and sits at the cap once hit.
    capped = [r.capped_kv_slots for r in reports]
    assert None not in capped and max(capped[first_at_cap:]) <= CAP + chunk_video_tokens, capped
    assert CAP in capped, capped
    assert reports[-1].visual_kv_slots < NUM_CHUNKS * per_chunk_kept
    assert reports[-1].prompt_tokens - reports[first_at_cap].prompt_tokens >= (NUM_CHUNKS - 1 - first_at_cap) * chunk_video_tokens
    assert vl_server.stats().get("shrink_dropped_tokens", 0) > 0, vl_server.stats()

    # Metadata in Redis, as another process sees it.
    store = open_store(redis_url, namespace)
    record = store.get_stream(stream_id)
    last = reports[-1]
    assert (record.chunks_ingested, record.backend) == (NUM_CHUNKS, "sglang")
    assert (record.logical_tokens, record.kept_tokens) == (last.prompt_tokens, last.prompt_kv_slots)
    chunks = store.chunks(stream_id)
    assert [(c.memory_logical_tokens, c.memory_kept_tokens) for c in chunks] == \
        [(r.prompt_tokens, r.prompt_kv_slots) for r in reports]
    assert all(os.path.isdir(c.artifact) and c.retention == RETENTION for c in chunks)
    turns = store.turns(stream_id, "default")
    assert [t.answer for t in turns] == [answers[i][1].text for i in PAUSE_AFTER]
    assert [t.memory_chunks for t in turns] == [i + 1 for i in PAUSE_AFTER]

    # After the stream ended, a follow-up still reuses the whole memory (and sees the history).
    started = time.perf_counter()
    final = manager.ask(stream_id, token, "And at the end?")
    assert final.text and final.cached_tokens >= last.prompt_tokens, final
    assert time.perf_counter() - started < 60

    # In-place shrinking leaked no KV slot: a flush gets every slot back.
    vl_server.flush_cache()
    flush = vl_server.stats()["last_flush"]
    assert flush and flush["available_after_evict"] == flush["allocator_size"], flush
