"""Soak: N live video streams for M minutes, the server-held memory vs the resend baseline, same KV pool.

    python -m benchmarks.soak --streams 4 --minutes 30 --output benchmarks/results/soak_server_memory_cpu.json
    python -m benchmarks.soak --quick                           # CI: 2 streams, 30 s a backend
    python -m benchmarks.soak --reanalyze benchmarks/results/soak_server_memory_cpu.json
    python -m benchmarks.soak --model-path Qwen/Qwen2.5-VL-7B-Instruct --max-pixels 200704 \\
        --kv-cap 2048 --max-total-tokens 60000 --streams 8 --minutes 30     # a GPU

Two backends run in turn, each against its own server with the same ``--max-total-tokens``, and
the same client: the product's ingest loop
(:class:`~flashcache_sglang.streaming.service.StreamManager`: reader, bounded frame queue
dropping the oldest frames when ingest falls behind, chunker, metadata store):

- ``flashcache``, the product: ``flashcache_sglang.launch_server`` holding every stream's
  memory (issue 13), driven by
  :class:`~flashcache_sglang.streaming.sglang_backend.SGLangMemoryBackend`: an ingest request
  carries only its chunk, a question only its text; the memory is compressed under
  ``--kv-cap`` and re-based;
- ``vanilla``, the resend baseline: vanilla ``sglang.launch_server`` driven by
  :class:`benchmarks.soak_baseline.ResendBaselineBackend`, which resends the stream's prompt
  window (sink + newest chunks, at most ``--max-prompt-chunks``) with every ingest and question,
  as the product did before; same horizon semantics as the old soak, so its numbers compare.

Each stream replays its own generated video at real-time pace (``--pace``, like ``ffmpeg
-re``), so it behaves as a live camera: a slow server shows up as frames dropped and ingest fps
below the source's. One client per stream asks a question every ``--question-interval`` seconds
(conversations of ``--turns`` turns). Every ``--sample-interval`` seconds the tool samples, per
stream, the KV its memory holds (the server's ``memory_tokens`` / the baseline's window) and
the pool (``sglang:kv_{used,evictable,available}_tokens``, ``sglang:evicted_tokens_total``).
Per request it records the wire bytes and the server's own timings from ``meta_info``
(benchmarks/stream_wire.py: ``e2e_latency``, ``first_token_latency``, ``queue_time``, tokenize
and prefill spans; flashcache appends also ``append_ms``).

Acceptance (issue 13), computed for both backends, target for ``flashcache``; "early" is the
window of ``--window`` seconds around ``--early-at`` (minute 1), "late" around ``--late-at``
(minute 30; clipped to the run's last full window):

- ``question_request_bytes``: median bytes late / early, per kind of question (the same question
  text at the same conversation turn), the kind farthest from 1, within 10%;
- ``question_server_time``: median server ``e2e_latency`` late / early, within 10%;
- ``question_ttft``: median client TTFT late / early <= 1.1;
- ``ingest_request_bytes``, ``ingest_server_time``, ``ingest_latency`` (client): late / early
  within 10%;
- ``ingest_max_over_median``: the slowest ingest over the median, whole run, <= 2;
- ``memory_flat``: per stream, once its memory reached the cap, ``(max - min) / max`` of its KV
  slots <= 5%;
- ``errors`` (failed ingests, questions, streams), ``chunks`` (lost or duplicated, checked
  against the metadata store and the server's own count) and ``leaked_kv_slots`` (after the
  streams are closed and the cache flushed, the allocator is back to its size) all 0.

The exit status says whether the correctness checks held (errors, chunks, leaks); timing
targets are recorded with their measured values. The JSON records the machine, its load
average over the run, versions and every setting; ``python benchmarks/make_report.py`` turns
it into the README's figure.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional, Sequence

import requests

from benchmarks.serving import (
    ACTIVE_SERVERS,
    BenchServer,
    distribution_ms,
    exit_on_sigterm,
    finite,
    load_average,
    machine_info,
    prometheus_value,
    settings_from_options,
    wait_for_load,
    write_report,
)
from benchmarks.stream_wire import RecordingSession, sum_timings

RESULTS_DIR = Path(__file__).resolve().parent / "results"
BACKENDS = ("vanilla", "flashcache")
DESIGN = "server-memory"  # the report format; older soak JSONs (no "design") are the resend design
BACKEND_DESCRIPTIONS = {
    "flashcache": "flashcache server-held stream memory (StreamManager + SGLangMemoryBackend): ingests carry "
                  "only their chunk, questions only their text",
    "vanilla": "vanilla SGLang + resend baseline client (benchmarks/soak_baseline.py): every ingest and question "
               "resends the stream's prompt window",
}
POOL_METRICS = {
    "kv_used": "sglang:kv_used_tokens",
    "kv_evictable": "sglang:kv_evictable_tokens",
    "kv_available": "sglang:kv_available_tokens",
    "evicted_total": "sglang:evicted_tokens_total",
    "running": "sglang:num_running_reqs",
    "queued": "sglang:num_queue_reqs",
}
QUESTIONS = ("What is happening in the video right now?", "What changed in the last few seconds?",
             "Describe the scene.", "What colors dominate the stream?", "Has anything moved recently?")
WITHIN = 0.10  # "within 10% of minute 1"
TTFT_TARGET = 1.1
SPIKE_TARGET = 2.0
FLATNESS_TARGET = 0.05
TINY_MAX_PIXELS = 28 * 28 * 16  # the tiny Qwen2.5-VL processor's limit


@dataclass(frozen=True)
class SoakSettings:
    """Everything that shapes a soak run (recorded in the JSON)."""

    streams: int = 4
    duration_s: float = 1800.0
    fps: float = 2.0
    chunk_frames: int = 4
    pace: float = 1.0
    max_pixels: int = TINY_MAX_PIXELS
    kv_cap: int = 128
    base_retention: float = 0.3
    footprint_s: float = 60.0
    rebuild_chunks: int = 16
    max_prompt_chunks: int = 32
    video_transport: str = "path"
    question_interval_s: float = 10.0
    turns: int = 2
    answer_tokens: int = 8
    sample_interval_s: float = 5.0
    queue_frames: int = 16
    max_total_tokens: int = 1536
    early_at_s: float = 60.0
    late_at_s: float = 1800.0
    window_s: float = 60.0
    request_timeout_s: float = 300.0

    def __post_init__(self) -> None:
        positive = ("streams", "duration_s", "fps", "chunk_frames", "kv_cap", "max_prompt_chunks", "footprint_s",
                    "question_interval_s", "turns", "answer_tokens", "sample_interval_s", "queue_frames",
                    "max_total_tokens", "window_s", "request_timeout_s", "pace")
        for name in positive:
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and value > 0 and math.isfinite(value)):
                raise ValueError(f"soak setting {name}={value!r} must be a positive number")
        if not 0 < self.base_retention <= 1:
            raise ValueError(f"soak setting base_retention={self.base_retention!r} must be in (0, 1]")
        if self.chunk_frames % 2:
            raise ValueError(f"soak setting chunk_frames={self.chunk_frames} must be even (Qwen-VL temporal patches)")
        if self.max_prompt_chunks < 2:
            raise ValueError(f"soak setting max_prompt_chunks={self.max_prompt_chunks} must be >= 2")
        if not isinstance(self.rebuild_chunks, int) or self.rebuild_chunks < 0:
            raise ValueError(f"soak setting rebuild_chunks={self.rebuild_chunks!r} must be an int >= 0")
        if self.video_transport not in ("path", "data_url"):
            raise ValueError(f"soak setting video_transport={self.video_transport!r}; valid: ['path', 'data_url']")
        if not 0 <= self.early_at_s < self.late_at_s:
            raise ValueError(f"early_at_s={self.early_at_s} must be >= 0 and below late_at_s={self.late_at_s}")

    @property
    def chunk_period_s(self) -> float:
        """Wall seconds between two chunks of one stream at the source's pace."""
        return self.chunk_frames / self.fps / self.pace

    @property
    def video_seconds(self) -> float:
        """Video each stream needs: the run at ``pace`` plus a margin."""
        return self.duration_s * self.pace + 4 * self.chunk_frames / self.fps


