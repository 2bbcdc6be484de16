"""The same contract for the embedded store and the Redis store."""

import subprocess
import sys
import time

import pytest

from flashcache_sglang.streaming.store import (
    InMemoryStore,
    RedisStore,
    StoreUnavailable,
    StreamExistsError,
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
    for index in [0, 1, 2, 2, 3]:
        store.add_chunk("st_a", chunk(index))
    assert [c.index for c in store.chunks("st_a")] == [0, 1, 2, 3]
    assert [c.index for c in store.chunks("st_a", start=2)] == [2, 3]
    for index in range(4, 12):
        store.add_chunk("st_a", chunk(index))
    assert [c.index for c in store.chunks("st_a")] == [7, 8, 9, 10, 11]
    with pytest.raises(UnknownStreamError):
        store.add_chunk("st_missing", chunk(0))


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
