"""Stream metadata: the :class:`MetadataStore` protocol, an embedded store and a Redis store.

What is stored per stream: its id, sanitised source, status (and error), budget / sampling /
chunking settings, counters (chunks, frames, drops, reconnects), logical vs kept tokens, the
SHA-256 of its owner token (never the token), one record per ingested chunk and the turns of
each conversation. Both stores pass the same contract tests (tests/streaming/test_store.py).

Redis layout, every key under the deployment's namespace ``NS``::

    NS:streams                       set of stream ids
    NS:stream:ID                     hash, field -> JSON value (StreamRecord)
    NS:stream:ID:chunks              hash, chunk index -> JSON ChunkRecord
    NS:stream:ID:conversations       set of conversation ids
    NS:stream:ID:turns:CONVERSATION  list of JSON Turn

Redis unreachable at start-up raises :class:`StoreUnavailable` with the (sanitised) URL;
during operation every call retries with backoff before raising it, and the ingest loop
keeps running and writes its pending records once Redis answers again.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import hmac
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Protocol, TypeVar

from .sources import sanitize_url
from .types import ChunkRecord, Turn

__all__ = [
    "StreamRecord",
    "MetadataStore",
    "InMemoryStore",
    "RedisStore",
    "StoreUnavailable",
    "UnknownStreamError",
    "StreamExistsError",
    "hash_token",
    "token_matches",
    "open_store",
    "DEFAULT_NAMESPACE",
]

logger = logging.getLogger(__name__)

DEFAULT_NAMESPACE = "flashcache"
DEFAULT_KEEP_CHUNK_RECORDS = 10_000
T = TypeVar("T")


class StoreUnavailable(RuntimeError):
    """The metadata store cannot be reached (after retries)."""


class UnknownStreamError(KeyError):
    """No stream with this id in the store."""


class StreamExistsError(ValueError):
    """A stream with this id is already stored."""


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def token_matches(token: Optional[str], token_hash: str) -> bool:
    """Constant-time check of a presented token against a stored hash."""
    if not token:
        return False
    return hmac.compare_digest(hash_token(token), token_hash)


@dataclass
class StreamRecord:
    """A stream's metadata. ``source`` is always sanitised (no credentials)."""

    stream_id: str
    source: str
    owner_token_hash: str
    is_live: bool = False
    status: str = "starting"
    error: str = ""
    backend: str = ""
    created_at: float = 0.0
    updated_at: float = 0.0
    budget: dict[str, Any] = field(default_factory=dict)
    sampling: dict[str, Any] = field(default_factory=dict)
    chunking: dict[str, Any] = field(default_factory=dict)
    chunks_ingested: int = 0
    last_chunk_index: int = -1
    last_chunk_end_s: float = -1.0
    frames_read: int = 0
    frames_dropped: int = 0
    reconnects: int = 0
    logical_tokens: int = 0
    kept_tokens: int = 0
    cap_tokens: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "StreamRecord":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def public_dict(self) -> dict[str, Any]:
        """What a token holder sees (everything but the token hash)."""
        data = self.to_dict()
        data.pop("owner_token_hash")
        return data


_RECORD_FIELDS = {f.name for f in dataclasses.fields(StreamRecord)}


def _check_fields(fields: dict[str, Any]) -> None:
    unknown = set(fields) - _RECORD_FIELDS
    if unknown:
        raise ValueError(f"unknown stream record fields {sorted(unknown)}; valid: {sorted(_RECORD_FIELDS)}")
    if "source" in fields and fields["source"] != sanitize_url(fields["source"]):
        raise ValueError("refusing to store a source URL with credentials; pass sanitize_url(source)")


class MetadataStore(Protocol):
    """Stream metadata shared by every process of a deployment."""

    def ping(self) -> None: ...

    def create_stream(self, record: StreamRecord) -> None: ...

    def get_stream(self, stream_id: str) -> Optional[StreamRecord]: ...

    def update_stream(self, stream_id: str, **fields: Any) -> None: ...

    def list_streams(self) -> list[StreamRecord]: ...

    def delete_stream(self, stream_id: str) -> None: ...

    def add_chunk(self, stream_id: str, record: ChunkRecord) -> None: ...

    def chunks(self, stream_id: str, start: int = 0, limit: Optional[int] = None) -> list[ChunkRecord]: ...

    def add_turn(self, stream_id: str, conversation_id: str, turn: Turn) -> None: ...

    def turns(self, stream_id: str, conversation_id: str) -> list[Turn]: ...


