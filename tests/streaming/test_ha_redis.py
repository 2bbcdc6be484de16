"""The store against Redis servers started here: password and ACL auth, TLS (certificates made
with openssl, client certificates required) and Sentinel failover (a master, a replica and a
sentinel; the master is killed and the store continues on the promoted replica).

Each server is a ``redis-server`` process on a free loopback port, stopped by its pid.
Debian's redis-server 7.0 is built with TLS and runs as a sentinel with ``--sentinel``.
"""

import shutil
import subprocess
import time
from pathlib import Path

import pytest

from flashcache_sglang.streaming.store import RedisStore, StoreUnavailable, StreamRecord, hash_token
from flashcache_sglang.streaming.types import ChunkRecord
from flashcache_sglang.testing.server import free_port

REDIS = shutil.which("redis-server")
pytestmark = pytest.mark.skipif(REDIS is None, reason="redis-server is not installed (apt-get install redis-server)")


class RedisProcess:
    def __init__(self, folder: Path, name: str, args: list[str], port: int, ping: list[str] = ()):
        self.port = port
        self.log = folder / f"{name}.log"
        with open(self.log, "w") as handle:
            self.process = subprocess.Popen([REDIS, *args], stdout=handle, stderr=subprocess.STDOUT, cwd=folder)
        deadline = time.monotonic() + 20
        while subprocess.run(["redis-cli", "-p", str(port), *ping, "ping"], capture_output=True, text=True).stdout.strip() != "PONG":
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not start: {self.log.read_text()[-2000:]}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


