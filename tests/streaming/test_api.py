"""The HTTP API (auth, tenants, source policy, limits) and the CLI."""

import os
import subprocess
import sys
import time

import pytest
from fastapi.testclient import TestClient

from flashcache_sglang.streaming.api import create_app
from flashcache_sglang.streaming.auth import new_api_key
from flashcache_sglang.streaming.limits import Limits
from flashcache_sglang.streaming.memory import IN_PROCESS_LABEL, InProcessMemoryBackend
from flashcache_sglang.streaming.service import StreamManager
from flashcache_sglang.streaming.source_policy import SourcePolicy
from flashcache_sglang.streaming.store import InMemoryStore
from flashcache_sglang.testing.server import free_port


class Api:
    """A TestClient over a manager whose media root is the test videos' folder, two tenants."""

    def __init__(self, videos, limits=Limits()):
        self.store = InMemoryStore()
        self.manager = StreamManager(self.store, InProcessMemoryBackend(), limits=limits,
                                     source_policy=SourcePolicy(media_root=str(videos["short"].parent)))
        self.keys = {}
        for tenant in ("acme", "globex"):
            key, record = new_api_key(tenant)
            self.store.add_api_key(record)
            self.keys[tenant] = key
        self.client = TestClient(create_app(self.manager))

    def start(self, source, tenant="acme", **body):
        return self.client.post("/streams", json={"source": str(source), **body}, headers=auth(self.keys[tenant]))


@pytest.fixture
def api(videos):
    api = Api(videos)
    with api.client:
        yield api
    api.manager.shutdown()


def auth(credential):
    return {"Authorization": f"Bearer {credential}"}


def wait_status(client, stream_id, credential, status, timeout_s=30):
    deadline = time.monotonic() + timeout_s
    while (info := client.get(f"/streams/{stream_id}", headers=auth(credential)).json())["status"] != status:
        assert time.monotonic() < deadline, info
        time.sleep(0.05)
    return info


def test_start_inspect_ask_stop(api, videos):
    client, key = api.client, api.keys["acme"]
    response = api.start(videos["short"].name, fps=4, budget={"kv_cap_tokens": 80})  # relative to the media root
    assert response.status_code == 201, response.text
    stream_id, token = response.json()["stream_id"], response.json()["token"]
    info = wait_status(client, stream_id, token, "finished")
    assert info["chunks_ingested"] == 6 and info["kept_tokens"] <= 80 and "owner_token_hash" not in info
    assert info["tenant"] == "acme" and "owner" not in info  # the replica is the operator's business
    assert [s["stream_id"] for s in client.get("/streams", headers=auth(key)).json()] == [stream_id]
    assert len(client.get(f"/streams/{stream_id}/chunks?start=2", headers=auth(token)).json()) == 4
    answer = client.post(f"/streams/{stream_id}/ask", json={"question": "what?", "conversation_id": "c1"}, headers=auth(token))
    assert answer.status_code == 200 and answer.json()["text"].startswith(IN_PROCESS_LABEL)
    turns = client.get(f"/streams/{stream_id}/conversations/c1", headers=auth(token)).json()
    assert [t["question"] for t in turns] == ["what?"]
    # The owning tenant's operator key works on the stream too.
    assert client.get(f"/streams/{stream_id}", headers=auth(key)).json()["owner"] is None  # finished: nobody ingests it
    assert client.post(f"/streams/{stream_id}/ask", json={"question": "op?"}, headers=auth(key)).status_code == 200
    assert client.post(f"/streams/{stream_id}/stop", headers=auth(key)).status_code == 200
    assert client.delete(f"/streams/{stream_id}", headers=auth(token)).status_code == 200
    assert client.get(f"/streams/{stream_id}", headers=auth(token)).status_code == 404
    assert client.get("/streams", headers=auth(key)).json() == []