class InMemoryStore:
    """The embedded store: same contract as :class:`RedisStore`, one process only."""

    def __init__(self, keep_chunk_records: int = DEFAULT_KEEP_CHUNK_RECORDS):
        self.keep_chunk_records = keep_chunk_records
        self._lock = threading.Lock()
        self._streams: dict[str, StreamRecord] = {}
        self._chunks: dict[str, dict[int, ChunkRecord]] = {}
        self._turns: dict[str, dict[str, list[Turn]]] = {}

    def ping(self) -> None:
        return None

    def create_stream(self, record: StreamRecord) -> None:
        _check_fields({"source": record.source})
        with self._lock:
            if record.stream_id in self._streams:
                raise StreamExistsError(f"stream {record.stream_id!r} already exists")
            self._streams[record.stream_id] = copy.deepcopy(record)
            self._chunks[record.stream_id] = {}
            self._turns[record.stream_id] = {}

    def get_stream(self, stream_id: str) -> Optional[StreamRecord]:
        with self._lock:
            record = self._streams.get(stream_id)
            return copy.deepcopy(record) if record is not None else None

    def update_stream(self, stream_id: str, **fields: Any) -> None:
        _check_fields(fields)
        with self._lock:
            record = self._streams.get(stream_id)
            if record is None:
                raise UnknownStreamError(stream_id)
            for name, value in fields.items():
                setattr(record, name, copy.deepcopy(value))

    def list_streams(self) -> list[StreamRecord]:
        with self._lock:
            return [copy.deepcopy(r) for r in sorted(self._streams.values(), key=lambda r: (r.created_at, r.stream_id))]

    def delete_stream(self, stream_id: str) -> None:
        with self._lock:
            self._streams.pop(stream_id, None)
            self._chunks.pop(stream_id, None)
            self._turns.pop(stream_id, None)

    def add_chunk(self, stream_id: str, record: ChunkRecord) -> None:
        with self._lock:
            if stream_id not in self._streams:
                raise UnknownStreamError(stream_id)
            chunks = self._chunks[stream_id]
            chunks[record.index] = record
            chunks.pop(record.index - self.keep_chunk_records, None)

    def chunks(self, stream_id: str, start: int = 0, limit: Optional[int] = None) -> list[ChunkRecord]:
        with self._lock:
            if stream_id not in self._streams:
                raise UnknownStreamError(stream_id)
            records = [r for i, r in sorted(self._chunks[stream_id].items()) if i >= start]
        return records if limit is None else records[:limit]

    def add_turn(self, stream_id: str, conversation_id: str, turn: Turn) -> None:
        with self._lock:
            if stream_id not in self._streams:
                raise UnknownStreamError(stream_id)
            self._turns[stream_id].setdefault(conversation_id, []).append(turn)

    def turns(self, stream_id: str, conversation_id: str) -> list[Turn]:
        with self._lock:
            if stream_id not in self._streams:
                raise UnknownStreamError(stream_id)
            return list(self._turns[stream_id].get(conversation_id, []))