# ---------------------------------------------------------------------------------------- analysis
def _median(values: Sequence[float]) -> Optional[float]:
    return statistics.median(values) if values else None


def window_values(events: Sequence[dict], key: str, center: float, half_width: float) -> list[float]:
    """``event[key]`` of the successful events whose ``t`` lies in ``[center - hw, center + hw]``."""
    return [e[key] for e in events
            if not e.get("error") and e.get(key) is not None and abs(e["t"] - center) <= half_width]


def effective_marks(settings: SoakSettings, elapsed_s: float) -> tuple[float, float, float]:
    """(early, late, half window) clipped to the run: the late window ends at the run's end, and
    a run shorter than ``late_at_s`` compares its first and last windows instead (the JSON
    records which marks were used)."""
    half = settings.window_s / 2
    late = min(settings.late_at_s, elapsed_s - half)
    early = min(settings.early_at_s, late / 4)
    if late - early < 2 * half:  # short runs: shrink the windows so they do not overlap
        half = max((late - early) / 2, 0.0)
    return early, late, half


def late_over_early(events: Sequence[dict], key: str, early_at: float, late_at: float, half_width: float,
                    *, target: float, two_sided: bool, by: Optional[str] = None) -> dict[str, Any]:
    """Median of ``event[key]`` around ``late_at`` over the median around ``early_at``.

    ``two_sided``: met when ``|ratio - 1| <= target`` ("within 10%"), else when
    ``ratio <= target``. With ``by`` the ratio is taken per value of ``event[by]`` (e.g. the
    conversation turn: a second turn carries the first turn's text) and the group farthest
    from 1 is the one reported.
    """
    groups = sorted({e.get(by) for e in events if e.get(key) is not None}, key=str) if by else [None]
    rows = []
    for group in groups:
        chosen = [e for e in events if by is None or e.get(by) == group]
        early = window_values(chosen, key, early_at, half_width)
        late = window_values(chosen, key, late_at, half_width)
        early_median, late_median = _median(early), _median(late)
        ratio = late_median / early_median if early_median and late_median is not None else None
        rows.append({"group": group, "early_median": early_median, "late_median": late_median,
                     "early_count": len(early), "late_count": len(late), "ratio": ratio})
    measured = [r for r in rows if r["ratio"] is not None]
    # Groups seen in only one of the windows cannot be compared; the others all are.
    worst = max(measured, key=lambda r: abs(r["ratio"] - 1)) if measured else None
    ratio = worst["ratio"] if worst else None
    met = ratio is not None and (abs(ratio - 1) <= target if two_sided else ratio <= target)
    out: dict[str, Any] = {"measured": ratio, "target": f"within {target:.0%} of early" if two_sided else f"<= {target:g}",
                           "met": met, "key": key, "early_at_s": early_at, "late_at_s": late_at,
                           "half_window_s": half_width}
    if by:
        out.update(by=by, groups=rows, groups_compared=len(measured), worst_group=worst["group"] if worst else None)
    else:
        out.update({k: v for k, v in rows[0].items() if k != "group"})
    return out


def ingest_spikes(ingests: Sequence[dict]) -> dict[str, Any]:
    """The slowest ingest over the median, whole run (client latency, the target), with the
    same ratio for the server's own time and the slowest ingests' details (why they were slow)."""
    ok = [i for i in ingests if not i.get("error") and i.get("seconds") is not None]
    out: dict[str, Any] = {"measured": None, "target": f"<= {SPIKE_TARGET:g}", "met": False, "ingests": len(ok)}
    if not ok:
        return out
    latencies = [i["seconds"] for i in ok]
    median = statistics.median(latencies)
    out.update(measured=max(latencies) / median if median > 0 else None, median_ms=median * 1e3,
               max_ms=max(latencies) * 1e3, p99_over_median=_percentile(latencies, 99) / median if median > 0 else None)
    out["met"] = out["measured"] is not None and out["measured"] <= SPIKE_TARGET
    for key, name in (("server_e2e_s", "server_e2e"), ("append_ms", "append_ms")):
        values = [i[key] for i in ok if i.get(key) is not None]
        if values and statistics.median(values) > 0:
            out[f"{name}_max_over_median"] = max(values) / statistics.median(values)
    after_first_minute = [i["seconds"] for i in ok if i["t"] >= 60.0]
    if len(after_first_minute) >= 2:
        out["max_over_median_after_first_minute"] = max(after_first_minute) / statistics.median(after_first_minute)
    out["over_target"] = sum(1 for v in latencies if v > SPIKE_TARGET * median)
    slowest = sorted(ok, key=lambda i: -i["seconds"])[:5]
    out["slowest"] = [{k: i.get(k) for k in ("t", "stream_id", "chunk", "seconds", "server_e2e_s", "server_queue_s",
                                              "server_tokenize_s", "server_prefill_s", "append_ms", "in_flight")}
                      for i in slowest]
    return out


