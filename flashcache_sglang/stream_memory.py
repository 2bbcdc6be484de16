"""Stream memories held by the server: append-only ingest, questions that branch off, re-basing.

A stream's memory is a token sequence the server keeps in its radix tree: the prompt header, the
first chunk (the sink) and, under a fixed cap, the visual tokens of every chunk that FlashCache
kept. Clients never resend it:

- an **append** request carries one new chunk; the server prefills it after the memory, scores
  the memory's candidates and the chunk's together (one FlashCache ranking over the whole
  memory), keeps the best under the cap (with a footprint floor: the best visual token of every
  time segment survives), and installs the result as the memory's next **version**;
- an **ask** request carries a question (and its conversation's history); the server answers it
  after the current version and never adds it to the memory.

Positions stay bounded: a version's kept tokens are **re-based** to contiguous positions (each
media item keeps its internal time/height/width offsets, items and text tokens are packed one
after another), so the memory's length and its largest position track the cap, not the stream's
age. Kept keys are re-rotated to their new positions in the pool (the model's own rotary table).

A version lives in the tree under its own namespace (``flashcache/stream=<id>/v=<n>``), locked by
the registry while it is current or while a request created against it is alive, so a running
question never sees its prefix change or vanish. A superseded version is deleted from the tree
as soon as its last request is released.

This module is pure bookkeeping (no SGLang): :class:`StreamRegistry` (streams, versions,
references), :class:`MemoryVersion` (the per-token record) and the two pure decisions,
:func:`rebase_positions` and :func:`footprint_floor`. The tree work is CompressedRadixCache's.
"""

from __future__ import annotations

import math
import time
from array import array
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, Optional

import torch

__all__ = [
    "TOKEN_TEXT", "TOKEN_SINK", "TOKEN_MEDIA", "TOKEN_DELIMITER",
    "MemoryVersion", "StreamError", "StreamRegistry", "StreamState", "footprint_floor",
    "rebase_positions", "stream_namespace", "SESSION_PREFIX",
]

# What each memory token is (``MemoryVersion.kind``).
TOKEN_TEXT = 0  # never dropped: the prompt header, text between media
TOKEN_SINK = 1  # never dropped: the first chunk (attention sink)
TOKEN_MEDIA = 2  # a visual token (or, for text streams, an appended token): a candidate
TOKEN_DELIMITER = 3  # <|vision_start|> / <|vision_end|> around a media item: a candidate

CANDIDATE_KINDS = (TOKEN_MEDIA, TOKEN_DELIMITER)
# SGLang's session endpoints (/close_session) address a stream memory by this session id prefix.
SESSION_PREFIX = "flashcache-stream:"


def stream_namespace(stream_id: str, version: int) -> str:
    """The radix-tree namespace (``extra_key``) of one version of a stream memory."""
    return f"flashcache/stream={stream_id}/v={version}"


class StreamError(Exception):
    """A stream request the server refuses; ``status`` is the HTTP status the client gets."""

    def __init__(self, message: str, status: int = HTTPStatus.BAD_REQUEST) -> None:
        super().__init__(message)
        self.status = int(status)