class RedisStore:
    """Metadata in Redis (redis-py), namespaced per deployment.

    Args:
        url: ``redis://host:port/db`` (credentials allowed; never logged).
        namespace: key prefix that keeps deployments sharing one Redis apart.
        retries: attempts per call when Redis does not answer (then StoreUnavailable).
        retry_backoff_s: first wait between attempts; doubles each time.
    """

    def __init__(
        self,
        url: str,
        namespace: str = DEFAULT_NAMESPACE,
        retries: int = 3,
        retry_backoff_s: float = 0.2,
        socket_timeout_s: float = 2.0,
        keep_chunk_records: int = DEFAULT_KEEP_CHUNK_RECORDS,
    ):
        import redis

        if not namespace or any(c in namespace for c in " :*?[]"):
            raise ValueError(f"namespace={namespace!r} must be non-empty without spaces, ':' or glob characters")
        self.namespace = namespace
        self.retries = retries
        self.retry_backoff_s = retry_backoff_s
        self.keep_chunk_records = keep_chunk_records
        self.sanitized_url = sanitize_url(url)
        self._errors = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)
        try:
            self._redis = redis.Redis.from_url(
                url, socket_timeout=socket_timeout_s, socket_connect_timeout=socket_timeout_s, decode_responses=True
            )
        except ValueError as error:
            raise StoreUnavailable(f"bad Redis URL {self.sanitized_url!r}: {error}") from None
        try:
            self._redis.ping()
        except self._errors as error:
            raise StoreUnavailable(f"cannot reach Redis at {self.sanitized_url!r}: {error}") from None

    def _key(self, *parts: str) -> str:
        return ":".join((self.namespace,) + parts)

    def _call(self, operation: Callable[[], T]) -> T:
        delay = self.retry_backoff_s
        for attempt in range(self.retries):
            try:
                return operation()
            except self._errors as error:
                if attempt == self.retries - 1:
                    raise StoreUnavailable(f"Redis at {self.sanitized_url!r} unreachable after {self.retries} attempts: {error}") from None
                logger.warning("Redis at %s: %s; retrying in %.1f s", self.sanitized_url, error, delay)
                time.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")

    def ping(self) -> None:
        self._call(self._redis.ping)

    def create_stream(self, record: StreamRecord) -> None:
        _check_fields({"source": record.source})
        key = self._key("stream", record.stream_id)
        payload = {name: json.dumps(value) for name, value in record.to_dict().items()}

        def create() -> bool:
            pipe = self._redis.pipeline()
            pipe.hsetnx(key, "stream_id", payload["stream_id"])
            created = pipe.execute()[0]
            if not created:
                return False
            pipe = self._redis.pipeline()
            pipe.hset(key, mapping=payload)
            pipe.sadd(self._key("streams"), record.stream_id)
            pipe.execute()
            return True

        if not self._call(create):
            raise StreamExistsError(f"stream {record.stream_id!r} already exists")

    def get_stream(self, stream_id: str) -> Optional[StreamRecord]:
        raw = self._call(lambda: self._redis.hgetall(self._key("stream", stream_id)))
        if not raw:
            return None
        return StreamRecord.from_dict({name: json.loads(value) for name, value in raw.items()})

    def update_stream(self, stream_id: str, **fields: Any) -> None:
        _check_fields(fields)
        key = self._key("stream", stream_id)
        if not fields:
            return
        payload = {name: json.dumps(value) for name, value in fields.items()}
        # A script makes "update only if it exists" atomic (a deleted stream stays deleted).
        script = "if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end redis.call('HSET', KEYS[1], unpack(ARGV)) return 1"
        flat = [item for pair in payload.items() for item in pair]
        if not self._call(lambda: self._redis.eval(script, 1, key, *flat)):
            raise UnknownStreamError(stream_id)

    def list_streams(self) -> list[StreamRecord]:
        ids = self._call(lambda: self._redis.smembers(self._key("streams")))
        records = [r for r in (self.get_stream(i) for i in ids) if r is not None]
        return sorted(records, key=lambda r: (r.created_at, r.stream_id))

    def delete_stream(self, stream_id: str) -> None:
        def delete() -> None:
            conversations = self._redis.smembers(self._key("stream", stream_id, "conversations"))
            pipe = self._redis.pipeline()
            pipe.delete(
                self._key("stream", stream_id),
                self._key("stream", stream_id, "chunks"),
                self._key("stream", stream_id, "conversations"),
                *[self._key("stream", stream_id, "turns", c) for c in conversations],
            )
            pipe.srem(self._key("streams"), stream_id)
            pipe.execute()

        self._call(delete)

    def _require(self, stream_id: str) -> None:
        if not self._call(lambda: self._redis.exists(self._key("stream", stream_id))):
            raise UnknownStreamError(stream_id)

    def add_chunk(self, stream_id: str, record: ChunkRecord) -> None:
        self._require(stream_id)
        key = self._key("stream", stream_id, "chunks")

        def add() -> None:
            pipe = self._redis.pipeline()
            pipe.hset(key, str(record.index), json.dumps(record.to_dict()))
            if record.index >= self.keep_chunk_records:
                pipe.hdel(key, str(record.index - self.keep_chunk_records))
            pipe.execute()

        self._call(add)

    def chunks(self, stream_id: str, start: int = 0, limit: Optional[int] = None) -> list[ChunkRecord]:
        self._require(stream_id)
        raw = self._call(lambda: self._redis.hgetall(self._key("stream", stream_id, "chunks")))
        records = sorted((ChunkRecord.from_dict(json.loads(v)) for v in raw.values()), key=lambda r: r.index)
        records = [r for r in records if r.index >= start]
        return records if limit is None else records[:limit]

    def add_turn(self, stream_id: str, conversation_id: str, turn: Turn) -> None:
        self._require(stream_id)

        def add() -> None:
            pipe = self._redis.pipeline()
            pipe.sadd(self._key("stream", stream_id, "conversations"), conversation_id)
            pipe.rpush(self._key("stream", stream_id, "turns", conversation_id), json.dumps(turn.to_dict()))
            pipe.execute()

        self._call(add)

    def turns(self, stream_id: str, conversation_id: str) -> list[Turn]:
        self._require(stream_id)
        raw = self._call(lambda: self._redis.lrange(self._key("stream", stream_id, "turns", conversation_id), 0, -1))
        return [Turn.from_dict(json.loads(item)) for item in raw]


def open_store(redis_url: Optional[str], namespace: str = DEFAULT_NAMESPACE) -> MetadataStore:
    """A :class:`RedisStore` when a URL is given, else the embedded :class:`InMemoryStore`."""
    if redis_url:
        return RedisStore(redis_url, namespace=namespace)
    return InMemoryStore()
