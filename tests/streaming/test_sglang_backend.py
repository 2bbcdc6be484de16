"""SGLangMemoryBackend against a fake SGLang server that follows the stream-memory contract
(flashcache_sglang.stream_memory; tests/streaming/test_sglang_e2e.py runs the real server; these
tests pin down the requests the backend sends and how it reads the answers, including 404s)."""

import base64
import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import decord
import pytest

from flashcache_sglang.streaming.budget import BudgetSettings
from flashcache_sglang.streaming.service import StreamConfig, StreamManager
from flashcache_sglang.streaming.sglang_backend import PromptTemplate, SGLangMemoryBackend
from flashcache_sglang.streaming.sources import SamplingSettings
from flashcache_sglang.streaming.store import InMemoryStore

TOKENS_PER_VIDEO = 42
VIDEOS_PER_CHUNK = 2  # 4-frame chunks cut into 2-frame videos
CAP = 60


class FakeSGLang:
    """A stand-in for a flashcache SGLang server holding stream memories.

    Text costs characters/4 tokens, each video TOKENS_PER_VIDEO visual tokens. Per stream id it
    keeps a memory: header tokens, sink tokens and kept candidate tokens per chunk; an append
    keeps ``retention`` of its chunk's visual tokens and then drops from the oldest non-sink
    chunks (never below one token each) until the cap holds; a question is answered after the
    memory. Unknown streams answer 404 (a streamed answer: an abort event), /close_session
    forgets a stream, and ``lose()`` forgets everything (a server restart).
    """

    def __init__(self):
        self.requests = []
        self.responses = []
        self.closed = []
        self.memory = {}  # stream id -> {"fixed": int, "chunks": {index: kept}, "version": int}
        self.busy = 0  # answer this many of the next non-start appends "retryable" (no slots to copy into)
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path == "/close_session":
                    fake.closed.append(body["session_id"])
                    fake.memory.pop(body["session_id"].split(":", 1)[1], None)
                    self.send_response(200)
                    self.end_headers()
                    return
                fake.requests.append(body)
                status, meta = fake.answer(body)
                fake.responses.append(meta)
                if body.get("stream"):
                    self.send_response(200)
                    self.send_header("Content-Type", "text/event-stream")
                    self.end_headers()
                    for text in (["A ball", "A ball moves."] if status == 200 else ["x"]):
                        self.wfile.write(f"data: {json.dumps({'text': text, 'meta_info': meta})}\n\n".encode())
                    self.wfile.write(b"data: [DONE]\n\n")
                else:
                    payload = json.dumps({"text": ".", "meta_info": meta} if status == 200
                                         else {"object": "error", "message": meta["error"], "code": status}).encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def lose(self):
        self.memory.clear()

    def answer(self, body):
        stream = body["sampling_params"]["custom_params"]["flashcache"]["stream"]
        text_tokens = len(body["text"]) // 4
        visual = TOKENS_PER_VIDEO * len(body.get("video_data", []))
        memory = self.memory.get(stream["id"])
        if stream["op"] == "append" and stream.get("start"):
            memory = self.memory[stream["id"]] = {"fixed": 0, "chunks": {}, "version": 0}
        elif memory is None:
            message = f"unknown stream memory {stream['id']!r}"
            return 404, {"error": message, "finish_reason": {"type": "abort", "status_code": 404, "message": message},
                         "prompt_tokens": 1, "cached_tokens": 0}
        before = memory["fixed"] + sum(memory["chunks"].values())
        meta = {"prompt_tokens": before + text_tokens + visual, "cached_tokens": before}
        if stream["op"] == "append" and not stream.get("start") and self.busy:
            self.busy -= 1
            meta["flashcache"] = [{"stream": {"id": stream["id"], "op": "append", "version": memory["version"],
                                              "retryable": True, "error": "no free KV slots to copy the memory into"}}]
            return 200, meta
        if stream["op"] == "ask":
            meta["flashcache"] = [{"settings": {"stream_op": "ask"}}]
            return 200, meta
        memory["fixed"] += text_tokens
        if stream.get("start"):
            memory["fixed"] += visual  # the sink is never dropped
            kept = 0
        else:
            kept = round(TOKENS_PER_VIDEO * len(body["video_data"]) * stream["retention"])
            memory["chunks"][stream["chunk"]] = kept
            cap = stream["cap_tokens"]
            for index in sorted(memory["chunks"]):
                excess = sum(memory["chunks"].values()) - cap
                if excess <= 0:
                    break
                memory["chunks"][index] = max(1, memory["chunks"][index] - excess)
        memory["version"] += 1
        capped = sum(memory["chunks"].values())
        total = memory["fixed"] + capped
        meta["flashcache"] = [{"candidate_tokens": 0 if stream.get("start") else visual, "kept_tokens": kept,
                               "stream": {"id": stream["id"], "op": "append", "version": memory["version"],
                                          "memory_tokens": total, "memory_kv_slots": total, "capped_kv_slots": capped,
                                          "cap_tokens": stream["cap_tokens"], "next_position": total,
                                          "footprint": {str(k): v for k, v in memory["chunks"].items()}}}]
        return 200, meta

    def close(self):
        self.server.shutdown()


