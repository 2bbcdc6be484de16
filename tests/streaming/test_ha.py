"""Acceptance on loopback with real processes: Redis, a GStreamer RTSP camera and two
``flashcache-stream serve`` replicas (in-process memory backend) sharing one Redis.

The commands are the README's deployment commands: ``keys create`` into Redis and into an
``--api-keys`` file, then ``serve`` with the source policy, lease and limit flags.
"""

import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import requests

from flashcache_sglang.testing.server import free_port

from .conftest import RtspServer, _gst_available

CLI = [sys.executable, "-m", "flashcache_sglang.streaming.cli"]
LEASE_TTL_S = 3.0


class Replica:
    def __init__(self, name: str, port: int, command: list[str], log: Path):
        self.name, self.port, self.url = name, port, f"http://127.0.0.1:{port}"
        self.log = log
        with open(log, "w") as handle:
            self.process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while True:
            try:
                if requests.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"replica {name} did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.1)

    def get(self, path, credential=None, **kwargs):
        return requests.get(self.url + path, headers=_auth(credential), timeout=30, **kwargs)

    def post(self, path, credential=None, headers=None, **kwargs):
        return requests.post(self.url + path, headers={**_auth(credential), **(headers or {})}, timeout=30, **kwargs)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)  # a crash: no lease release, no cleanup
            self.process.wait(10)


def _auth(credential):
    return {"Authorization": f"Bearer {credential}"} if credential else {}