@dataclass
class MemoryVersion:
    """One version of a stream memory: its tokens, their positions and what each one is.

    Attributes:
        stream_id / number: which stream, which version (1, 2, ...).
        token_ids: ``[length]`` the memory's token ids (media tokens hold SGLang's pad values).
        positions: ``[3, length]`` int64 M-RoPE positions (time, height, width), or ``[length]``
            for one position per token; contiguous after re-basing.
        kind: ``[length]`` int8, TOKEN_* per token.
        unit: ``[length]`` int64: the media item a token belongs to (re-basing keeps an item's
            internal offsets), -1 for text tokens.
        chunk: ``[length]`` int64 client chunk index, -1 for the header.
        time_s: ``[length]`` float64 stream time of the token's chunk (NaN for the header).
        node / lock: the version's leaf in the radix tree and the registry's lock on it.
        refs: ids of the live requests created against this version.
    """

    stream_id: str
    number: int
    token_ids: array
    positions: torch.Tensor
    kind: torch.Tensor
    unit: torch.Tensor
    chunk: torch.Tensor
    time_s: torch.Tensor
    node: Any = None
    lock: Any = None
    refs: set = field(default_factory=set)
    superseded: bool = False

    def __post_init__(self) -> None:
        length = len(self.token_ids)
        for name in ("kind", "unit", "chunk", "time_s"):
            if getattr(self, name).shape != (length,):
                raise ValueError(f"MemoryVersion.{name} must be [{length}], got {tuple(getattr(self, name).shape)}")
        if self.positions.shape[-1] != length or self.positions.dim() not in (1, 2):
            raise ValueError(f"MemoryVersion.positions must be [{length}] or [3, {length}], "
                             f"got {tuple(self.positions.shape)}")

    @property
    def length(self) -> int:
        return len(self.token_ids)

    @property
    def namespace(self) -> str:
        return stream_namespace(self.stream_id, self.number)

    @property
    def next_position(self) -> int:
        """Where the next token goes: one past the largest position of the memory."""
        return int(self.positions.max()) + 1 if self.length else 0

    def candidate_mask(self) -> torch.Tensor:
        return (self.kind == TOKEN_MEDIA) | (self.kind == TOKEN_DELIMITER)

    def footprint(self) -> dict[int, int]:
        """Kept visual tokens per chunk index."""
        media = self.kind == TOKEN_MEDIA
        chunks, counts = torch.unique(self.chunk[media], return_counts=True)
        return {int(c): int(n) for c, n in zip(chunks.tolist(), counts.tolist())}

    @classmethod
    def empty(cls, stream_id: str, multimodal_positions: bool) -> "MemoryVersion":
        positions = torch.zeros((3, 0) if multimodal_positions else (0,), dtype=torch.int64)
        return cls(stream_id, 0, array("q"), positions, torch.zeros(0, dtype=torch.int8),
                   torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64),
                   torch.zeros(0, dtype=torch.float64))


def rebase_positions(positions: torch.Tensor, unit: torch.Tensor) -> torch.Tensor:
    """Contiguous positions for a memory's kept tokens (in order).

    One position per token (``[n]``): ``0 .. n-1``. M-RoPE (``[3, n]``): tokens are grouped
    into runs of the same media item (``unit >= 0``; a text token, ``unit == -1``, is its own
    group); each group keeps its tokens' offsets relative to its smallest coordinate (an image's
    rows and columns, a video's frames) and starts one past the previous group's largest
    position. So an item that lost tokens keeps its geometry, the gaps between items and the
    positions of evicted items disappear, and the largest position is at most the sum of the
    groups' extents (<= n for text, <= an item's grid side per item).

    Returns int64 of the input's shape.
    """
    if positions.dim() == 1:
        return torch.arange(positions.numel(), dtype=torch.int64)
    count = positions.shape[1]
    if count == 0:
        return positions.clone()
    unit = unit.to(torch.int64)
    new_group = torch.ones(count, dtype=torch.bool)
    new_group[1:] = (unit[1:] != unit[:-1]) | (unit[1:] < 0)
    group = torch.cumsum(new_group.to(torch.int64), 0) - 1
    num_groups = int(group[-1]) + 1
    token_min = positions.min(dim=0).values
    base = torch.full((num_groups,), torch.iinfo(torch.int64).max, dtype=torch.int64)
    base = base.scatter_reduce(0, group, token_min, reduce="amin")
    relative = positions - base[group][None, :]
    extent = torch.zeros(num_groups, dtype=torch.int64).scatter_reduce(
        0, group, relative.max(dim=0).values + 1, reduce="amax")
    start = torch.cumsum(extent, 0) - extent
    return relative + start[group][None, :]


def footprint_floor(time_s: torch.Tensor, scores: torch.Tensor, eligible: torch.Tensor,
                    segment_s: float, max_segments: int) -> torch.Tensor:
    """The best-scoring eligible token of every time segment, as a bool mask ``[n]``.

    Segments are ``segment_s`` wide; while more than ``max_segments`` hold eligible tokens, the
    width doubles (older content is then covered more coarsely), so the floor never takes more
    than ``max_segments`` tokens however long the stream runs.
    """
    protected = torch.zeros(scores.numel(), dtype=torch.bool)
    usable = eligible & torch.isfinite(time_s)
    if max_segments < 1 or not bool(usable.any()):
        return protected
    index = usable.nonzero().flatten()
    times = time_s[index].to(torch.float64)
    width = float(segment_s)
    while True:
        bucket = torch.floor(times / width).to(torch.int64)
        if int(torch.unique(bucket).numel()) <= max_segments:
            break
        width *= 2.0
    # Best score first within each bucket, then the first row of each bucket.
    order = torch.argsort(scores[index].to(torch.float64), descending=True, stable=True)
    order = order[torch.argsort(bucket[order], stable=True)]
    sorted_bucket = bucket[order]
    first = torch.ones(order.numel(), dtype=torch.bool)
    first[1:] = sorted_bucket[1:] != sorted_bucket[:-1]
    protected[index[order[first]]] = True
    return protected


