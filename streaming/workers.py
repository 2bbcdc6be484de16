"""Stream memories spread over several SGLang workers: placement, health checks, failover.

Each stream's memory lives in exactly one worker (``python -m flashcache_sglang.launch_server``):
the server holds it and every append or question of the stream must reach that server. Three
pieces make that work with several workers and several service replicas:

- **Placement** (:class:`Placement`): stream id -> worker URL, recorded in Redis
  (:class:`RedisPlacement`, hash ``NS:placement``) so every replica sends a stream's requests
  to the same worker, or in process (:class:`InMemoryPlacement`) for a single replica. A stream
  is placed once, on the live worker with the least load, load being the sum of the KV caps
  (``kv_cap_tokens``) of the streams placed there: every memory grows to its cap within a few
  chunks and never past it, so the caps are what each worker will hold. Ties go to the
  stream's rendezvous-hash order. Placing is one Lua script (read the loads, choose, record),
  so two replicas placing at once cannot both see the same worker as emptiest.
- **Health** (:class:`WorkerPool`): each replica probes every worker's ``/ping`` every
  ``health_every_s`` (SGLang's flag check: started, not unhealthy, not shutting down; its
  ``/health`` runs a one-token generation and waits at least a second, too heavy to poll);
  ``fail_after`` failed probes in a row mark a worker down, one success marks it up. A
  request that cannot connect to its worker probes it at once and, when that fails too, marks
  it down without waiting. A worker whose scheduler hangs keeps answering ``/ping``: requests
  to it time out (``timeout_s``) and SGLang's own watchdog ends such a server.
- **Failover** (:class:`MultiWorkerMemoryBackend`): a stream whose worker is down is placed
  again on a live worker (the same script: a placement on a worker outside the live set is
  replaced), and the request raises :class:`WorkerLost`, a ``MemoryLost``: the
  SGLangMemoryBackend underneath rebuilds the memory on the new worker from the chunk files it
  kept (the sink and the rebuild set) and retries, exactly as after a server's 404. A
  stream's first append carries everything it needs and is simply re-sent. Streams stay where
  they are when their worker comes back (moving a memory costs a rebuild); new streams fill the
  emptier worker. The worker a stream left is sent a ``/close_session`` for it once it
  answers again, in case it was only unreachable and still holds the memory.

Why not sglang-router (sgl-model-gateway): its cache-aware policy matches the *text* of
requests against a prefix tree, and our append requests carry only the new chunk (identical
video placeholders for every stream), so it cannot see which worker holds a stream; its
``manual`` policy with an ``X-SMG-Routing-Key`` header does pin keys, but the key -> worker map
lives inside one router process (two service replicas would need one shared router, a new
single point of failure, or would disagree), it does not forward ``/close_session`` (closing a
stream would leak its memory until the server's idle timeout), it balances by request or key
counts rather than by KV caps, and its default health check marks a dead worker after
3 x 60 s. Placement next to the lease data in Redis needs none of that (README, "Several
machines").
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional, Protocol, Sequence

import requests

from .budget import BudgetSettings
from .memory import MemoryBackendError
from .sglang_backend import STREAM_SESSION_PREFIX, MemoryLost, SGLangMemoryBackend
from .sources import sanitize_url
from .store import StoreUnavailable, call_with_retries, open_redis
from .types import Answer, Chunk, ChunkReceipt, ChunkRecord, Turn

__all__ = [
    "WorkerSettings",
    "WorkerState",
    "WorkerPool",
    "Placement",
    "InMemoryPlacement",
    "RedisPlacement",
    "MultiWorkerMemoryBackend",
    "WorkerLost",
    "rendezvous_order",
    "parse_worker_urls",
]

logger = logging.getLogger(__name__)


class WorkerLost(MemoryLost):
    """The stream's worker is down; the stream was placed on another worker, which does not
    hold its memory yet (the SGLang backend rebuilds it there)."""


@dataclass(frozen=True)
class WorkerSettings:
    """Health checking of the workers.

    Attributes:
        health_path: the endpoint probed (200: up).
        health_every_s: seconds between two probes of a worker (> 0).
        health_timeout_s: a probe that takes longer fails (> 0).
        fail_after: failed probes in a row that mark a worker down (>= 1). A request that
            cannot connect marks it down after one more failed probe.
        conflict_wait_s: how long an append refused with 409 (another append of the stream
            in flight, e.g. another replica rebuilding it) is retried before failing.
    """

    health_path: str = "/ping"
    health_every_s: float = 2.0
    health_timeout_s: float = 2.0
    fail_after: int = 2
    conflict_wait_s: float = 30.0

    def __post_init__(self) -> None:
        for name in ("health_every_s", "health_timeout_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"{name}={value!r} must be a number > 0")
        if not self.health_path.startswith("/"):
            raise ValueError(f"health_path={self.health_path!r} must start with '/'")
        if not isinstance(self.fail_after, int) or self.fail_after < 1:
            raise ValueError(f"fail_after={self.fail_after!r} must be an int >= 1")
        if not isinstance(self.conflict_wait_s, (int, float)) or self.conflict_wait_s < 0:
            raise ValueError(f"conflict_wait_s={self.conflict_wait_s!r} must be a number >= 0")


def parse_worker_urls(values: Sequence[str]) -> list[str]:
    """Worker URLs from repeated and/or comma-separated values, without trailing slashes.

    Raises ValueError for an empty list, a URL that is not ``http(s)://host[:port][/path]``
    or one given twice."""
    urls = [part.strip().rstrip("/") for value in values for part in value.split(",") if part.strip()]
    if not urls:
        raise ValueError("no SGLang worker URL given (--sglang-url http://host:port, repeat or comma-separate for several)")
    for url in urls:
        scheme, _, rest = url.partition("://")
        if scheme not in ("http", "https") or not rest or rest.startswith("/"):
            raise ValueError(f"SGLang worker URL {sanitize_url(url)!r} must look like http(s)://host:port[/path]")
    duplicates = sorted({sanitize_url(url) for url in urls if urls.count(url) > 1})
    if duplicates:
        raise ValueError(f"SGLang worker URLs given more than once: {duplicates}")
    return urls


def rendezvous_order(stream_id: str, workers: Sequence[str]) -> list[str]:
    """``workers`` ordered by the stream's rendezvous (highest random weight) hash: every
    replica computes the same order, and removing a worker keeps the others' relative order."""

    def score(worker: str) -> int:
        return int.from_bytes(hashlib.sha256(f"{worker}\n{stream_id}".encode()).digest()[:8], "big")

    return sorted(workers, key=score, reverse=True)