def _create_key(*args) -> str:
    out = subprocess.run(CLI + ["keys", "create", *args], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.startswith("fck_"), out.stderr
    return out.stdout.strip()


@pytest.fixture(scope="module")
def deployment(redis_url, tmp_path_factory):
    reason = _gst_available()
    if reason:
        pytest.skip(reason)
    folder = tmp_path_factory.mktemp("ha")
    namespace = "ha-" + uuid.uuid4().hex[:12]  # the Redis may outlive this session
    camera = RtspServer(free_port())
    camera.start()
    keys = {
        "acme": _create_key("--tenant", "acme", "--redis-url", redis_url, "--namespace", namespace),
        "globex": _create_key("--tenant", "globex", "--redis-url", redis_url, "--namespace", namespace),
        "initech": _create_key("--tenant", "initech", "--file", str(folder / "keys.jsonl")),
    }
    replicas = []
    try:
        for name in ("replica-a", "replica-b"):
            port = free_port()
            command = CLI + [
                "serve", "--port", str(port), "--redis-url", redis_url, "--namespace", namespace,
                "--replica-id", name, "--api-keys", str(folder / "keys.jsonl"),
                "--allow-host", "*", "--allow-host", f"127.0.0.1:{camera.port}",
                "--lease-ttl", str(LEASE_TTL_S), "--takeover-scan", "0.5", "--max-body-bytes", "16KiB",
                "--log-level", "info",
            ]
            replicas.append(Replica(name, port, command, folder / f"{name}.log"))
        yield {"camera": camera, "keys": keys, "a": replicas[0], "b": replicas[1]}
    finally:
        for replica in replicas:
            replica.kill()
        camera.stop()


def _wait(predicate, timeout_s, what):
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


LIVE = {"fps": 4, "chunk_frames": 4, "max_pixels": 112 * 140, "budget": {"kv_cap_tokens": 60}}


def test_acceptance_refusals(deployment):
    a, b, keys, camera = deployment["a"], deployment["b"], deployment["keys"], deployment["camera"]
    for replica in (a, b):
        for response in (replica.post("/streams", json={"source": camera.url}), replica.get("/streams")):
            assert response.status_code == 401 and response.headers["www-authenticate"].startswith("Bearer"), response.text
    created = a.post("/streams", keys["acme"], json={"source": camera.url, **LIVE})
    assert created.status_code == 201, created.text
    stream_id = created.json()["stream_id"]
    assert b.get("/streams", keys["globex"]).json() == [] and b.get("/streams", keys["initech"]).json() == []
    assert [s["stream_id"] for s in b.get("/streams", keys["acme"]).json()] == [stream_id]
    for path in ("", "/chunks", "/memory"):
        response = b.get(f"/streams/{stream_id}{path}", keys["globex"])
        assert response.status_code == 404 and stream_id not in response.text and camera.url not in response.text
    assert b.post(f"/streams/{stream_id}/stop", keys["globex"]).status_code == 404
    refused = {
        "/etc/passwd": "media_root",
        "file:///etc/hostname": "media_root",
        f"{b.url}/healthz": "address",  # another loopback port: the service itself
        f"rtsp://127.0.0.1:{camera.port + 1 if camera.port < 65535 else 1}/test": "address",
        "ftp://example.com/v.mp4": "scheme",
    }
    for source, rule in refused.items():
        response = b.post("/streams", keys["acme"], json={"source": source})
        assert response.status_code == 400 and f"rule '{rule}'" in response.json()["detail"], (source, response.text)
    response = b.post("/streams", keys["acme"], data=b"{" + b" " * 20000 + b"}", headers={"Content-Type": "application/json"})
    assert response.status_code == 413
    assert requests.delete(f"{b.url}/streams/{stream_id}", headers=_auth(keys["acme"]), timeout=30).status_code == 200
    assert a.get(f"/streams/{stream_id}", keys["acme"]).status_code == 404


def test_killing_the_owner_of_a_live_stream(deployment):
    a, b, key, camera = deployment["a"], deployment["b"], deployment["keys"]["acme"], deployment["camera"]
    created = a.post("/streams", key, json={"source": camera.url, **LIVE})
    assert created.status_code == 201, created.text
    stream_id, token = created.json()["stream_id"], created.json()["token"]

    def info(replica):
        return replica.get(f"/streams/{stream_id}", key).json()

    _wait(lambda: info(a)["chunks_ingested"] >= 3, 30, "3 chunks on replica-a")
    assert info(b)["owner"] == "replica-a"
    for replica in (a, b):  # questions work through either replica
        answer = replica.post(f"/streams/{stream_id}/ask", token, json={"question": "what is on screen?"})
        assert answer.status_code == 200 and answer.json()["memory_chunks"] >= 3, answer.text

    a.kill()
    killed_at = time.monotonic()
    written_before = info(b)["chunks_ingested"]
    _wait(lambda: info(b)["owner"] == "replica-b", 20, "replica-b to take the stream over")
    owned_after_s = time.monotonic() - killed_at
    _wait(lambda: info(b)["chunks_ingested"] > written_before, 20, "replica-b to write the next chunk")
    resumed_after_s = time.monotonic() - killed_at
    print(f"\nreplica-a killed: replica-b owned the stream after {owned_after_s:.1f} s and wrote the next chunk "
          f"after {resumed_after_s:.1f} s (lease TTL {LEASE_TTL_S} s, takeover scan 0.5 s, chunks of 1 s)")
    assert resumed_after_s < 10, f"takeover took {resumed_after_s:.1f} s"

    _wait(lambda: info(b)["chunks_ingested"] >= written_before + 3, 30, "3 more chunks on replica-b")
    answer = b.post(f"/streams/{stream_id}/ask", token, json={"question": "and now?"})
    assert answer.status_code == 200 and answer.json()["memory_chunks"] >= written_before + 3, answer.text
    assert b.post(f"/streams/{stream_id}/stop", token).status_code == 200
    chunks = b.get(f"/streams/{stream_id}/chunks", token).json()
    assert [c["index"] for c in chunks] == list(range(len(chunks))), "chunk indices contiguous, no duplicates"
    assert all(c["end_s"] < n["start_s"] for c, n in zip(chunks, chunks[1:])), "stream time keeps moving forward"
    final = info(b)
    assert final["status"] == "stopped" and final["chunks_ingested"] == len(chunks) and final["owner"] is None