def _percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def memory_flatness(samples: Sequence[dict], stream: int, cap: Optional[int]) -> dict[str, Any]:
    """How flat stream ``stream``'s memory stays once its capped KV first reached ``cap``.

    ``samples[i]["streams"][stream]`` holds ``kv_slots`` (every KV slot of its memory) and
    ``capped_kv_slots`` (what the server's cap counts: visual tokens and their delimiters).
    Without a cap, or if the cap was never reached, ``settled_at_s`` is None (the first and
    last ``kv_slots`` are still reported).
    """
    points = [(s["t"], s["streams"][stream]) for s in samples
              if stream < len(s["streams"]) and s["streams"][stream].get("kv_slots")]
    out: dict[str, Any] = {"stream": stream, "cap": cap, "samples": len(points), "settled_at_s": None,
                           "spread": None, "min_kv_slots": None, "max_kv_slots": None,
                           "target": FLATNESS_TARGET, "met": False}
    if not points:
        return out
    out["first_kv_slots"], out["last_kv_slots"] = points[0][1]["kv_slots"], points[-1][1]["kv_slots"]
    settled = None
    if cap is not None:
        settled = next((i for i, (_, s) in enumerate(points) if (s.get("capped_kv_slots") or 0) >= cap), None)
    if settled is None:
        return out
    values = [s["kv_slots"] for _, s in points[settled:]]
    out.update(settled_at_s=points[settled][0], min_kv_slots=min(values), max_kv_slots=max(values),
               spread=(max(values) - min(values)) / max(values), samples_after_cap=len(values))
    out["met"] = len(values) >= 2 and out["spread"] <= FLATNESS_TARGET
    return out


def ingest_fps_series(samples: Sequence[dict], chunk_frames: int, window_s: float = 0.0) -> list[dict[str, float]]:
    """Frames ingested per second per stream (mean over streams) at each sample, over the
    trailing ``window_s`` seconds (0: since the previous sample). The sample taken after the
    run's shutdown (``final``) is left out: nothing is ingested then."""
    live = [s for s in samples if not s.get("final")]
    series = []
    for index, after in enumerate(live[1:], start=1):
        start = index - 1
        while start > 0 and after["t"] - live[start - 1]["t"] <= window_s:
            start -= 1
        before = live[start]
        span = after["t"] - before["t"]
        if span <= 0:
            continue
        rates = [(a["chunks"] - b["chunks"]) * chunk_frames / span
                 for b, a in zip(before["streams"], after["streams"])]
        series.append({"t": after["t"], "fps": sum(rates) / len(rates) if rates else 0.0})
    return series


def chunk_integrity(ingests: Sequence[dict], stored: dict[str, list[int]],
                    server_counts: dict[str, Optional[int]]) -> dict[str, Any]:
    """Lost or duplicated chunks per stream: the chunk indices the ingest loop appended
    successfully, the metadata store's chunk records and the server's own count of appends
    must all agree, without gaps (a chunk index is 0, 1, 2, ... per stream) or repeats."""
    by_stream: dict[str, list[int]] = {}
    attempted: dict[str, set[int]] = {}
    for ingest in ingests:
        attempted.setdefault(ingest["stream_id"], set()).add(ingest["chunk"])
        if not ingest.get("error"):
            by_stream.setdefault(ingest["stream_id"], []).append(ingest["chunk"])
    rows, lost, duplicated, mismatched = [], 0, 0, 0
    for stream_id in sorted(set(attempted) | set(stored)):
        appended = by_stream.get(stream_id, [])
        unique = set(appended)
        top = max(attempted.get(stream_id, set()) | set(stored.get(stream_id, [])), default=-1)
        missing = sorted(set(range(top + 1)) - unique)
        repeats = len(appended) - len(unique)
        records = stored.get(stream_id)
        store_ok = records is None or (sorted(records) == sorted(unique) and len(records) == len(set(records)))
        server = server_counts.get(stream_id)
        server_ok = server is None or server == len(unique)
        rows.append({"stream_id": stream_id, "appended": len(appended), "lost": missing[:20], "lost_count": len(missing),
                     "duplicated": repeats, "store_records": None if records is None else len(records),
                     "store_agrees": store_ok, "server_chunks_appended": server, "server_agrees": server_ok})
        lost += len(missing)
        duplicated += repeats
        mismatched += (not store_ok) + (not server_ok)
    return {"measured": {"lost": lost, "duplicated": duplicated, "disagreements": mismatched}, "target": "all 0",
            "met": lost == 0 and duplicated == 0 and mismatched == 0, "streams": rows}


def summarize(samples: Sequence[dict], questions: Sequence[dict], ingests: Sequence[dict],
              settings: SoakSettings, elapsed_s: float, cap: Optional[int],
              integrity: Optional[dict] = None) -> dict[str, Any]:
    """Everything the report says about one backend's run, its acceptance checks included."""
    ok_questions = [q for q in questions if not q.get("error")]
    ok_ingests = [i for i in ingests if not i.get("error")]
    out: dict[str, Any] = {
        "questions": len(questions),
        "question_errors": len(questions) - len(ok_questions),
        "ingests": len(ingests),
        "ingest_errors": len(ingests) - len(ok_ingests),
    }
    out.update(distribution_ms("ttft", [q["ttft_s"] for q in ok_questions]))
    out.update(distribution_ms("e2e_latency", [q["e2e_s"] for q in ok_questions if q.get("e2e_s") is not None]))
    out.update(distribution_ms("question_server_e2e", [q["server_e2e_s"] for q in ok_questions if q.get("server_e2e_s") is not None]))
    out.update(distribution_ms("ingest_latency", [i["seconds"] for i in ok_ingests]))
    out.update(distribution_ms("ingest_server_e2e", [i["server_e2e_s"] for i in ok_ingests if i.get("server_e2e_s") is not None]))
    appends = [i["append_ms"] / 1e3 for i in ok_ingests if i.get("append_ms") is not None]
    if appends:
        out.update(distribution_ms("append", appends))
    out["max_ingest_latency_ms"] = max((i["seconds"] for i in ok_ingests), default=float("nan")) * 1e3
    for name, events in (("question", ok_questions), ("ingest", ok_ingests)):
        sizes = [e["request_bytes"] for e in events if e.get("request_bytes") is not None]
        out[f"median_{name}_request_bytes"] = _median(sizes)
        out[f"max_{name}_request_bytes"] = max(sizes, default=None)
    prompt = sum(q.get("prompt_tokens") or 0 for q in ok_questions)
    out["question_cached_token_share"] = sum(q.get("cached_tokens") or 0 for q in ok_questions) / prompt if prompt else 0.0
    out["median_question_prompt_tokens"] = _median([q["prompt_tokens"] for q in ok_questions if q.get("prompt_tokens")])
    last = samples[-1] if samples else {"streams": []}
    frames_read = sum(s["frames_read"] for s in last["streams"])
    frames_dropped = sum(s["frames_dropped"] for s in last["streams"])
    chunks = sum(s["chunks"] for s in last["streams"])
    out.update(frames_read=frames_read, frames_dropped=frames_dropped, chunks_ingested=chunks,
               frames_dropped_share=frames_dropped / frames_read if frames_read else 0.0,
               mean_ingest_fps_per_stream=chunks * settings.chunk_frames / elapsed_s / max(1, settings.streams),
               source_fps_per_stream=settings.fps * settings.pace)
    flatness = [memory_flatness(samples, k, cap) for k in range(settings.streams)]
    out["memory_flatness"] = flatness
    spreads = [f["spread"] for f in flatness if f["spread"] is not None]
    out["worst_memory_spread"] = max(spreads) if len(spreads) == len(flatness) and spreads else None
    kv_last = [s["kv_slots"] for s in last["streams"] if s.get("kv_slots")]
    out["final_kv_slots_per_stream"] = sum(kv_last) / len(kv_last) if kv_last else None
    logical = [s["logical_tokens"] for s in last["streams"]]
    out["final_logical_tokens_per_stream"] = sum(logical) / len(logical) if logical else None
    positions = [s["next_position"] for s in last["streams"] if s.get("next_position") is not None]
    out["final_next_position_per_stream"] = sum(positions) / len(positions) if positions else None
    peak = max((s["pool"].get("kv_used", 0) + s["pool"].get("kv_evictable", 0) for s in samples if s.get("pool")),
               default=None)
    out["peak_pool_tokens_cached"] = peak
    out["evicted_tokens_total"] = last.get("pool", {}).get("evicted_total") if samples else None
    loads = [s["load1"] for s in samples if s.get("load1") is not None]
    out["load_average_1min"] = {"mean": sum(loads) / len(loads), "max": max(loads), "min": min(loads)} if loads else None
    out["failed_streams"] = sorted({k for sample in samples for k, s in enumerate(sample["streams"])
                                    if s["status"] == "failed"})
    out["errors"] = out["question_errors"] + out["ingest_errors"] + len(out["failed_streams"])

    early, late, half = effective_marks(settings, elapsed_s)
    marks = (early, late, half)
    acceptance = {
        "question_request_bytes": late_over_early(ok_questions, "request_bytes", *marks, target=WITHIN, two_sided=True,
                                                  by="kind"),
        "question_server_time": late_over_early(ok_questions, "server_e2e_s", *marks, target=WITHIN, two_sided=True),
        "question_ttft": late_over_early(ok_questions, "ttft_s", *marks, target=TTFT_TARGET, two_sided=False),
        "ingest_request_bytes": late_over_early(ok_ingests, "request_bytes", *marks, target=WITHIN, two_sided=True),
        "ingest_server_time": late_over_early(ok_ingests, "server_e2e_s", *marks, target=WITHIN, two_sided=True),
        "ingest_latency": late_over_early(ok_ingests, "seconds", *marks, target=WITHIN, two_sided=True),
        "ingest_max_over_median": ingest_spikes(ingests),
        "memory_flat": {"measured": out["worst_memory_spread"], "target": f"<= {FLATNESS_TARGET:.0%}",
                        "met": bool(flatness) and all(f["met"] for f in flatness)},
        "errors": {"measured": out["errors"], "target": "0", "met": out["errors"] == 0},
    }
    if integrity is not None:
        acceptance["chunks"] = integrity
    out["acceptance"] = acceptance
    return out


