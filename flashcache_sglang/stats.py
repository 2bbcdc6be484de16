"""Server-wide compression counters, readable from outside the scheduler process.

The scheduler process owns the cache; tests, benchmarks and operators read these numbers from a
JSON file (``FLASHCACHE_STATS_FILE``), rewritten atomically after each compression and after
each flush, together with the allocator's free-slot count.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

STATS_FILE_ENV = "FLASHCACHE_STATS_FILE"

_prometheus_counters: Optional[dict] = None


def _prometheus() -> Optional[dict]:
    """Counters on SGLang's /metrics (only with --enable-metrics, which sets the multiprocess
    directory that prometheus_client must see before it is imported)."""
    global _prometheus_counters
    if _prometheus_counters is None and os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import Counter

        _prometheus_counters = {
            "candidates": Counter("flashcache_candidate_tokens_total",
                                  "Prompt tokens FlashCache was allowed to drop"),
            "kept": Counter("flashcache_kept_tokens_total", "Candidate tokens FlashCache kept"),
            "saved": Counter("flashcache_kv_slots_saved_total",
                             "KV slots FlashCache freed (dropped candidates and older tokens a stream memory dropped at its cap)"),
            "seconds": Counter("flashcache_compression_seconds_total", "Time spent compressing rows"),
        }
    return _prometheus_counters


@dataclass
class CompressionStats:
    """Cumulative counters; ``snapshot()`` adds whatever ``probe`` reports (pool state)."""

    requests_compressed: int = 0
    memory_dropped_tokens: int = 0
    candidate_tokens: int = 0
    kept_tokens: int = 0
    compression_seconds: float = 0.0
    probe: Optional[Callable[[], dict]] = field(default=None, repr=False, compare=False)
    # Set by each cache flush: the allocator's free count once the tree gave every slot back.
    last_flush: Optional[dict] = None

    def __post_init__(self) -> None:
        self._lock = threading.Lock()

    @property
    def slots_saved(self) -> int:
        return self.candidate_tokens - self.kept_tokens

    def record(self, candidates: int, kept: int, seconds: float, publish: bool = True) -> None:
        with self._lock:
            if candidates > kept:
                self.requests_compressed += 1
            self.candidate_tokens += candidates
            self.kept_tokens += kept
            self.compression_seconds += seconds
        counters = _prometheus()
        if counters is not None:
            counters["candidates"].inc(candidates)
            counters["kept"].inc(kept)
            counters["saved"].inc(candidates - kept)
            counters["seconds"].inc(seconds)
        if publish:
            self.publish()

    def record_memory_drop(self, dropped: int) -> None:
        with self._lock:
            self.memory_dropped_tokens += dropped
        counters = _prometheus()
        if counters is not None:
            counters["saved"].inc(dropped)

    def snapshot(self) -> dict:
        data = {
            "requests_compressed": self.requests_compressed,
            "memory_dropped_tokens": self.memory_dropped_tokens,
            "candidate_tokens": self.candidate_tokens,
            "kept_tokens": self.kept_tokens,
            "compression_seconds": self.compression_seconds,
            "last_flush": self.last_flush,
        }
        data["slots_saved"] = self.slots_saved
        data["time"] = time.time()
        if self.probe is not None:
            data.update(self.probe())
        return data

    def publish(self, min_interval: float = 0.0) -> None:
        """Rewrite the stats file; with ``min_interval`` skip if it was written that recently."""
        path = os.environ.get(STATS_FILE_ENV)
        if not path:
            return
        now = time.monotonic()
        if min_interval and now - getattr(self, "_last_publish", -1e9) < min_interval:
            return
        self._last_publish = now
        target = Path(path)
        staging = target.with_suffix(target.suffix + f".{os.getpid()}.tmp")
        staging.write_text(json.dumps(self.snapshot(), indent=1))
        os.replace(staging, target)


def read_stats(path: str | os.PathLike) -> dict:
    return json.loads(Path(path).read_text())