# ----------------------------------------------------------------------------- placement


class Placement(Protocol):
    """Where each stream's memory lives, shared by the service replicas."""

    def place(self, stream_id: str, candidates: Sequence[str], weight: int) -> tuple[str, Optional[str]]:
        """Keep the stream's worker if it is among ``candidates`` (the live workers, in the
        stream's preference order); otherwise record the candidate with the least load (sum of
        weights of the other streams placed there; ties: the first in order). Returns
        ``(worker, previous worker or None)``. One atomic step."""
        ...

    def get(self, stream_id: str) -> Optional[str]: ...

    def remove(self, stream_id: str) -> None: ...

    def loads(self) -> dict[str, int]:
        """Worker -> sum of the weights placed there (workers without streams are absent)."""
        ...


@dataclass
class _Placed:
    worker: str
    weight: int


class InMemoryPlacement:
    """Placement for a single service replica (no Redis)."""

    def __init__(self) -> None:
        self._placed: dict[str, _Placed] = {}
        self._lock = threading.Lock()

    def place(self, stream_id: str, candidates: Sequence[str], weight: int) -> tuple[str, Optional[str]]:
        if not candidates:
            raise ValueError("place() needs at least one candidate worker")
        with self._lock:
            current = self._placed.get(stream_id)
            if current is not None and current.worker in candidates:
                return current.worker, None
            loads = {worker: 0 for worker in candidates}
            for other, placed in self._placed.items():
                if other != stream_id and placed.worker in loads:
                    loads[placed.worker] += placed.weight
            best = min(candidates, key=lambda worker: loads[worker])  # min keeps the first of equals
            self._placed[stream_id] = _Placed(best, int(weight))
            return best, current.worker if current is not None else None

    def get(self, stream_id: str) -> Optional[str]:
        with self._lock:
            placed = self._placed.get(stream_id)
        return placed.worker if placed is not None else None

    def remove(self, stream_id: str) -> None:
        with self._lock:
            self._placed.pop(stream_id, None)

    def loads(self) -> dict[str, int]:
        with self._lock:
            totals: dict[str, int] = {}
            for placed in self._placed.values():
                totals[placed.worker] = totals.get(placed.worker, 0) + placed.weight
        return totals