# ---------------------------------------------------------------------------------------- video
def generate_video(path: Path, seconds: float, fps: float, size: str = "224x168", seed: int = 0,
                   extra_filters: str = "") -> Path:
    """A test video at the sampling rate whose every frame differs (moving pattern, running
    counter, noise, a slow hue rotation), so no two chunks hash alike and the vision encoder
    never gets a free cache hit. Different ``seed`` values give different noise and hues: each
    stream of a soak gets its own video, or vanilla SGLang's radix tree (which has no per-stream
    namespace) would hold one shared memory for all of them. ``extra_filters`` (ffmpeg filter
    syntax, appended to the chain) can plant scenes."""
    if shutil.which("ffmpeg") is None:
        raise SystemExit("ffmpeg is not installed: run bash scripts/setup.sh (or apt-get install ffmpeg)")
    source = (f"testsrc2=size={size}:rate={fps:g}:duration={seconds:.1f},noise=alls=12:allf=t+u:all_seed={seed + 1},"
              f"hue=h=t*3+{(seed * 47) % 360}")
    if extra_filters:
        source += "," + extra_filters
    subprocess.run(["ffmpeg", "-loglevel", "error", "-y", "-f", "lavfi", "-i", source,
                    "-c:v", "libx264", "-preset", "veryfast", "-pix_fmt", "yuv420p", str(path)],
                   check=True, timeout=max(120.0, seconds))
    return path


# ---------------------------------------------------------------------------------------- run
class TimedBackend:
    """The memory backend with every ingest timed and its requests recorded (everything else
    passes through). ``session`` is the backend's RecordingSession."""

    def __init__(self, backend, session: RecordingSession, clock_origin: float):
        self.backend = backend
        self.session = session
        self.name = backend.name
        self.origin = clock_origin
        self.ingests: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._in_flight = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.backend, name)

    def append_chunk(self, stream_id, chunk):
        started = time.perf_counter()
        record: dict[str, Any] = {"t": started - self.origin, "stream_id": stream_id, "chunk": chunk.index,
                                  "chunk_time_s": chunk.start_s}
        with self._lock:
            self._in_flight += 1
            record["in_flight"] = self._in_flight  # ingests of all streams running now, this one included
        self.session.begin()
        try:
            receipt = self.backend.append_chunk(stream_id, chunk)
            record.update(kv_slots=receipt.memory.total_kv_slots, capped_kv_slots=receipt.memory.kept_tokens,
                          logical_tokens=receipt.logical_tokens, kept_tokens=receipt.kept_tokens,
                          retention=receipt.retention)
            report = self.backend.last_report(stream_id)
            record.update({k: report[k] for k in ("append_ms", "version", "next_position", "memory_tokens",
                                                  "chunks_appended", "dropped_from_memory", "window_chunks", "rebases")
                           if k in report})
            return receipt
        except Exception as error:
            record["error"] = f"{type(error).__name__}: {error}"[:300]
            raise
        finally:
            record["seconds"] = time.perf_counter() - started
            wire = sum_timings(self.session.end())
            wire.pop("prompt_tokens", None)  # kept below under the request's own name
            record.update(wire)
            with self._lock:
                self._in_flight -= 1
                self.ingests.append(record)


def make_backend(backend_name: str, server_url: str, settings: SoakSettings, chunk_dir: Path,
                 session: RecordingSession):
    """The client of one backend (both implement streaming.memory.MemoryBackend)."""
    if backend_name == "flashcache":
        from flashcache_sglang.streaming.sglang_backend import SGLangMemoryBackend

        return SGLangMemoryBackend(server_url, str(chunk_dir), fps=settings.fps, video_transport=settings.video_transport,
                                   rebuild_chunks=settings.rebuild_chunks, max_answer_tokens=settings.answer_tokens,
                                   timeout_s=settings.request_timeout_s, session=session)
    from benchmarks.soak_baseline import ResendBaselineBackend

    return ResendBaselineBackend(server_url, str(chunk_dir), fps=settings.fps, video_transport=settings.video_transport,
                                 max_prompt_chunks=settings.max_prompt_chunks, max_answer_tokens=settings.answer_tokens,
                                 timeout_s=settings.request_timeout_s, session=session)