@pytest.fixture
def fake_server():
    server = FakeSGLang()
    yield server
    server.close()


def run_stream(fake_server, videos, tmp_path, transport="data_url", **backend_kwargs):
    backend = SGLangMemoryBackend(fake_server.url, str(tmp_path / "chunks"), fps=4.0, video_transport=transport,
                                  **backend_kwargs)
    manager = StreamManager(InMemoryStore(), backend)
    config = StreamConfig(sampling=SamplingSettings(fps=4.0, max_pixels=112 * 112), budget=BudgetSettings(kv_cap_tokens=CAP))
    stream_id, token = manager.start_stream(str(videos["short"]), config)
    assert manager.wait(stream_id, 60)
    record = manager.store.get_stream(stream_id)
    assert record.status == "finished", record.error
    return manager, stream_id, token


def test_appends_carry_only_their_chunk(fake_server, videos, tmp_path):
    manager, stream_id, token = run_stream(fake_server, videos, tmp_path)
    appends = fake_server.requests
    assert len(appends) == 6
    template = PromptTemplate()
    header = template.header.format(system=template.system)
    for k, request in enumerate(appends):
        assert request["text"] == (header if k == 0 else "") + template.video * VIDEOS_PER_CHUNK
        assert len(request["video_data"]) == VIDEOS_PER_CHUNK  # never an earlier chunk's video
        params = request["sampling_params"]
        assert params["max_new_tokens"] == 1
        stream = params["custom_params"]["flashcache"]["stream"]
        assert stream["id"] == stream_id and stream["op"] == "append" and stream["chunk"] == k
        assert stream.get("start", False) is (k == 0) and stream["cap_tokens"] == CAP
        assert 0.05 <= stream["retention"] <= 1.0 and stream["report_footprint"] is True
    chunks = manager.store.chunks(stream_id)
    # Logical tokens: what the chunk added to the prompt (videos + their wrapper text).
    visual = VIDEOS_PER_CHUNK * TOKENS_PER_VIDEO
    wrapper = len(template.video * VIDEOS_PER_CHUNK) // 4
    assert all(c.logical_tokens == visual + wrapper for c in chunks[1:])
    parts = [sorted(os.listdir(c.artifact)) for c in chunks if os.path.isdir(c.artifact)]
    assert parts and all(p == ["part_000.mp4", "part_001.mp4"] for p in parts)
    first = os.path.join(chunks[0].artifact, "part_000.mp4")
    reader = decord.VideoReader(first)
    assert len(reader) == 2 and reader[0].shape == (84, 112, 3)  # 320x240 at most 112*112 pixels, multiples of 28
    assert appends[0]["video_data"][0] == "data:video/mp4;base64," + base64.b64encode(open(first, "rb").read()).decode()