# KEYS[1] = NS:placement (stream id -> JSON {worker, weight})
# ARGV = stream id, weight, candidate workers in preference order
# Returns {worker, previous worker or ""}.
_PLACE = """
local current = redis.call('HGET', KEYS[1], ARGV[1])
local previous = ''
local loads = {}
for i = 3, #ARGV do loads[ARGV[i]] = 0 end
if current then
  previous = cjson.decode(current).worker
  if loads[previous] ~= nil then return {previous, ''} end
end
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  if all[i] ~= ARGV[1] then
    local entry = cjson.decode(all[i + 1])
    if loads[entry.worker] ~= nil then loads[entry.worker] = loads[entry.worker] + entry.weight end
  end
end
local best = nil
for i = 3, #ARGV do
  if best == nil or loads[ARGV[i]] < loads[best] then best = ARGV[i] end
end
redis.call('HSET', KEYS[1], ARGV[1], cjson.encode({worker = best, weight = tonumber(ARGV[2])}))
return {best, previous}
"""


class RedisPlacement:
    """Placement in Redis, shared by every replica of one deployment (``NS:placement``).

    Args:
        url: the deployment's Redis URL (every form streaming.store accepts).
        namespace: the deployment's key namespace (the same as the metadata store's).
        retries / retry_backoff_s: attempts when Redis does not answer, then StoreUnavailable.
    """

    def __init__(self, url: str, namespace: str, retries: int = 3, retry_backoff_s: float = 0.2,
                 socket_timeout_s: float = 2.0):
        import redis

        if not namespace or any(c in namespace for c in " :*?[]"):
            raise ValueError(f"namespace={namespace!r} must be non-empty without spaces, ':' or glob characters")
        self.key = f"{namespace}:placement"
        self.sanitized_url = sanitize_url(url)
        self.retries = retries
        self.retry_backoff_s = retry_backoff_s
        self._errors = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)
        self._redis = open_redis(url, socket_timeout_s)
        self._place = self._redis.register_script(_PLACE)

    def _call(self, operation):
        return call_with_retries(operation, self._errors, self.retries, self.retry_backoff_s, self.sanitized_url)

    def place(self, stream_id: str, candidates: Sequence[str], weight: int) -> tuple[str, Optional[str]]:
        if not candidates:
            raise ValueError("place() needs at least one candidate worker")
        worker, previous = self._call(lambda: self._place(keys=[self.key], args=[stream_id, int(weight), *candidates]))
        return worker, previous or None

    def get(self, stream_id: str) -> Optional[str]:
        raw = self._call(lambda: self._redis.hget(self.key, stream_id))
        return json.loads(raw)["worker"] if raw else None

    def remove(self, stream_id: str) -> None:
        self._call(lambda: self._redis.hdel(self.key, stream_id))

    def loads(self) -> dict[str, int]:
        totals: dict[str, int] = {}
        for raw in self._call(lambda: self._redis.hvals(self.key)):
            entry = json.loads(raw)
            totals[entry["worker"]] = totals.get(entry["worker"], 0) + int(entry["weight"])
        return totals


# ----------------------------------------------------------------------------- health


