"""Rolling dynamic KV budgets for endless streams (pure logic, no torch, no server).

Two decisions are made per stream:

1. **Per-chunk retention.** A chunk whose outlier energy (streaming.energy) is above the
   stream's running mean keeps more of its KV, a quiet chunk keeps less:
   ``retention = base_retention * (energy / mean_energy) ** energy_exponent``, clamped to
   ``[min_retention, max_retention]``. This is FlashCache's Dynamic Budget Allocation lifted
   from heads to chunks.
2. **Shrinking older memory at the cap.** When the kept tokens of the memory plus the incoming
   chunk would pass ``kv_cap_tokens``, older chunks are re-scored
   (``kept * (energy / mean_energy) ** energy_exponent * age_decay ** age``) and the budget
   left after the sink and the incoming chunk is water-filled over them in proportion to that
   score, never growing a chunk. The total lands at ``shrink_to * kv_cap_tokens`` so the next
   few chunks fit without another shrink. A chunk squeezed below ``min_tokens_per_chunk`` is
   evicted (0 tokens), which keeps memory flat however long the stream runs.

A backend whose server enforces the cap itself (SGLangMemoryBackend: the server re-scores the
older kept tokens with their real keys) uses only decision 1, through :class:`RetentionSchedule`.

The first chunk is the attention sink: with ``keep_sink`` it is never shrunk (as long as it
fits in the shrink target on its own).

Settings and their defaults are documented on :class:`BudgetSettings`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Sequence

__all__ = [
    "BudgetSettings",
    "MemoryEntry",
    "ShrinkPlan",
    "chunk_retention",
    "plan_shrink",
    "RetentionSchedule",
    "RollingBudget",
]

_ENERGY_FLOOR = 1e-6  # keeps the energy ratio finite for black / static chunks


@dataclass(frozen=True)
class BudgetSettings:
    """Per-stream budget settings.

    Attributes:
        kv_cap_tokens: most KV slots of dropable tokens a stream's memory keeps: visual tokens
            and their delimiters; the prompt header and the first chunk (the sink) are not
            counted. The server enforces it and reports the same count (default 8192).
        base_retention: retention of a chunk with average outlier energy (default 0.3).
        min_retention / max_retention: clamp of a chunk's retention (defaults 0.05 / 1.0).
        energy_exponent: how strongly retention follows energy; 0 gives a fixed retention
            (default 1.0).
        energy_smoothing: weight of the newest chunk in the running mean energy, in (0, 1]
            (default 0.2).
        keep_sink: never shrink the first chunk (default True).
        shrink_to: fraction of the cap that memory is shrunk to when the cap is reached,
            in (0, 1] (default 0.85).
        age_decay: per-chunk age factor on the re-scoring of older memory, in (0, 1]; below 1
            older chunks give up tokens first (default 0.97).
        min_tokens_per_chunk: a chunk shrunk below this many tokens is evicted (default 4).
        footprint_s: the server keeps at least the best visual token of every segment of this
            many seconds of stream time (segments widen when there are more than cap / 4 of
            them) (default 60).
    """

    kv_cap_tokens: int = 8192
    base_retention: float = 0.3
    min_retention: float = 0.05
    max_retention: float = 1.0
    energy_exponent: float = 1.0
    energy_smoothing: float = 0.2
    keep_sink: bool = True
    shrink_to: float = 0.85
    age_decay: float = 0.97
    min_tokens_per_chunk: int = 4
    footprint_s: float = 60.0

    def __post_init__(self) -> None:
        def check(name: str, value: float, low: float, high: float, low_open: bool = False) -> None:
            below = value <= low if low_open else value < low
            if below or value > high or (isinstance(value, float) and math.isnan(value)):
                bracket = "(" if low_open else "["
                raise ValueError(f"BudgetSettings.{name}={value!r} is outside {bracket}{low}, {high}]")

        if not isinstance(self.kv_cap_tokens, int) or self.kv_cap_tokens < 1:
            raise ValueError(f"BudgetSettings.kv_cap_tokens={self.kv_cap_tokens!r} must be an int >= 1")
        check("min_retention", self.min_retention, 0.0, 1.0, low_open=True)
        check("max_retention", self.max_retention, self.min_retention, 1.0)
        check("base_retention", self.base_retention, self.min_retention, self.max_retention)
        check("energy_exponent", self.energy_exponent, 0.0, 8.0)
        check("energy_smoothing", self.energy_smoothing, 0.0, 1.0, low_open=True)
        check("shrink_to", self.shrink_to, 0.0, 1.0, low_open=True)
        check("age_decay", self.age_decay, 0.0, 1.0, low_open=True)
        if not (isinstance(self.footprint_s, (int, float)) and self.footprint_s > 0 and math.isfinite(self.footprint_s)):
            raise ValueError(f"BudgetSettings.footprint_s={self.footprint_s!r} must be a number of seconds > 0")
        if not isinstance(self.min_tokens_per_chunk, int) or self.min_tokens_per_chunk < 0:
            raise ValueError(
                f"BudgetSettings.min_tokens_per_chunk={self.min_tokens_per_chunk!r} must be an int >= 0"
            )

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, data: dict) -> "BudgetSettings":
        names = set(cls.__dataclass_fields__)
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown budget settings {sorted(unknown)}; valid: {sorted(names)}")
        return cls(**data)


@dataclass(frozen=True)
class MemoryEntry:
    """One chunk as the budget sees it."""

    index: int
    logical_tokens: int
    kept_tokens: int
    outlier_energy: float


@dataclass(frozen=True)
class ShrinkPlan:
    """New kept-token counts for older chunks (only the chunks that change are listed).

    Attributes:
        new_kept: chunk index -> kept tokens after the shrink (0 = evicted).
        incoming_kept: kept tokens allowed for the incoming chunk (it may be clamped when it
            alone would not fit beside the sink).
        total_kept: kept tokens of the memory after the shrink, incoming chunk included.
    """

    new_kept: dict[int, int] = field(default_factory=dict)
    incoming_kept: int = 0
    total_kept: int = 0

    @property
    def is_empty(self) -> bool:
        return not self.new_kept


def chunk_retention(outlier_energy: float, mean_energy: float, settings: BudgetSettings) -> float:
    """Retention for a chunk from its outlier energy relative to the stream's mean energy."""
    if not 0.0 <= outlier_energy or math.isnan(outlier_energy):
        raise ValueError(f"outlier_energy={outlier_energy!r} must be >= 0")
    ratio = max(outlier_energy, _ENERGY_FLOOR) / max(mean_energy, _ENERGY_FLOOR)
    retention = settings.base_retention * ratio**settings.energy_exponent
    return min(settings.max_retention, max(settings.min_retention, retention))


