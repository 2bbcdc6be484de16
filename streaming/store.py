"""Stream metadata: the :class:`MetadataStore` protocol, an embedded store and a Redis store.

What is stored per stream: its id, tenant, sanitised source, status (and error), budget /
sampling / chunking settings, counters (chunks, frames, drops, reconnects), logical vs kept
tokens, bytes of chunk files on disk, the SHA-256 of its owner token (never the token), one
record per ingested chunk, the turns of each conversation, and its ownership lease. Besides
streams: operator API keys (hashed, streaming.auth) and question rate buckets. Both stores
pass the same contract tests (tests/streaming/test_store.py).

Ownership (streaming.lease): one service replica at a time ingests a stream, the holder of its
lease. Acquiring a lease increments the stream's fencing counter; the holder's chunk and
status writes carry that number and are refused atomically (a Lua script in Redis) once the
counter has moved on, so a replica that lost its lease (paused, partitioned, presumed dead)
cannot write, even if it has not noticed yet. A chunk write also refuses an index that is not
the next one and ignores a replay of the last, and advances the stream's ``last_chunk_index``
in the same step: the resume point and the chunk records can never disagree.

Redis layout, every key under the deployment's namespace ``NS``::

    NS:streams                       set of stream ids
    NS:tenant:T:streams              set of tenant T's stream ids
    NS:stream:ID                     hash, field -> JSON value (StreamRecord)
    NS:stream:ID:chunks              hash, chunk index -> JSON ChunkRecord
    NS:stream:ID:conversations       set of conversation ids
    NS:stream:ID:turns:CONVERSATION  list of JSON Turn
    NS:stream:ID:lease               string "OWNER|FENCE", expires (PX) unless renewed
    NS:stream:ID:fence               integer, incremented by every acquisition and revocation
    NS:stream:ID:ask_rate            hash {tokens, at_ms}: the question token bucket (expires)
    NS:apikeys                       hash, key id -> JSON ApiKeyRecord (SHA-256 of the secret)

Redis URLs: ``redis://[[user]:password@]host:port/db``, ``rediss://...`` (TLS; e.g.
``?ssl_ca_certs=/path/ca.pem``, ``&ssl_certfile=...&ssl_keyfile=...`` for client
certificates), ``unix:///path.sock?db=0`` and, for Sentinel-managed failover,
``redis+sentinel://[[user]:password@]host:port[,host:port...]/SERVICE[/DB]`` (query:
``sentinel_password``, ``sentinel_username``, ``ssl=true`` and the ``ssl_*`` options for the
master connection). Credentials are never logged. Redis Cluster is not supported (the Lua
scripts touch several keys of one stream).

Redis unreachable at start-up raises :class:`StoreUnavailable` with the (sanitised) URL;
during operation every call retries with backoff before raising it, and the ingest loop
keeps running and writes its pending records once Redis answers again (within its lease).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Protocol, Sequence, TypeVar
from urllib.parse import parse_qsl, unquote, urlsplit

from .auth import ApiKeyRecord, hash_token, token_matches
from .sources import sanitize_url
from .types import RESUMABLE_STATUSES, ChunkRecord, Turn

__all__ = [
    "StreamRecord",
    "Lease",
    "MetadataStore",
    "InMemoryStore",
    "RedisStore",
    "StoreUnavailable",
    "UnknownStreamError",
    "StreamExistsError",
    "StreamLimitReached",
    "LeaseLost",
    "hash_token",
    "token_matches",
    "open_store",
    "open_redis",
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


class StreamLimitReached(RuntimeError):
    """The tenant already has its maximum number of streams."""


class LeaseLost(RuntimeError):
    """A fenced write by a replica whose lease was taken over or revoked."""


@dataclass
class StreamRecord:
    """A stream's metadata. ``source`` is always sanitised (no credentials).

    ``artifact_bytes`` is what the stream's chunk files take on disk; ``warning`` says when
    they exceed the per-stream disk limit because the memory still needs them.
    """

    stream_id: str
    source: str
    owner_token_hash: str
    tenant: str = ""
    is_live: bool = False
    status: str = "starting"
    error: str = ""
    warning: str = ""
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
    artifact_bytes: int = 0

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


@dataclass(frozen=True)
class Lease:
    """Ownership of one stream by one replica. ``fence`` grows with every acquisition."""

    stream_id: str
    owner: str
    fence: int

    @property
    def value(self) -> str:
        return f"{self.owner}|{self.fence}"


_RECORD_FIELDS = {f.name for f in dataclasses.fields(StreamRecord)}


def _check_fields(fields: dict[str, Any]) -> None:
    unknown = set(fields) - _RECORD_FIELDS
    if unknown:
        raise ValueError(f"unknown stream record fields {sorted(unknown)}; valid: {sorted(_RECORD_FIELDS)}")
    if "source" in fields and fields["source"] != sanitize_url(fields["source"]):
        raise ValueError("refusing to store a source URL with credentials; pass sanitize_url(source)")


def _check_owner(owner: str) -> None:
    if not owner or "|" in owner:
        raise ValueError(f"lease owner {owner!r} must be non-empty without '|'")


def _bucket_take(tokens: float, at_s: float, now_s: float, rate_per_s: float, burst: float) -> tuple[float, float]:
    """Token bucket step: ``(tokens left, seconds to wait)``; wait 0 means one was taken."""
    tokens = min(burst, tokens + max(0.0, now_s - at_s) * rate_per_s)
    if tokens >= 1.0:
        return tokens - 1.0, 0.0
    return tokens, (1.0 - tokens) / rate_per_s


class MetadataStore(Protocol):
    """Stream metadata shared by every process of a deployment."""

    def ping(self) -> None: ...

    def create_stream(self, record: StreamRecord, max_streams_per_tenant: int = 0, owner: Optional[str] = None,
                      ttl_s: float = 0.0) -> Optional[Lease]: ...

    def get_stream(self, stream_id: str) -> Optional[StreamRecord]: ...

    def update_stream(self, stream_id: str, fence: Optional[int] = None, **fields: Any) -> None: ...

    def list_streams(self, tenant: Optional[str] = None) -> list[StreamRecord]: ...

    def delete_stream(self, stream_id: str) -> None: ...

    def add_chunk(self, stream_id: str, record: ChunkRecord, fence: int) -> bool: ...

    def chunks(self, stream_id: str, start: int = 0, limit: Optional[int] = None) -> list[ChunkRecord]: ...

    def add_turn(self, stream_id: str, conversation_id: str, turn: Turn) -> None: ...

    def turns(self, stream_id: str, conversation_id: str) -> list[Turn]: ...

    def acquire_lease(self, stream_id: str, owner: str, ttl_s: float) -> Optional[Lease]: ...

    def renew_leases(self, leases: Sequence[Lease], ttl_s: float) -> list[bool]: ...

    def release_lease(self, lease: Lease) -> bool: ...

    def lease_owner(self, stream_id: str) -> Optional[str]: ...

    def revoke_lease(self, stream_id: str, **fields: Any) -> None: ...

    def orphaned_streams(self) -> list[str]: ...

    def take_ask_token(self, stream_id: str, rate_per_s: float, burst: float) -> float: ...

    def add_api_key(self, record: ApiKeyRecord) -> None: ...

    def get_api_key(self, key_id: str) -> Optional[ApiKeyRecord]: ...

    def list_api_keys(self, tenant: Optional[str] = None) -> list[ApiKeyRecord]: ...

    def delete_api_key(self, key_id: str) -> bool: ...


class InMemoryStore:
    """The embedded store: same contract as :class:`RedisStore`, one process only."""

    def __init__(self, keep_chunk_records: int = DEFAULT_KEEP_CHUNK_RECORDS, clock: Callable[[], float] = time.monotonic):
        self.keep_chunk_records = keep_chunk_records
        self._clock = clock
        self._lock = threading.Lock()
        self._streams: dict[str, StreamRecord] = {}
        self._chunks: dict[str, dict[int, ChunkRecord]] = {}
        self._turns: dict[str, dict[str, list[Turn]]] = {}
        self._leases: dict[str, tuple[str, float]] = {}  # stream id -> (value, expires at)
        self._fences: dict[str, int] = {}
        self._buckets: dict[str, tuple[float, float]] = {}
        self._api_keys: dict[str, ApiKeyRecord] = {}

    def ping(self) -> None:
        return None

    def create_stream(self, record: StreamRecord, max_streams_per_tenant: int = 0, owner: Optional[str] = None,
                      ttl_s: float = 0.0) -> Optional[Lease]:
        """Store a new stream; with ``owner``, also its first lease in the same step (so no
        takeover scan can see it unowned)."""
        _check_fields({"source": record.source})
        if owner is not None:
            _check_owner(owner)
        with self._lock:
            if record.stream_id in self._streams:
                raise StreamExistsError(f"stream {record.stream_id!r} already exists")
            if max_streams_per_tenant > 0:
                count = sum(1 for r in self._streams.values() if r.tenant == record.tenant)
                if count >= max_streams_per_tenant:
                    raise StreamLimitReached(
                        f"tenant {record.tenant!r} has {count} streams, the limit is {max_streams_per_tenant}; delete one first"
                    )
            self._streams[record.stream_id] = copy.deepcopy(record)
            self._chunks[record.stream_id] = {}
            self._turns[record.stream_id] = {}
            if owner is None:
                return None
            lease = Lease(record.stream_id, owner, 1)
            self._fences[record.stream_id] = 1
            self._leases[record.stream_id] = (lease.value, self._clock() + ttl_s)
            return lease

    def get_stream(self, stream_id: str) -> Optional[StreamRecord]:
        with self._lock:
            record = self._streams.get(stream_id)
            return copy.deepcopy(record) if record is not None else None

    def _check_fence(self, stream_id: str, fence: Optional[int]) -> None:
        if fence is not None and self._fences.get(stream_id) != fence:
            raise LeaseLost(f"stream {stream_id!r}: fence {fence} is stale (now {self._fences.get(stream_id)})")

    def update_stream(self, stream_id: str, fence: Optional[int] = None, **fields: Any) -> None:
        _check_fields(fields)
        with self._lock:
            record = self._streams.get(stream_id)
            if record is None:
                raise UnknownStreamError(stream_id)
            self._check_fence(stream_id, fence)
            for name, value in fields.items():
                setattr(record, name, copy.deepcopy(value))

    def list_streams(self, tenant: Optional[str] = None) -> list[StreamRecord]:
        with self._lock:
            records = [r for r in self._streams.values() if tenant is None or r.tenant == tenant]
            return [copy.deepcopy(r) for r in sorted(records, key=lambda r: (r.created_at, r.stream_id))]

    def delete_stream(self, stream_id: str) -> None:
        with self._lock:
            for table in (self._streams, self._chunks, self._turns, self._leases, self._fences, self._buckets):
                table.pop(stream_id, None)

    def add_chunk(self, stream_id: str, record: ChunkRecord, fence: int) -> bool:
        with self._lock:
            stream = self._streams.get(stream_id)
            if stream is None:
                raise UnknownStreamError(stream_id)
            self._check_fence(stream_id, fence)
            if record.index <= stream.last_chunk_index:
                return False  # a replay of a stored chunk
            if record.index != stream.last_chunk_index + 1:
                raise ValueError(f"stream {stream_id!r}: chunk {record.index} would leave a gap after {stream.last_chunk_index}")
            chunks = self._chunks[stream_id]
            chunks[record.index] = record
            chunks.pop(record.index - self.keep_chunk_records, None)
            stream.last_chunk_index = record.index
            stream.chunks_ingested = record.index + 1
            stream.last_chunk_end_s = record.end_s
            return True

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

    # ----------------------------------------------------------------- leases

    def _live_lease(self, stream_id: str) -> Optional[str]:
        lease = self._leases.get(stream_id)
        if lease is None or lease[1] <= self._clock():
            self._leases.pop(stream_id, None)
            return None
        return lease[0]

    def acquire_lease(self, stream_id: str, owner: str, ttl_s: float) -> Optional[Lease]:
        _check_owner(owner)
        with self._lock:
            if stream_id not in self._streams:
                raise UnknownStreamError(stream_id)
            if self._live_lease(stream_id) is not None:
                return None
            fence = self._fences.get(stream_id, 0) + 1
            self._fences[stream_id] = fence
            lease = Lease(stream_id, owner, fence)
            self._leases[stream_id] = (lease.value, self._clock() + ttl_s)
            return lease

    def renew_leases(self, leases: Sequence[Lease], ttl_s: float) -> list[bool]:
        with self._lock:
            renewed = []
            for lease in leases:
                held = self._live_lease(lease.stream_id) == lease.value
                if held:
                    self._leases[lease.stream_id] = (lease.value, self._clock() + ttl_s)
                renewed.append(held)
            return renewed

    def release_lease(self, lease: Lease) -> bool:
        with self._lock:
            if self._live_lease(lease.stream_id) != lease.value:
                return False
            del self._leases[lease.stream_id]
            return True

    def lease_owner(self, stream_id: str) -> Optional[str]:
        with self._lock:
            value = self._live_lease(stream_id)
        return value.rsplit("|", 1)[0] if value else None

    def revoke_lease(self, stream_id: str, **fields: Any) -> None:
        _check_fields(fields)
        with self._lock:
            record = self._streams.get(stream_id)
            if record is None:
                raise UnknownStreamError(stream_id)
            self._fences[stream_id] = self._fences.get(stream_id, 0) + 1
            self._leases.pop(stream_id, None)
            for name, value in fields.items():
                setattr(record, name, copy.deepcopy(value))

    def orphaned_streams(self) -> list[str]:
        with self._lock:
            return sorted(
                sid for sid, r in self._streams.items() if r.status in RESUMABLE_STATUSES and self._live_lease(sid) is None
            )

    # ----------------------------------------------------------------- rates and keys

    def take_ask_token(self, stream_id: str, rate_per_s: float, burst: float) -> float:
        with self._lock:
            now = self._clock()
            tokens, at = self._buckets.get(stream_id, (burst, now))
            tokens, wait = _bucket_take(tokens, at, now, rate_per_s, burst)
            self._buckets[stream_id] = (tokens, now)
            return wait

    def add_api_key(self, record: ApiKeyRecord) -> None:
        with self._lock:
            self._api_keys[record.key_id] = record

    def get_api_key(self, key_id: str) -> Optional[ApiKeyRecord]:
        with self._lock:
            return self._api_keys.get(key_id)

    def list_api_keys(self, tenant: Optional[str] = None) -> list[ApiKeyRecord]:
        with self._lock:
            keys = [k for k in self._api_keys.values() if tenant is None or k.tenant == tenant]
        return sorted(keys, key=lambda k: (k.tenant, k.created_at, k.key_id))

    def delete_api_key(self, key_id: str) -> bool:
        with self._lock:
            return self._api_keys.pop(key_id, None) is not None


# --------------------------------------------------------------------- Redis

_CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return -1 end
local limit = tonumber(ARGV[1])
if limit > 0 and redis.call('SCARD', KEYS[3]) >= limit then return -2 end
redis.call('HSET', KEYS[1], unpack(ARGV, 6))
redis.call('SADD', KEYS[2], ARGV[2])
if ARGV[3] ~= '' then redis.call('SADD', KEYS[3], ARGV[2]) end
if ARGV[4] == '' then return 0 end
local fence = redis.call('INCR', KEYS[5])
redis.call('SET', KEYS[4], ARGV[4] .. '|' .. fence, 'PX', ARGV[5])
return fence
"""
_UPDATE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if ARGV[1] ~= '' and redis.call('GET', KEYS[2]) ~= ARGV[1] then return -1 end
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
return 1
"""
_ADD_CHUNK = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return -1 end
local index = tonumber(ARGV[2])
local last = tonumber(redis.call('HGET', KEYS[1], 'last_chunk_index') or '-1')
if index <= last then return 2 end
if index ~= last + 1 then return -2 end
redis.call('HSET', KEYS[3], ARGV[2], ARGV[3])
local keep = tonumber(ARGV[4])
if index >= keep then redis.call('HDEL', KEYS[3], tostring(index - keep)) end
redis.call('HSET', KEYS[1], 'last_chunk_index', ARGV[2], 'chunks_ingested', ARGV[5], 'last_chunk_end_s', ARGV[6])
return 1
"""
_ACQUIRE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
local fence = redis.call('INCR', KEYS[3])
redis.call('SET', KEYS[2], ARGV[1] .. '|' .. fence, 'NX', 'PX', ARGV[2])
return fence
"""
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1 end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) return 1 end
return 0
"""
_REVOKE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('INCR', KEYS[3])
redis.call('DEL', KEYS[2])
if #ARGV > 0 then redis.call('HSET', KEYS[1], unpack(ARGV)) end
return 1
"""
_TAKE_TOKEN = """
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + tonumber(now[2]) / 1000
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at_ms')
local tokens = tonumber(state[1]) or burst
local at_ms = tonumber(state[2]) or now_ms
tokens = math.min(burst, tokens + math.max(0, now_ms - at_ms) * rate / 1000)
local wait_ms = 0
if tokens >= 1 then tokens = tokens - 1 else wait_ms = math.ceil((1 - tokens) * 1000 / rate) end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at_ms', tostring(now_ms))
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return wait_ms
"""

_SENTINEL_SCHEME = "redis+sentinel"
_SENTINEL_QUERY = ("sentinel_password", "sentinel_username", "ssl", "ssl_ca_certs", "ssl_certfile", "ssl_keyfile",
                   "ssl_cert_reqs", "ssl_check_hostname")


def _host_port(item: str, default_port: int, url: str) -> tuple[str, int]:
    item = item.strip()
    if item.startswith("["):
        host, _, rest = item[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    else:
        host, _, port_text = item.partition(":")
    if not host or (port_text and not port_text.isdigit()):
        raise ValueError(f"bad Sentinel address {item!r} in {sanitize_url(url)!r}; expected host:port")
    return host, int(port_text) if port_text else default_port


def open_redis(url: str, socket_timeout_s: float = 2.0):
    """A redis-py client for ``url`` (see the module docstring for the URL forms)."""
    import redis

    scheme = url.split("://", 1)[0].lower()
    if scheme != _SENTINEL_SCHEME:
        return redis.Redis.from_url(url, socket_timeout=socket_timeout_s, socket_connect_timeout=socket_timeout_s,
                                    decode_responses=True)
    from redis.sentinel import Sentinel

    parts = urlsplit(url)
    userinfo, _, host_list = parts.netloc.rpartition("@")
    username, _, password = userinfo.partition(":")
    sentinels = [_host_port(item, 26379, url) for item in host_list.split(",")]
    path = [unquote(p) for p in parts.path.split("/") if p]
    if not 1 <= len(path) <= 2 or (len(path) == 2 and not path[1].isdigit()):
        raise ValueError(f"Sentinel URL {sanitize_url(url)!r} must end in /SERVICE_NAME[/DB]")
    query = dict(parse_qsl(parts.query))
    unknown = sorted(set(query) - set(_SENTINEL_QUERY))
    if unknown:
        raise ValueError(f"unknown Sentinel URL options {unknown}; valid: {list(_SENTINEL_QUERY)}")
    timeouts = {"socket_timeout": socket_timeout_s, "socket_connect_timeout": socket_timeout_s}
    sentinel_kwargs = dict(timeouts)
    for name in ("sentinel_password", "sentinel_username"):
        if name in query:
            sentinel_kwargs[name.split("_", 1)[1]] = query.pop(name)
    master_kwargs: dict[str, Any] = dict(timeouts, decode_responses=True, db=int(path[1]) if len(path) == 2 else 0)
    if username:
        master_kwargs["username"] = unquote(username)
    if password:
        master_kwargs["password"] = unquote(password)
    if "ssl" in query:
        master_kwargs["ssl"] = query.pop("ssl").lower() in ("1", "true", "yes")
    if "ssl_check_hostname" in query:
        master_kwargs["ssl_check_hostname"] = query.pop("ssl_check_hostname").lower() in ("1", "true", "yes")
    master_kwargs.update(query)
    sentinel = Sentinel(sentinels, sentinel_kwargs=sentinel_kwargs, **timeouts)
    return sentinel.master_for(path[0], **master_kwargs)


def call_with_retries(operation: Callable[[], T], errors: tuple, retries: int, backoff_s: float, sanitized_url: str) -> T:
    """Run a Redis operation, retrying connection errors with doubling backoff; StoreUnavailable
    once ``retries`` attempts failed (the URL in messages is the sanitised one)."""
    delay = backoff_s
    for attempt in range(retries):
        try:
            return operation()
        except errors as error:
            if attempt == retries - 1:
                raise StoreUnavailable(f"Redis at {sanitized_url!r} unreachable after {retries} attempts: {error}") from None
            logger.warning("Redis at %s: %s; retrying in %.1f s", sanitized_url, error, delay)
            time.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")


class RedisStore:
    """Metadata in Redis (redis-py), namespaced per deployment.

    Args:
        url: a Redis URL (module docstring; credentials allowed, never logged).
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
            self._redis = open_redis(url, socket_timeout_s)
        except ValueError as error:
            raise StoreUnavailable(f"bad Redis URL {self.sanitized_url!r}: {str(error).replace(url, self.sanitized_url)}") from None
        try:
            self._redis.ping()
        except redis.exceptions.AuthenticationError as error:
            raise StoreUnavailable(f"Redis at {self.sanitized_url!r} refused the credentials: {error}") from None
        except self._errors as error:
            raise StoreUnavailable(f"cannot reach Redis at {self.sanitized_url!r}: {error}") from None
        except redis.exceptions.ResponseError as error:  # e.g. NOAUTH: a password is required
            raise StoreUnavailable(f"Redis at {self.sanitized_url!r} refused the connection: {error}") from None
        self._scripts = {
            name: self._redis.register_script(source)
            for name, source in [("create", _CREATE), ("update", _UPDATE), ("add_chunk", _ADD_CHUNK), ("acquire", _ACQUIRE),
                                 ("renew", _RENEW), ("release", _RELEASE), ("revoke", _REVOKE), ("take_token", _TAKE_TOKEN)]
        }

    def _key(self, *parts: str) -> str:
        return ":".join((self.namespace,) + parts)

    def _call(self, operation: Callable[[], T]) -> T:
        return call_with_retries(operation, self._errors, self.retries, self.retry_backoff_s, self.sanitized_url)

    def _script(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        script = self._scripts[name]
        return self._call(lambda: script(keys=list(keys), args=list(args)))

    def ping(self) -> None:
        self._call(self._redis.ping)

    def create_stream(self, record: StreamRecord, max_streams_per_tenant: int = 0, owner: Optional[str] = None,
                      ttl_s: float = 0.0) -> Optional[Lease]:
        """Store a new stream; with ``owner``, also its first lease in the same step (so no
        takeover scan can see it unowned)."""
        _check_fields({"source": record.source})
        if owner is not None:
            _check_owner(owner)
        payload = [item for name, value in record.to_dict().items() for item in (name, json.dumps(value))]
        keys = [self._key("stream", record.stream_id), self._key("streams"), self._key("tenant", record.tenant, "streams"),
                self._key("stream", record.stream_id, "lease"), self._key("stream", record.stream_id, "fence")]
        args = [max_streams_per_tenant, record.stream_id, record.tenant, owner or "", max(1, int(ttl_s * 1000)), *payload]
        result = self._script("create", keys, args)
        if result == -1:
            raise StreamExistsError(f"stream {record.stream_id!r} already exists")
        if result == -2:
            raise StreamLimitReached(
                f"tenant {record.tenant!r} has {max_streams_per_tenant} streams, the limit is {max_streams_per_tenant}; "
                "delete one first"
            )
        return Lease(record.stream_id, owner, int(result)) if owner is not None else None

    def get_stream(self, stream_id: str) -> Optional[StreamRecord]:
        raw = self._call(lambda: self._redis.hgetall(self._key("stream", stream_id)))
        if not raw:
            return None
        return StreamRecord.from_dict({name: json.loads(value) for name, value in raw.items()})

    def update_stream(self, stream_id: str, fence: Optional[int] = None, **fields: Any) -> None:
        _check_fields(fields)
        if not fields:
            return
        flat = [item for name, value in fields.items() for item in (name, json.dumps(value))]
        keys = [self._key("stream", stream_id), self._key("stream", stream_id, "fence")]
        result = self._script("update", keys, ["" if fence is None else str(fence), *flat])
        if result == 0:
            raise UnknownStreamError(stream_id)
        if result == -1:
            raise LeaseLost(f"stream {stream_id!r}: fence {fence} is stale")

    def list_streams(self, tenant: Optional[str] = None) -> list[StreamRecord]:
        key = self._key("streams") if tenant is None else self._key("tenant", tenant, "streams")
        ids = self._call(lambda: self._redis.smembers(key))
        records = [r for r in (self.get_stream(i) for i in ids) if r is not None]
        return sorted(records, key=lambda r: (r.created_at, r.stream_id))

    def delete_stream(self, stream_id: str) -> None:
        def delete() -> None:
            record = self._redis.hget(self._key("stream", stream_id), "tenant")
            conversations = self._redis.smembers(self._key("stream", stream_id, "conversations"))
            pipe = self._redis.pipeline()
            pipe.delete(
                self._key("stream", stream_id),
                *[self._key("stream", stream_id, part) for part in ("chunks", "conversations", "lease", "fence", "ask_rate")],
                *[self._key("stream", stream_id, "turns", c) for c in conversations],
            )
            pipe.srem(self._key("streams"), stream_id)
            if record:
                pipe.srem(self._key("tenant", json.loads(record), "streams"), stream_id)
            pipe.execute()

        self._call(delete)

    def _require(self, stream_id: str) -> None:
        if not self._call(lambda: self._redis.exists(self._key("stream", stream_id))):
            raise UnknownStreamError(stream_id)

    def add_chunk(self, stream_id: str, record: ChunkRecord, fence: int) -> bool:
        keys = [self._key("stream", stream_id), self._key("stream", stream_id, "fence"), self._key("stream", stream_id, "chunks")]
        args = [str(fence), str(record.index), json.dumps(record.to_dict()), self.keep_chunk_records,
                json.dumps(record.index + 1), json.dumps(record.end_s)]
        result = self._script("add_chunk", keys, args)
        if result == 0:
            raise UnknownStreamError(stream_id)
        if result == -1:
            raise LeaseLost(f"stream {stream_id!r}: fence {fence} is stale")
        if result == -2:
            raise ValueError(f"stream {stream_id!r}: chunk {record.index} would leave a gap")
        return result == 1

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

    # ----------------------------------------------------------------- leases

    def _lease_keys(self, stream_id: str) -> list[str]:
        return [self._key("stream", stream_id), self._key("stream", stream_id, "lease"), self._key("stream", stream_id, "fence")]

    def acquire_lease(self, stream_id: str, owner: str, ttl_s: float) -> Optional[Lease]:
        _check_owner(owner)
        fence = self._script("acquire", self._lease_keys(stream_id), [owner, max(1, int(ttl_s * 1000))])
        if fence == -1:
            raise UnknownStreamError(stream_id)
        return Lease(stream_id, owner, int(fence)) if fence > 0 else None

    def renew_leases(self, leases: Sequence[Lease], ttl_s: float) -> list[bool]:
        if not leases:
            return []
        script = self._scripts["renew"]

        def renew() -> list[bool]:
            pipe = self._redis.pipeline(transaction=False)
            for lease in leases:
                script(keys=[self._key("stream", lease.stream_id, "lease")], args=[lease.value, max(1, int(ttl_s * 1000))],
                       client=pipe)
            return [bool(r) for r in pipe.execute()]

        return self._call(renew)

    def release_lease(self, lease: Lease) -> bool:
        return bool(self._script("release", [self._key("stream", lease.stream_id, "lease")], [lease.value]))

    def lease_owner(self, stream_id: str) -> Optional[str]:
        value = self._call(lambda: self._redis.get(self._key("stream", stream_id, "lease")))
        return value.rsplit("|", 1)[0] if value else None

    def revoke_lease(self, stream_id: str, **fields: Any) -> None:
        _check_fields(fields)
        flat = [item for name, value in fields.items() for item in (name, json.dumps(value))]
        if not self._script("revoke", self._lease_keys(stream_id), flat):
            raise UnknownStreamError(stream_id)

    def orphaned_streams(self) -> list[str]:
        def scan() -> list[str]:
            ids = sorted(self._redis.smembers(self._key("streams")))
            pipe = self._redis.pipeline(transaction=False)
            for stream_id in ids:
                pipe.hget(self._key("stream", stream_id), "status")
                pipe.exists(self._key("stream", stream_id, "lease"))
            answers = pipe.execute()
            return [
                stream_id
                for stream_id, status, leased in zip(ids, answers[0::2], answers[1::2])
                if status is not None and json.loads(status) in RESUMABLE_STATUSES and not leased
            ]

        return self._call(scan)

    # ----------------------------------------------------------------- rates and keys

    def take_ask_token(self, stream_id: str, rate_per_s: float, burst: float) -> float:
        expire_ms = int(1000 * (burst / rate_per_s + 1))
        wait_ms = self._script("take_token", [self._key("stream", stream_id, "ask_rate")], [rate_per_s, burst, expire_ms])
        return int(wait_ms) / 1000.0

    def add_api_key(self, record: ApiKeyRecord) -> None:
        self._call(lambda: self._redis.hset(self._key("apikeys"), record.key_id, json.dumps(record.to_dict())))

    def get_api_key(self, key_id: str) -> Optional[ApiKeyRecord]:
        raw = self._call(lambda: self._redis.hget(self._key("apikeys"), key_id))
        return ApiKeyRecord.from_dict(json.loads(raw)) if raw else None

    def list_api_keys(self, tenant: Optional[str] = None) -> list[ApiKeyRecord]:
        raw = self._call(lambda: self._redis.hgetall(self._key("apikeys")))
        keys = [ApiKeyRecord.from_dict(json.loads(v)) for v in raw.values()]
        return sorted((k for k in keys if tenant is None or k.tenant == tenant), key=lambda k: (k.tenant, k.created_at, k.key_id))

    def delete_api_key(self, key_id: str) -> bool:
        return bool(self._call(lambda: self._redis.hdel(self._key("apikeys"), key_id)))


def open_store(redis_url: Optional[str], namespace: str = DEFAULT_NAMESPACE) -> MetadataStore:
    """A :class:`RedisStore` when a URL is given, else the embedded :class:`InMemoryStore`."""
    if redis_url:
        return RedisStore(redis_url, namespace=namespace)
    return InMemoryStore()