def test_missing_and_wrong_credentials(api, videos):
    client = api.client
    stream_id, token = api.start(videos["long"], fps=1).json().values()
    for method, path in [("post", "/streams"), ("get", "/streams"), ("get", f"/streams/{stream_id}"),
                         ("post", f"/streams/{stream_id}/ask"), ("delete", f"/streams/{stream_id}")]:
        response = getattr(client, method)(path, **({"json": {"source": "x", "question": "q"}} if method == "post" else {}))
        assert response.status_code == 401, (path, response.text)
        assert response.headers["www-authenticate"].startswith("Bearer") and "Authorization: Bearer" in response.json()["detail"]
    assert client.get("/streams", headers={"Authorization": f"Basic {token}"}).status_code == 401
    # A key that is malformed, unknown or has a wrong secret: 403, and the key is not echoed.
    prefix, key_id, _secret = api.keys["acme"].split("_", 2)
    for bad in ["fck_nothex_" + "a" * 43, f"{prefix}_{key_id}_" + "b" * 43, "fck_0123456789ab_" + "c" * 43]:
        response = client.get("/streams", headers=auth(bad))
        assert response.status_code == 403 and bad not in response.text, response.text
    # A stream token cannot create or list.
    response = client.get("/streams", headers=auth(token))
    assert response.status_code == 403 and "operator API key" in response.json()["detail"]
    # A wrong stream token and an unknown stream answer alike (no existence oracle).
    wrong = client.get(f"/streams/{stream_id}", headers=auth("fst_wrong"))
    unknown = client.get("/streams/st_nope", headers=auth(token))
    assert wrong.status_code == unknown.status_code == 404 and wrong.json() == unknown.json()
    assert client.post(f"/streams/{stream_id}/stop", headers=auth(token)).status_code == 200


def test_tenants_see_only_their_streams(api, videos):
    client, acme, globex = api.client, api.keys["acme"], api.keys["globex"]
    stream_id, token = api.start(videos["long"], fps=1).json().values()
    other_id, _ = api.start(videos["short"], tenant="globex").json().values()
    assert [s["stream_id"] for s in client.get("/streams", headers=auth(acme)).json()] == [stream_id]
    assert [s["stream_id"] for s in client.get("/streams", headers=auth(globex)).json()] == [other_id]
    unknown = client.get("/streams/st_nope", headers=auth(globex)).json()
    for method, path in [("get", ""), ("get", "/chunks"), ("get", "/memory"), ("post", "/ask"),
                         ("get", "/conversations/default"), ("post", "/stop"), ("delete", "")]:
        kwargs = {"json": {"question": "leak?"}} if path == "/ask" else {}
        response = getattr(client, method)(f"/streams/{stream_id}{path}", headers=auth(globex), **kwargs)
        assert response.status_code == 404 and response.json() == unknown, (path, response.text)
        assert stream_id not in response.text and "long.mp4" not in response.text
    assert client.get(f"/streams/{stream_id}", headers=auth(token)).json()["status"] in ("starting", "running", "finished")
    assert client.delete(f"/streams/{stream_id}", headers=auth(acme)).status_code == 200


def test_source_policy_refusals(api, videos, tmp_path):
    client = api.client
    outside = tmp_path / "outside.mp4"
    outside.write_bytes(videos["short"].read_bytes())
    link = videos["short"].parent / "escape.mp4"
    link.symlink_to(outside)
    try:
        cases = {
            "/etc/passwd": "media_root",
            "file:///etc/hostname": "media_root",
            "../../../../etc/passwd": "media_root",
            str(outside): "media_root",
            link.name: "media_root",  # a symlink inside the root pointing out of it
            "ftp://example.com/x.mp4": "scheme",
            f"http://127.0.0.1:{free_port()}/flush_cache": "address",
            "http://169.254.169.254/latest/meta-data/": "address",
            "rtsp://[::1]:8554/cam": "address",
            "http://2130706433/x": "address",  # 127.0.0.1 written as a number
            "file://otherhost/etc/passwd": "url",
        }
        for source, rule in cases.items():
            response = api.start(source)
            assert response.status_code == 400, (source, response.text)
            assert f"rule '{rule}'" in response.json()["detail"], (source, response.text)
        # Outside the root, an existing and a missing file answer the same.
        existing, missing = api.start("/etc/hostname").json(), api.start("/etc/no-such-file").json()
        assert existing["detail"].replace("hostname", "X") == missing["detail"].replace("no-such-file", "X")
        # Inside the root a missing file says so.
        response = api.start("no-such.mp4")
        assert response.status_code == 400 and "does not exist" in response.json()["detail"]
        assert client.get("/streams", headers=auth(api.keys["acme"])).json() == []
    finally:
        link.unlink()


