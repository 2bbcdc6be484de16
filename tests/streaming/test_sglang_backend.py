"""SGLangMemoryBackend against a fake SGLang /generate endpoint (the real server is the lead's
fixture; these tests pin down the requests the backend sends)."""

import base64
import json
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


class FakeSGLang:
    """Counts tokens as characters/4 + TOKENS_PER_VIDEO per video; cached = longest prefix seen."""

    def __init__(self):
        self.requests = []
        self.seen = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append(body)
                key = (body["text"], tuple(body["video_data"]))
                prompt_tokens = len(body["text"]) // 4 + TOKENS_PER_VIDEO * len(body["video_data"])
                cached = max((fake.common(key, seen) for seen in fake.seen), default=0)
                fake.seen.append(key)
                retention = body["sampling_params"].get("custom_params", {}).get("flashcache", {}).get("retention", 1.0)
                meta = {"prompt_tokens": prompt_tokens, "cached_tokens": cached,
                        "flashcache": {"kept_tokens": round(TOKENS_PER_VIDEO * retention)}}
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

    @staticmethod
    def common(key, seen):
        videos = 0
        for a, b in zip(key[1], seen[1]):
            if a != b:
                break
            videos += 1
        chars = 0
        for a, b in zip(key[0], seen[0]):
            if a != b:
                break
            chars += 1
        return chars // 4 + TOKENS_PER_VIDEO * videos

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
    config = StreamConfig(sampling=SamplingSettings(fps=4.0, max_pixels=112 * 112), budget=BudgetSettings(kv_cap_tokens=60))
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
        assert request["text"] == template.memory_prompt(k + 1)
        assert len(request["video_data"]) == k + 1
        assert request["video_data"][:k] == ingests[k - 1]["video_data"] if k else True
        params = request["sampling_params"]
        assert params["max_new_tokens"] == 1
        knob = params["custom_params"]["flashcache"]
        assert 0.05 <= knob["retention"] <= 1.0 and knob["memory_cap_tokens"] == 60 and knob["keep_sink"] is True
    chunks = manager.store.chunks(stream_id)
    # Logical tokens are the growth of the server's prompt count: video + its wrapper text.
    wrapper = len(PromptTemplate().video) // 4
    assert all(abs(c.logical_tokens - TOKENS_PER_VIDEO - wrapper) <= 1 for c in chunks[1:])
    assert all(c.artifact.endswith(".mp4") for c in chunks)
    reader = decord.VideoReader(chunks[0].artifact)
    assert len(reader) == 4 and reader[0].shape == (84, 112, 3)  # 320x240 at most 112*112 pixels, multiples of 28
    assert ingests[0]["video_data"][0] == "data:video/mp4;base64," + base64.b64encode(open(chunks[0].artifact, "rb").read()).decode()


def test_questions_branch_off_the_memory(fake_server, videos, tmp_path):
    manager, stream_id, token = run_stream(fake_server, videos, tmp_path, transport="path")
    memory_prompt = fake_server.requests[-1]["text"]
    first = manager.ask(stream_id, token, "What moves?", conversation_id="alice")
    assert first.text == "A ball moves." and first.backend == "sglang"
    assert first.cached_tokens >= TOKENS_PER_VIDEO * 6, "the memory prefix came from the cache"
    ask = fake_server.requests[-1]
    assert ask["text"].startswith(memory_prompt) and ask["text"].endswith("What moves?<|im_end|>\n<|im_start|>assistant\n")
    assert ask["stream"] is True and "custom_params" not in ask["sampling_params"]
    manager.ask(stream_id, token, "Which colour?", conversation_id="alice")
    second = fake_server.requests[-1]["text"]
    assert "What moves?" in second and "A ball moves." in second and second.startswith(memory_prompt)
    manager.ask(stream_id, token, "Other?", conversation_id="bob")
    assert "What moves?" not in fake_server.requests[-1]["text"]


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
    assert max(len(r["video_data"]) for r in fake_server.requests) <= 5
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
    backend._streams["st_x"].prompt_chunks.append(type("C", (), {"index": 0, "path": str(videos["short"])})())
    with pytest.raises(MemoryBackendError):
        backend.ask("st_x", "q", [])
