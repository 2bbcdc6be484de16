"""Streams over several SGLang workers (streaming.workers) against fake workers that follow the
server's stream-memory protocol: placement by load, shared through Redis, failover with a
rebuild on the surviving worker, orphaned memories closed when a worker returns, bounded
chunk files. tests/streaming/test_workers_e2e.py runs the same against real servers."""

from __future__ import annotations

import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from flashcache_sglang.streaming.budget import BudgetSettings
from flashcache_sglang.streaming.chunker import ChunkSettings
from flashcache_sglang.streaming.cli import build_backend, build_parser
from flashcache_sglang.streaming.memory import MemoryBackendError
from flashcache_sglang.streaming.service import StreamConfig, StreamManager
from flashcache_sglang.streaming.sglang_backend import SGLangMemoryBackend
from flashcache_sglang.streaming.sources import SamplingSettings
from flashcache_sglang.streaming.store import InMemoryStore
from flashcache_sglang.streaming.types import Chunk, ChunkRecord, Frame
from flashcache_sglang.streaming.workers import (
    InMemoryPlacement,
    MultiWorkerMemoryBackend,
    RedisPlacement,
    WorkerSettings,
    parse_worker_urls,
    rendezvous_order,
)
from flashcache_sglang.testing.server import free_port

from .conftest import make_video

TOKENS_PER_VIDEO = 10
HEADER_TOKENS = 20
CAP = 40
FAST = WorkerSettings(health_every_s=0.1, health_timeout_s=1.0, fail_after=1, conflict_wait_s=5.0)