class SoakRun:
    """N streams, their question clients and the sampler, against one started server."""

    def __init__(self, server, backend_name: str, settings: SoakSettings, videos: Sequence[Path], workdir: Path,
                 redis_url: Optional[str], progress: bool = True):
        from flashcache_sglang.streaming.service import StreamManager
        from flashcache_sglang.streaming.store import open_store

        self.server = server
        self.backend_name = backend_name
        self.settings = settings
        if len(videos) < settings.streams:
            raise ValueError(f"{settings.streams} streams need as many videos, got {len(videos)}")
        self.videos = list(videos)
        self.progress = progress
        self.origin = time.perf_counter()
        self.session = RecordingSession()
        memory = make_backend(backend_name, server.url, settings, workdir / "chunks", self.session)
        self.memory = TimedBackend(memory, self.session, self.origin)
        self.store = open_store(redis_url, namespace=f"flashcache-soak-{backend_name}-{secrets.token_hex(4)}")
        self.manager = StreamManager(self.store, self.memory)
        self.streams: list[tuple[str, str]] = []
        self.questions: list[dict[str, Any]] = []
        self.samples: list[dict[str, Any]] = []
        self.stop = threading.Event()
        self._lock = threading.Lock()

    def elapsed(self) -> float:
        return time.perf_counter() - self.origin

    def config(self):
        from flashcache_sglang.streaming.budget import BudgetSettings
        from flashcache_sglang.streaming.chunker import ChunkSettings
        from flashcache_sglang.streaming.service import StreamConfig
        from flashcache_sglang.streaming.sources import SamplingSettings

        s = self.settings
        return StreamConfig(sampling=SamplingSettings(fps=s.fps, max_pixels=s.max_pixels, pace=s.pace),
                            chunking=ChunkSettings(frames=s.chunk_frames),
                            budget=BudgetSettings(kv_cap_tokens=s.kv_cap, base_retention=s.base_retention,
                                                  footprint_s=s.footprint_s),
                            queue_frames=s.queue_frames, drop_policy="drop_oldest")

    def run(self) -> dict[str, Any]:
        s = self.settings
        clients = []
        self.origin = self.memory.origin = time.perf_counter()
        try:
            for index in range(s.streams):
                # Staggered so the streams' chunks do not all arrive at the same instant.
                if index:
                    time.sleep(s.chunk_period_s / s.streams)
                self.streams.append(self.manager.start_stream(str(self.videos[index]), self.config()))
                client = threading.Thread(target=self._ask_loop, args=(index,), name=f"soak-ask-{index}", daemon=True)
                client.start()
                clients.append(client)
            next_sample = 0.0
            while self.elapsed() < s.duration_s:
                self._sample()
                if self.progress:
                    print(self._progress_line(), file=sys.stderr, flush=True)
                next_sample += s.sample_interval_s
                self.stop.wait(max(0.0, min(next_sample, s.duration_s) - self.elapsed()))
        finally:
            self.stop.set()
            elapsed = self.elapsed()
            self.manager.shutdown(timeout_s=s.request_timeout_s)
            for client in clients:
                client.join(s.request_timeout_s)
            self._sample(final=True)
        integrity = chunk_integrity(self.memory.ingests, self._stored_chunks(), self._server_counts())
        release_errors = self._release_streams()
        cap = s.kv_cap if self.backend_name == "flashcache" else None
        summary = summarize(self.samples, self.questions, self.memory.ingests, s, elapsed, cap, integrity)
        return {"elapsed_s": elapsed, "summary": summary, "samples": self.samples, "questions": self.questions,
                "ingests": self.memory.ingests, "chunk_integrity": integrity, "release_errors": release_errors}

    def _stored_chunks(self) -> dict[str, list[int]]:
        return {stream_id: [record.index for record in self.store.chunks(stream_id)] for stream_id, _ in self.streams}

    def _server_counts(self) -> dict[str, Optional[int]]:
        """The server's own count of chunks appended to each memory (flashcache; the baseline
        counts on the client, so it is not an independent check there)."""
        if self.backend_name != "flashcache":
            return {}
        counts = {}
        for stream_id, _ in self.streams:
            report = self.memory.last_report(stream_id)
            counts[stream_id] = report.get("chunks_appended")
        return counts

    def _release_streams(self) -> list[str]:
        """Stop every stream through the product's API (its memory on the server is closed)."""
        errors = []
        for stream_id, token in self.streams:
            try:
                self.manager.stop_stream(stream_id, token)
            except Exception as error:  # noqa: BLE001 - recorded; the leak check then says what it cost
                errors.append(f"{stream_id}: {type(error).__name__}: {error}"[:300])
        return errors

    def _ask_loop(self, index: int) -> None:
        s = self.settings
        stream_id, token = self.streams[index]
        # The first question after the first chunk can have landed; clients spread over the interval.
        next_at = self.elapsed() + 2 * s.chunk_period_s + index * s.question_interval_s / s.streams
        asked = 0
        while not self.stop.wait(max(0.0, next_at - self.elapsed())):
            question = QUESTIONS[asked % len(QUESTIONS)]
            conversation = f"client{index}-conversation{asked // s.turns}"
            # "kind": the same question at the same turn carries the same text (a later turn also
            # the earlier turns and their answers), so request bytes compare like with like.
            record: dict[str, Any] = {"t": self.elapsed(), "stream": index, "turn": asked % s.turns,
                                      "question": asked % len(QUESTIONS),
                                      "kind": f"turn{asked % s.turns}/q{asked % len(QUESTIONS)}"}
            self.session.begin()
            try:
                answer = self.manager.ask(stream_id, token, question, conversation_id=conversation)
                if answer.memory_chunks == 0:
                    record["skipped"] = "no chunk in memory yet"
                else:
                    record.update(ttft_s=answer.ttft_s, e2e_s=answer.extra.get("e2e_s"),
                                  cached_tokens=answer.cached_tokens, memory_chunks=answer.memory_chunks,
                                  prompt_tokens=answer.extra.get("prompt_tokens"),
                                  memory_version=answer.extra.get("memory_version"))
            except Exception as error:  # noqa: BLE001 - counted as an error in the report
                if self.stop.is_set():
                    self.session.end()
                    break  # the run ended under it
                record["error"] = f"{type(error).__name__}: {error}"[:300]
            wire = sum_timings(self.session.end())
            for key in ("prompt_tokens", "cached_tokens"):
                wire.pop(key, None)
            record.update(wire)
            if "skipped" not in record:
                with self._lock:
                    self.questions.append(record)
            asked += 1
            next_at = max(next_at + s.question_interval_s, self.elapsed())

    def _sample(self, final: bool = False) -> None:
        streams = []
        for stream_id, _ in self.streams:
            progress = self.manager.progress(stream_id)
            entry: dict[str, Any] = {"chunks": 0, "frames_read": 0, "frames_dropped": 0, "kv_slots": 0,
                                     "logical_tokens": 0, "capped_kv_slots": None, "next_position": None,
                                     "version": None, "status": "stopped"}
            if progress is not None:
                entry.update(chunks=progress.chunks, frames_read=progress.frames_read,
                             frames_dropped=progress.frames_dropped, status=progress.status)
            elif self.samples:  # shut down at the end of the run: its last counters and status
                entry.update(self.samples[-1]["streams"][len(streams)])
            try:
                usage = self.memory.memory_tokens(stream_id)
                entry.update(kv_slots=max(usage.total_kv_slots, 0), logical_tokens=usage.logical_tokens)
                report = self.memory.last_report(stream_id)
                if self.backend_name == "flashcache":
                    entry.update(capped_kv_slots=usage.kept_tokens, next_position=report.get("next_position"),
                                 version=report.get("version"))
                else:
                    entry.update(window_chunks=report.get("window_chunks"), rebases=report.get("rebases"))
            except Exception:  # noqa: BLE001 - released at the end of the run
                pass
            streams.append(entry)
        sample = {"t": self.elapsed(), "streams": streams, "pool": self._pool(), "load1": load_average()[0]}
        if final:
            sample["final"] = True  # taken after the shutdown
        self.samples.append(sample)

    def _pool(self) -> dict[str, float]:
        try:
            text = requests.get(f"{self.server.url}/metrics", timeout=30).text
        except requests.RequestException:
            return {}
        return {key: prometheus_value(text, name) for key, name in POOL_METRICS.items()}

    def _progress_line(self) -> str:
        last = self.samples[-1]
        kv = [s["kv_slots"] for s in last["streams"]]
        dropped = sum(s["frames_dropped"] for s in last["streams"])
        chunks = sum(s["chunks"] for s in last["streams"])
        answered = [q for q in self.questions if not q.get("error")]
        ttft = f"{answered[-1]['ttft_s'] * 1e3:.0f} ms" if answered else "-"
        pool = last["pool"]
        cached = int(pool.get("kv_used", 0) + pool.get("kv_evictable", 0)) if pool else "?"
        return (f"[soak] {self.backend_name:<10} {last['t']:6.0f}/{self.settings.duration_s:.0f} s  chunks {chunks:4d}  "
                f"kv/stream {kv}  pool cached {cached}/{self.settings.max_total_tokens}  dropped frames {dropped}  "
                f"questions {len(answered)} (last TTFT {ttft})  load {last['load1']:.1f}")