def test_memory_numbers_are_the_servers(fake_server, videos, tmp_path):
    manager, stream_id, token = run_stream(fake_server, videos, tmp_path)
    record = manager.store.get_stream(stream_id)
    last = fake_server.responses[-1]["flashcache"][0]["stream"]
    assert record.kept_tokens == last["capped_kv_slots"] <= CAP == record.cap_tokens
    series = [c.memory_kept_tokens for c in manager.store.chunks(stream_id)]
    assert series == [m["flashcache"][0]["stream"]["capped_kv_slots"] for m in fake_server.responses]
    usage = manager.backend.memory_tokens(stream_id)
    assert usage.total_kv_slots == last["memory_tokens"] and usage.kept_tokens == last["capped_kv_slots"]
    assert manager.backend.last_report(stream_id)["version"] == 6


def test_questions_carry_only_their_text(fake_server, videos, tmp_path):
    manager, stream_id, token = run_stream(fake_server, videos, tmp_path, transport="path")
    first = manager.ask(stream_id, token, "What moves?", conversation_id="alice")
    assert first.text == "A ball moves." and first.backend == "sglang"
    assert first.cached_tokens == fake_server.responses[-2]["flashcache"][0]["stream"]["memory_tokens"]
    ask = fake_server.requests[-1]
    assert ask["text"] == "\nWhat moves?<|im_end|>\n<|im_start|>assistant\n" and "video_data" not in ask
    assert ask["stream"] is True
    assert ask["sampling_params"]["custom_params"]["flashcache"] == {"stream": {"id": stream_id, "op": "ask"}}
    manager.ask(stream_id, token, "Which colour?", conversation_id="alice")
    second = fake_server.requests[-1]["text"]
    assert second.startswith("\nWhat moves?") and "A ball moves." in second and "Which colour?" in second
    manager.ask(stream_id, token, "Other?", conversation_id="bob")
    assert "What moves?" not in fake_server.requests[-1]["text"]


def test_a_lost_memory_is_rebuilt_from_the_kept_chunks(fake_server, videos, tmp_path):
    manager, stream_id, token = run_stream(fake_server, videos, tmp_path, rebuild_chunks=2)
    backend = manager.backend
    needed = backend.needed_artifacts(stream_id)
    assert 0 in needed and len(needed) == 3
    fake_server.lose()  # a restarted server
    before = len(fake_server.requests)
    answer = manager.ask(stream_id, token, "Still there?")
    assert answer.text == "A ball moves."
    rebuild = fake_server.requests[before + 1:-1]  # after the 404, before the retried question
    streams = [r["sampling_params"]["custom_params"]["flashcache"]["stream"] for r in rebuild]
    assert [s["chunk"] for s in streams] == sorted(needed) and streams[0]["start"] is True
    assert all(len(r["video_data"]) == VIDEOS_PER_CHUNK for r in rebuild)
    assert backend._state(stream_id).rebuilds == 1


def test_a_restarted_service_reuses_the_servers_memory(fake_server, videos, tmp_path):
    manager, stream_id, token = run_stream(fake_server, videos, tmp_path)
    fresh = SGLangMemoryBackend(fake_server.url, str(tmp_path / "chunks"), fps=4.0)
    fresh.open(stream_id, BudgetSettings(kv_cap_tokens=CAP), restore=manager.store.chunks(stream_id))
    before = len(fake_server.requests)
    fresh.ask(stream_id, "again?", [])
    assert len(fake_server.requests) == before + 1  # no rebuild: the server still holds the memory
    assert fresh.memory_tokens(stream_id).kept_tokens == manager.store.get_stream(stream_id).kept_tokens


