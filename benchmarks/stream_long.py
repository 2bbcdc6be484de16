"""Long stream: one hour of video through the server-held memory, faster than real time.

    python -m benchmarks.stream_long --minutes 60 --output benchmarks/results/stream_long_60min_cpu.json
    python -m benchmarks.stream_long --quick                  # CI: 4 minutes of stream time
    python -m benchmarks.stream_long --reanalyze benchmarks/results/stream_long_60min_cpu.json

One stream replays a generated video of ``--minutes`` minutes through the product
(:class:`~flashcache_sglang.streaming.service.StreamManager` +
:class:`~flashcache_sglang.streaming.sglang_backend.SGLangMemoryBackend`, a
``flashcache_sglang.launch_server`` holding the memory), unpaced: each chunk's ``time_s``
advances with the video while ingest goes as fast as the CPU allows (the file source blocks
rather than drops). The video has a **planted scene**: from ``--planted-at`` for
``--planted-seconds`` seconds the frame is a red and yellow grid, unlike anything else in it.

It answers issue 13's memory questions for one stream, from the server's own reports:

- **footprint**: with ``report_footprint`` every append returns the kept visual tokens per chunk;
  at the end every ``--segment`` (60 s) of stream time must keep at least one;
- **the planted scene**: how many tokens its chunks keep at the end, against the chunks of the
  minute before and after it (and how that evolved, and what each chunk kept when it arrived),
  with an explanation written from those numbers;
- **flat KV**: the memory's KV slots (``memory_tokens``) once the cap is reached, spread <= 5%;
- **bounded positions and length**: the stream appends at least 10x the server's
  ``--context-length`` in tokens (and, without re-basing, its positions would pass the context
  too), while ``next_position`` stays below the context and ``next_position`` and
  ``memory_tokens`` stop growing (<= 5% over the second half of the run). The un-rebased
  positions are measured, not estimated: a probe stream with retention 1 (nothing dropped, so
  re-basing is the identity) gives the positions the header and the first chunk take and the
  positions each further chunk adds; the stream's total is then
  ``header + sink + (chunks - 1) * per_chunk``. Re-based positions can exceed the memory's token
  count (a video item keeps its grid offsets however few of its tokens survive); the report
  gives that structural ceiling too;
- zero errors, zero lost or duplicated chunks (ingest, metadata store and the server's count
  agree), zero leaked KV slots after the stream is closed and the cache flushed.

Questions about the start of the stream are asked every ``--question-every`` seconds of stream
time (their prompt size and TTFT must not grow either). The JSON records the machine, its load
average over the run and every setting; ``--reanalyze`` recomputes the analysis from the raw
per-append records.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import secrets
import signal
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional, Sequence

from benchmarks.serving import (ACTIVE_SERVERS, BenchServer, exit_on_sigterm, finite, load_average, machine_info,
                                settings_from_options, write_report)
from benchmarks.soak import TINY_MAX_PIXELS, TimedBackend, chunk_integrity, generate_video
from benchmarks.stream_wire import RecordingSession, sum_timings
from flashcache_sglang.streaming.sglang_backend import DEFAULT_REBUILD_CHUNKS, FRAME_FACTOR

RESULTS_DIR = Path(__file__).resolve().parent / "results"
FLATNESS_TARGET = 0.05
LENGTH_FACTOR_TARGET = 10.0  # the stream appends >= 10x the tokens the context holds
PLATEAU_TARGET = 0.05  # next_position / memory_tokens: last tenth vs the tenth after the midpoint
QUESTION = "What did the stream show at its very start?"


@dataclass(frozen=True)
class LongStreamSettings:
    """Everything that shapes a long-stream run (recorded in the JSON)."""

    stream_minutes: float = 60.0
    fps: float = 2.0
    chunk_frames: int = 4
    max_pixels: int = TINY_MAX_PIXELS
    kv_cap: int = 256
    base_retention: float = 0.3
    footprint_s: float = 60.0
    segment_s: float = 60.0
    context_length: int = 2048
    planted_at_s: float = 120.0
    planted_s: float = 6.0
    question_every_s: float = 300.0
    answer_tokens: int = 8
    max_total_tokens: int = 4096
    footprint_snapshot_every: int = 30  # keep the full footprint of every N-th append (and the last)
    request_timeout_s: float = 300.0

    def __post_init__(self) -> None:
        for name in ("stream_minutes", "fps", "chunk_frames", "kv_cap", "footprint_s", "segment_s", "context_length",
                     "planted_s", "question_every_s", "answer_tokens", "max_total_tokens", "footprint_snapshot_every",
                     "request_timeout_s"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and value > 0 and math.isfinite(value)):
                raise ValueError(f"long-stream setting {name}={value!r} must be a positive number")
        if not 0 < self.base_retention <= 1:
            raise ValueError(f"long-stream setting base_retention={self.base_retention!r} must be in (0, 1]")
        if self.chunk_frames % 2:
            raise ValueError(f"long-stream setting chunk_frames={self.chunk_frames} must be even")
        if not 0 < self.planted_at_s < self.duration_s - self.planted_s:
            raise ValueError(f"planted_at_s={self.planted_at_s} must lie inside the stream (0, "
                             f"{self.duration_s - self.planted_s:g}) s")

    @property
    def duration_s(self) -> float:
        return self.stream_minutes * 60.0

    @property
    def chunk_seconds(self) -> float:
        return self.chunk_frames / self.fps

    def planted_filter(self) -> str:
        """ffmpeg filters painting the planted scene (a red frame with a yellow grid), then light
        camera noise over every frame, so the planted frames differ from each other as all
        frames of the video do."""
        end = self.planted_at_s + self.planted_s - 1e-3  # frames at [planted_at, planted_at + planted_s)
        when = f"enable='between(t,{self.planted_at_s:g},{end:g})'"
        return (f"drawbox=x=0:y=0:w=iw:h=ih:color=0xb02020@1:t=fill:{when},"
                f"drawgrid=w=20:h=20:t=6:color=0xd0d040@1:{when},noise=alls=6:allf=t+u:all_seed=99")


# ---------------------------------------------------------------------------------------- analysis
def segment_footprint(footprint: dict[int, int], chunk_times: dict[int, float], segment_s: float,
                      duration_s: float) -> list[int]:
    """Kept visual tokens per ``segment_s`` segment of stream time (``footprint``: chunk index
    -> kept tokens; ``chunk_times``: chunk index -> its start time)."""
    count = max(1, math.ceil(duration_s / segment_s - 1e-9))
    per_segment = [0] * count
    for chunk, tokens in footprint.items():
        start = chunk_times.get(chunk)
        if start is None:
            continue
        per_segment[min(count - 1, int(start // segment_s))] += tokens
    return per_segment


def planted_chunks(chunk_times: dict[int, float], settings: LongStreamSettings) -> list[int]:
    """Chunks that start inside the planted scene."""
    end = settings.planted_at_s + settings.planted_s
    return sorted(c for c, t in chunk_times.items() if settings.planted_at_s <= t < end)


def neighbour_chunks(chunk_times: dict[int, float], settings: LongStreamSettings, sink: Optional[int]) -> list[int]:
    """Chunks within one segment before or after the planted scene (the sink excluded)."""
    start, end = settings.planted_at_s, settings.planted_at_s + settings.planted_s
    return sorted(c for c, t in chunk_times.items() if c != sink and (start - settings.segment_s <= t < start
                                                                       or end <= t < end + settings.segment_s))


def plateau(points: Sequence[tuple[float, float]]) -> dict[str, Any]:
    """Whether a series has stopped growing, for points taken after the cap was reached.

    ``growth``: the mean of the last tenth over the mean of the tenth right after the midpoint,
    minus 1 (a bounded series that fills up after the cap and then stays flat has ~0 there;
    one still growing does not); ``growth_since_cap``: last tenth over the first tenth, minus 1;
    also the range and a least-squares slope per hour of stream time over the second half.
    """
    if len(points) < 20:
        return {"samples": len(points), "growth": None, "growth_since_cap": None, "min": None, "max": None,
                "slope_per_hour_second_half": None}
    tenth = len(points) // 10
    middle = len(points) // 2
    first = statistics.mean(v for _, v in points[:tenth])
    after_middle = statistics.mean(v for _, v in points[middle: middle + tenth])
    last = statistics.mean(v for _, v in points[-tenth:])
    half = points[middle:]
    mean_t, mean_v = statistics.mean(t for t, _ in half), statistics.mean(v for _, v in half)
    spread_t = sum((t - mean_t) ** 2 for t, _ in half)
    slope = sum((t - mean_t) * (v - mean_v) for t, v in half) / spread_t if spread_t else 0.0
    values = [v for _, v in points]
    return {"samples": len(points), "first_tenth_mean": first, "after_midpoint_tenth_mean": after_middle,
            "last_tenth_mean": last, "growth": last / after_middle - 1 if after_middle else None,
            "growth_since_cap": last / first - 1 if first else None, "min": min(values), "max": max(values),
            "slope_per_hour_second_half": slope * 3600.0}


def analyze(raw: dict[str, Any], settings: LongStreamSettings) -> dict[str, Any]:
    """Every number the report gives, from the raw records of a run (``ingests``, ``probe``,
    ``final_report``, ``questions``, ``leak_check``, ``chunk_integrity``)."""
    ingests = raw["ingests"]
    ok = [i for i in ingests if not i.get("error")]
    chunk_times = {i["chunk"]: i["chunk_time_s"] for i in ok}
    sink = min(chunk_times) if chunk_times else None
    final = raw.get("final_report") or {}
    footprint = {int(k): int(v) for k, v in (final.get("footprint") or {}).items()}
    out: dict[str, Any] = {"appends": len(ingests), "append_errors": len(ingests) - len(ok),
                           "question_errors": sum(1 for q in raw.get("questions", []) if q.get("error"))}
    out["errors"] = out["append_errors"] + out["question_errors"] + (1 if raw.get("stream_status") == "failed" else 0)
    stream_seconds = (max(chunk_times.values()) + settings.chunk_seconds) if chunk_times else 0.0
    out["stream_seconds"] = stream_seconds
    wall = raw.get("ingest_wall_s")
    out["speed_vs_real_time"] = stream_seconds / wall if wall else None

    # Footprint per segment.
    segments = segment_footprint(footprint, chunk_times, settings.segment_s, stream_seconds)
    empty = [k for k, n in enumerate(segments) if n == 0]
    out["footprint"] = {"measured": {"segments": len(segments), "empty_segments": empty, "min_tokens": min(segments)},
                        "target": ">= 1 kept visual token in every segment", "met": bool(segments) and not empty,
                        "segment_s": settings.segment_s, "tokens_per_segment": segments,
                        "sink_chunk": sink, "sink_chunk_note": "the first chunk is the attention sink: kept whole and "
                        "never a candidate, so the footprint (candidate visual tokens) does not count it",
                        "chunks_holding_tokens": len(footprint), "kept_visual_tokens": sum(footprint.values())}

    # The planted scene.
    planted = planted_chunks(chunk_times, settings)
    neighbours = neighbour_chunks(chunk_times, settings, sink)
    others = [c for c in chunk_times if c != sink and c not in planted]
    kept = lambda chunks: [footprint.get(c, 0) for c in chunks]  # noqa: E731 - local shorthand
    # Visual tokens a chunk kept in its own append (the server's footprint); older runs recorded
    # only the receipt's kept tokens, which also count the chunk's kept delimiters.
    at_admission = {i["chunk"]: i.get("own_visual_kept", i.get("kept_tokens")) for i in ok}
    retention = {i["chunk"]: i.get("retention") for i in ok}
    planted_kept, neighbour_kept, other_kept = kept(planted), kept(neighbours), kept(others)
    per_chunk_planted = statistics.mean(planted_kept) if planted_kept else None
    per_chunk_neighbour = statistics.mean(neighbour_kept) if neighbour_kept else None
    per_chunk_all = statistics.mean(other_kept) if other_kept else None
    planted_out: dict[str, Any] = {
        "chunks": planted, "kept_at_end": planted_kept, "kept_at_end_total": sum(planted_kept),
        "kept_per_chunk": per_chunk_planted, "neighbour_chunks": len(neighbours),
        "neighbour_kept_total": sum(neighbour_kept), "neighbour_kept_per_chunk": per_chunk_neighbour,
        "neighbour_chunks_keeping_any": sum(1 for n in neighbour_kept if n), "all_chunks_kept_per_chunk": per_chunk_all,
        "ratio_to_neighbours": (per_chunk_planted / per_chunk_neighbour
                                if per_chunk_planted is not None and per_chunk_neighbour else None),
        "planted_kept_at_admission": [at_admission.get(c) for c in planted],
        "neighbour_kept_at_admission_mean": _mean([at_admission.get(c) for c in neighbours]),
        "planted_retention_at_admission": [retention.get(c) for c in planted],
        "neighbour_retention_at_admission_mean": _mean([retention.get(c) for c in neighbours]),
        "percentile_among_chunks": _percentile_rank(per_chunk_planted, other_kept),
    }
    history = [(i["chunk_time_s"], i["planted_kept"], i.get("neighbour_kept")) for i in ok if "planted_kept" in i]
    planted_out["history_points"] = len(history)
    if history:
        peak = max(history, key=lambda h: h[1])
        planted_out["peak_kept"] = peak[1]
        planted_out["peak_at_stream_s"] = peak[0]
        planted_out["kept_after_10_min"] = next((h[1] for h in history if h[0] >= settings.planted_at_s + 600), None)
    planted_out["explanation"] = explain_planted(planted_out, out["footprint"], settings)
    out["planted_scene"] = planted_out

    # Flat KV and bounded positions after the cap.
    capped_at = next((i for i in ok if (i.get("capped_kv_slots") or 0) >= settings.kv_cap), None)
    settled = [i for i in ok if capped_at is not None and i["t"] >= capped_at["t"]]
    memory = [i["memory_tokens"] for i in settled if i.get("memory_tokens") is not None]
    out["memory_flat"] = {"measured": (max(memory) - min(memory)) / max(memory) if memory else None,
                          "target": f"<= {FLATNESS_TARGET:.0%}", "cap": settings.kv_cap,
                          "reached_cap_at_stream_s": capped_at["chunk_time_s"] if capped_at else None,
                          "min_memory_tokens": min(memory, default=None), "max_memory_tokens": max(memory, default=None),
                          "appends_after_cap": len(memory)}
    out["memory_flat"]["met"] = len(memory) >= 2 and out["memory_flat"]["measured"] <= FLATNESS_TARGET
    positions = [(i["chunk_time_s"], i["next_position"]) for i in settled if i.get("next_position") is not None]
    lengths = [(i["chunk_time_s"], i["memory_tokens"]) for i in settled if i.get("memory_tokens") is not None]
    logical_total = sum(i.get("logical_tokens") or 0 for i in ok)
    probe = raw.get("probe") or {}
    raw_positions = None
    if probe.get("per_chunk_positions") is not None and chunk_times:
        raw_positions = probe["first_chunk_positions"] + (len(chunk_times) - 1) * probe["per_chunk_positions"]
    max_position = max((i["next_position"] for i in ok if i.get("next_position") is not None), default=None)
    position_plateau, length_plateau = plateau(positions), plateau(lengths)
    context = raw.get("context_length") or settings.context_length
    # Re-basing packs kept items one after another, but each item keeps its own grid offsets
    # (M-RoPE), so a video item left with one token can still span its grid's extent: the
    # structural ceiling is the header and sink plus, per capped token, one item's extent.
    bound = None
    if probe.get("per_chunk_positions") is not None:
        videos_per_chunk = max(1, settings.chunk_frames // 2)  # SGLangMemoryBackend: 2 frames a video
        item_extent = max(1, probe["per_chunk_positions"] // videos_per_chunk - 2)  # minus its 2 delimiters
        bound = probe["first_chunk_positions"] + settings.kv_cap * item_extent
    bounded = {
        "context_length": context,
        "logical_tokens_appended": logical_total,
        "logical_over_context": logical_total / context,
        "unrebased_positions": raw_positions,
        "unrebased_positions_over_context": raw_positions / context if raw_positions else None,
        "max_next_position": max_position,
        "next_position_ceiling": bound,
        "next_position_ceiling_note": "header + sink positions + cap x one video item's grid extent (each kept item "
                                      "keeps its internal offsets)",
        "final_next_position": ok[-1].get("next_position") if ok else None,
        "final_memory_tokens": ok[-1].get("memory_tokens") if ok else None,
        "next_position_after_cap": position_plateau,
        "memory_tokens_after_cap": length_plateau,
        "probe": probe,
    }
    bounded["measured"] = {"max_next_position": max_position,
                           "max_next_position_over_context": max_position / context if max_position else None,
                           "logical_over_context": bounded["logical_over_context"],
                           "unrebased_positions_over_context": bounded["unrebased_positions_over_context"]}
    bounded["target"] = (f"the stream appends >= {LENGTH_FACTOR_TARGET:g}x the context in tokens and un-rebased "
                         f"positions pass the context, while next_position stays below the context and its "
                         f"structural ceiling")
    bounded["met"] = (max_position is not None and max_position < context
                      and (bound is None or max_position <= bound)
                      and bounded["logical_over_context"] >= LENGTH_FACTOR_TARGET
                      and (bounded["unrebased_positions_over_context"] or 0) > 1)
    grows = [p["growth"] for p in (position_plateau, length_plateau)]
    out["positions_plateau"] = {
        "measured": {"next_position_growth_second_half": grows[0], "memory_tokens_growth_second_half": grows[1],
                     "next_position_growth_since_cap": position_plateau.get("growth_since_cap"),
                     "next_position_slope_per_hour_second_half": position_plateau.get("slope_per_hour_second_half")},
        "target": f"next_position and memory_tokens grow <= {PLATEAU_TARGET:.0%} over the second half of the run",
        "met": all(g is not None and g <= PLATEAU_TARGET for g in grows)}
    out["positions_bounded"] = bounded

    # Costs over the stream (informational: the soak checks them under load).
    latencies = [(i["chunk_time_s"], i["seconds"]) for i in ok]
    out["append_latency"] = _early_late(latencies, settings)
    out["append_server_ms"] = _early_late([(i["chunk_time_s"], i["append_ms"] / 1e3) for i in ok
                                           if i.get("append_ms") is not None], settings)
    asked = [q for q in raw.get("questions", []) if not q.get("error")]
    out["questions"] = {"asked": len(raw.get("questions", [])),
                        "prompt_tokens": [q.get("prompt_tokens") for q in asked],
                        "request_bytes": [q.get("request_bytes") for q in asked],
                        "ttft_ms": [round(q["ttft_s"] * 1e3, 1) for q in asked if q.get("ttft_s") is not None]}
    out["errors_check"] = {"measured": out["errors"], "target": "0", "met": out["errors"] == 0}
    disk = [(i["chunk_time_s"], i["disk_files"], i["disk_bytes"]) for i in ok if i.get("disk_bytes") is not None]
    if disk:
        half = disk[len(disk) // 2][0]
        first = max(b for t, _, b in disk if t < half) if any(t < half for t, _, _ in disk) else 0
        second = max(b for t, _, b in disk if t >= half)
        most_files = max(f for _, f, _ in disk)
        out["disk_bounded"] = {
            "measured": {"max_files": most_files, "max_bytes_first_half": first, "max_bytes_second_half": second,
                         "files_end": disk[-1][1], "bytes_end": disk[-1][2], "appends": len(disk)},
            "target": "chunk files kept per stream <= the sink + rebuild set + the chunk in flight (a fixed number), "
                      "bytes in the second half <= 1.2x the first half's maximum",
            "met": most_files <= _files_per_chunk(settings) * (DEFAULT_REBUILD_CHUNKS + 2) and second <= 1.2 * max(first, 1)}
    leak = raw.get("leak_check") or {}
    out["leaked_kv_slots"] = {"measured": leak.get("leaked_kv_slots"), "target": "0",
                              "met": bool(leak.get("ok")) and leak.get("leaked_kv_slots") == 0}
    integrity = raw.get("chunk_integrity")
    if integrity is not None:
        out["chunks"] = integrity
    loads = [i["load1"] for i in ok if i.get("load1") is not None]
    out["load_average_1min"] = {"mean": statistics.mean(loads), "max": max(loads), "min": min(loads)} if loads else None
    checks = ("footprint", "memory_flat", "positions_bounded", "positions_plateau", "errors_check", "leaked_kv_slots",
              "chunks", "disk_bounded")
    out["acceptance"] = {name: {k: out[name][k] for k in ("measured", "target", "met")} for name in checks if name in out}
    out["acceptance"]["all_met"] = all(c["met"] for c in out["acceptance"].values())
    return out


def _files_per_chunk(settings: LongStreamSettings) -> int:
    return max(1, settings.chunk_frames // FRAME_FACTOR)


def _mean(values: Sequence[Optional[float]]) -> Optional[float]:
    present = [v for v in values if v is not None]
    return statistics.mean(present) if present else None


def _percentile_rank(value: Optional[float], population: Sequence[float]) -> Optional[float]:
    """Share of ``population`` strictly below ``value`` (0..1)."""
    if value is None or not population:
        return None
    return sum(1 for v in population if v < value) / len(population)


def _early_late(points: Sequence[tuple[float, float]], settings: LongStreamSettings) -> dict[str, Any]:
    """Median over the first and the last 5 minutes of stream time (ms), and their ratio."""
    if not points:
        return {}
    end = max(t for t, _ in points)
    window = min(300.0, end / 4)
    early = [v for t, v in points if t <= window]
    late = [v for t, v in points if t >= end - window]
    early_ms = statistics.median(early) * 1e3 if early else None
    late_ms = statistics.median(late) * 1e3 if late else None
    return {"window_stream_s": window, "early_median_ms": early_ms, "late_median_ms": late_ms,
            "late_over_early": late_ms / early_ms if early_ms and late_ms is not None else None,
            "median_ms": statistics.median(v for _, v in points) * 1e3, "max_ms": max(v for _, v in points) * 1e3}


def explain_planted(planted: dict[str, Any], footprint: dict[str, Any], settings: LongStreamSettings) -> str:
    """A reading of the planted scene's numbers (written from them, so it cannot disagree).

    The evidence it leans on is the server's: what each chunk kept in its own append (the
    ranking's verdict when the chunk was new) and what it keeps at the end (after every later
    append re-ranked the whole memory)."""
    per_chunk, neighbours = planted.get("kept_per_chunk"), planted.get("neighbour_kept_per_chunk")
    ratio = planted.get("ratio_to_neighbours")
    total = planted.get("kept_at_end_total")
    if per_chunk is None:
        return "The planted scene's chunks were not found among the appended chunks."
    parts = [f"At the end the planted scene's {len(planted['chunks'])} chunks keep {total} visual tokens "
             f"({per_chunk:.2f} per chunk) against {_fmt(neighbours)} per chunk for the chunks within one "
             f"{settings.segment_s:g} s segment before and after it" + (f" (x{ratio:.2f})" if ratio is not None else "")
             + f"; all other chunks keep {_fmt(planted.get('all_chunks_kept_per_chunk'))} per chunk."]
    admitted = _mean(planted.get("planted_kept_at_admission") or [])
    neighbour_admitted = planted.get("neighbour_kept_at_admission_mean")
    admission_ratio = admitted / neighbour_admitted if admitted is not None and neighbour_admitted else None
    if admitted is not None and neighbour_admitted is not None:
        parts.append(f"In their own appends they kept {admitted:.1f} visual tokens per chunk against {neighbour_admitted:.1f} "
                     f"for the neighbours, with a requested retention of "
                     f"{_fmt(_mean(planted.get('planted_retention_at_admission') or []))} against "
                     f"{_fmt(planted.get('neighbour_retention_at_admission_mean'))} (the client raises retention with a "
                     "chunk's pixel outlier energy; once the memory is at the cap the budget is the cap and the "
                     "ranking alone decides).")
    if planted.get("peak_kept") is not None:
        later = planted.get("kept_after_10_min")
        parts.append(f"The most the scene held at once was {planted['peak_kept']} tokens (stream time "
                     f"{planted['peak_at_stream_s']:.0f} s)" + (f"; ten minutes after it, {later}." if later is not None
                                                                 else "."))
    mechanism = ("FlashCache scores a token by how far its key/value deviates from the DCT low-pass 'base' along the "
                 "token sequence and keeps the top of memory and new chunk together under the cap; every append "
                 "re-scores the whole memory, so old tokens keep competing with new ones.")
    if admission_ratio is not None and admission_ratio < 0.67:
        parts.append("Its tokens lost the ranking already when they were new, so to FlashCache's score the scene is not "
                     "distinct. That is consistent with how the score works: a flat red frame under a regular grid "
                     "repeats nearly the same patch token after token, which the low-pass base predicts well (small "
                     "deviation), while the noisy, moving test pattern of the ordinary frames deviates more. Distinct "
                     "in content is not distinct in the score; this tiny model has random weights, so its keys carry "
                     "no learned notion of 'unusual scene' either.")
    elif admission_ratio is not None and admission_ratio > 1.5:
        parts.append("Its tokens won the ranking when they were new: they deviate from the base more than ordinary "
                     "frames' tokens do.")
    elif admission_ratio is not None:
        parts.append("When new, its tokens ranked about like the neighbours': to FlashCache's score the scene is "
                     "ordinary.")
    if ratio is not None and ratio > 1.5:
        parts.append("At the end it holds more than its neighbours: its tokens kept winning the re-ranking.")
    elif ratio is not None and ratio < 0.67:
        parts.append("At the end it holds less than its neighbours.")
    if total == 0:
        parts.append(f"None of its tokens is left; its segment is still covered by the footprint floor, which keeps the "
                     f"best-scoring visual token of every {settings.footprint_s:g} s segment, and that token lies in "
                     "another chunk of the same minute.")
    elif footprint.get("met"):
        parts.append(f"The footprint floor keeps the best-scoring visual token of every {settings.footprint_s:g} s "
                     "segment whatever the ranking does; everything above it is kept by score.")
    return " ".join(parts + [mechanism])


def _fmt(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.2f}"


# ---------------------------------------------------------------------------------------- run
class FootprintRecorder(TimedBackend):
    """TimedBackend that also follows the planted scene in every append's footprint report and
    keeps the whole footprint every ``snapshot_every`` appends."""

    def __init__(self, backend, session: RecordingSession, clock_origin: float, settings: LongStreamSettings):
        super().__init__(backend, session, clock_origin)
        self.settings = settings
        self.chunk_times: dict[int, float] = {}
        self.snapshots: list[dict[str, Any]] = []

    def append_chunk(self, stream_id, chunk):
        self.chunk_times[chunk.index] = chunk.start_s
        receipt = super().append_chunk(stream_id, chunk)
        record = self.ingests[-1]
        report = self.backend.last_report(stream_id)
        footprint = {int(k): int(v) for k, v in (report.get("footprint") or {}).items()}
        planted = planted_chunks(self.chunk_times, self.settings)
        neighbours = neighbour_chunks(self.chunk_times, self.settings, min(self.chunk_times))
        record["planted_kept"] = sum(footprint.get(c, 0) for c in planted)
        if neighbours:
            record["neighbour_kept"] = sum(footprint.get(c, 0) for c in neighbours) / len(neighbours)
        record["visual_tokens_kept"] = sum(footprint.values())
        record["own_visual_kept"] = footprint.get(chunk.index, 0)  # the ranking's verdict on the new chunk
        record["outlier_energy"] = chunk.outlier_energy
        record["load1"] = load_average()[0]
        record["disk_files"], record["disk_bytes"] = chunk_disk(Path(self.backend.chunk_dir) / stream_id)
        if chunk.index % self.settings.footprint_snapshot_every == 0:
            self.snapshots.append({"chunk": chunk.index, "stream_s": chunk.start_s, "footprint": footprint})
        return receipt


def chunk_disk(folder: Path) -> tuple[int, int]:
    """Chunk videos a stream keeps on disk: (files, bytes)."""
    files = [path for path in folder.rglob("*.mp4") if path.is_file()] if folder.is_dir() else []
    return len(files), sum(path.stat().st_size for path in files)


def read_chunks(video: Path, settings: LongStreamSettings, count: int):
    """The first ``count`` chunks of ``video`` as the stream will see them (product source + chunker)."""
    from flashcache_sglang.streaming.chunker import Chunker, ChunkSettings
    from flashcache_sglang.streaming.sources import SamplingSettings, open_source, parse_source

    source = open_source(parse_source(str(video)), SamplingSettings(fps=settings.fps, max_pixels=settings.max_pixels))
    chunker = Chunker(ChunkSettings(frames=settings.chunk_frames))
    chunks = []
    try:
        for frame in source.frames():
            chunk = chunker.push(frame)
            if chunk is not None:
                chunks.append(chunk)
                if len(chunks) == count:
                    break
    finally:
        source.close()
    return chunks


def probe_positions(server_url: str, video: Path, settings: LongStreamSettings, workdir: Path) -> dict[str, Any]:
    """Positions an un-rebased memory takes: a probe stream with retention 1 and no cap keeps
    every token, so the server's re-basing changes nothing and ``next_position`` is SGLang's own
    M-RoPE layout of header + chunks."""
    from flashcache_sglang.streaming.budget import BudgetSettings
    from flashcache_sglang.streaming.sglang_backend import SGLangMemoryBackend

    backend = SGLangMemoryBackend(server_url, str(workdir / "probe"), fps=settings.fps, video_transport="path",
                                  timeout_s=settings.request_timeout_s)
    stream_id = "probe-" + secrets.token_hex(4)
    backend.open(stream_id, BudgetSettings(kv_cap_tokens=100_000, base_retention=1.0, min_retention=1.0,
                                           max_retention=1.0, energy_exponent=0.0))
    reports = []
    try:
        for chunk in read_chunks(video, settings, 3):
            backend.append_chunk(stream_id, chunk)
            reports.append(backend.last_report(stream_id))
    finally:
        backend.release(stream_id)
    positions = [r["next_position"] for r in reports]
    tokens = [r["memory_tokens"] for r in reports]
    steps = {positions[k + 1] - positions[k] for k in range(len(positions) - 1)}
    return {"next_positions": positions, "memory_tokens": tokens, "first_chunk_positions": positions[0],
            "per_chunk_positions": max(steps), "per_chunk_tokens": tokens[-1] - tokens[-2],
            "steps_agree": len(steps) == 1,
            "method": "probe stream, retention 1, no cap: 3 appends of the video's first chunks"}




def server_flags(settings: LongStreamSettings) -> list[str]:
    mm = {"video": {"fps": settings.fps, "min_pixels": 28 * 28 * 4, "max_pixels": settings.max_pixels}}
    return ["--enable-multimodal", "--mm-process-config", json.dumps(mm), "--enable-metrics",
            "--context-length", str(settings.context_length)]


def flashcache_settings(settings: LongStreamSettings) -> dict[str, Any]:
    return {"retention": settings.base_retention, "candidates": "multimodal", "min_candidates": 8}


def run(settings: LongStreamSettings, model: str, video: Path, workdir: Path, redis_url: Optional[str],
        startup_timeout: float) -> dict[str, Any]:
    from flashcache_sglang.streaming.budget import BudgetSettings
    from flashcache_sglang.streaming.chunker import ChunkSettings
    from flashcache_sglang.streaming.service import StreamConfig, StreamManager
    from flashcache_sglang.streaming.sglang_backend import SGLangMemoryBackend
    from flashcache_sglang.streaming.sources import SamplingSettings
    from flashcache_sglang.streaming.store import open_store
    from flashcache_sglang.testing.server import SGLangServer

    server = SGLangServer(model, flashcache=flashcache_settings(settings), extra_args=server_flags(settings),
                          max_total_tokens=settings.max_total_tokens, startup_timeout=startup_timeout, log_dir=workdir)
    raw: dict[str, Any] = {"server_log": str(server.log_path), "context_length": settings.context_length}
    ACTIVE_SERVERS.append(server)
    try:
        started = time.monotonic()
        server.start()
        raw["startup_s"] = time.monotonic() - started
        print("[stream_long] probing un-rebased positions", file=sys.stderr, flush=True)
        raw["probe"] = probe_positions(server.url, video, settings, workdir)
        session = RecordingSession()
        backend = SGLangMemoryBackend(server.url, str(workdir / "chunks"), fps=settings.fps, video_transport="path",
                                      max_answer_tokens=settings.answer_tokens, timeout_s=settings.request_timeout_s,
                                      session=session)
        origin = time.perf_counter()
        recorder = FootprintRecorder(backend, session, origin, settings)
        store = open_store(redis_url, namespace=f"flashcache-long-{secrets.token_hex(4)}")
        manager = StreamManager(store, recorder)
        config = StreamConfig(sampling=SamplingSettings(fps=settings.fps, max_pixels=settings.max_pixels, pace=0.0),
                              chunking=ChunkSettings(frames=settings.chunk_frames),
                              budget=BudgetSettings(kv_cap_tokens=settings.kv_cap, base_retention=settings.base_retention,
                                                    footprint_s=settings.footprint_s),
                              drop_policy="block")
        raw["load_average_start"] = load_average()
        stream_id, token = manager.start_stream(str(video), config)
        questions: list[dict[str, Any]] = []
        next_question = settings.question_every_s
        last_print = 0.0
        while not manager.wait(stream_id, 1.0):
            done = recorder.ingests[-1]["chunk_time_s"] if recorder.ingests else 0.0
            if done >= next_question:
                questions.append(ask(manager, session, stream_id, token, origin, done))
                next_question += settings.question_every_s
            if time.perf_counter() - last_print > 30:
                last_print = time.perf_counter()
                last = recorder.ingests[-1] if recorder.ingests else {}
                print(f"[stream_long] stream {done / 60:5.1f}/{settings.stream_minutes:g} min  wall "
                      f"{last_print - origin:5.0f} s  memory {last.get('memory_tokens')} tokens  next_position "
                      f"{last.get('next_position')}  planted kept {last.get('planted_kept')}  load "
                      f"{load_average()[0]:.1f}", file=sys.stderr, flush=True)
        raw["ingest_wall_s"] = time.perf_counter() - origin
        record = store.get_stream(stream_id)
        raw["stream_status"], raw["stream_error"] = record.status, record.error
        done = recorder.ingests[-1]["chunk_time_s"] if recorder.ingests else 0.0
        questions.append(ask(manager, session, stream_id, token, origin, done))
        raw["final_report"] = backend.last_report(stream_id)
        stored = {stream_id: [c.index for c in store.chunks(stream_id)]}
        raw["chunk_integrity"] = chunk_integrity(recorder.ingests, stored,
                                                 {stream_id: raw["final_report"].get("chunks_appended")})
        raw["load_average_end"] = load_average()
        manager.stop_stream(stream_id, token)
        manager.shutdown()
        raw["leak_check"] = BenchServer(server, "flashcache", settings.request_timeout_s).flush()
        raw.update(ingests=recorder.ingests, questions=questions, footprint_snapshots=recorder.snapshots,
                   chunk_times={str(k): v for k, v in recorder.chunk_times.items()})
        raw["server_alive_at_end"] = server.alive()
    except Exception as error:  # noqa: BLE001 - recorded in the report, which then fails
        raw["error"] = f"{type(error).__name__}: {error}"[:2000]
        raw.setdefault("ingests", [])
    finally:
        if not server.alive():
            raw["log_tail"] = server.log_tail(40)
        server.stop()
        ACTIVE_SERVERS.remove(server)
    return raw


def ask(manager, session: RecordingSession, stream_id: str, token: str, origin: float, stream_s: float) -> dict:
    record: dict[str, Any] = {"t": time.perf_counter() - origin, "stream_s": stream_s}
    session.begin()
    try:
        answer = manager.ask(stream_id, token, QUESTION, conversation_id=f"at-{stream_s:.0f}")
        record.update(ttft_s=answer.ttft_s, e2e_s=answer.extra.get("e2e_s"), prompt_tokens=answer.extra.get("prompt_tokens"),
                      cached_tokens=answer.cached_tokens, answer=answer.text[:200])
    except Exception as error:  # noqa: BLE001 - counted as an error
        record["error"] = f"{type(error).__name__}: {error}"[:300]
    wire = sum_timings(session.end())
    wire.pop("prompt_tokens", None)
    wire.pop("cached_tokens", None)
    record.update(wire)
    return record


# ---------------------------------------------------------------------------------------- driver
def quick_settings() -> LongStreamSettings:
    """The CI version: 4 minutes of stream time, a small cap and context."""
    return LongStreamSettings(stream_minutes=4.0, kv_cap=48, context_length=256, question_every_s=60.0,
                              max_total_tokens=2048, footprint_snapshot_every=10, request_timeout_s=120.0)


OPTIONS = (
    ("--minutes", "stream_minutes", float, "minutes of stream time"),
    ("--fps", "fps", float, "sampled frames per second"),
    ("--chunk-frames", "chunk_frames", int, "frames per chunk"),
    ("--kv-cap", "kv_cap", int, "capped KV slots (visual tokens + delimiters) the memory keeps"),
    ("--base-retention", "base_retention", float, "retention of a chunk of average energy"),
    ("--footprint", "footprint_s", float, "seconds of stream per footprint segment (server floor)"),
    ("--segment", "segment_s", float, "segment of the footprint check, s"),
    ("--context-length", "context_length", int, "the server's --context-length"),
    ("--planted-at", "planted_at_s", float, "stream time of the planted scene, s"),
    ("--planted-seconds", "planted_s", float, "length of the planted scene, s"),
    ("--question-every", "question_every_s", float, "stream seconds between questions"),
    ("--max-total-tokens", "max_total_tokens", int, "KV pool"),
)


def parse_args(argv: Optional[Sequence[str]] = None) -> tuple[argparse.Namespace, LongStreamSettings]:
    base = LongStreamSettings()
    parser = argparse.ArgumentParser(prog="python -m benchmarks.stream_long", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the CI version (4 minutes of stream time)")
    for flag, name, kind, text in OPTIONS:
        parser.add_argument(flag, type=kind, dest=name, help=f"{text} (default {getattr(base, name):g})")
    parser.add_argument("--model-path", help="a Qwen2.5-VL model (default: the tiny random-weight one)")
    parser.add_argument("--redis-url", default=os.environ.get("FLASHCACHE_REDIS_URL"),
                        help="metadata store (default: in process)")
    parser.add_argument("--startup-timeout", type=float, default=600.0)
    parser.add_argument("--output", type=Path, default=None, help="JSON path (default benchmarks/results/stream_long_*.json)")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--reanalyze", type=Path, metavar="JSON", help="recompute the analysis and plot of a saved run")
    args = parser.parse_args(argv)
    start = quick_settings() if args.quick else base
    return args, settings_from_options(parser, args, OPTIONS, start)



def build_report(raw: dict[str, Any], settings: LongStreamSettings, command: str, model: str, quick: bool,
                 redis_url: Optional[str], elapsed_s: float) -> dict[str, Any]:
    from flashcache_sglang import cpu_compat

    analysis = analyze(raw, settings)
    return {
        "benchmark": "stream_long",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "quick": quick,
        "machine": {**machine_info(), "load_average_start": raw.get("load_average_start"),
                    "load_average_end": raw.get("load_average_end")},
        "settings": {**asdict(settings), "model": Path(model).name if Path(model).exists() else model,
                     "dtype": "float32" if cpu_compat.needed() else "model default",
                     "flashcache": flashcache_settings(settings), "server_args": server_flags(settings),
                     "metadata_store": "redis" if redis_url else "in-process",
                     "planted_scene": f"red frame with a yellow grid from {settings.planted_at_s:g} s for "
                                      f"{settings.planted_s:g} s ({settings.planted_filter()})"},
        "analysis": analysis,
        "acceptance": analysis["acceptance"],
        "raw": raw,
        "elapsed_s": elapsed_s,
        "ok": "error" not in raw and analysis["errors"] == 0 and analysis["leaked_kv_slots"]["met"]
              and analysis.get("chunks", {}).get("met", False),
    }


def reanalyze(path: Path) -> dict[str, Any]:
    report = json.loads(Path(path).read_text())
    fields = set(LongStreamSettings.__dataclass_fields__)
    settings = LongStreamSettings(**{k: v for k, v in report["settings"].items() if k in fields})
    analysis = analyze(report["raw"], settings)
    report.update(analysis=analysis, acceptance=analysis["acceptance"],
                  reanalyzed=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    return report


def print_summary(report: dict) -> None:
    analysis = report["analysis"]
    print(f"\nstream: {analysis['stream_seconds'] / 60:.1f} min of video in {report['raw'].get('ingest_wall_s', 0):.0f} s "
          f"(x{analysis.get('speed_vs_real_time') or 0:.1f} real time), {analysis['appends']} appends")
    for name, check in report["acceptance"].items():
        if name != "all_met":
            print(f"  {name:<20} measured {json.dumps(finite(check['measured']))[:110]:<110}  "
                  f"{'met' if check['met'] else 'NOT met'}")
    planted = analysis["planted_scene"]
    print(f"planted scene: {planted['kept_at_end']} tokens at the end ({planted.get('kept_per_chunk')} per chunk) vs "
          f"neighbours {planted.get('neighbour_kept_per_chunk')} per chunk")
    print(planted["explanation"])
    print(f"all acceptance checks met: {report['acceptance']['all_met']}; ok: {report['ok']}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args, settings = parse_args(argv)
    from benchmarks.plot_stream_long import plot_stream_long

    if args.reanalyze:
        report = finite(reanalyze(args.reanalyze))
        write_report(report, args.reanalyze, None if args.no_plot else args.reanalyze.with_suffix(".png"),
                     plot_stream_long, "stream_long")
        print_summary(report)
        return 0 if report["ok"] else 1
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, exit_on_sigterm)
    command = "python -m benchmarks.stream_long " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.model_path:
        model = args.model_path
    else:
        from flashcache_sglang.testing.models import tiny_qwen2_5_vl_dir

        model = str(tiny_qwen2_5_vl_dir())
    workdir = Path(tempfile.mkdtemp(prefix="flashcache-long-"))
    started = time.monotonic()
    print(f"[stream_long] generating {settings.duration_s:.0f} s of test video", file=sys.stderr, flush=True)
    video = generate_video(workdir / "stream.mp4", settings.duration_s, settings.fps, seed=7,
                           extra_filters=settings.planted_filter())
    raw = run(settings, model, video, workdir, args.redis_url, args.startup_timeout)
    report = build_report(raw, settings, command, model, args.quick, args.redis_url, time.monotonic() - started)
    output = args.output or RESULTS_DIR / f"stream_long_{'quick' if args.quick else 'cpu'}.json"
    write_report(report, output, None if args.no_plot else output.with_suffix(".png"), plot_stream_long, "stream_long")
    print(f"[stream_long] server log and chunk files under {workdir}", file=sys.stderr)
    print_summary(report)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
