"""Records passed between the streaming layers (sources, chunker, memory backend, store).

Every record is a small frozen dataclass with ``to_dict`` / ``from_dict`` so the metadata
store can keep it as JSON. Frames carry numpy pixels; nothing here imports torch or SGLang.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "Frame",
    "Chunk",
    "ChunkReceipt",
    "ChunkRecord",
    "MemoryUsage",
    "Turn",
    "Answer",
    "StreamStatus",
    "STREAM_STATUSES",
]


class StreamStatus:
    """The life cycle of a stream as stored in metadata (plain strings, JSON friendly)."""

    STARTING = "starting"
    RUNNING = "running"
    RECONNECTING = "reconnecting"
    FINISHED = "finished"  # a file reached its end
    STOPPED = "stopped"  # a client asked to stop
    FAILED = "failed"  # unreadable source, unsupported codec, backend error


STREAM_STATUSES = (
    StreamStatus.STARTING,
    StreamStatus.RUNNING,
    StreamStatus.RECONNECTING,
    StreamStatus.FINISHED,
    StreamStatus.STOPPED,
    StreamStatus.FAILED,
)
# Streams in these states are resumed when a service restarts.
RESUMABLE_STATUSES = (StreamStatus.STARTING, StreamStatus.RUNNING, StreamStatus.RECONNECTING)


@dataclass(frozen=True)
class Frame:
    """One sampled, resized video frame.

    Attributes:
        pixels: ``[height, width, 3]``, ``np.uint8``, RGB.
        timestamp_s: seconds since the start of the stream (file: presentation time; live
            source: time on the stream's own clock, continuous across reconnects).
    """

    pixels: np.ndarray
    timestamp_s: float


@dataclass(frozen=True)
class Chunk:
    """Consecutive frames that enter the memory together.

    Attributes:
        index: 0, 1, 2, ... per stream, without gaps or repeats.
        frames: the sampled frames in time order (at least one).
        outlier_energy: high-frequency energy ratio of the chunk's pixel signal in [0, 1]
            (streaming.energy); drives the chunk's retention.
    """

    index: int
    frames: tuple[Frame, ...]
    outlier_energy: float

    @property
    def start_s(self) -> float:
        return self.frames[0].timestamp_s

    @property
    def end_s(self) -> float:
        return self.frames[-1].timestamp_s

    @property
    def height(self) -> int:
        return int(self.frames[0].pixels.shape[0])

    @property
    def width(self) -> int:
        return int(self.frames[0].pixels.shape[1])


@dataclass(frozen=True)
class ChunkReceipt:
    """What a memory backend reports after appending one chunk.

    Attributes:
        logical_tokens: tokens the chunk occupies in the prompt (before compression).
        kept_tokens: KV entries kept for the chunk right after its compression.
        retention: the retention the chunk was compressed with (kept / logical as requested).
        memory: the stream's whole memory after the append (and any shrink of older chunks).
        artifact: where the backend keeps what it needs to rebuild the chunk after a restart
            (e.g. the chunk's video file); empty when it needs nothing.
    """

    logical_tokens: int
    kept_tokens: int
    retention: float
    memory: "MemoryUsage"
    artifact: str = ""


@dataclass(frozen=True)
class MemoryUsage:
    """Logical vs kept KV tokens of one stream's memory.

    Attributes:
        logical_tokens: every token the stream ever appended (what an uncompressed prompt holds).
        kept_tokens: the KV slots the cap counts: kept visual tokens and their delimiters (the
            prompt header and the sink chunk are not counted); never above ``cap_tokens``.
        cap_tokens: the stream's cap.
        num_chunks: chunks appended.
        total_kv_slots: every KV slot the memory holds, header and sink included (-1: unknown).
    """

    logical_tokens: int
    kept_tokens: int
    cap_tokens: int
    num_chunks: int
    total_kv_slots: int = -1

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class ChunkRecord:
    """The stored trace of one ingested chunk (what survives a service restart).

    ``memory_logical_tokens`` / ``memory_kept_tokens`` are the whole memory's
    :class:`MemoryUsage` right after this chunk (the stream's memory curve over time; -1 in
    records written before they existed).
    """

    index: int
    start_s: float
    end_s: float
    num_frames: int
    logical_tokens: int
    kept_tokens: int
    retention: float
    outlier_energy: float
    ingested_at: float  # wall clock, time.time()
    artifact: str = ""
    memory_logical_tokens: int = -1
    memory_kept_tokens: int = -1

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ChunkRecord":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass(frozen=True)
class Turn:
    """One question and its answer inside a conversation on top of a stream."""

    question: str
    answer: str
    asked_at: float = 0.0
    memory_chunks: int = 0  # how many chunks the memory held when the question was asked

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Turn":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass(frozen=True)
class Answer:
    """A backend's answer.

    Attributes:
        text: the answer.
        ttft_s: seconds to the first token (the whole call for a non-streaming request).
        cached_tokens: prompt tokens served from the prefix cache (the memory prefix).
        memory_chunks: chunks in the memory snapshot the question was answered from.
        backend: which backend answered ("in-process summary", "sglang").
    """

    text: str
    ttft_s: float
    cached_tokens: int
    memory_chunks: int
    backend: str
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