# ---------------------------------------------------------------------------------------- driver
def server_flags(settings: SoakSettings) -> list[str]:
    mm = {"video": {"fps": settings.fps, "min_pixels": 28 * 28 * 4, "max_pixels": settings.max_pixels}}
    return ["--enable-multimodal", "--mm-process-config", json.dumps(mm), "--enable-metrics"]


def flashcache_settings(settings: SoakSettings) -> dict[str, Any]:
    return {"retention": settings.base_retention, "candidates": "multimodal", "min_candidates": 8}




def run_backend(backend: str, settings: SoakSettings, model: str, videos: Sequence[Path], workdir: Path,
                redis_url: Optional[str], startup_timeout: float) -> dict[str, Any]:
    from flashcache_sglang.testing.server import SGLangServer

    server = SGLangServer(model, flashcache=flashcache_settings(settings) if backend == "flashcache" else None,
                          extra_args=server_flags(settings), max_total_tokens=settings.max_total_tokens,
                          startup_timeout=startup_timeout, log_dir=workdir)
    out: dict[str, Any] = {"client": BACKEND_DESCRIPTIONS[backend], "server_log": str(server.log_path)}
    print(f"[soak] {backend}: starting the server (pool {settings.max_total_tokens} tokens)", file=sys.stderr, flush=True)
    ACTIVE_SERVERS.append(server)
    started = time.monotonic()
    try:
        try:
            server.start()
        except Exception as error:  # noqa: BLE001 - recorded; the other backend still runs
            out["error"] = f"server start failed: {error}"[:2000]
            return out
        out["startup_s"] = time.monotonic() - started
        out["load_average_start"] = load_average()
        try:
            out.update(SoakRun(server, backend, settings, videos, workdir / backend, redis_url).run())
        except Exception as error:  # noqa: BLE001 - recorded; the other backend still runs
            out["error"] = f"soak run failed: {type(error).__name__}: {error}"[:2000]
            return out
        out["load_average_end"] = load_average()
        out["leak_check"] = BenchServer(server, backend, settings.request_timeout_s).flush()
        if backend == "flashcache":
            stats = server.stats()
            out["flashcache_stats"] = {k: stats.get(k) for k in (
                "requests_compressed", "candidate_tokens", "kept_tokens", "slots_saved", "compression_seconds")}
        out["server_alive_at_end"] = server.alive()
    finally:
        if not server.alive():
            out["log_tail"] = server.log_tail(40)
        server.stop()
        ACTIVE_SERVERS.remove(server)
    return out


def quick_settings() -> SoakSettings:
    """The CI version: two streams for 30 s at twice real time (60 s of video each)."""
    return SoakSettings(streams=2, duration_s=30.0, pace=2.0, kv_cap=48, max_prompt_chunks=16,
                        question_interval_s=5.0, sample_interval_s=2.0, max_total_tokens=1024,
                        early_at_s=8.0, late_at_s=26.0, window_s=8.0, request_timeout_s=120.0)


# Command-line flags that set one SoakSettings field each: (flag, field, type, help).
OPTIONS = (
    ("--streams", "streams", int, "concurrent streams"),
    ("--pace", "pace", float, "video seconds per wall second (1: live)"),
    ("--fps", "fps", float, "sampled frames per second"),
    ("--chunk-frames", "chunk_frames", int, "frames per chunk"),
    ("--max-pixels", "max_pixels", int, "pixels per frame (the default suits the tiny model)"),
    ("--kv-cap", "kv_cap", int, "FlashCache: capped KV slots (visual tokens + delimiters) a stream keeps"),
    ("--base-retention", "base_retention", float, "FlashCache: retention of a chunk of average energy"),
    ("--footprint", "footprint_s", float, "FlashCache: seconds of stream per footprint segment"),
    ("--rebuild-chunks", "rebuild_chunks", int, "FlashCache: chunks re-appended when a lost memory is rebuilt"),
    ("--max-prompt-chunks", "max_prompt_chunks", int, "resend baseline: horizon, chunks in a stream's prompt"),
    ("--video-transport", "video_transport", str, "how chunk videos travel: path or data_url"),
    ("--question-interval", "question_interval_s", float, "seconds between questions per stream"),
    ("--turns", "turns", int, "turns per conversation"),
    ("--answer-tokens", "answer_tokens", int, "tokens per answer"),
    ("--sample-interval", "sample_interval_s", float, "seconds between samples"),
    ("--max-total-tokens", "max_total_tokens", int, "KV pool of BOTH servers"),
    ("--early-at", "early_at_s", float, "early mark, s"),
    ("--late-at", "late_at_s", float, "late mark, s (clipped to the run's last full window)"),
    ("--window", "window_s", float, "seconds of events around each mark"),
)


