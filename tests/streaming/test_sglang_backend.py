"""SGLangMemoryBackend against a fake SGLang /generate endpoint that follows the server's
flashcache contract (tests/streaming/test_sglang_e2e.py runs the real server; these tests pin
down the requests the backend sends and how it reads the answers)."""

import base64
import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import decord
import pytest

from flashcache_sglang.streaming.budget import BudgetSettings
from flashcache_sglang.streaming.memory import MemoryBackendError
from flashcache_sglang.streaming.service import StreamConfig, StreamManager
from flashcache_sglang.streaming.sglang_backend import PromptTemplate, SGLangMemoryBackend
from flashcache_sglang.streaming.sources import SamplingSettings
from flashcache_sglang.streaming.store import InMemoryStore

TOKENS_PER_VIDEO = 42
VIDEOS_PER_CHUNK = 2  # 4-frame chunks cut into 2-frame videos
CAP = 60


class FakeSGLang:
    """A stand-in for a flashcache SGLang server.

    Text costs characters/4 tokens, each video TOKENS_PER_VIDEO visual tokens. Per namespace it
    remembers the kept visual tokens of each video of the longest prompt seen; a request reuses
    (cached_tokens) the common prefix within its own namespace only, keeps ``retention`` of each
    new video, and with ``memory_cap_tokens`` drops kept tokens from the oldest non-sink videos
    until the visual KV fits, as the real server does in place in its radix tree.
    """

    def __init__(self):
        self.requests = []
        self.responses = []
        self.memory = {}  # namespace -> (text, videos, kept visual tokens per video)
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append(body)
                meta = fake.answer(body)
                fake.responses.append(meta)
                if body.get("stream"):
                    self.send_response(200)
                    self.send_header("Content-Type", "text/event-stream")
                    self.end_headers()
                    for text in ["A ball", "A ball moves."]:
                        self.wfile.write(f"data: {json.dumps({'text': text, 'meta_info': meta})}\n\n".encode())
                    self.wfile.write(b"data: [DONE]\n\n")
                else:
                    payload = json.dumps({"text": ".", "meta_info": meta}).encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def answer(self, body):
        text, videos = body["text"], list(body["video_data"])
        knob = body["sampling_params"].get("custom_params", {}).get("flashcache", {})
        namespace = knob.get("namespace", "default")
        seen_text, seen_videos, seen_kept = self.memory.get(namespace, ("", [], []))
        common_videos = 0
        for a, b in zip(videos, seen_videos):
            if a != b:
                break
            common_videos += 1
        common_chars = 0
        for a, b in zip(text, seen_text):
            if a != b:
                break
            common_chars += 1
        kept = list(seen_kept[:common_videos])
        new = len(videos) - common_videos
        kept += [round(TOKENS_PER_VIDEO * knob.get("retention", 1.0))] * new
        cap = knob.get("memory_cap_tokens")
        first = knob.get("sink_items", 1) if knob.get("keep_sink", True) else 0
        for i in range(first, len(kept)):
            if cap is None or sum(kept) <= cap:
                break
            kept[i] = max(0, kept[i] - (sum(kept) - cap))
        if len(videos) >= len(seen_videos):
            self.memory[namespace] = (text, videos, kept)
        text_tokens = len(text) // 4
        visual = TOKENS_PER_VIDEO * len(videos)
        meta = {
            "prompt_tokens": text_tokens + visual,
            "video_tokens": visual,
            "cached_tokens": common_chars // 4 + TOKENS_PER_VIDEO * common_videos,
        }
        if new:
            meta["flashcache"] = [{
                "prompt_tokens": text_tokens + visual,
                "prompt_kv_slots": text_tokens + sum(kept),
                "candidate_tokens": TOKENS_PER_VIDEO * new,
                "kept_tokens": sum(kept[common_videos:]),
            }]
        return meta

    def close(self):
        self.server.shutdown()


@pytest.fixture
def fake_server():
    server = FakeSGLang()
    yield server
    server.close()