@dataclass
class WorkerState:
    """One worker as this replica sees it.

    Attributes:
        url: the worker's base URL.
        up: whether requests are sent to it.
        failures: failed probes in a row.
        last_error: why the last probe or request failed ("" after a success).
        checked_at: ``time.time()`` of the last probe (0: never).
    """

    url: str
    up: bool = True
    failures: int = 0
    last_error: str = ""
    checked_at: float = 0.0

    def to_dict(self) -> dict:
        return {"url": self.url, "up": self.up, "failures": self.failures, "last_error": self.last_error,
                "checked_at": self.checked_at}


class WorkerPool:
    """Health of the SGLang workers as seen by this replica.

    Probes every worker once at construction (so the first placement knows who is up), then
    every ``settings.health_every_s`` in a daemon thread until :meth:`close`.
    ``on_up(url)`` is called from that thread when a worker that was down answers again.
    """

    def __init__(self, urls: Sequence[str], settings: WorkerSettings = WorkerSettings(),
                 session: Optional[requests.Session] = None, on_up: Optional[Callable[[str], None]] = None,
                 start: bool = True):
        self.urls = parse_worker_urls(urls)
        self.settings = settings
        self._http = session or requests.Session()
        self._states = {url: WorkerState(url) for url in self.urls}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._on_up = on_up
        self._thread: Optional[threading.Thread] = None
        for url in self.urls:
            self.check(url)
        down = [url for url in self.urls if not self._states[url].up]
        if down:
            logger.warning("SGLang workers down at start: %s", ", ".join(down))
        if start:
            self._thread = threading.Thread(target=self._loop, name="sglang-worker-health", daemon=True)
            self._thread.start()

    def live(self) -> list[str]:
        """The workers up now, in the configured order."""
        with self._lock:
            return [url for url in self.urls if self._states[url].up]

    def states(self) -> list[WorkerState]:
        with self._lock:
            return [WorkerState(**vars(self._states[url])) for url in self.urls]

    def probe(self, url: str) -> str:
        """"" when the worker answers the health probe with 200 in time, else why not."""
        path = self.settings.health_path
        try:
            response = self._http.get(f"{url}{path}", timeout=self.settings.health_timeout_s)
        except requests.RequestException as error:
            return f"{type(error).__name__}: {error}"
        response.close()
        return "" if response.status_code == 200 else f"{path} answered {response.status_code}"

    def check(self, url: str) -> bool:
        """Probe one worker and update its state; returns whether it is up."""
        error = self.probe(url)
        came_up = False
        with self._lock:
            state = self._states[url]
            state.checked_at = time.time()
            if not error:
                came_up = not state.up
                state.up, state.failures, state.last_error = True, 0, ""
            else:
                state.failures += 1
                state.last_error = error
                if state.up and state.failures >= self.settings.fail_after:
                    state.up = False
                    logger.warning("SGLang worker %s is down after %d failed health checks: %s", url, state.failures, error)
        if came_up:
            logger.warning("SGLang worker %s is up again", url)
            if self._on_up is not None:
                self._on_up(url)
        return not error

    def confirm_down(self, url: str, reason: str) -> bool:
        """A request could not reach ``url``: probe it once; if that fails too, mark it down
        now (without waiting for ``fail_after`` probes) and return True."""
        error = self.probe(url)
        if not error:
            return False
        with self._lock:
            state = self._states[url]
            was_up = state.up
            state.up, state.failures, state.last_error, state.checked_at = False, max(state.failures, 1), error, time.time()
        if was_up:
            logger.warning("SGLang worker %s is down: a request failed (%s) and so did a health check (%s)", url, reason, error)
        return True

    def _loop(self) -> None:
        while not self._stop.wait(self.settings.health_every_s):
            for url in self.urls:
                if self._stop.is_set():
                    return
                try:
                    self.check(url)
                except Exception:  # the health thread must outlive any one bad probe
                    logger.exception("health check of %s failed", url)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.settings.health_timeout_s + 1.0)


# ----------------------------------------------------------------------------- the backend


