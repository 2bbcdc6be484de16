"""The HTTP API and the CLI."""

import subprocess
import sys
import time

import pytest
from fastapi.testclient import TestClient

from flashcache_sglang.streaming.api import create_app
from flashcache_sglang.streaming.memory import IN_PROCESS_LABEL, InProcessMemoryBackend
from flashcache_sglang.streaming.service import StreamManager
from flashcache_sglang.streaming.store import InMemoryStore


@pytest.fixture
def client():
    manager = StreamManager(InMemoryStore(), InProcessMemoryBackend())
    with TestClient(create_app(manager)) as test_client:
        yield test_client
    manager.shutdown()


def auth(token):
    return {"Authorization": f"Bearer {token}"}


def test_start_inspect_ask_stop(client, videos):
    response = client.post("/streams", json={"source": str(videos["short"]), "fps": 4, "budget": {"kv_cap_tokens": 80}})
    assert response.status_code == 201, response.text
    stream_id, token = response.json()["stream_id"], response.json()["token"]
    deadline = time.monotonic() + 30
    while client.get(f"/streams/{stream_id}", headers=auth(token)).json()["status"] != "finished":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    info = client.get(f"/streams/{stream_id}", headers=auth(token)).json()
    assert info["chunks_ingested"] == 6 and info["kept_tokens"] <= 80 and "owner_token_hash" not in info
    assert [s["stream_id"] for s in client.get("/streams").json()] == [stream_id]
    assert len(client.get(f"/streams/{stream_id}/chunks?start=2", headers=auth(token)).json()) == 4
    answer = client.post(f"/streams/{stream_id}/ask", json={"question": "what?", "conversation_id": "c1"}, headers=auth(token))
    assert answer.status_code == 200 and answer.json()["text"].startswith(IN_PROCESS_LABEL)
    turns = client.get(f"/streams/{stream_id}/conversations/c1", headers=auth(token)).json()
    assert [t["question"] for t in turns] == ["what?"]
    assert client.post(f"/streams/{stream_id}/stop", headers=auth(token)).status_code == 200
    assert client.delete(f"/streams/{stream_id}", headers=auth(token)).status_code == 200
    assert client.get(f"/streams/{stream_id}", headers=auth(token)).status_code == 404


def test_errors(client, videos):
    assert client.post("/streams", json={"source": "/no/such.mp4"}).status_code == 400
    assert client.post("/streams", json={"source": "ftp://h/x"}).status_code == 400
    assert client.post("/streams", json={"source": str(videos["short"]), "budget": {"cap": 1}}).status_code == 400
    assert client.post("/streams", json={"source": str(videos["short"]), "fps": -1}).status_code == 400
    created = client.post("/streams", json={"source": str(videos["corrupt"])}).json()
    stream_id, token = created["stream_id"], created["token"]
    assert client.get(f"/streams/{stream_id}").status_code == 403
    assert client.get(f"/streams/{stream_id}", headers=auth("wrong")).status_code == 403
    assert client.post(f"/streams/{stream_id}/ask", json={"question": "q"}, headers=auth("wrong")).status_code == 403
    assert client.get("/streams/st_nope", headers=auth(token)).status_code == 404
    assert client.post("/streams/st_nope/ask", json={"question": "q"}, headers=auth(token)).status_code == 404
    deadline = time.monotonic() + 10
    while (info := client.get(f"/streams/{stream_id}", headers=auth(token)).json())["status"] != "failed":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert "cannot decode video file" in info["error"]


def cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "flashcache_sglang.streaming.cli", *args], capture_output=True, text=True, timeout=120
    )


def test_cli_run(videos):
    out = cli("run", str(videos["short"]), "--fps", "4", "--kv-cap", "60", "--ask", "what happened?")
    assert out.returncode == 0, out.stderr
    assert "A: " + IN_PROCESS_LABEL in out.stdout and "chunks 6" in out.stderr


@pytest.mark.parametrize("source, message", [("/no/such.mp4", "does not exist"), ("CORRUPT", "cannot decode")])
def test_cli_errors(videos, source, message):
    out = cli("run", str(videos["corrupt"]) if source == "CORRUPT" else source)
    assert out.returncode != 0 and message in out.stderr


def test_cli_unreachable_redis(videos):
    from flashcache_sglang.testing.server import free_port

    out = cli("run", str(videos["short"]), "--redis-url", f"redis://127.0.0.1:{free_port()}/0")
    assert out.returncode == 2 and "cannot reach Redis" in out.stderr