def run_stream(fake_server, videos, tmp_path, transport="data_url"):
    backend = SGLangMemoryBackend(fake_server.url, str(tmp_path / "chunks"), fps=4.0, video_transport=transport)
    manager = StreamManager(InMemoryStore(), backend)
    config = StreamConfig(sampling=SamplingSettings(fps=4.0, max_pixels=112 * 112), budget=BudgetSettings(kv_cap_tokens=CAP))
    stream_id, token = manager.start_stream(str(videos["short"]), config)
    assert manager.wait(stream_id, 60)
    record = manager.store.get_stream(stream_id)
    assert record.status == "finished", record.error
    return manager, stream_id, token


def test_ingest_requests_grow_one_prefix(fake_server, videos, tmp_path):
    manager, stream_id, token = run_stream(fake_server, videos, tmp_path)
    ingests = fake_server.requests
    assert len(ingests) == 6
    template = PromptTemplate()
    for k, request in enumerate(ingests):
        videos = VIDEOS_PER_CHUNK * (k + 1)
        assert request["text"] == template.memory_prompt(videos)
        assert len(request["video_data"]) == videos
        assert request["video_data"][: videos - VIDEOS_PER_CHUNK] == ingests[k - 1]["video_data"] if k else True
        params = request["sampling_params"]
        assert params["max_new_tokens"] == 1
        knob = params["custom_params"]["flashcache"]
        assert knob["namespace"] == f"stream/{stream_id}"
        assert 0.05 <= knob["retention"] <= 1.0 and knob["memory_cap_tokens"] == CAP and knob["keep_sink"] is True
    chunks = manager.store.chunks(stream_id)
    # Logical tokens are the growth of the server's prompt count: videos + their wrapper text.
    visual = VIDEOS_PER_CHUNK * TOKENS_PER_VIDEO
    wrapper = VIDEOS_PER_CHUNK * len(PromptTemplate().video) // 4
    assert all(abs(c.logical_tokens - visual - wrapper) <= 1 for c in chunks[1:])
    # A chunk keeps what the server kept of its visual tokens, plus its wrappers.
    for chunk, meta in zip(chunks[1:], fake_server.responses[1:]):
        assert chunk.kept_tokens == meta["flashcache"][0]["kept_tokens"] + chunk.logical_tokens - visual
    parts = [sorted(os.listdir(c.artifact)) for c in chunks]
    assert all(p == ["part_000.mp4", "part_001.mp4"] for p in parts)
    first = os.path.join(chunks[0].artifact, "part_000.mp4")
    reader = decord.VideoReader(first)
    assert len(reader) == 2 and reader[0].shape == (84, 112, 3)  # 320x240 at most 112*112 pixels, multiples of 28
    assert ingests[0]["video_data"][0] == "data:video/mp4;base64," + base64.b64encode(open(first, "rb").read()).decode()


def test_memory_numbers_are_the_servers(fake_server, videos, tmp_path):
    manager, stream_id, token = run_stream(fake_server, videos, tmp_path)
    record = manager.store.get_stream(stream_id)
    last = fake_server.responses[-1]
    assert record.kept_tokens == last["flashcache"][0]["prompt_kv_slots"]
    assert record.logical_tokens == last["prompt_tokens"]
    # The fake enforces the cap on visual tokens; the memory holds the text besides.
    assert record.kept_tokens - (last["prompt_tokens"] - last["video_tokens"]) <= CAP
    series = [(c.memory_logical_tokens, c.memory_kept_tokens) for c in manager.store.chunks(stream_id)]
    assert series == [(m["prompt_tokens"], m["flashcache"][0]["prompt_kv_slots"]) for m in fake_server.responses]
    report = manager.backend.last_ingest(stream_id)
    assert report.visual_kv_slots <= CAP and report.prompt_kv_slots == record.kept_tokens