@dataclass
class StreamState:
    """A stream the server holds a memory for."""

    stream_id: str
    current: MemoryVersion
    cap_tokens: Optional[int] = None
    keep_sink: bool = True
    footprint_s: float = 60.0
    ingest_rid: Optional[str] = None  # the append request in flight (one at a time)
    last_used: float = field(default_factory=time.monotonic)
    appended: int = 0  # chunks appended since the memory started
    superseded: list = field(default_factory=list)  # older versions still referenced


class StreamRegistry:
    """Streams, their memory versions, and which live request holds which version.

    Args:
        max_streams: most streams held at once; a new one beyond it is refused (503).
        idle_timeout_s: a stream unused this long is closed at the next request (0: never).
        multimodal_positions: the model uses M-RoPE (``[3, n]`` positions).
    """

    def __init__(self, max_streams: int = 256, idle_timeout_s: float = 0.0, multimodal_positions: bool = False):
        self.max_streams = max_streams
        self.idle_timeout_s = idle_timeout_s
        self.multimodal_positions = multimodal_positions
        self.streams: dict[str, StreamState] = {}
        self.requests: dict[str, tuple[StreamState, MemoryVersion, str]] = {}

    # ------------------------------------------------------------------ requests
    def admit(self, rid: str, op) -> tuple[StreamState, MemoryVersion, list[MemoryVersion]]:
        """Register request ``rid`` doing ``op`` (config.StreamOp).

        Returns the stream, the version the request reads, and versions that became
        unreferenced (a ``start`` replacing a memory, idle streams closed): the caller deletes
        those from the tree. Raises StreamError.
        """
        if rid in self.requests:
            raise StreamError(f"request id {rid!r} is already registered with stream {self.requests[rid][0].stream_id!r}")
        released = self.close_idle()
        state = self.streams.get(op.stream_id)
        if op.op == "append" and op.start:
            if state is not None:
                if state.ingest_rid is not None:
                    raise StreamError(f"stream memory {op.stream_id!r} has an append in flight "
                                      f"({state.ingest_rid}); start it again once that finishes", HTTPStatus.CONFLICT)
                released += self.close(op.stream_id)
            elif len(self.streams) >= self.max_streams:
                raise StreamError(f"the server holds {len(self.streams)} stream memories, its limit "
                                  f"(--flashcache-stream-max {self.max_streams}); close one first",
                                  HTTPStatus.SERVICE_UNAVAILABLE)
            state = StreamState(op.stream_id, MemoryVersion.empty(op.stream_id, self.multimodal_positions),
                                cap_tokens=op.cap_tokens, keep_sink=op.keep_sink, footprint_s=op.footprint_s)
            self.streams[op.stream_id] = state
        elif state is None:
            raise StreamError(f"unknown stream memory {op.stream_id!r}: it was never started on this server, "
                              "or it was closed, flushed or lost in a restart; start it again "
                              "(stream.start=true) and re-append its chunks", HTTPStatus.NOT_FOUND)
        elif op.op == "append":
            if state.ingest_rid is not None:
                raise StreamError(f"stream memory {op.stream_id!r} has an append in flight ({state.ingest_rid}); "
                                  "appends of one stream must be sent one at a time", HTTPStatus.CONFLICT)
            if op.cap_tokens is not None:
                state.cap_tokens = op.cap_tokens
            state.footprint_s = op.footprint_s
        if op.op == "ask" and state.current.length == 0:
            raise StreamError(f"stream memory {op.stream_id!r} is still empty: its first chunk has not "
                              "been appended yet", HTTPStatus.CONFLICT)
        if op.op == "append":
            state.ingest_rid = rid
        version = state.current
        version.refs.add(rid)
        state.last_used = time.monotonic()
        self.requests[rid] = (state, version, op.op)
        return state, version, released

    def lookup(self, rid: str) -> Optional[tuple[StreamState, MemoryVersion, str]]:
        return self.requests.get(rid)

    def release(self, rid: str) -> list[MemoryVersion]:
        """Request ``rid`` is done (finished, aborted, never scheduled): drop its reference.
        Returns versions that are now unreferenced and superseded (to delete from the tree)."""
        entry = self.requests.pop(rid, None)
        if entry is None:
            return []
        state, version, _ = entry
        version.refs.discard(rid)
        if state.ingest_rid == rid:
            state.ingest_rid = None
        if version.superseded and not version.refs:
            if version in state.superseded:
                state.superseded.remove(version)
            return [version]
        return []

    # ------------------------------------------------------------------ versions
    def install(self, state: StreamState, version: MemoryVersion) -> list[MemoryVersion]:
        """Make ``version`` the stream's current memory. Returns the old version if nothing
        references it any more (to delete), else keeps it until its last request is released."""
        old = state.current
        version.number = old.number + 1
        state.current = version
        state.appended += 1
        state.last_used = time.monotonic()
        old.superseded = True
        if self.streams.get(state.stream_id) is not state:
            # Closed while the append ran: the new version is as good as closed too.
            version.superseded = True
        if old.refs or old.length == 0:
            if old.refs:
                state.superseded.append(old)
            return []
        return [old]

    def close(self, stream_id: str) -> list[MemoryVersion]:
        """Forget a stream. Returns its versions that nothing references (to delete); the others
        are deleted when their last request is released."""
        state = self.streams.pop(stream_id, None)
        if state is None:
            return []
        released = []
        for version in [state.current, *state.superseded]:
            version.superseded = True
            if not version.refs and version.length:
                released.append(version)
        state.superseded = [v for v in state.superseded if v.refs]
        if state.current.refs:
            state.superseded.append(state.current)
        return released

    def close_idle(self, now: Optional[float] = None) -> list[MemoryVersion]:
        if self.idle_timeout_s <= 0:
            return []
        now = time.monotonic() if now is None else now
        idle = [sid for sid, state in self.streams.items()
                if state.ingest_rid is None and now - state.last_used > self.idle_timeout_s]
        released = []
        for stream_id in idle:
            released += self.close(stream_id)
        return released

    def clear(self) -> None:
        """Forget everything (the tree was flushed)."""
        self.streams.clear()
        self.requests.clear()

    def held_versions(self) -> list[MemoryVersion]:
        """Every version still in the tree: current ones and superseded ones with live requests."""
        versions = []
        for state in self.streams.values():
            versions += [v for v in [state.current, *state.superseded] if v.length]
        seen = {id(v) for v in versions}
        for state, version, _ in self.requests.values():
            if id(version) not in seen and version.length:
                versions.append(version)
                seen.add(id(version))
        return versions