def base_args(port: int) -> list[str]:
    return ["--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]


def record(stream_id: str) -> StreamRecord:
    return StreamRecord(stream_id=stream_id, source="rtsp://cam/x", owner_token_hash=hash_token("t"), status="running",
                        created_at=time.time())


def chunk(index: int) -> ChunkRecord:
    return ChunkRecord(index, index, index + 0.5, 4, 10, 5, 0.5, 0.1, time.time())


@pytest.fixture
def servers(tmp_path):
    started = []

    def start(name, args, port, ping=()):
        started.append(RedisProcess(tmp_path, name, args, port, ping))
        return started[-1]

    yield start
    for server in started:
        server.stop()


def test_password_and_acl_user(servers):
    port = free_port()
    servers("auth", base_args(port) + ["--requirepass", "s3cret-pw", "--user", "ingest", "on", ">user-pw", "~*", "&*", "+@all"], port,
            ["-a", "s3cret-pw", "--no-auth-warning"])
    for url in [f"redis://:s3cret-pw@127.0.0.1:{port}/0", f"redis://ingest:user-pw@127.0.0.1:{port}/0"]:
        store = RedisStore(url, namespace="auth")
        store.create_stream(record("st_" + url.split("@")[0][-4:]))
        assert len(store.list_streams()) >= 1
    for url, message in [(f"redis://:wrong-pw@127.0.0.1:{port}/0", "refused the credentials"),
                         (f"redis://127.0.0.1:{port}/0", "refused")]:
        with pytest.raises(StoreUnavailable, match=message) as caught:
            RedisStore(url, namespace="auth", socket_timeout_s=1)
        assert "wrong-pw" not in str(caught.value) and "s3cret" not in str(caught.value)


def _openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_certificates(folder: Path) -> None:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, all signed by the CA."""
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "1", "-subj", "/CN=flashcache-test-ca", cwd=folder)
    (folder / "server.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    for name in ("server", "client"):
        _openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=folder)
        extra = ["-extfile", "server.ext"] if name == "server" else []
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.crt", "-days", "1", *extra, cwd=folder)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
def test_tls_with_client_certificates(servers, tmp_path):
    make_certificates(tmp_path)
    port = free_port()
    c = {name: str(tmp_path / name) for name in ("ca.crt", "server.crt", "server.key", "client.crt", "client.key")}
    args = ["--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--tls-cert-file", c["server.crt"], "--tls-key-file", c["server.key"], "--tls-ca-cert-file", c["ca.crt"],
            "--tls-auth-clients", "yes", "--requirepass", "tls-pw"]
    servers("tls", args, port, ["--tls", "--cacert", c["ca.crt"], "--cert", c["client.crt"], "--key", c["client.key"],
                                "-a", "tls-pw", "--no-auth-warning"])
    good = (f"rediss://:tls-pw@127.0.0.1:{port}/0?ssl_ca_certs={c['ca.crt']}"
            f"&ssl_certfile={c['client.crt']}&ssl_keyfile={c['client.key']}")
    store = RedisStore(good, namespace="tls")
    store.create_stream(record("st_tls"))
    lease = store.acquire_lease("st_tls", "replica-a", 30)
    assert store.add_chunk("st_tls", chunk(0), lease.fence) and store.get_stream("st_tls").last_chunk_index == 0
    refused = {
        "no CA (the test CA is not trusted)": f"rediss://:tls-pw@127.0.0.1:{port}/0",
        "no client certificate": f"rediss://:tls-pw@127.0.0.1:{port}/0?ssl_ca_certs={c['ca.crt']}",
        "plain TCP to the TLS port": f"redis://:tls-pw@127.0.0.1:{port}/0",
    }
    for case, url in refused.items():
        with pytest.raises(StoreUnavailable) as caught:
            RedisStore(url, namespace="tls", socket_timeout_s=1, retries=1)
        assert "tls-pw" not in str(caught.value), case


def test_sentinel_failover(servers, tmp_path):
    master_port, replica_port, sentinel_port = free_port(), free_port(), free_port()
    auth = ["--requirepass", "pw", "--masterauth", "pw"]
    ping = ["-a", "pw", "--no-auth-warning"]
    master = servers("master", base_args(master_port) + auth, master_port, ping)
    servers("replica", base_args(replica_port) + auth + ["--replicaof", "127.0.0.1", str(master_port)], replica_port, ping)
    config = tmp_path / "sentinel.conf"
    config.write_text(
        f"port {sentinel_port}\nbind 127.0.0.1\nsentinel monitor mymaster 127.0.0.1 {master_port} 1\n"
        "sentinel auth-pass mymaster pw\nsentinel down-after-milliseconds mymaster 1000\n"
        "sentinel failover-timeout mymaster 5000\n"
    )
    servers("sentinel", [str(config), "--sentinel"], sentinel_port)
    import redis

    sentinel = redis.Redis(port=sentinel_port, decode_responses=True)
    deadline = time.monotonic() + 20
    while not sentinel.sentinel_slaves("mymaster"):  # the sentinel has seen the replica
        assert time.monotonic() < deadline, "the sentinel did not discover the replica"
        time.sleep(0.1)

    store = RedisStore(f"redis+sentinel://:pw@127.0.0.1:{sentinel_port}/mymaster/0", namespace="ha", socket_timeout_s=1)
    store.create_stream(record("st_ha"))
    lease = store.acquire_lease("st_ha", "replica-a", 60)
    assert store.add_chunk("st_ha", chunk(0), lease.fence)
    assert redis.Redis(port=master_port, password="pw").execute_command("WAIT", 1, 5000) == 1  # on the replica too

    master.stop()  # kill -9 the master
    failed_at = time.monotonic()
    while True:
        try:
            assert store.add_chunk("st_ha", chunk(1), lease.fence)  # writable again: the replica was promoted
            break
        except StoreUnavailable:
            assert time.monotonic() - failed_at < 30, "no failover within 30 s"
    print(f"\nSentinel failover: writes resumed {time.monotonic() - failed_at:.1f} s after the master was killed")
    assert int(sentinel.sentinel_get_master_addr_by_name("mymaster")[1]) == replica_port
    assert [c.index for c in store.chunks("st_ha")] == [0, 1] and store.lease_owner("st_ha") == "replica-a"
    with pytest.raises(StoreUnavailable, match="SERVICE_NAME"):
        RedisStore(f"redis+sentinel://127.0.0.1:{sentinel_port}", namespace="ha")