def test_limits(videos):
    api = Api(videos, Limits(max_streams_per_tenant=2, max_body_bytes=2048, ask_rate_per_s=1.0, ask_burst=2))
    with api.client as client:
        key = api.keys["acme"]
        big = {"source": "x" * 5000}
        response = client.post("/streams", json=big, headers=auth(key))
        assert response.status_code == 413 and "2048" in response.json()["detail"]

        def chunked():  # no Content-Length: counted while reading
            for _ in range(10):
                yield b"x" * 500

        response = client.post("/streams", content=chunked(), headers={**auth(key), "Content-Type": "application/json"})
        assert response.status_code == 413
        first, token = api.start(videos["short"], fps=4).json().values()
        assert api.start(videos["short"]).status_code == 201
        response = api.start(videos["short"])
        assert response.status_code == 409 and "limit is 2" in response.json()["detail"]
        assert api.start(videos["short"], tenant="globex").status_code == 201  # per tenant
        codes = [client.post(f"/streams/{first}/ask", json={"question": "q"}, headers=auth(token)) for _ in range(3)]
        assert [c.status_code for c in codes] == [200, 200, 429]
        assert int(codes[2].headers["retry-after"]) >= 1 and "questions per second" in codes[2].json()["detail"]
        time.sleep(1.05)
        assert client.post(f"/streams/{first}/ask", json={"question": "q"}, headers=auth(token)).status_code == 200
    api.manager.shutdown()


def test_api_refuses_the_local_user_policy():
    manager = StreamManager(InMemoryStore(), InProcessMemoryBackend())
    with pytest.raises(ValueError, match="operator source policy"):
        create_app(manager)


def test_stream_errors_surface_in_status(api, videos):
    stream_id, token = api.start(videos["corrupt"]).json().values()
    info = wait_status(api.client, stream_id, token, "failed", timeout_s=10)
    assert "cannot decode video file" in info["error"]
    response = api.start(videos["short"], budget={"cap": 1})
    assert response.status_code == 400 and "cap" in response.json()["detail"]
    assert api.start(videos["short"], fps=-1).status_code == 400


def cli(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "flashcache_sglang.streaming.cli", *args], capture_output=True, text=True, timeout=120,
        env=env,
    )


def test_cli_run(videos):
    out = cli("run", str(videos["short"]), "--fps", "4", "--kv-cap", "60", "--ask", "what happened?")
    assert out.returncode == 0, out.stderr
    assert "A: " + IN_PROCESS_LABEL in out.stdout and "chunks 6" in out.stderr


def test_cli_run_applies_policy_flags(videos, tmp_path):
    out = cli("run", str(videos["short"]), "--media-root", str(tmp_path))
    assert out.returncode == 2 and "rule 'media_root'" in out.stderr
    out = cli("run", str(videos["short"]), "--fps", "4", "--media-root", str(videos["short"].parent))
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("source, message", [("/no/such.mp4", "does not exist"), ("CORRUPT", "cannot decode")])
def test_cli_errors(videos, source, message):
    out = cli("run", str(videos["corrupt"]) if source == "CORRUPT" else source)
    assert out.returncode != 0 and message in out.stderr


def test_cli_unreachable_redis(videos):
    out = cli("run", str(videos["short"]), "--redis-url", f"redis://127.0.0.1:{free_port()}/0")
    assert out.returncode == 2 and "cannot reach Redis" in out.stderr


def test_cli_keys_file(tmp_path):
    path = tmp_path / "keys.jsonl"
    created = cli("keys", "create", "--tenant", "acme", "--label", "ops", "--file", str(path))
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip()
    assert key.startswith("fck_") and key not in path.read_text() and key.split("_", 2)[2] not in path.read_text()
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"
    key_id = key.split("_")[1]
    listed = cli("keys", "list", "--file", str(path))
    assert key_id in listed.stdout and "tenant=acme" in listed.stdout and key not in listed.stdout
    assert cli("keys", "revoke", key_id, "--file", str(path)).returncode == 0
    assert key_id not in cli("keys", "list", "--file", str(path)).stdout
    assert cli("keys", "revoke", key_id, "--file", str(path)).returncode == 1


def test_cli_keys_in_redis(redis_url, namespace):
    from flashcache_sglang.streaming.auth import Authenticator
    from flashcache_sglang.streaming.store import RedisStore

    created = cli("keys", "create", "--tenant", "acme", "--redis-url", redis_url, "--namespace", namespace)
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip()
    store = RedisStore(redis_url, namespace=namespace)
    assert Authenticator(store).authenticate(key).tenant == "acme"
    assert key.split("_", 2)[2] not in str(store._redis.hgetall(f"{namespace}:apikeys"))
    assert cli("keys", "revoke", key.split("_")[1], "--redis-url", redis_url, "--namespace", namespace).returncode == 0
    assert store.list_api_keys() == []