def parse_args(argv: Optional[Sequence[str]] = None) -> tuple[argparse.Namespace, SoakSettings]:
    base = SoakSettings()
    parser = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the CI version (2 streams, 30 s a backend, pace 2)")
    for flag, name, kind, text in OPTIONS:
        default = getattr(base, name)
        parser.add_argument(flag, type=kind, dest=name,
                            help=f"{text} (default {default:g})" if not isinstance(default, str) else f"{text} (default {default})")
    parser.add_argument("--minutes", type=float, help=f"soak length per backend (default {base.duration_s / 60:g})")
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    parser.add_argument("--model-path", help="a Qwen2.5-VL model (default: the tiny random-weight one)")
    parser.add_argument("--redis-url", default=os.environ.get("FLASHCACHE_REDIS_URL"),
                        help="metadata store (default: in process)")
    parser.add_argument("--startup-timeout", type=float, default=600.0)
    parser.add_argument("--wait-for-load", type=float, default=None, metavar="LOAD",
                        help="first wait until the 1-minute load average is below LOAD")
    parser.add_argument("--wait-timeout", type=float, default=1200.0)
    parser.add_argument("--output", type=Path, default=None, help="JSON path (default benchmarks/results/soak_*.json)")
    parser.add_argument("--plot", type=Path, default=None, help="PNG path (default: the JSON's, .png)")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--merge-into", type=Path, metavar="JSON",
                        help="put this run's backends into a saved soak with the same settings (replacing them)")
    parser.add_argument("--reanalyze", type=Path, metavar="JSON",
                        help="recompute the summaries, checks and plot of a saved run from its raw series")
    args = parser.parse_args(argv)
    start = quick_settings() if args.quick else base
    duration_s = None if args.minutes is None else args.minutes * 60
    return args, settings_from_options(parser, args, OPTIONS, start, duration_s=duration_s)



def main(argv: Optional[Sequence[str]] = None) -> int:
    args, settings = parse_args(argv)
    # Imported before the run, not after it: an hour of measurements must not depend on what the
    # source tree holds when the run ends.
    from benchmarks.plot_soak import plot_soak

    if args.reanalyze:
        report = finite(reanalyze(args.reanalyze))
        write_report(report, args.reanalyze, None if args.no_plot else args.reanalyze.with_suffix(".png"), plot_soak,
                     "soak")
        print_summary(report)
        return 0 if report["ok"] else 1
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, exit_on_sigterm)
    command = "python -m benchmarks.soak " + " ".join(sys.argv[1:] if argv is None else argv)
    waited = wait_for_load(args.wait_for_load, args.wait_timeout) if args.wait_for_load is not None else None
    if args.model_path:
        model = args.model_path
    else:
        from flashcache_sglang.testing.models import tiny_qwen2_5_vl_dir

        model = str(tiny_qwen2_5_vl_dir())
    workdir = Path(tempfile.mkdtemp(prefix="flashcache-soak-"))
    started = time.monotonic()
    load_start = load_average()
    print(f"[soak] generating {settings.streams} x {settings.video_seconds:.0f} s of test video", file=sys.stderr, flush=True)
    videos = [generate_video(workdir / f"stream_{k}.mp4", settings.video_seconds, settings.fps, seed=k)
              for k in range(settings.streams)]
    backends = {}
    output = args.output or args.merge_into or RESULTS_DIR / f"soak_{'quick' if args.quick else 'server_memory_cpu'}.json"
    partial = output.with_suffix(".partial.json")
    try:
        for backend in args.backends:
            backends[backend] = run_backend(backend, settings, model, videos, workdir, args.redis_url,
                                            args.startup_timeout)
            partial.write_text(json.dumps(finite({"settings": asdict(settings), "command": command,
                                                  "backends": backends}), allow_nan=False))
    finally:
        if not os.environ.get("FLASHCACHE_SOAK_KEEP"):
            for backend in BACKENDS:
                shutil.rmtree(workdir / backend / "chunks", ignore_errors=True)
    runs = {name: {"command": command, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                   "load_average_start": load_start, "load_average_end": load_average()} for name in backends}
    if args.merge_into:
        backends, runs, command = merge_backends(args.merge_into, settings, backends, runs, command)
        args.backends = list(backends)
    report = build_report(backends, settings, command, model, waited, time.monotonic() - started, args,
                          load_start=load_start)
    report["backend_runs"] = runs
    write_report(report, output, None if args.no_plot else (args.plot or output.with_suffix(".png")), plot_soak, "soak")
    partial.unlink(missing_ok=True)
    print(f"[soak] server logs under {workdir}", file=sys.stderr)
    print_summary(report)
    return 0 if report["ok"] else 1


def merge_backends(path: Path, settings: SoakSettings, backends: dict[str, dict], runs: dict[str, dict],
                   command: str) -> tuple[dict[str, dict], dict[str, dict], str]:
    """Put this run's backends into a saved soak (same settings), replacing the ones of the same
    name: a backend disturbed by other load is re-run alone. Returns backends, per-backend run
    records and the combined command."""
    saved = json.loads(Path(path).read_text())
    fields = set(SoakSettings.__dataclass_fields__)
    theirs = {k: v for k, v in saved["settings"].items() if k in fields}
    ours = {k: v for k, v in asdict(settings).items() if k in theirs}
    if theirs != ours:
        differ = sorted(k for k in ours if ours[k] != theirs[k])
        raise SystemExit(f"--merge-into {path}: its settings differ in {differ}; re-run with the same settings")
    old_runs = saved.get("backend_runs") or {name: {"command": saved.get("command"), "created": saved.get("created")}
                                             for name in saved["backends"]}
    merged = {**saved["backends"], **backends}
    return merged, {**old_runs, **runs}, f"{saved.get('command')} ; then {command}"


def build_report(backends: dict[str, dict], settings: SoakSettings, command: str, model: str,
                 waited: Optional[dict], elapsed_s: float, args, load_start: Optional[list] = None) -> dict[str, Any]:
    from flashcache_sglang import cpu_compat

    errors, failed_checks, acceptance = checks_and_acceptance(backends)
    model_name = Path(model).name if Path(model).exists() else model
    return {
        "benchmark": "soak",
        "design": DESIGN,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "quick": bool(args.quick),
        "machine": {**machine_info(), "waited_for_load": waited, "load_average_start": load_start,
                    "load_average_end": load_average()},
        "settings": {**asdict(settings), "model": model_name,
                     "dtype": "float32" if cpu_compat.needed() else "model default",
                     "flashcache": flashcache_settings(settings), "server_args": server_flags(settings),
                     "metadata_store": "redis" if args.redis_url else "in-process",
                     "video_per_stream": "distinct (one generated video per stream)",
                     "backends": {name: BACKEND_DESCRIPTIONS[name] for name in args.backends}},
        "backends": backends,
        "acceptance": acceptance,
        "targets": headline_targets(backends),
        "errors": errors,
        "failed_checks": failed_checks,
        "elapsed_s": elapsed_s,
        "ok": errors == 0 and not failed_checks and set(backends) == set(args.backends),
    }


