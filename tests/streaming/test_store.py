"""The same contract for the embedded store and the Redis store."""

import subprocess
import sys
import time

import pytest

from flashcache_sglang.streaming.auth import (
    Authenticator,
    InvalidApiKey,
    Principal,
    key_file_line,
    load_key_file,
    new_api_key,
)
from flashcache_sglang.streaming.store import (
    InMemoryStore,
    LeaseLost,
    RedisStore,
    StoreUnavailable,
    StreamExistsError,
    StreamLimitReached,
    StreamRecord,
    UnknownStreamError,
    hash_token,
    token_matches,
)
from flashcache_sglang.streaming.types import ChunkRecord, Turn


@pytest.fixture(params=["embedded", "redis"])
def store(request, namespace):
    if request.param == "embedded":
        return InMemoryStore(keep_chunk_records=5)
    return RedisStore(request.getfixturevalue("redis_url"), namespace=namespace, keep_chunk_records=5)


def record(stream_id="st_a", **fields):
    return StreamRecord(stream_id=stream_id, source="rtsp://cam/x", owner_token_hash=hash_token("tok"), created_at=time.time(), **fields)


def chunk(index):
    return ChunkRecord(index, index * 2.0, index * 2.0 + 1.5, 4, 110, 33, 0.3, 0.2, time.time())


def test_stream_life_cycle(store):
    assert store.get_stream("st_a") is None
    store.create_stream(record(budget={"kv_cap_tokens": 100}))
    with pytest.raises(StreamExistsError):
        store.create_stream(record())
    store.update_stream("st_a", status="running", kept_tokens=12)
    got = store.get_stream("st_a")
    assert (got.status, got.kept_tokens, got.budget) == ("running", 12, {"kv_cap_tokens": 100})
    assert [r.stream_id for r in store.list_streams()] == ["st_a"]
    with pytest.raises(UnknownStreamError):
        store.update_stream("st_missing", status="running")
    with pytest.raises(ValueError, match="no_such_field"):
        store.update_stream("st_a", no_such_field=1)
    store.delete_stream("st_a")
    assert store.get_stream("st_a") is None and store.list_streams() == []
    with pytest.raises(UnknownStreamError):
        store.update_stream("st_a", status="running")


def test_chunks_are_idempotent_ordered_and_bounded(store):
    store.create_stream(record())
    fence = store.acquire_lease("st_a", "replica-1", 30).fence
    assert [store.add_chunk("st_a", chunk(index), fence) for index in [0, 1, 2, 2, 3]] == [True, True, True, False, True]
    assert [c.index for c in store.chunks("st_a")] == [0, 1, 2, 3]
    assert [c.index for c in store.chunks("st_a", start=2)] == [2, 3]
    got = store.get_stream("st_a")
    assert (got.last_chunk_index, got.chunks_ingested, got.last_chunk_end_s) == (3, 4, chunk(3).end_s)
    with pytest.raises(ValueError, match="gap"):
        store.add_chunk("st_a", chunk(5), fence)
    for index in range(4, 12):
        store.add_chunk("st_a", chunk(index), fence)
    assert [c.index for c in store.chunks("st_a")] == [7, 8, 9, 10, 11]
    with pytest.raises(UnknownStreamError):
        store.add_chunk("st_missing", chunk(0), fence)


def test_conversations_are_separate(store):
    store.create_stream(record())
    store.add_turn("st_a", "alice", Turn("q1", "a1"))
    store.add_turn("st_a", "alice", Turn("q2", "a2"))
    store.add_turn("st_a", "bob", Turn("q3", "a3"))
    assert [t.question for t in store.turns("st_a", "alice")] == ["q1", "q2"]
    assert [t.question for t in store.turns("st_a", "bob")] == ["q3"]
    assert store.turns("st_a", "carol") == []


def test_credentials_are_refused(store):
    with pytest.raises(ValueError, match="credentials"):
        store.create_stream(StreamRecord(stream_id="st_b", source="rtsp://u:p@cam/x", owner_token_hash="h"))


