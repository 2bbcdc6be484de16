"""A bounded frame queue with an explicit policy for a full queue.

The reader thread of a stream puts decoded frames here and the ingest thread takes them. When
the memory backend is slower than the source, the policy decides:

- ``block``: the reader waits (files: nothing is lost, the file is simply read slower);
- ``drop_oldest``: the oldest queued frame is dropped (live sources: stay close to now);
- ``drop_newest``: the incoming frame is dropped.

Dropped frames are counted; memory is bounded by ``capacity`` frames either way. Frames are
dropped before chunking, so chunk numbers never have gaps.
"""

from __future__ import annotations

import collections
import threading
from typing import Generic, Optional, TypeVar

__all__ = ["BoundedQueue", "DROP_POLICIES", "QueueClosed"]

DROP_POLICIES = ("block", "drop_oldest", "drop_newest")
T = TypeVar("T")


class QueueClosed(Exception):
    """The queue was closed and is empty."""


class BoundedQueue(Generic[T]):
    def __init__(self, capacity: int, policy: str):
        if capacity < 1:
            raise ValueError(f"capacity={capacity} must be >= 1")
        if policy not in DROP_POLICIES:
            raise ValueError(f"unknown drop policy {policy!r}; valid: {list(DROP_POLICIES)}")
        self.capacity = capacity
        self.policy = policy
        self.dropped = 0
        self.high_water = 0
        self._items: collections.deque[T] = collections.deque()
        self._closed = False
        self._condition = threading.Condition()

    def __len__(self) -> int:
        with self._condition:
            return len(self._items)

    def put(self, item: T, timeout: Optional[float] = None) -> bool:
        """Add ``item``; returns False when it was dropped (or the queue is closed)."""
        with self._condition:
            if self._closed:
                return False
            if len(self._items) >= self.capacity:
                if self.policy == "drop_newest":
                    self.dropped += 1
                    return False
                if self.policy == "drop_oldest":
                    self._items.popleft()
                    self.dropped += 1
                else:
                    self._condition.wait_for(lambda: len(self._items) < self.capacity or self._closed, timeout)
                    if self._closed or len(self._items) >= self.capacity:
                        return False
            self._items.append(item)
            self.high_water = max(self.high_water, len(self._items))
            self._condition.notify_all()
            return True

    def get(self, timeout: Optional[float] = None) -> Optional[T]:
        """Next item; None on timeout; raises QueueClosed once closed and drained."""
        with self._condition:
            self._condition.wait_for(lambda: self._items or self._closed, timeout)
            if self._items:
                item = self._items.popleft()
                self._condition.notify_all()
                return item
            if self._closed:
                raise QueueClosed()
            return None

    def close(self) -> None:
        """No more puts; gets drain what is left, then raise QueueClosed."""
        with self._condition:
            self._closed = True
            self._condition.notify_all()