class FakeWorker:
    """A flashcache SGLang server reduced to its stream protocol (streaming.sglang_backend):
    ``append`` with ``start`` opens a memory, later appends need it (404 otherwise), ``ask``
    answers after it (streamed; 404 as an abort event), ``/close_session`` forgets it. A memory
    keeps at most ``cap_tokens`` visual tokens, the oldest non-sink ones dropped first.
    ``kill()`` closes the port (connections are refused), ``start()`` opens it again, empty."""

    def __init__(self, port: int | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.memories: dict[str, dict] = {}
        self.requests: list[dict] = []
        self.closed: list[str] = []
        self.conflicts = 0  # answer this many appends with 409 first
        self.server = None
        self.start()

    def start(self) -> None:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                self._send(200 if self.path == "/ping" else 404, b"")

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path == "/close_session":
                    stream_id = body["session_id"].split(":", 1)[1]
                    fake.closed.append(stream_id)
                    fake.memories.pop(stream_id, None)
                    return self._send(200, b"{}")
                fake.requests.append(body)
                knob = body["sampling_params"]["custom_params"]["flashcache"]["stream"]
                if knob["op"] == "append":
                    if fake.conflicts:
                        fake.conflicts -= 1
                        return self._send(409, b'{"error": "another append of this stream is in flight"}')
                    status, meta = fake.append(knob, body)
                    if status != 200:
                        return self._send(status, json.dumps({"error": {"message": "no memory"}}).encode())
                    return self._send(200, json.dumps({"text": ".", "meta_info": meta}).encode())
                memory = fake.memories.get(knob["id"])
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()
                if memory is None:
                    event = {"text": "", "meta_info": {"finish_reason": {"type": "abort", "status_code": 404,
                                                                         "message": "unknown stream"}}}
                else:
                    meta = {"prompt_tokens": memory["memory_tokens"] + 5, "cached_tokens": memory["memory_tokens"],
                            "flashcache": [{"stream": {"id": knob["id"], "op": "ask", "version": memory["version"]}}]}
                    event = {"text": f"answer from {fake.port}", "meta_info": meta}
                self.wfile.write(f"data: {json.dumps(event)}\n\ndata: [DONE]\n\n".encode())

            def _send(self, status, payload):
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def append(self, knob: dict, body: dict) -> tuple[int, dict]:
        stream_id = knob["id"]
        if knob.get("start"):
            memory = {"chunks": {}, "sink": knob["chunk"], "version": 0, "memory_tokens": HEADER_TOKENS}
            self.memories[stream_id] = memory
        elif stream_id not in self.memories:
            return 404, {}
        memory = self.memories[stream_id]
        before = memory["memory_tokens"]
        memory["chunks"][knob["chunk"]] = TOKENS_PER_VIDEO * len(body["video_data"])
        # The cap counts visual tokens: drop from the oldest non-sink chunk first.
        while sum(memory["chunks"].values()) > knob["cap_tokens"]:
            oldest = min(index for index, kept in memory["chunks"].items() if index != memory["sink"] and kept > 0)
            memory["chunks"][oldest] -= min(memory["chunks"][oldest], sum(memory["chunks"].values()) - knob["cap_tokens"])
        memory["version"] += 1
        visual = sum(memory["chunks"].values())
        memory["memory_tokens"] = HEADER_TOKENS + visual
        stream = {"id": stream_id, "op": "append", "version": memory["version"], "memory_tokens": memory["memory_tokens"],
                  "memory_kv_slots": memory["memory_tokens"], "capped_kv_slots": visual, "cap_tokens": knob["cap_tokens"],
                  "next_position": memory["memory_tokens"], "chunks_held": sum(1 for v in memory["chunks"].values() if v),
                  "footprint": {str(k): v for k, v in memory["chunks"].items() if v}}
        new = TOKENS_PER_VIDEO * len(body["video_data"])
        return 200, {"prompt_tokens": (0 if knob.get("start") else before) + new + (HEADER_TOKENS if knob.get("start") else 0),
                     "cached_tokens": 0 if knob.get("start") else before,
                     "flashcache": [{"kept_tokens": new, "candidate_tokens": new, "stream": stream}]}

    def appends(self, stream_id: str) -> list[dict]:
        return [r["sampling_params"]["custom_params"]["flashcache"]["stream"] for r in self.requests
                if r["sampling_params"]["custom_params"]["flashcache"]["stream"]["id"] == stream_id
                and r["sampling_params"]["custom_params"]["flashcache"]["stream"]["op"] == "append"]

    def kill(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None
        self.memories.clear()


@pytest.fixture
def workers():
    pair = [FakeWorker(), FakeWorker()]
    yield pair
    for worker in pair:
        worker.kill()


def make_chunk(index: int, frames: int = 4) -> Chunk:
    rng = np.random.default_rng(index)
    return Chunk(index, tuple(Frame(rng.integers(0, 255, (56, 56, 3), dtype=np.uint8), index * frames + k * 0.5)
                              for k in range(frames)), outlier_energy=0.1)


def make_backend(workers, tmp_path, placement=None, **kwargs) -> MultiWorkerMemoryBackend:
    kwargs.setdefault("rebuild_chunks", 2)
    return MultiWorkerMemoryBackend([w.url for w in workers], str(tmp_path / "chunks"), placement=placement,
                                    workers=FAST, max_answer_tokens=8, video_transport="path", **kwargs)


BUDGET = BudgetSettings(kv_cap_tokens=CAP, base_retention=0.5)


# ----------------------------------------------------------------------------- small pieces


def test_worker_urls_repeat_or_comma_separated():
    assert parse_worker_urls(["http://a:1,http://b:2/", "https://c:3/sglang"]) == ["http://a:1", "http://b:2",
                                                                                 "https://c:3/sglang"]
    for bad, message in [([], "no SGLang worker"), (["a:1"], "must look like"), (["http:///x"], "must look like"),
                         (["http://a:1", "http://a:1/"], "more than once")]:
        with pytest.raises(ValueError, match=message):
            parse_worker_urls(bad)
    for bad in [dict(health_every_s=0), dict(fail_after=0), dict(conflict_wait_s=-1), dict(health_path="ping")]:
        with pytest.raises(ValueError, match=next(iter(bad))):
            WorkerSettings(**bad)


def test_rendezvous_order_is_stable_and_minimal():
    workers = [f"http://w{i}:1" for i in range(5)]
    orders = {f"s{i}": rendezvous_order(f"s{i}", workers) for i in range(200)}
    assert all(sorted(order) == workers for order in orders.values())
    assert len({order[0] for order in orders.values()}) == 5  # every worker comes first for some stream
    for stream, order in orders.items():  # removing a worker keeps the others' order
        assert rendezvous_order(stream, workers[1:]) == [w for w in order if w != workers[0]]


@pytest.fixture(params=["memory", "redis"])
def placement_factory(request):
    if request.param == "memory":
        shared = InMemoryPlacement()
        return lambda: shared
    redis_url = request.getfixturevalue("redis_url")
    namespace = request.getfixturevalue("namespace")
    return lambda: RedisPlacement(redis_url, namespace)


def test_placement_balances_by_cap_and_keeps_streams(placement_factory):
    workers = ["http://a:1", "http://b:1"]
    replicas = [placement_factory(), placement_factory()]  # two service replicas: one shared view
    placed = {}
    for i in range(8):
        stream = f"st_{i}"
        placed[stream], previous = replicas[i % 2].place(stream, rendezvous_order(stream, workers), 64)
        assert previous is None
    assert sorted(replicas[0].loads().values()) == [4 * 64, 4 * 64]
    assert all(replicas[1].get(s) == w for s, w in placed.items())
    # A stream keeps its worker while that worker is among the candidates, whatever the loads.
    for stream, worker in placed.items():
        assert replicas[1].place(stream, workers, 64) == (worker, None)
    # One heavy stream counts as much as several light ones.
    heavy = replicas[0].place("heavy", ["http://a:1", "http://b:1"], 4 * 64)[0]
    light = [replicas[1].place(f"light_{i}", ["http://a:1", "http://b:1"], 64)[0] for i in range(4)]
    assert light == [w for w in workers if w != heavy] * 4
    # A worker leaves the candidates (down): its streams move to the others, the rest stay.
    moved = {s: replicas[0].place(s, ["http://b:1"], 64) for s, w in placed.items() if w == "http://a:1"}
    assert moved and all(result == ("http://b:1", "http://a:1") for result in moved.values())
    replicas[1].remove("heavy")
    assert replicas[0].get("heavy") is None


def test_redis_placement_is_atomic_across_replicas(redis_url, namespace):
    """Sixteen streams placed at once from sixteen threads (each its own client): the script
    reads the loads and records the choice in one step, so the split is exactly even."""
    workers = ["http://a:1", "http://b:1"]
    barrier = threading.Barrier(16)
    results = {}

    def place(i):
        placement = RedisPlacement(redis_url, namespace)
        barrier.wait()
        results[i] = placement.place(f"st_{i}", workers, 40)[0]

    threads = [threading.Thread(target=place, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sorted(RedisPlacement(redis_url, namespace).loads().values()) == [8 * 40, 8 * 40], results


# ----------------------------------------------------------------------------- failover


def test_dead_worker_streams_move_and_rebuild(workers, tmp_path):
    backend = make_backend(workers, tmp_path)
    streams = [f"st_{i}" for i in range(4)]
    try:
        for stream in streams:
            backend.open(stream, BUDGET)
        homes = {s: backend.worker_of(s) for s in streams}
        assert sorted(homes.values()) == sorted([workers[0].url, workers[1].url] * 2)
        for index in range(4):
            for stream in streams:
                receipt = backend.append_chunk(stream, make_chunk(index))
                assert receipt.memory.kept_tokens <= CAP
        for worker in workers:
            assert set(worker.memories) == {s for s in streams if homes[s] == worker.url}
        dead, survivor = workers
        lost = [s for s in streams if homes[s] == dead.url]
        dead.kill()
        for stream in streams:
            receipt = backend.append_chunk(stream, make_chunk(4))
            assert receipt.memory.kept_tokens <= CAP and receipt.memory.num_chunks == 5
            assert backend.worker_of(stream) == survivor.url
        assert set(survivor.memories) == set(streams)
        for stream in lost:
            # Rebuilt from the kept files: the sink (start), the rebuild set, then the new chunk
            # (after a first try of the new chunk that got 404, when the health check had already
            # moved the stream before the append reached the dead worker).
            chunks = [a["chunk"] for a in survivor.appends(stream)]
            assert chunks[-4:] == [0, 2, 3, 4] and chunks[:-4] in ([], [4]), chunks
            assert survivor.appends(stream)[-4]["start"] is True
            assert backend._state(stream).rebuilds == 1
            assert survivor.memories[stream]["memory_tokens"] - HEADER_TOKENS <= CAP
        for stream in set(streams) - set(lost):
            assert backend._state(stream).rebuilds == 0 and survivor.appends(stream)[-1]["chunk"] == 4
        for stream in streams:
            answer = backend.ask(stream, "what now?", [])
            assert answer.text == f"answer from {survivor.port}"
        # The dead worker comes back (empty): streams stay where they are; it gets a close
        # for each stream that left it, in case it had only been unreachable.
        dead.start()
        deadline = time.monotonic() + 10
        while set(dead.closed) != set(lost) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert set(dead.closed) == set(lost)
        assert all(backend.worker_of(s) == survivor.url for s in streams)
        # A new stream goes to the emptier worker.
        backend.open("st_new", BUDGET)
        assert backend.worker_of("st_new") == dead.url
        for stream in streams + ["st_new"]:
            backend.release(stream)
        assert survivor.memories == {} and backend.placement.loads() == {}
    finally:
        backend.close()


def test_a_question_finds_the_dead_worker_first(workers, tmp_path):
    backend = make_backend(workers, tmp_path)
    try:
        backend.open("st_q", BUDGET)
        for index in range(3):
            backend.append_chunk("st_q", make_chunk(index))
        home = next(w for w in workers if w.url == backend.worker_of("st_q"))
        other = next(w for w in workers if w is not home)
        backend.pool.close()  # no health thread: the question itself must notice
        home.kill()
        answer = backend.ask("st_q", "still there?", [])
        assert answer.text == f"answer from {other.port}" and backend._state("st_q").rebuilds == 1
        assert [a["chunk"] for a in other.appends("st_q")] == [0, 1, 2]
        assert backend.worker_of("st_q") == other.url
    finally:
        backend.close()


def test_first_append_is_resent_and_no_worker_is_an_error(workers, tmp_path):
    backend = make_backend(workers, tmp_path)
    try:
        backend.pool.close()
        backend.open("st_a", BUDGET)
        home = next(w for w in workers if w.url == backend.worker_of("st_a"))
        home.kill()
        backend.append_chunk("st_a", make_chunk(0))  # the start append simply goes to the other worker
        assert backend._state("st_a").rebuilds == 0 and backend.worker_of("st_a") != home.url
        for worker in workers:
            worker.kill()
        with pytest.raises(MemoryBackendError, match="no SGLang worker is up"):
            backend.append_chunk("st_a", make_chunk(1))
    finally:
        backend.close()


def test_an_append_in_flight_elsewhere_is_waited_for(workers, tmp_path):
    backend = make_backend(workers, tmp_path)
    try:
        backend.open("st_c", BUDGET)
        home = next(w for w in workers if w.url == backend.worker_of("st_c"))
        home.conflicts = 3
        backend.append_chunk("st_c", make_chunk(0))
        assert home.conflicts == 0 and len(home.appends("st_c")) == 4
    finally:
        backend.close()


def test_two_replicas_send_a_stream_to_one_worker(workers, tmp_path, redis_url, namespace):
    """Replica a ingests; replica b answers questions from the same worker's memory, and after
    a's worker died b follows the move a made, without rebuilding anything itself."""
    a = make_backend(workers, tmp_path, placement=RedisPlacement(redis_url, namespace))
    b = make_backend(workers, tmp_path, placement=RedisPlacement(redis_url, namespace))
    try:
        a.open("st_r", BUDGET)
        receipts = [a.append_chunk("st_r", make_chunk(i)) for i in range(3)]
        records = [ChunkRecord(index=i, start_s=0.0, end_s=1.0, num_frames=4, logical_tokens=r.logical_tokens,
                               kept_tokens=r.kept_tokens, retention=r.retention, outlier_energy=0.1, ingested_at=0.0,
                               artifact=r.artifact) for i, r in enumerate(receipts)]
        b.open("st_r", BUDGET, restore=records)
        home = next(w for w in workers if w.url == a.worker_of("st_r"))
        other = next(w for w in workers if w is not home)
        assert b.worker_of("st_r") == home.url
        assert b.ask("st_r", "q", []).text == f"answer from {home.port}"
        home.kill()
        a.append_chunk("st_r", make_chunk(3))  # a moves it and rebuilds it on the other worker
        assert b.ask("st_r", "q", []).text == f"answer from {other.port}"
        assert a._state("st_r").rebuilds == 1 and b._state("st_r").rebuilds == 0
    finally:
        a.close()
        b.close()


# ----------------------------------------------------------------------------- the service


def test_chunk_files_stay_bounded_over_a_long_stream(workers, tmp_path):
    """A 60-chunk stream through StreamManager: after every chunk, only the sink and the
    rebuild set keep files (the service rotates the rest away), a worker death in the middle is
    survived from exactly those files, and the folder count never grows past 1 + rebuild_chunks."""
    video = make_video(tmp_path / "long.mp4", 60, size="64x48", rate=4)
    rebuild_chunks = 4
    counts = []

    class Counting(MultiWorkerMemoryBackend):
        def append_chunk(self, stream_id, chunk):
            folder = os.path.join(self.chunk_dir, stream_id)
            counts.append(len(os.listdir(folder)) if os.path.isdir(folder) else 0)
            if chunk.index == 30:
                next(w for w in workers if w.url == self.worker_of(stream_id)).kill()
            return super().append_chunk(stream_id, chunk)

    backend = Counting([w.url for w in workers], str(tmp_path / "chunks"), workers=FAST, rebuild_chunks=rebuild_chunks,
                       video_transport="path")
    try:
        manager = StreamManager(InMemoryStore(), backend)
        config = StreamConfig(sampling=SamplingSettings(fps=2.0, max_pixels=56 * 56),
                              chunking=ChunkSettings(frames=2), budget=BUDGET)
        stream_id, token = manager.start_stream(str(video), config)
        assert manager.wait(stream_id, 240)
        record = manager.store.get_stream(stream_id)
        assert record.status == "finished", record.error
        assert record.chunks_ingested >= 55 and backend._state(stream_id).rebuilds == 1
        assert max(counts) <= 1 + rebuild_chunks, counts
        kept = sorted(os.listdir(os.path.join(backend.chunk_dir, stream_id)))
        assert len(kept) == len(backend.needed_artifacts(stream_id)) <= 1 + rebuild_chunks
        assert "chunk_00000000" in kept  # the sink
        assert 0 < record.artifact_bytes
        assert manager.ask(stream_id, token, "and at the end?").text.startswith("answer from")
    finally:
        backend.close()


def test_cli_builds_the_backend_from_the_worker_flags(workers, tmp_path):
    parser = build_parser()
    one = parser.parse_args(["run", "x.mp4", "--sglang-url", workers[0].url, "--chunk-dir", str(tmp_path)])
    assert type(build_backend(one)) is SGLangMemoryBackend
    args = parser.parse_args(["run", "x.mp4", "--sglang-url", f"{workers[0].url},{workers[1].url}", "--chunk-dir",
                              str(tmp_path), "--rebuild-chunks", "3", "--worker-health-every", "0.5",
                              "--worker-fail-after", "4"])
    args.redis_url = None
    backend = build_backend(args)
    try:
        assert isinstance(backend, MultiWorkerMemoryBackend) and isinstance(backend.placement, InMemoryPlacement)
        assert backend.pool.urls == [workers[0].url, workers[1].url] and backend.rebuild_chunks == 3
        assert (backend.settings.health_every_s, backend.settings.fail_after) == (0.5, 4)
        assert [w["up"] for w in backend.workers()] == [True, True]
    finally:
        backend.close()
