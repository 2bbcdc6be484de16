"""The Redis server CI starts is real and reachable."""

import uuid


def test_redis_roundtrip(redis_url):
    import redis

    client = redis.Redis.from_url(redis_url)
    key = f"flashcache-test:{uuid.uuid4().hex}"
    client.set(key, b"value", ex=30)
    assert client.get(key) == b"value"
    client.delete(key)
    assert client.get(key) is None