def test_streams_have_their_own_memories_and_close_them(fake_server, videos, tmp_path):
    backend = SGLangMemoryBackend(fake_server.url, str(tmp_path / "chunks"), fps=4.0)
    manager = StreamManager(InMemoryStore(), backend)
    config = StreamConfig(sampling=SamplingSettings(fps=4.0, max_pixels=112 * 112))
    started = [manager.start_stream(str(videos["short"]), config) for _ in range(2)]
    for stream_id, _ in started:
        assert manager.wait(stream_id, 60)
    ids = {r["sampling_params"]["custom_params"]["flashcache"]["stream"]["id"] for r in fake_server.requests}
    assert ids == {stream_id for stream_id, _ in started}
    manager.delete_stream(*started[0])
    assert fake_server.closed == ["flashcache-stream:" + started[0][0]]


def test_unreachable_server_is_a_backend_error(videos, tmp_path):
    from flashcache_sglang.testing.server import free_port

    backend = SGLangMemoryBackend(f"http://127.0.0.1:{free_port()}", str(tmp_path), timeout_s=2)
    manager = StreamManager(InMemoryStore(), backend)
    stream_id, _ = manager.start_stream(str(videos["short"]))
    assert manager.wait(stream_id, 30)
    record = manager.store.get_stream(stream_id)
    assert record.status == "failed" and "unreachable" in record.error


def test_odd_chunks_are_padded_to_whole_temporal_patches(fake_server, videos, tmp_path):
    import numpy as np

    from flashcache_sglang.streaming.sglang_backend import chunk_videos
    from flashcache_sglang.streaming.types import Chunk, Frame

    frames = tuple(Frame(np.full((28, 28, 3), i, np.uint8), i * 0.5) for i in range(5))
    cut = chunk_videos(Chunk(0, frames, 0.1), 2)
    assert [[f.timestamp_s for f in v] for v in cut] == [[0.0, 0.5], [1.0, 1.5], [2.0, 2.0]]
    assert [len(v) for v in chunk_videos(Chunk(0, frames[:1], 0.1), None)] == [2]
    with pytest.raises(ValueError, match="frames_per_video"):
        SGLangMemoryBackend(fake_server.url, str(tmp_path), frames_per_video=3)


def test_a_busy_server_append_is_retried_and_lands_once(fake_server, videos, tmp_path, monkeypatch):
    from flashcache_sglang.streaming import sglang_backend

    monkeypatch.setattr(sglang_backend, "APPEND_RETRY_BACKOFF_S", 0.01)
    fake_server.busy = 3
    manager, stream_id, _ = run_stream(fake_server, videos, tmp_path)
    chunks = [r["sampling_params"]["custom_params"]["flashcache"]["stream"].get("chunk") for r in fake_server.requests]
    assert chunks == [0, 1, 1, 1, 1, 2, 3, 4, 5]  # chunk 1 sent until the server took it, then the rest once
    assert fake_server.memory[stream_id]["version"] == 6
    assert [c.index for c in manager.store.chunks(stream_id)] == list(range(6))


def test_an_append_the_server_keeps_refusing_fails_the_stream_with_its_reason(fake_server, videos, tmp_path,
                                                                            monkeypatch):
    from flashcache_sglang.streaming import sglang_backend

    monkeypatch.setattr(sglang_backend, "APPEND_RETRY_BACKOFF_S", 0.01)
    fake_server.busy = 1000
    backend = SGLangMemoryBackend(fake_server.url, str(tmp_path / "chunks"), fps=4.0)
    manager = StreamManager(InMemoryStore(), backend)
    config = StreamConfig(sampling=SamplingSettings(fps=4.0, max_pixels=112 * 112), budget=BudgetSettings(kv_cap_tokens=CAP))
    stream_id, _ = manager.start_stream(str(videos["short"]), config)
    assert manager.wait(stream_id, 60)
    record = manager.store.get_stream(stream_id)
    assert record.status == "failed" and "could not append chunk 1" in record.error
    assert "no free KV slots" in record.error
    assert len(fake_server.requests) == 1 + sglang_backend.APPEND_RETRIES + 1