def stream_report(state: StreamState, version: MemoryVersion, op, **extra: Any) -> dict[str, Any]:
    """The ``meta_info["flashcache"][0]["stream"]`` entry of a stream request."""
    candidates = version.candidate_mask()
    report = {
        "id": state.stream_id,
        "op": op.op,
        "version": version.number,
        "memory_tokens": version.length,
        "memory_kv_slots": version.length,
        "capped_kv_slots": int(candidates.sum()),
        "cap_tokens": state.cap_tokens,
        "next_position": version.next_position,
        "chunks_held": int(torch.unique(version.chunk[version.kind == TOKEN_MEDIA]).numel()),
        "chunks_appended": state.appended,
    }
    if getattr(op, "report_footprint", False):
        report["footprint"] = {str(k): v for k, v in version.footprint().items()}
    report.update(extra)
    return report


def chunk_time(op, state: StreamState) -> float:
    """Stream time of an appended chunk: the client's ``time_s``, else its chunk index, else the
    number of chunks appended so far (then ``footprint_s`` counts chunks)."""
    if op.time_s is not None:
        return float(op.time_s)
    if op.chunk is not None:
        return float(op.chunk)
    return float(state.appended)


def is_nan(value: float) -> bool:
    return isinstance(value, float) and math.isnan(value)