class MultiWorkerMemoryBackend(SGLangMemoryBackend):
    """SGLangMemoryBackend over several workers: each stream on one worker, moved when it dies.

    Every request of a stream goes to the worker its placement names (read from the shared
    placement on each request, so a move by another replica is seen at once). The protocol,
    chunk files, rebuilds and ``needed_artifacts`` are the SGLangMemoryBackend's.

    Args:
        worker_urls: the workers (at least one), e.g. ``["http://10.0.0.5:30000", ...]``.
        chunk_dir: where chunk videos are kept (on storage every replica reaches).
        placement: shared placement (default: in process, for a single replica).
        workers: health check settings.
        **kwargs: SGLangMemoryBackend's (fps, video_transport, rebuild_chunks, ...).
    """

    name = "sglang"

    def __init__(self, worker_urls: Sequence[str], chunk_dir: str, *, placement: Optional[Placement] = None,
                 workers: WorkerSettings = WorkerSettings(), start_health_checks: bool = True, **kwargs):
        urls = parse_worker_urls(worker_urls)
        super().__init__(urls[0], chunk_dir, **kwargs)
        self.placement: Placement = placement if placement is not None else InMemoryPlacement()
        self.settings = workers
        self._weights: dict[str, int] = {}
        self._known: dict[str, str] = {}  # stream -> last worker seen (used while Redis is unreachable)
        self._orphans: dict[str, set[str]] = {}  # worker -> streams moved away while it was down
        self._placement_lock = threading.Lock()
        self.pool = WorkerPool(urls, workers, on_up=self._close_orphans, start=start_health_checks)

    # ----------------------------------------------------------------- placement

    def worker_for(self, stream_id: str) -> str:
        """The live worker holding (or about to hold) the stream's memory; places or moves it
        when needed. MemoryBackendError when no worker is up."""
        live = self.pool.live()
        if not live:
            states = "; ".join(f"{s.url}: {s.last_error or 'down'}" for s in self.pool.states())
            raise MemoryBackendError(f"no SGLang worker is up ({states})")
        weight = self._weights.get(stream_id, 1)
        try:
            worker, previous = self.placement.place(stream_id, rendezvous_order(stream_id, live), weight)
        except StoreUnavailable as error:
            # Redis down: keep sending to the worker last seen, as long as it is up; a new
            # placement must wait for Redis (two replicas could otherwise disagree).
            with self._placement_lock:
                known = self._known.get(stream_id)
            if known in live:
                return known
            raise MemoryBackendError(f"stream {stream_id}: cannot place it on a worker: {error}") from None
        with self._placement_lock:
            self._known[stream_id] = worker
            if previous is not None and previous != worker:
                self._orphans.setdefault(previous, set()).add(stream_id)
        if previous is not None and previous != worker:
            logger.warning("stream %s moved from SGLang worker %s (down) to %s", stream_id, previous, worker)
        return worker

    def worker_of(self, stream_id: str) -> Optional[str]:
        """The worker the shared placement names for the stream (None: not placed)."""
        try:
            return self.placement.get(stream_id)
        except StoreUnavailable:
            with self._placement_lock:
                return self._known.get(stream_id)

    def _close_orphans(self, worker: str) -> None:
        """``worker`` answers again: close the memories of streams moved away from it (a worker
        that was only unreachable may still hold them)."""
        with self._placement_lock:
            streams = self._orphans.pop(worker, set())
        for stream_id in streams:
            if self.worker_of(stream_id) == worker:
                continue  # placed back there meanwhile: its memory is the live one
            self._close_on(worker, stream_id)

    def _close_on(self, worker: str, stream_id: str) -> None:
        try:
            self._http.post(f"{worker}/close_session", json={"session_id": STREAM_SESSION_PREFIX + stream_id},
                            timeout=self.timeout_s)
        except requests.RequestException as error:
            logger.warning("stream %s: could not close its memory on %s: %s", stream_id, worker, error)

    # ----------------------------------------------------------------- protocol

    def open(self, stream_id: str, budget: BudgetSettings, restore: Sequence[ChunkRecord] = ()) -> None:
        super().open(stream_id, budget, restore)
        self._weights[stream_id] = max(1, int(budget.kv_cap_tokens))
        try:
            self.worker_for(stream_id)  # place it now: inspect shows it, and loads count it at once
        except MemoryBackendError as error:
            logger.warning("stream %s: not placed yet: %s", stream_id, error)

    def append_chunk(self, stream_id: str, chunk: Chunk) -> ChunkReceipt:
        # A worker may die during the rebuild that follows another's death: each attempt
        # places the stream on a live worker again, at most once per worker.
        for attempt in range(len(self.pool.urls)):
            try:
                return super().append_chunk(stream_id, chunk)
            except WorkerLost:
                if attempt == len(self.pool.urls) - 1:
                    raise
        raise AssertionError("unreachable")

    def ask(self, stream_id: str, question: str, history: Sequence[Turn]) -> Answer:
        for attempt in range(len(self.pool.urls)):
            worker = self.worker_of(stream_id)
            try:
                return super().ask(stream_id, question, history)
            except WorkerLost:
                if attempt == len(self.pool.urls) - 1:
                    raise
            except MemoryBackendError as error:
                # The worker died while streaming the answer (a broken stream, not a refused
                # connection): confirm, move the stream, and ask again (which rebuilds it).
                if worker is None or attempt == len(self.pool.urls) - 1 or not self.pool.confirm_down(worker, str(error)):
                    raise
        raise AssertionError("unreachable")

    def release(self, stream_id: str) -> None:
        """Forget the stream here, close its memory on its worker and drop its placement."""
        with self._lock:
            self._streams.pop(stream_id, None)
        self._weights.pop(stream_id, None)
        worker = self.worker_of(stream_id)
        with self._placement_lock:
            self._known.pop(stream_id, None)
        if worker is not None:
            self._close_on(worker, stream_id)
        try:
            self.placement.remove(stream_id)
        except StoreUnavailable as error:
            logger.warning("stream %s: could not drop its placement: %s", stream_id, error)

    def forget(self, stream_id: str) -> None:
        """Forget the stream here only (another replica owns it): its memory and placement stay."""
        with self._lock:
            self._streams.pop(stream_id, None)
        self._weights.pop(stream_id, None)
        with self._placement_lock:
            self._known.pop(stream_id, None)

    def close(self) -> None:
        """Stop the health checks."""
        self.pool.close()

    # ----------------------------------------------------------------- requests

    def _post(self, body: dict, stream: bool):
        knob = body["sampling_params"]["custom_params"]["flashcache"]["stream"]
        stream_id = knob["id"]
        conflict_deadline = time.monotonic() + self.settings.conflict_wait_s
        resent = 0
        while True:
            worker = self.worker_for(stream_id)
            try:
                response = self._http.post(f"{worker}/generate", json=body, timeout=self.timeout_s, stream=stream)
            except requests.ConnectionError as error:
                if not self.pool.confirm_down(worker, str(error)):
                    raise MemoryBackendError(f"SGLang worker {worker} failed a request but answers health checks: "
                                             f"{error}") from None
                if knob.get("start") and resent < len(self.pool.urls):
                    resent += 1
                    continue  # a first append carries all it needs: send it to the stream's new worker
                raise WorkerLost(f"SGLang worker {worker} is down ({type(error).__name__}); stream {stream_id} "
                                 "was placed on another worker") from None
            except requests.RequestException as error:
                raise MemoryBackendError(f"SGLang worker {worker} unreachable: {error}") from None
            if response.status_code == 409 and knob.get("op") == "append" and time.monotonic() < conflict_deadline:
                # Another append of this stream is in flight (another replica rebuilding it).
                response.close()
                time.sleep(0.2)
                continue
            return response

    def workers(self) -> list[dict]:
        """Each worker's health and the KV caps placed on it (for operators and tests)."""
        try:
            loads = self.placement.loads()
        except StoreUnavailable:
            loads = {}
        return [dict(state.to_dict(), placed_cap_tokens=loads.get(state.url, 0)) for state in self.pool.states()]