def _water_fill(budget: float, weights: Sequence[float], caps: Sequence[int]) -> list[float]:
    """Split ``budget`` in proportion to ``weights`` with no item above its cap."""
    allocation = [0.0] * len(weights)
    open_items = [i for i, cap in enumerate(caps) if cap > 0]
    remaining = float(budget)
    while open_items and remaining > 1e-9:
        weight_sum = sum(max(weights[i], 1e-12) for i in open_items)
        saturated = []
        for i in open_items:
            share = remaining * max(weights[i], 1e-12) / weight_sum
            if allocation[i] + share >= caps[i]:
                saturated.append(i)
        if not saturated:
            for i in open_items:
                allocation[i] += remaining * max(weights[i], 1e-12) / weight_sum
            break
        for i in saturated:
            remaining -= caps[i] - allocation[i]
            allocation[i] = float(caps[i])
        open_items = [i for i in open_items if i not in saturated]
    return allocation


def plan_shrink(
    entries: Sequence[MemoryEntry],
    incoming_kept: int,
    mean_energy: float,
    settings: BudgetSettings,
) -> ShrinkPlan:
    """Plan how older memory shrinks so that ``entries + incoming chunk`` stays under the cap.

    ``entries`` are in chunk order; the first one is the sink when ``settings.keep_sink``.
    Returns an empty plan when everything fits.
    """
    if incoming_kept < 0:
        raise ValueError(f"incoming_kept={incoming_kept} must be >= 0")
    cap = settings.kv_cap_tokens
    current = sum(e.kept_tokens for e in entries)
    if current + incoming_kept <= cap:
        return ShrinkPlan(incoming_kept=incoming_kept, total_kept=current + incoming_kept)

    target = int(settings.shrink_to * cap)
    sink = entries[0] if entries and settings.keep_sink else None
    sink_kept = sink.kept_tokens if sink is not None else 0
    if sink is not None and sink_kept >= target:
        sink, sink_kept = None, 0  # a sink that alone fills the target cannot be spared
    # The incoming chunk never takes more than half of what is left beside the sink, so
    # one loud chunk cannot wipe out the whole history.
    incoming = min(incoming_kept, max(0, (target - sink_kept + 1) // 2) if entries else target)
    incoming = min(incoming, cap)
    older = [e for e in entries if sink is None or e.index != sink.index]
    budget = max(0, target - sink_kept - incoming)

    newest_index = max((e.index for e in entries), default=0)
    weights = [
        e.kept_tokens
        * (max(e.outlier_energy, _ENERGY_FLOOR) / max(mean_energy, _ENERGY_FLOOR)) ** settings.energy_exponent
        * settings.age_decay ** (newest_index - e.index)
        for e in older
    ]
    allocation = _water_fill(budget, weights, [e.kept_tokens for e in older])
    new_kept: dict[int, int] = {}
    total = sink_kept + incoming
    for entry, share in zip(older, allocation):
        kept = min(entry.kept_tokens, int(math.floor(share)))
        if kept < settings.min_tokens_per_chunk:
            kept = 0
        if kept != entry.kept_tokens:
            new_kept[entry.index] = kept
        total += kept
    return ShrinkPlan(new_kept=new_kept, incoming_kept=incoming, total_kept=total)


@dataclass
class RetentionSchedule:
    """Decision 1 alone: each chunk's retention from its energy and the stream's running mean.

    Not thread-safe; the owner holds a lock around it.
    """

    settings: BudgetSettings
    mean_energy: float = 0.0
    num_chunks: int = 0

    def next_retention(self, outlier_energy: float) -> float:
        """Retention of the next chunk; the chunk's energy joins the running mean."""
        if self.num_chunks == 0:
            self.mean_energy = outlier_energy
        else:
            alpha = self.settings.energy_smoothing
            self.mean_energy = (1 - alpha) * self.mean_energy + alpha * outlier_energy
        self.num_chunks += 1
        return chunk_retention(outlier_energy, self.mean_energy, self.settings)


@dataclass
class RollingBudget:
    """The budget state of one stream: its chunk entries and the running mean energy.

    Not thread-safe; the owner (a memory backend) holds a lock around it.
    """

    settings: BudgetSettings
    entries: list[MemoryEntry] = field(default_factory=list)
    mean_energy: float = 0.0
    evicted_chunks: int = 0
    shrinks: int = 0
    total_logical_tokens: int = 0  # every chunk ever admitted, evicted ones included

    def retention_for(self, outlier_energy: float) -> float:
        """Retention of the next chunk (uses the mean energy including this chunk)."""
        return chunk_retention(outlier_energy, self._next_mean(outlier_energy), self.settings)

    def _next_mean(self, outlier_energy: float) -> float:
        if not self.entries and self.mean_energy == 0.0:
            return outlier_energy
        alpha = self.settings.energy_smoothing
        return (1 - alpha) * self.mean_energy + alpha * outlier_energy

    def admit(self, index: int, logical_tokens: int, kept_tokens: int, outlier_energy: float) -> ShrinkPlan:
        """Plan and apply the shrink for an incoming chunk, then record it.

        Returns the plan; ``plan.incoming_kept`` is what the chunk may keep (clamped from
        ``kept_tokens`` when needed).
        """
        if self.entries and index <= self.entries[-1].index:
            raise ValueError(f"chunk index {index} is not after the last admitted chunk {self.entries[-1].index}")
        self.mean_energy = self._next_mean(outlier_energy)
        plan = plan_shrink(self.entries, kept_tokens, self.mean_energy, self.settings)
        self.apply(plan)
        self.entries.append(MemoryEntry(index, logical_tokens, plan.incoming_kept, outlier_energy))
        self.total_logical_tokens += logical_tokens
        return plan

    def apply(self, plan: ShrinkPlan) -> None:
        if plan.is_empty:
            return
        self.shrinks += 1
        kept_entries = []
        for entry in self.entries:
            new = plan.new_kept.get(entry.index, entry.kept_tokens)
            if new == 0:
                self.evicted_chunks += 1
            kept_entries.append(replace(entry, kept_tokens=new))
        # Evicted chunks leave the list, so the list stays bounded (at most
        # kv_cap_tokens / min_tokens_per_chunk entries) on endless streams.
        self.entries = [e for e in kept_entries if e.kept_tokens > 0]

    @property
    def kept_tokens(self) -> int:
        return sum(e.kept_tokens for e in self.entries)

    @property
    def logical_tokens(self) -> int:
        return self.total_logical_tokens