def checks_and_acceptance(backends: dict[str, dict]) -> tuple[int, list[str], dict[str, Any]]:
    """Errors, failed correctness checks (server failures, leaks, lost chunks) and the
    acceptance table: FlashCache's checks with measured value, target and whether met."""
    errors, failed_checks = 0, []
    for name, run in backends.items():
        if "error" in run:
            failed_checks.append(f"{name}: {run['error'][:200]}")
            continue
        errors += run["summary"]["errors"]
        if not run["leak_check"].get("ok"):
            failed_checks.append(f"{name}: leak check {run['leak_check']}")
        integrity = run["summary"]["acceptance"].get("chunks")
        if integrity is not None and not integrity["met"]:
            failed_checks.append(f"{name}: lost/duplicated chunks {integrity['measured']}")
        if run.get("release_errors"):
            failed_checks.append(f"{name}: closing streams failed: {run['release_errors'][:3]}")
    acceptance: dict[str, Any] = {}
    flash = backends.get("flashcache", {})
    if "summary" in flash:
        acceptance = dict(flash["summary"]["acceptance"])
        leak = flash.get("leak_check", {})
        acceptance["leaked_kv_slots"] = {"measured": leak.get("leaked_kv_slots"), "target": "0",
                                         "met": bool(leak.get("ok")) and leak.get("leaked_kv_slots") == 0}
        acceptance["all_met"] = all(check["met"] for check in acceptance.values())
    return errors, failed_checks, acceptance


def headline_targets(backends: dict[str, dict]) -> dict[str, Any]:
    """The few numbers the README's headline quotes, both backends side by side."""
    targets: dict[str, Any] = {}
    for name in BACKENDS:
        summary = backends.get(name, {}).get("summary")
        if not summary:
            continue
        for check in ("question_ttft", "question_server_time", "question_request_bytes", "ingest_latency",
                      "ingest_max_over_median"):
            targets[f"{name}_{check}"] = summary["acceptance"][check]["measured"]
    flash = backends.get("flashcache", {}).get("summary")
    vanilla = backends.get("vanilla", {}).get("summary")
    if flash:
        targets["flashcache_worst_memory_spread"] = flash["worst_memory_spread"]
        targets["flashcache_memory_flat_met"] = flash["acceptance"]["memory_flat"]["met"]
    if flash and vanilla and flash["final_kv_slots_per_stream"] and vanilla["final_kv_slots_per_stream"]:
        targets["kv_slots_per_stream_ratio"] = flash["final_kv_slots_per_stream"] / vanilla["final_kv_slots_per_stream"]
    for key in ("median_question_request_bytes", "median_ingest_request_bytes"):
        if flash and vanilla and flash.get(key) and vanilla.get(key):
            targets[f"{key}_ratio"] = flash[key] / vanilla[key]
    return targets


def reanalyze(path: Path) -> dict[str, Any]:
    """Recompute every summary and check of a saved run from its raw samples, questions,
    ingests and chunk records (the analysis is code; the measurements are not re-taken)."""
    report = json.loads(Path(path).read_text())
    if report.get("design") != DESIGN:
        raise SystemExit(f"{path} is a soak of the old resend design (no \"design\": {DESIGN!r}); "
                         "this version of the tool cannot reanalyze it")
    fields = {name for name in SoakSettings.__dataclass_fields__}
    settings = SoakSettings(**{k: v for k, v in report["settings"].items() if k in fields})
    for name, run in report["backends"].items():
        if "samples" in run:
            cap = settings.kv_cap if name == "flashcache" else None
            integrity = run.get("chunk_integrity")
            if integrity is not None:
                # The store's chunk indices are not in the JSON (only whether they agreed): keep that verdict.
                redone = chunk_integrity(run["ingests"], {}, {row["stream_id"]: row["server_chunks_appended"]
                                                                for row in integrity["streams"]})
                for row, old in zip(redone["streams"], integrity["streams"]):
                    row["store_records"], row["store_agrees"] = old["store_records"], old["store_agrees"]
                    if not old["store_agrees"]:
                        redone["measured"]["disagreements"] += 1
                        redone["met"] = False
                integrity = redone
            run["summary"] = summarize(run["samples"], run["questions"], run["ingests"], settings, run["elapsed_s"],
                                       cap, integrity)
    errors, failed_checks, acceptance = checks_and_acceptance(report["backends"])
    report.update(errors=errors, failed_checks=failed_checks, acceptance=acceptance,
                  targets=headline_targets(report["backends"]), ok=errors == 0 and not failed_checks,
                  reanalyzed=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    return report


def print_summary(report: dict) -> None:
    keys = ("questions", "median_ttft_ms", "p99_ttft_ms", "median_question_server_e2e_ms",
            "median_question_request_bytes", "median_ingest_latency_ms", "max_ingest_latency_ms",
            "median_ingest_server_e2e_ms", "median_ingest_request_bytes", "mean_ingest_fps_per_stream",
            "frames_dropped_share", "final_kv_slots_per_stream", "final_logical_tokens_per_stream",
            "peak_pool_tokens_cached", "evicted_tokens_total", "errors")
    runs = {name: run.get("summary", {}) for name, run in report["backends"].items()}
    print(f"\n{'metric':<34}" + "".join(f"{name:>14}" for name in runs))
    for key in keys:
        cells = "".join(f"{v:14.4g}" if isinstance(v, (int, float)) else f"{str(v):>14}"
                        for v in (runs[name].get(key) for name in runs))
        print(f"{key:<34}{cells}")
    print("\nacceptance (FlashCache; the resend baseline's value beside it):")
    for name, check in report.get("acceptance", {}).items():
        if name == "all_met":
            continue
        baseline = (runs.get("vanilla", {}).get("acceptance") or {}).get(name, {}).get("measured")
        print(f"  {name:<26} measured {_shown(check['measured']):>24}  target {check['target']:<22} "
              f"{'met' if check['met'] else 'NOT met':<8} baseline {_shown(baseline)}")
    print(f"all acceptance checks met: {report.get('acceptance', {}).get('all_met')}")
    print(f"errors: {report['errors']}, failed checks: {report['failed_checks']}, ok: {report['ok']}")


def _shown(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


if __name__ == "__main__":
    sys.exit(main())
