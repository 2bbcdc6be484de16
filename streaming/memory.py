"""Where a stream's memory lives: the :class:`MemoryBackend` protocol and an in-process one.

A memory backend owns, per stream, the growing prefix of chunks and its KV budget:

- ``open`` creates (or, after a service restart, restores from stored chunk records) a
  stream's memory;
- ``append_chunk`` adds one chunk, compresses it with the retention the rolling budget
  (streaming.budget) gives it and shrinks older memory at the cap;
- ``ask`` answers from a snapshot of the memory on a branch: the question and its history
  never enter the memory, and ingest is not blocked while it runs;
- ``memory_tokens`` reports logical vs kept tokens; ``release`` forgets the stream.

Two implementations: :class:`InProcessMemoryBackend` (here: exact token accounting and budget,
but no model; it answers with a labelled summary of what it holds) and
``streaming.sglang_backend.SGLangMemoryBackend`` (the real memory inside an SGLang server).
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from typing import Protocol, Sequence

from .budget import BudgetSettings, MemoryEntry, RollingBudget, plan_shrink
from .types import Answer, Chunk, ChunkReceipt, ChunkRecord, MemoryUsage, Turn

__all__ = [
    "MemoryBackend",
    "MemoryBackendError",
    "UnknownMemoryError",
    "VisionGeometry",
    "InProcessMemoryBackend",
    "IN_PROCESS_LABEL",
]

IN_PROCESS_LABEL = "[in-process summary memory: no model was run]"


class MemoryBackendError(RuntimeError):
    """The backend could not serve a request (server down, bad response)."""


class UnknownMemoryError(KeyError):
    """The backend holds no memory for this stream id."""


class MemoryBackend(Protocol):
    """A stream memory. Implementations are thread-safe: ``ask`` runs beside ``append_chunk``."""

    name: str

    def open(self, stream_id: str, budget: BudgetSettings, restore: Sequence[ChunkRecord] = ()) -> None: ...

    def append_chunk(self, stream_id: str, chunk: Chunk) -> ChunkReceipt: ...

    def ask(self, stream_id: str, question: str, history: Sequence[Turn]) -> Answer: ...

    def memory_tokens(self, stream_id: str) -> MemoryUsage: ...

    def release(self, stream_id: str) -> None: ...

    def forget(self, stream_id: str) -> None:
        """Drop this process's state of a stream whose memory now belongs to another replica
        (a lost lease): unlike :meth:`release`, the memory itself is left alone."""
        ...


@dataclass(frozen=True)
class VisionGeometry:
    """How a vision tower turns frames into tokens (defaults: Qwen2.5-VL).

    ``tokens = ceil(num_frames / temporal_patch) * (height / patch) * (width / patch) /
    spatial_merge**2 + wrapper_tokens`` (vision_start and vision_end).
    """

    patch: int = 14
    spatial_merge: int = 2
    temporal_patch: int = 2
    wrapper_tokens: int = 2

    def chunk_tokens(self, num_frames: int, height: int, width: int) -> int:
        if num_frames < 1:
            raise ValueError(f"num_frames={num_frames} must be >= 1")
        side = self.patch * self.spatial_merge
        grid_h, grid_w = max(1, height // side), max(1, width // side)
        return math.ceil(num_frames / self.temporal_patch) * grid_h * grid_w + self.wrapper_tokens


@dataclass
class _StreamMemory:
    budget: RollingBudget
    lock: threading.Lock
    timeline: dict[int, tuple[float, float, float]]  # chunk index -> (start_s, end_s, energy)
    chunks_seen: int = 0


class InProcessMemoryBackend:
    """Token accounting and rolling budgets without a model.

    It keeps what a real backend would keep (per chunk: logical and kept tokens, energy,
    timestamps) and applies the same budget decisions, so memory curves and caps can be
    checked without SGLang. ``ask`` answers with a deterministic summary that starts with
    :data:`IN_PROCESS_LABEL`.
    """

    name = "in-process"

    def __init__(self, geometry: VisionGeometry = VisionGeometry()):
        self.geometry = geometry
        self._streams: dict[str, _StreamMemory] = {}
        self._lock = threading.Lock()

    def open(self, stream_id: str, budget: BudgetSettings, restore: Sequence[ChunkRecord] = ()) -> None:
        memory = _StreamMemory(RollingBudget(budget), threading.Lock(), {})
        for record in restore:
            memory.budget.entries.append(
                MemoryEntry(record.index, record.logical_tokens, record.kept_tokens, record.outlier_energy)
            )
            memory.budget.total_logical_tokens += record.logical_tokens
            memory.timeline[record.index] = (record.start_s, record.end_s, record.outlier_energy)
            memory.chunks_seen += 1
        if restore:
            energies = [r.outlier_energy for r in restore]
            memory.budget.mean_energy = sum(energies) / len(energies)
            # Records describe chunks at ingest time; later shrinks lowered them, so replay one.
            memory.budget.apply(plan_shrink(memory.budget.entries, 0, memory.budget.mean_energy, budget))
        with self._lock:
            self._streams[stream_id] = memory

    def _memory(self, stream_id: str) -> _StreamMemory:
        with self._lock:
            memory = self._streams.get(stream_id)
        if memory is None:
            raise UnknownMemoryError(f"no memory for stream {stream_id!r}")
        return memory

    def append_chunk(self, stream_id: str, chunk: Chunk) -> ChunkReceipt:
        memory = self._memory(stream_id)
        logical = self.geometry.chunk_tokens(len(chunk.frames), chunk.height, chunk.width)
        with memory.lock:
            retention = memory.budget.retention_for(chunk.outlier_energy)
            wanted = max(1, round(logical * retention))
            plan = memory.budget.admit(chunk.index, logical, wanted, chunk.outlier_energy)
            memory.timeline[chunk.index] = (chunk.start_s, chunk.end_s, chunk.outlier_energy)
            alive = {entry.index for entry in memory.budget.entries}
            memory.timeline = {i: v for i, v in memory.timeline.items() if i in alive}
            memory.chunks_seen += 1
            usage = self._usage(memory)
        return ChunkReceipt(logical_tokens=logical, kept_tokens=plan.incoming_kept, retention=retention, memory=usage)

    def _usage(self, memory: _StreamMemory) -> MemoryUsage:
        return MemoryUsage(
            logical_tokens=memory.budget.logical_tokens,
            kept_tokens=memory.budget.kept_tokens,
            cap_tokens=memory.budget.settings.kv_cap_tokens,
            num_chunks=memory.chunks_seen,
        )

    def memory_tokens(self, stream_id: str) -> MemoryUsage:
        memory = self._memory(stream_id)
        with memory.lock:
            return self._usage(memory)

    def ask(self, stream_id: str, question: str, history: Sequence[Turn]) -> Answer:
        started = time.perf_counter()
        memory = self._memory(stream_id)
        with memory.lock:  # a snapshot; the answer is built outside the lock
            entries = list(memory.budget.entries)
            timeline = dict(memory.timeline)
            usage = self._usage(memory)
        if not entries:
            text = f"{IN_PROCESS_LABEL} The memory holds no chunks yet."
        else:
            first, last = timeline[entries[0].index], timeline[entries[-1].index]
            salient = max(entries, key=lambda e: e.outlier_energy)
            text = (
                f"{IN_PROCESS_LABEL} Memory of {usage.num_chunks} chunks "
                f"({len(entries)} still held, {first[0]:.1f}-{last[1]:.1f} s); "
                f"KV kept {usage.kept_tokens} of {usage.logical_tokens} logical tokens (cap {usage.cap_tokens}); "
                f"most salient chunk #{salient.index} at {timeline[salient.index][0]:.1f} s "
                f"(outlier energy {salient.outlier_energy:.3f}). "
                f"Question {len(history) + 1} of this conversation: {question!r}."
            )
        return Answer(
            text=text,
            ttft_s=time.perf_counter() - started,
            cached_tokens=usage.kept_tokens,
            memory_chunks=usage.num_chunks,
            backend=self.name,
        )

    def release(self, stream_id: str) -> None:
        with self._lock:
            self._streams.pop(stream_id, None)

    def forget(self, stream_id: str) -> None:
        self.release(stream_id)  # the memory lives in this process: nothing is shared