def test_tokens_are_hashed():
    assert hash_token("tok") != "tok"
    assert token_matches("tok", hash_token("tok"))
    assert not token_matches("other", hash_token("tok"))
    assert not token_matches(None, hash_token("tok"))


def test_namespaces_are_isolated(redis_url):
    first, second = RedisStore(redis_url, namespace="ns-one-x"), RedisStore(redis_url, namespace="ns-two-x")
    first.create_stream(record("st_ns"))
    try:
        assert second.get_stream("st_ns") is None and second.list_streams() == []
    finally:
        first.delete_stream("st_ns")


def test_visible_from_another_process(redis_url, namespace):
    store = RedisStore(redis_url, namespace=namespace)
    store.create_stream(record("st_x", status="running"))
    code = (
        "from flashcache_sglang.streaming.store import RedisStore;"
        f"s = RedisStore({redis_url!r}, namespace={namespace!r});"
        "print(s.get_stream('st_x').status)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "running", out.stderr


def test_unreachable_redis_fails_clearly_at_start():
    from flashcache_sglang.testing.server import free_port

    with pytest.raises(StoreUnavailable, match="cannot reach Redis at 'redis://127.0.0.1"):
        RedisStore(f"redis://:secretpw@127.0.0.1:{free_port()}/0", socket_timeout_s=0.5)
    try:
        RedisStore(f"redis://:secretpw@127.0.0.1:{free_port()}/0", socket_timeout_s=0.5)
    except StoreUnavailable as error:
        assert "secretpw" not in str(error)


def test_bad_namespace_is_refused(redis_url):
    with pytest.raises(ValueError, match="namespace"):
        RedisStore(redis_url, namespace="a:b")


def test_leases_and_fencing(store):
    store.create_stream(record(status="running"))
    with pytest.raises(UnknownStreamError):
        store.acquire_lease("st_missing", "a", 1)
    assert store.orphaned_streams() == ["st_a"]
    first = store.acquire_lease("st_a", "replica-a", 0.4)
    assert first.fence == 1 and store.lease_owner("st_a") == "replica-a" and store.orphaned_streams() == []
    assert store.acquire_lease("st_a", "replica-b", 0.4) is None
    assert store.renew_leases([first], 0.4) == [True]
    assert store.add_chunk("st_a", chunk(0), first.fence)
    time.sleep(0.5)  # replica-a stops renewing (paused, partitioned, dead): its lease expires
    assert store.orphaned_streams() == ["st_a"]
    second = store.acquire_lease("st_a", "replica-b", 30)
    assert second.fence == 2 and store.lease_owner("st_a") == "replica-b"
    # The old holder can neither renew nor write, even though it never heard of the takeover.
    assert store.renew_leases([first, second], 30) == [False, True]
    with pytest.raises(LeaseLost):
        store.add_chunk("st_a", chunk(1), first.fence)
    with pytest.raises(LeaseLost):
        store.update_stream("st_a", fence=first.fence, status="failed")
    assert not store.release_lease(first) and store.lease_owner("st_a") == "replica-b"
    assert store.add_chunk("st_a", chunk(1), second.fence)
    store.update_stream("st_a", fence=second.fence, status="reconnecting")
    assert (store.get_stream("st_a").status, store.get_stream("st_a").last_chunk_index) == ("reconnecting", 1)
    # Revoking (a stop from any replica) fences the holder out and sets the fields at once.
    store.revoke_lease("st_a", status="stopped")
    assert store.lease_owner("st_a") is None and store.get_stream("st_a").status == "stopped"
    with pytest.raises(LeaseLost):
        store.add_chunk("st_a", chunk(2), second.fence)
    assert store.orphaned_streams() == []  # stopped streams are not taken over
    third = store.acquire_lease("st_a", "replica-a", 30)
    assert third.fence == 4 and store.release_lease(third) and store.lease_owner("st_a") is None
    with pytest.raises(UnknownStreamError):
        store.revoke_lease("st_missing", status="stopped")


def test_delete_forgets_the_lease(store):
    store.create_stream(record(status="running"))
    lease = store.acquire_lease("st_a", "a", 30)
    store.delete_stream("st_a")
    assert store.lease_owner("st_a") is None and store.renew_leases([lease], 30) == [False]
    with pytest.raises(UnknownStreamError):
        store.add_chunk("st_a", chunk(0), lease.fence)
    store.create_stream(record(status="running"))  # the same id again starts from fence 1
    assert store.acquire_lease("st_a", "a", 30).fence == 1


def test_tenants_and_stream_limit(store):
    store.create_stream(record("st_1", tenant="acme"), max_streams_per_tenant=2)
    store.create_stream(record("st_2", tenant="acme"), max_streams_per_tenant=2)
    with pytest.raises(StreamLimitReached, match="limit is 2"):
        store.create_stream(record("st_3", tenant="acme"), max_streams_per_tenant=2)
    store.create_stream(record("st_4", tenant="globex"), max_streams_per_tenant=2)
    assert [r.stream_id for r in store.list_streams(tenant="acme")] == ["st_1", "st_2"]
    assert [r.stream_id for r in store.list_streams(tenant="globex")] == ["st_4"]
    assert len(store.list_streams()) == 3 and store.get_stream("st_3") is None
    store.delete_stream("st_1")
    store.create_stream(record("st_3", tenant="acme"), max_streams_per_tenant=2)
    assert [r.stream_id for r in store.list_streams(tenant="acme")] == ["st_2", "st_3"]


def test_api_keys_are_stored_hashed(store):
    key, stored = new_api_key("acme", label="ops laptop")
    store.add_api_key(stored)
    assert store.get_api_key(stored.key_id) == stored and key.split("_", 2)[2] not in str(stored)
    assert Authenticator(store).authenticate(key) == Principal("acme", stored.key_id)
    assert [k.key_id for k in store.list_api_keys("acme")] == [stored.key_id] and store.list_api_keys("globex") == []
    with pytest.raises(InvalidApiKey):
        Authenticator(store).authenticate(key[:-2] + "xx")
    assert store.delete_api_key(stored.key_id) and not store.delete_api_key(stored.key_id)
    with pytest.raises(InvalidApiKey):
        Authenticator(store).authenticate(key)


def test_ask_token_bucket(store):
    store.create_stream(record())
    waits = [store.take_ask_token("st_a", 5.0, 2) for _ in range(3)]
    assert waits[:2] == [0.0, 0.0] and 0.1 <= waits[2] <= 0.21
    time.sleep(waits[2] + 0.02)
    assert store.take_ask_token("st_a", 5.0, 2) == 0.0


def test_api_key_file(tmp_path):
    key, stored = new_api_key("acme")
    path = tmp_path / "keys.jsonl"
    path.write_text("# operator keys\n" + key_file_line(stored) + "\n")
    assert Authenticator(InMemoryStore(), str(path)).authenticate(key).tenant == "acme"
    path.write_text(key + "\n")
    with pytest.raises(ValueError, match="plaintext API key"):
        load_key_file(str(path))
    path.write_text('{"key_id": "zz", "tenant": "acme", "secret_hash": "00"}\n')
    with pytest.raises(ValueError, match=":1: key_id"):
        load_key_file(str(path))


def test_a_new_stream_is_owned_from_its_creation(store):
    lease = store.create_stream(record(status="starting"), owner="replica-a", ttl_s=30)
    assert lease.fence == 1 and store.lease_owner("st_a") == "replica-a"
    assert store.orphaned_streams() == [] and store.acquire_lease("st_a", "replica-b", 30) is None
    assert store.add_chunk("st_a", chunk(0), lease.fence)
    assert store.create_stream(record("st_b")) is None and store.lease_owner("st_b") is None