def test_questions_branch_off_the_memory(fake_server, videos, tmp_path):
    manager, stream_id, token = run_stream(fake_server, videos, tmp_path, transport="path")
    memory_prompt = fake_server.requests[-1]["text"]
    first = manager.ask(stream_id, token, "What moves?", conversation_id="alice")
    assert first.text == "A ball moves." and first.backend == "sglang"
    assert first.cached_tokens >= TOKENS_PER_VIDEO * 6, "the memory prefix came from the cache"
    ask = fake_server.requests[-1]
    assert ask["text"].startswith(memory_prompt) and ask["text"].endswith("What moves?<|im_end|>\n<|im_start|>assistant\n")
    knob = ask["sampling_params"]["custom_params"]["flashcache"]
    assert ask["stream"] is True and knob["namespace"] == f"stream/{stream_id}"
    # A question that has to recompute an evicted memory holds it to the stream's cap, as an ingest would.
    ingest_knob = fake_server.requests[-2]["sampling_params"]["custom_params"]["flashcache"]
    assert knob["memory_cap_tokens"] == CAP and knob["keep_sink"] is True
    assert knob["sink_items"] == ingest_knob["sink_items"]
    manager.ask(stream_id, token, "Which colour?", conversation_id="alice")
    second = fake_server.requests[-1]["text"]
    assert "What moves?" in second and "A ball moves." in second and second.startswith(memory_prompt)
    manager.ask(stream_id, token, "Other?", conversation_id="bob")
    assert "What moves?" not in fake_server.requests[-1]["text"]


def test_streams_do_not_share_prefixes(fake_server, videos, tmp_path):
    backend = SGLangMemoryBackend(fake_server.url, str(tmp_path / "chunks"), fps=4.0)
    manager = StreamManager(InMemoryStore(), backend)
    config = StreamConfig(sampling=SamplingSettings(fps=4.0, max_pixels=112 * 112))
    ids = [manager.start_stream(str(videos["short"]), config)[0] for _ in range(2)]
    for stream_id in ids:
        assert manager.wait(stream_id, 60)
    namespaces = {r["sampling_params"]["custom_params"]["flashcache"]["namespace"] for r in fake_server.requests}
    assert namespaces == {f"stream/{i}" for i in ids}


def test_restore_rebuilds_the_prefix(fake_server, videos, tmp_path):
    manager, stream_id, token = run_stream(fake_server, videos, tmp_path)
    fresh = SGLangMemoryBackend(fake_server.url, str(tmp_path / "chunks"), fps=4.0)
    fresh.open(stream_id, BudgetSettings(kv_cap_tokens=60), restore=manager.store.chunks(stream_id))
    fresh.ask(stream_id, "again?", [])
    assert fake_server.requests[-1]["video_data"] == fake_server.requests[5]["video_data"]


def test_prompt_window_rebases(fake_server, videos, tmp_path):
    backend = SGLangMemoryBackend(fake_server.url, str(tmp_path / "chunks"), fps=4.0, max_prompt_chunks=4)
    manager = StreamManager(InMemoryStore(), backend)
    config = StreamConfig(sampling=SamplingSettings(fps=4.0, max_pixels=112 * 112))
    stream_id, _ = manager.start_stream(str(videos["short"]), config)
    assert manager.wait(stream_id, 60)
    assert max(len(r["video_data"]) for r in fake_server.requests) <= 5 * VIDEOS_PER_CHUNK
    assert fake_server.requests[-1]["video_data"][0] == fake_server.requests[0]["video_data"][0], "the sink stays"


def test_unreachable_server_is_a_backend_error(videos, tmp_path):
    from flashcache_sglang.testing.server import free_port

    backend = SGLangMemoryBackend(f"http://127.0.0.1:{free_port()}", str(tmp_path), timeout_s=2)
    manager = StreamManager(InMemoryStore(), backend)
    stream_id, _ = manager.start_stream(str(videos["short"]))
    assert manager.wait(stream_id, 30)
    record = manager.store.get_stream(stream_id)
    assert record.status == "failed" and "unreachable" in record.error
    backend.open("st_x", BudgetSettings())
    backend._streams["st_x"].prompt_chunks.append(type("C", (), {"index": 0, "paths": (str(videos["short"]),)})())
    with pytest.raises(MemoryBackendError):
        backend.ask("st_x", "q", [])


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
