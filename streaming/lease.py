"""Stream ownership across service replicas: leases, renewal, takeover.

Several ``flashcache-stream serve`` replicas may share one Redis. Each running stream is
ingested by exactly one of them, the holder of the stream's lease (store.Lease):

- acquire: atomic in the store (``SET NX PX`` inside a Lua script); it increments the
  stream's fencing counter and the lease carries that number (the fence). A new stream gets
  its first lease in the same script that creates it, so no scan ever sees it unowned;
- renew: one :class:`LeaseKeeper` thread per replica renews all its leases every
  ``renew_every_s`` (one pipelined round trip). A renewal that finds the lease gone or held
  by another value means the stream was taken over, stopped or deleted: the runtime stops
  here at once, stored status untouched. A lease this replica could not renew for ``ttl_s``
  (Redis unreachable) is treated the same way, because another replica may own it by then;
- fence: every chunk record and status write of the holder carries its fence and the store
  refuses it atomically once the counter moved on. So a replica that was paused or cut off
  past its lease cannot write a single chunk after another replica took the stream over,
  even before it notices;
- release: a clean stop, finish or shutdown deletes the lease (compare-and-delete) so a peer
  can take over at once;
- takeover: every ``scan_every_s`` a replica looks for streams in a resumable state whose
  lease is gone (their owner died or was shut down) and resumes them from the next chunk.

Takeover latency after a crash is at most ``ttl_s + scan_every_s`` plus the source's reconnect.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional

from .store import Lease, MetadataStore, StoreUnavailable

__all__ = ["LeaseSettings", "LeaseKeeper"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LeaseSettings:
    """Timing of stream leases.

    Attributes:
        ttl_s: a lease expires this long after its last renewal (a crashed owner's streams
            are free again after at most this long).
        renew_every_s: renewal period; None = ``ttl_s / 3`` (two renewals may fail in a row).
        scan_every_s: how often a replica that runs the takeover scan looks for orphaned
            streams (``serve`` runs it; library users call ``StreamManager.resume_all``).
    """

    ttl_s: float = 5.0
    renew_every_s: Optional[float] = None
    scan_every_s: float = 1.0

    def __post_init__(self) -> None:
        if not self.ttl_s >= 0.5:
            raise ValueError(f"LeaseSettings.ttl_s={self.ttl_s!r} must be >= 0.5")
        if self.renew_every_s is not None and not 0 < self.renew_every_s < self.ttl_s:
            raise ValueError(f"LeaseSettings.renew_every_s={self.renew_every_s!r} must be in (0, ttl_s={self.ttl_s})")
        if not self.scan_every_s > 0:
            raise ValueError(f"LeaseSettings.scan_every_s={self.scan_every_s!r} must be > 0")

    @property
    def renew_period_s(self) -> float:
        return self.renew_every_s if self.renew_every_s is not None else self.ttl_s / 3


class LeaseKeeper:
    """Holds and renews one replica's stream leases in a background thread.

    Args:
        store: where leases live.
        owner: this replica's id (appears in ``GET /streams/{id}`` as ``owner``).
        settings: lease timing.
        on_lost: called (from the keeper thread) with a lease that is no longer held and why.
    """

    def __init__(
        self,
        store: MetadataStore,
        owner: str,
        settings: LeaseSettings,
        on_lost: Callable[[Lease, str], None],
        clock: Callable[[], float] = time.monotonic,
    ):
        self.store = store
        self.owner = owner
        self.settings = settings
        self._on_lost = on_lost
        self._clock = clock
        self._lock = threading.Lock()
        self._held: dict[str, tuple[Lease, float]] = {}  # stream id -> (lease, valid until, local clock)
        self._scan: Optional[Callable[[], object]] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.renew_failures = 0

    def acquire(self, stream_id: str) -> Optional[Lease]:
        """The stream's lease for this replica, or None when another replica holds it."""
        started = self._clock()
        lease = self.store.acquire_lease(stream_id, self.owner, self.settings.ttl_s)
        if lease is not None:
            with self._lock:
                self._held[stream_id] = (lease, started + self.settings.ttl_s)
            self._ensure_thread()
        return lease

    def adopt(self, lease: Lease, acquired_at: float) -> None:
        """Renew ``lease`` from now on; it was acquired (at ``acquired_at``, this keeper's
        clock) together with its stream's creation."""
        with self._lock:
            self._held[lease.stream_id] = (lease, acquired_at + self.settings.ttl_s)
        self._ensure_thread()

    def now(self) -> float:
        return self._clock()

    def release(self, lease: Lease) -> None:
        """Give the lease up (a peer may take the stream at once); a lost lease is left alone."""
        with self._lock:
            current = self._held.get(lease.stream_id)
            if current is not None and current[0] == lease:
                del self._held[lease.stream_id]
        try:
            self.store.release_lease(lease)
        except StoreUnavailable as error:
            logger.warning("stream %s: cannot release its lease (it expires by itself): %s", lease.stream_id, error)

    def forget(self, lease: Lease) -> None:
        """Stop renewing ``lease`` without touching the store (it was lost or revoked)."""
        with self._lock:
            current = self._held.get(lease.stream_id)
            if current is not None and current[0] == lease:
                del self._held[lease.stream_id]

    def held(self) -> list[Lease]:
        with self._lock:
            return [lease for lease, _ in self._held.values()]

    def run_scan(self, scan: Callable[[], object]) -> None:
        """Also call ``scan`` (the takeover scan) every ``settings.scan_every_s``."""
        self._scan = scan
        self._ensure_thread()

    def stop(self) -> None:
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(10)

    def _ensure_thread(self) -> None:
        with self._lock:
            if self._thread is None and not self._stop.is_set():
                self._thread = threading.Thread(target=self._loop, name=f"leases-{self.owner}", daemon=True)
                self._thread.start()

    def _loop(self) -> None:
        next_renew = next_scan = self._clock()
        while not self._stop.is_set():
            now = self._clock()
            if now >= next_renew:
                next_renew = now + self.settings.renew_period_s
                try:
                    self.renew_now()
                except Exception:  # e.g. a Redis error reply: keep the thread, leases expire if it persists
                    self.renew_failures += 1
                    logger.exception("lease renewal failed")
            if self._scan is not None and now >= next_scan:
                next_scan = now + self.settings.scan_every_s
                try:
                    self._scan()
                except StoreUnavailable as error:
                    logger.warning("takeover scan skipped: %s", error)
                except Exception:  # the scan must not kill renewals
                    logger.exception("takeover scan failed")
            wake = min(next_renew, next_scan if self._scan is not None else next_renew)
            self._stop.wait(max(0.01, wake - self._clock()))

    def renew_now(self) -> None:
        """Renew every held lease once; report the lost ones."""
        with self._lock:
            entries = list(self._held.values())
        if not entries:
            return
        started = self._clock()
        try:
            renewed = self.store.renew_leases([lease for lease, _ in entries], self.settings.ttl_s)
        except StoreUnavailable as error:
            self.renew_failures += 1
            lost = [(lease, "not renewed within its TTL (store unreachable)") for lease, valid in entries if started >= valid]
            if not lost:
                logger.warning("lease renewal failed (retrying): %s", error)
        else:
            lost = []
            with self._lock:
                for (lease, _), ok in zip(entries, renewed):
                    if ok and self._held.get(lease.stream_id, (None,))[0] == lease:
                        self._held[lease.stream_id] = (lease, started + self.settings.ttl_s)
                    elif not ok:
                        lost.append((lease, "taken over, stopped or deleted elsewhere"))
        for lease, reason in lost:
            self.forget(lease)
            logger.warning("stream %s: lease (fence %d) lost: %s", lease.stream_id, lease.fence, reason)
            try:
                self._on_lost(lease, reason)
            except Exception:
                logger.exception("stream %s: handling a lost lease failed", lease.stream_id)
