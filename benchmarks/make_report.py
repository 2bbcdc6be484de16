"""Regenerate every README figure and benchmarks/results/REPORT.md from benchmarks/results/*.json.

    python benchmarks/make_report.py [--results DIR]

Each JSON is recognised by its content and whatever is missing is skipped (and said so):

- serving (``python -m benchmarks.serving``): vanilla SGLang vs FlashCache tables, figure
  ``<same name>.png`` (benchmarks/plot_serving.py);
- kernels (benchmarks/bench_kernels.py): compression time vs tokens, one figure per device
  (benchmarks/plot_kernels.py, which names it after the first file of that device);
- fidelity (``python -m benchmarks.fidelity``): perplexity ratio / attention error per policy and
  retention, figure ``<same name>.png``;
- soak (``python -m benchmarks.soak``): streams over time, FlashCache's server-held memory beside
  the resend baseline on vanilla SGLang, with issue 13's acceptance table; soaks recorded before
  the server held stream memories (no ``"design"`` in the JSON) are rendered as the old resend
  design; figure ``<same name>.png`` (benchmarks/plot_soak.py);
- long stream (``python -m benchmarks.stream_long``): one stream for an hour of video, footprint,
  planted scene, bounded positions; figure ``<same name>.png`` (benchmarks/plot_stream_long.py);
- video overhead (``python -m benchmarks.video_overhead``): what a request pays per cached video.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Optional

HERE = Path(__file__).resolve().parent
LOAD_LIMIT = 1.5  # above this 1-minute load average, timings on the 2-core CPU box are noise
if str(HERE.parent) not in sys.path:  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(HERE.parent))


def kind_of(data: Any) -> Optional[str]:
    if not isinstance(data, dict):
        return None
    if data.get("benchmark") in ("serving", "soak", "video_overhead", "stream_long"):
        return data["benchmark"]
    rows = data.get("results")
    if isinstance(rows, list) and isinstance(data.get("device"), dict) and rows and "num_tokens" in rows[0]:
        return "kernels"
    if isinstance(data.get("main"), list) and "context" in data.get("config", {}):
        return "fidelity"
    return None


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return lines + [""]


# ---------------------------------------------------------------------------------------- serving
def serving_section(path: Path, report: dict) -> list[str]:
    from benchmarks.plot_serving import plot_serving

    figure = plot_serving(report, path.with_suffix(".png"))
    machine, settings = report["machine"], report["settings"]
    lines = [f"### Serving: vanilla SGLang vs FlashCache ({path.name}{', QUICK sizes' if report.get('quick') else ''})",
             "", f"![serving]({figure.name})", "",
             f"- command: `{report.get('command')}`",
             f"- machine: {machine.get('cpu_model')}, {machine.get('cores')} cores, torch {machine.get('torch')}, "
             f"sglang {machine.get('sglang')}; load average {machine.get('load_average_start')} at start, "
             f"{machine.get('load_average_end')} at end",
             f"- model {settings['model']} ({settings['dtype']}), KV pool {settings['max_total_tokens']} tokens "
             f"for both servers, FlashCache {json.dumps(settings['flashcache'])}",
             f"- errors: {report.get('errors')}, failed leak checks: {report.get('failed_leak_checks')}, "
             f"ok: {report.get('ok')}", ""]
    loads = [w[b].get("load_average_start", [0])[0] for w in report["workloads"].values()
             for b in ("vanilla", "flashcache") if isinstance(w[b].get("load_average_start"), list)]
    busiest = max(loads + [(machine.get("load_average_start") or [0])[0]])
    if busiest >= LOAD_LIMIT:
        lines += [f"> Timings in this run were taken at a 1-minute load average up to {busiest:.1f} (>= {LOAD_LIMIT}) "
                  "on a shared machine: compare counts (sessions, requests, slots), not times.", ""]
    headline = report.get("headline")
    if headline:
        ratio = headline.get("ratio")
        lines += [f"**Sessions held at once** ({headline['session_tokens']}-token contexts, "
                  f"{headline['max_total_tokens']}-token pool, retention {headline['retention']}): vanilla "
                  f"{headline['sessions_held_vanilla']}, FlashCache {headline['sessions_held_flashcache']}"
                  + (f" (**x{ratio:.2f}**)" if isinstance(ratio, (int, float)) else ""), ""]
    for name, workload in report["workloads"].items():
        lines += [f"#### {name}", "", "sizes: `" + json.dumps(workload.get("sizes")) + "`", ""]
        rows = [[key, workload["vanilla"].get(key), workload["flashcache"].get(key), value]
                for key, value in workload.get("ratios", {}).items()]
        lines += _table(["metric", "vanilla", "FlashCache", "FlashCache / vanilla"], rows)
        turns = {b: workload[b].get("per_turn") for b in ("vanilla", "flashcache")}
        if turns["vanilla"] and turns["flashcache"]:
            rows = [[v["turn"], v.get("cached_token_share"), f.get("cached_token_share"), v.get("median_ttft_ms"),
                     f.get("median_ttft_ms"), f.get("mean_prompt_kv_slots")]
                    for v, f in zip(turns["vanilla"], turns["flashcache"])]
            lines += _table(["turn", "cached share vanilla", "cached share FlashCache", "median TTFT ms vanilla",
                             "median TTFT ms FlashCache", "prompt KV slots FlashCache"], rows)
    return lines


# ---------------------------------------------------------------------------------------- soak
SOAK_KEYS = ("questions", "median_ttft_ms", "p99_ttft_ms", "median_e2e_latency_ms", "median_ingest_latency_ms",
             "p99_ingest_latency_ms", "mean_ingest_fps_per_stream", "source_fps_per_stream", "frames_dropped_share",
             "final_kv_slots_per_stream", "final_logical_tokens_per_stream", "peak_pool_tokens_cached",
             "evicted_tokens_total", "question_cached_token_share", "errors")
# The server-memory soak adds the server's own timings and the bytes on the wire.
SERVER_MEMORY_SOAK_KEYS = ("questions", "median_ttft_ms", "p99_ttft_ms", "median_question_server_e2e_ms",
                           "median_question_request_bytes", "median_question_prompt_tokens", "ingests",
                           "median_ingest_latency_ms", "p99_ingest_latency_ms", "max_ingest_latency_ms",
                           "median_ingest_server_e2e_ms", "median_append_ms", "median_ingest_request_bytes",
                           "mean_ingest_fps_per_stream", "source_fps_per_stream", "frames_dropped_share",
                           "final_kv_slots_per_stream", "final_logical_tokens_per_stream",
                           "final_next_position_per_stream", "peak_pool_tokens_cached", "evicted_tokens_total",
                           "question_cached_token_share", "errors")
SOAK_LABELS = {"flashcache": "FlashCache (server-held memory)", "vanilla": "resend baseline (vanilla SGLang)"}


def _where(machine: dict) -> str:
    if machine.get("device") == "cuda" and machine.get("gpu_name"):
        return f"{machine['gpu_name']}"
    return f"{machine.get('cpu_model')} ({machine.get('cores')} cores, {machine.get('device')})"


def _is_server_memory_soak(report: dict) -> bool:
    return report.get("design") == "server-memory"


def _measured(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k} {_cell(v)}" for k, v in value.items())
    if isinstance(value, list):
        return str(value[:8]) + ("..." if len(value) > 8 else "")
    return _cell(value)


def soak_headline(report: dict) -> str:
    """One sentence from the JSON: for a server-memory soak, the acceptance checks that matter
    most beside the baseline; for an old one, memory per stream, flatness and TTFT drift."""
    if not _is_server_memory_soak(report):
        return old_soak_headline(report)
    settings = report["settings"]
    runs = {name: run.get("summary", {}) for name, run in report["backends"].items()}
    flash, vanilla = runs.get("flashcache", {}), runs.get("vanilla", {})
    checks = report.get("acceptance", {})
    parts = [f"{settings['streams']} streams x {settings['duration_s'] / 60:g} min at {settings['pace']:g}x real time, "
             f"pool {settings['max_total_tokens']} tokens"]
    failed = failed_streams_note(report)
    if failed:
        parts.append(failed)
    if flash.get("final_kv_slots_per_stream") and vanilla.get("final_kv_slots_per_stream"):
        parts.append(f"KV slots a stream holds at the end: FlashCache {flash['final_kv_slots_per_stream']:.0f} vs "
                     f"resend baseline {vanilla['final_kv_slots_per_stream']:.0f}")
    base = (vanilla.get("acceptance") or {})
    for name, text in (("question_ttft", "question TTFT late/early"),
                       ("question_server_time", "question server time late/early"),
                       ("question_request_bytes", "question bytes late/early"),
                       ("ingest_latency", "ingest latency late/early"),
                       ("ingest_max_over_median", "max/median ingest latency"),
                       ("memory_flat", "memory spread after the cap")):
        check = checks.get(name)
        if not check or check.get("measured") is None:
            continue
        baseline = (base.get(name) or {}).get("measured")
        parts.append(f"{text} x{check['measured']:.2f} ({check['target']}: {'met' if check['met'] else 'NOT met'}"
                     + (f"; baseline x{baseline:.2f})" if isinstance(baseline, (int, float)) else ")"))
    if flash.get("median_question_request_bytes") and vanilla.get("median_question_request_bytes"):
        parts.append(f"median question request {flash['median_question_request_bytes']:.0f} B vs baseline "
                     f"{vanilla['median_question_request_bytes']:.0f} B")
    load = flash.get("load_average_1min") or {}
    if load:
        parts.append(f"machine load average during the FlashCache run {load['mean']:.1f} (max {load['max']:.1f}) on "
                     f"{report['machine'].get('cores')} cores")
    parts.append(f"all acceptance checks met: {checks.get('all_met')}; errors {report.get('errors')}, "
                 f"failed checks {len(report.get('failed_checks', []))}")
    return "; ".join(parts)


def failed_streams_note(report: dict) -> str:
    """Which backend's streams failed during the run, and the first error (empty when none did):
    after a stream fails, its later numbers describe a memory nothing appends to."""
    notes = []
    for name, run in report["backends"].items():
        summary = run.get("summary") or {}
        failed = summary.get("failed_streams") or []
        if failed:
            first = next((i.get("error") for i in run.get("ingests", []) if i.get("error")), None)
            notes.append(f"{SOAK_LABELS.get(name, name)}: {len(failed)} of {report['settings']['streams']} streams "
                         f"FAILED" + (f" ({first[:160]})" if first else ""))
    return "; ".join(notes)


def old_soak_headline(report: dict) -> str:
    """One sentence of a soak recorded before issue 13 (both backends resent the prompt window)."""
    settings, targets = report["settings"], report.get("targets", {})
    runs = {name: run.get("summary", {}) for name, run in report["backends"].items()}
    flash, vanilla = runs.get("flashcache", {}), runs.get("vanilla", {})
    parts = [f"{settings['streams']} streams x {settings['duration_s'] / 60:g} min"]
    if flash.get("final_kv_slots_per_stream") and vanilla.get("final_kv_slots_per_stream"):
        parts.append(f"KV slots a stream holds at the end: FlashCache {flash['final_kv_slots_per_stream']:.0f} vs vanilla "
                     f"{vanilla['final_kv_slots_per_stream']:.0f} (x{targets.get('kv_slots_per_stream_ratio', 0):.2f})")
    spread = targets.get("flashcache_worst_memory_spread")
    if spread is not None:
        parts.append(f"FlashCache memory spread after reaching the cap {spread:.1%} (target <= 5%: "
                     f"{'met' if targets.get('flashcache_memory_flat_met') else 'NOT met'})")
    for name, label in (("flashcache", "FlashCache"), ("vanilla", "vanilla")):
        drift = (runs.get(name) or {}).get("ttft_drift") or {}
        if drift.get("ratio") is not None:
            parts.append(f"{label} question TTFT at {drift['late_at_s'] / 60:.3g} min / at {drift['early_at_s'] / 60:.3g} min "
                         f"x{drift['ratio']:.2f}" + (" (target <= 1.2: " + ("met)" if drift["met"] else "NOT met)")
                                                     if name == "flashcache" else ""))
    if vanilla.get("evicted_tokens_total"):
        parts.append(f"vanilla evicted {vanilla['evicted_tokens_total']:.0f} cached tokens, FlashCache "
                     f"{flash.get('evicted_tokens_total') or 0:.0f}")
    parts.append(f"errors {report.get('errors')}, failed checks {len(report.get('failed_checks', []))}")
    return "; ".join(parts)


def soak_section(path: Path, report: dict) -> list[str]:
    if not _is_server_memory_soak(report):
        return old_soak_section(path, report)
    from benchmarks.plot_soak import plot_soak

    figure = plot_soak(report, path.with_suffix(".png"))
    machine, settings = report["machine"], report["settings"]
    lines = [f"### Soak: FlashCache's server-held stream memory beside the resend baseline ({path.name}"
             f"{', QUICK' if report.get('quick') else ''})", "", f"![soak]({figure.name})", "",
             f"- command: `{report.get('command')}`",
             f"- machine: {_where(machine)}, torch {machine.get('torch')}, sglang {machine.get('sglang')}; load average "
             f"{machine.get('load_average_start')} at start, {machine.get('load_average_end')} at end",
             f"- model {settings['model']} ({settings['dtype']}), KV pool {settings['max_total_tokens']} tokens for "
             f"both servers; {settings['streams']} streams (one video each) replayed at {settings['pace']:g}x real "
             f"time, {settings['fps']:g} fps, {settings['chunk_frames']} frames a chunk; FlashCache cap "
             f"{settings['kv_cap']} capped slots a stream, base retention {settings['base_retention']}, footprint "
             f"{settings['footprint_s']:g} s; resend baseline horizon {settings['max_prompt_chunks']} chunks; a "
             f"question every {settings['question_interval_s']:g} s per stream ({settings['turns']}-turn "
             f"conversations); video transport {settings['video_transport']}; metadata store: "
             f"{settings.get('metadata_store')}"]
    for name, text in settings.get("backends", {}).items():
        lines.append(f"- `{name}`: {text}")
    for name, run in (report.get("backend_runs") or {}).items():
        lines.append(f"- `{name}` measured {run.get('created')} by `{run.get('command')}` (load average "
                     f"{run.get('load_average_start')} at start, {run.get('load_average_end')} at end)")
    lines += [f"- {soak_headline(report)}", ""]
    runs = {name: run.get("summary", {}) for name, run in report["backends"].items()}
    loads = [(runs[n].get("load_average_1min") or {}).get("mean") for n in runs]
    if any(isinstance(v, (int, float)) and v >= LOAD_LIMIT for v in loads):
        lines += [f"> The 1-minute load average during these runs was {', '.join(_cell(v) for v in loads)} "
                  f"(>= {LOAD_LIMIT}) on a shared {machine.get('cores')}-core machine: other work competed for the "
                  "CPU, so timings carry that noise; bytes, token and slot counts do not.", ""]
    failed = failed_streams_note(report)
    if failed:
        lines += [f"> Streams failed during this run: {failed}. A failed stream ingests nothing more, so the "
                  "late-vs-early ratios of that backend compare a memory nothing appends to any more: they are not "
                  "a measurement of the design.", ""]
    lines += ["Acceptance (issue 13): FlashCache is checked; the resend baseline's value of the same measure is "
              "beside it. Early = the window around minute 1, late = the window around minute 30 (clipped to the "
              "run's last full window).", ""]
    base = runs.get("vanilla", {}).get("acceptance") or {}
    rows = []
    for name, check in report.get("acceptance", {}).items():
        if name == "all_met":
            continue
        rows.append([name, _measured(check.get("measured")), check.get("target"),
                     "met" if check.get("met") else "NOT met", _measured((base.get(name) or {}).get("measured"))])
    lines += _table(["check", "FlashCache measured", "target", "", "resend baseline measured"], rows)
    names = list(runs)
    lines += _table(["metric", *(SOAK_LABELS.get(n, n) for n in names)],
                    [[key, *(runs[n].get(key) for n in names)] for key in SERVER_MEMORY_SOAK_KEYS])
    flash_spikes = runs.get("flashcache", {}).get("acceptance", {}).get("ingest_max_over_median", {})
    if flash_spikes.get("slowest"):
        lines += ["Slowest FlashCache ingests (client latency; the server's own spans beside it):", ""]
        lines += _table(["t s", "chunk", "client ms", "server e2e ms", "queue ms", "tokenize ms", "prefill ms",
                         "append_ms", "ingests in flight"],
                        [[row.get("t"), row.get("chunk"), _ms(row.get("seconds")), _ms(row.get("server_e2e_s")),
                          _ms(row.get("server_queue_s")), _ms(row.get("server_tokenize_s")),
                          _ms(row.get("server_prefill_s")), row.get("append_ms"), row.get("in_flight")]
                         for row in flash_spikes["slowest"]])
        extra = {k: flash_spikes.get(k) for k in ("p99_over_median", "server_e2e_max_over_median",
                                                  "append_ms_max_over_median", "max_over_median_after_first_minute",
                                                  "over_target")}
        lines += [f"Ingest spread (FlashCache): `{json.dumps(extra)}`", ""]
    lines += flatness_and_failures(report, runs, names)
    errors = [[SOAK_LABELS.get(name, name), kind, count, first]
              for name in names for kind, count, first in error_kinds(report["backends"][name])]
    if errors:
        lines += ["Errors recorded (first message of each kind):", ""]
        lines += _table(["backend", "request", "count", "first message"], errors)
    return lines


def flatness_and_failures(report: dict, runs: dict, names: list[str]) -> list[str]:
    """A soak's per-stream memory flatness table and each failed backend's error."""
    rows = []
    for name in names:
        for flat in runs[name].get("memory_flatness", []):
            rows.append([name, flat["stream"], flat.get("settled_at_s"), flat.get("first_kv_slots"),
                         flat.get("last_kv_slots"), flat.get("min_kv_slots"), flat.get("max_kv_slots"), flat.get("spread")])
    lines = _table(["backend", "stream", "reached the cap at s", "first KV slots", "last KV slots",
                    "min after cap", "max after cap", "spread"], rows)
    for name in names:
        if "error" in report["backends"][name]:
            lines += [f"- {name}: {report['backends'][name]['error'][:300]}", ""]
    return lines


def error_kinds(run: dict) -> list[tuple[str, int, str]]:
    """(request kind, count, first message) of a soak backend's failed ingests and questions,
    one row per distinct message start (paths and ids vary, the cause does not)."""
    rows: dict[tuple[str, str], list] = {}
    for kind, events in (("ingest", run.get("ingests", [])), ("question", run.get("questions", []))):
        for event in events:
            message = event.get("error")
            if not message:
                continue
            key = (kind, re.sub(r"[/\w.-]*/[\w./-]+|st_[\w-]+|\d+", "_", message)[:80])
            rows.setdefault(key, [0, message])[0] += 1
    return [(kind, count, first[:240].replace("|", "/")) for (kind, _), (count, first) in rows.items()]


def _ms(seconds: Any) -> Any:
    return seconds * 1e3 if isinstance(seconds, (int, float)) else seconds


def old_soak_section(path: Path, report: dict) -> list[str]:
    from benchmarks.plot_soak import plot_soak

    figure = plot_soak(report, path.with_suffix(".png"))
    machine, settings = report["machine"], report["settings"]
    lines = [f"### Soak, OLD resend design: vanilla SGLang vs FlashCache, both resending the prompt window "
             f"({path.name}{', QUICK' if report.get('quick') else ''})", "",
             "> Recorded before the server held stream memories (issue 13): both backends resent the stream's "
             "prompt window with every ingest and question. Kept for comparison; the server-memory soak above "
             "supersedes it.", "", f"![soak]({figure.name})", "",
             f"- command: `{report.get('command')}`",
             f"- machine: {_where(machine)}, torch {machine.get('torch')}, sglang {machine.get('sglang')}",
             f"- model {settings['model']} ({settings['dtype']}), KV pool {settings['max_total_tokens']} tokens for "
             f"both servers; {settings['streams']} streams replayed at {settings['pace']:g}x real time, "
             f"{settings['fps']:g} fps, {settings['chunk_frames']} frames a chunk, horizon "
             f"{settings['max_prompt_chunks']} chunks; FlashCache cap {settings['kv_cap']} visual slots a stream, "
             f"base retention {settings['base_retention']}; a question every {settings['question_interval_s']:g} s "
             f"per stream; metadata store: {settings.get('metadata_store')}",
             f"- {old_soak_headline(report)}", ""]
    if "video_per_stream" not in settings:
        lines += ["> In this run every stream replayed the same video (the tool has given each stream its own "
                  "since): vanilla SGLang, whose radix tree has no per-stream namespace, held one shared memory "
                  "for all streams, so its pool and eviction numbers understate what distinct streams cost. "
                  "Per-stream memory (what each prompt holds) and FlashCache's numbers are unaffected.", ""]
    runs = {name: run.get("summary", {}) for name, run in report["backends"].items()}
    names = list(runs)
    lines += _table(["metric", *names], [[key, *(runs[n].get(key) for n in names)] for key in SOAK_KEYS])
    lines += flatness_and_failures(report, runs, names)
    return lines


# ---------------------------------------------------------------------------------------- long stream
def stream_long_headline(report: dict) -> str:
    analysis, settings = report["analysis"], report["settings"]
    planted = analysis["planted_scene"]
    bounded = analysis["positions_bounded"]
    footprint = analysis["footprint"]
    flat = analysis["memory_flat"]
    parts = [f"{analysis['stream_seconds'] / 60:.0f} min of video in one stream"
             + (f", ingested at {analysis['speed_vs_real_time']:.1f}x real time" if analysis.get("speed_vs_real_time") else ""),
             f"every {settings['segment_s']:g} s segment keeps a visual token: "
             f"{'yes' if footprint['met'] else 'NO'} ({len(footprint['measured']['empty_segments'])} of "
             f"{footprint['measured']['segments']} empty)",
             f"planted scene keeps {planted['kept_at_end_total']} tokens in {len(planted['chunks'])} chunks "
             f"({_cell(planted.get('kept_per_chunk'))}/chunk vs neighbours {_cell(planted.get('neighbour_kept_per_chunk'))})",
             f"KV flat after the cap: spread {_cell(flat['measured'])} ({'met' if flat['met'] else 'NOT met'})",
             f"next_position max {bounded['max_next_position']} (context {bounded['context_length']}, structural "
             f"ceiling {bounded.get('next_position_ceiling')}) while positions without re-basing would reach "
             f"{_cell(bounded['unrebased_positions_over_context'])}x the context and the stream appended "
             f"{_cell(bounded['logical_over_context'])}x the context in tokens ({'met' if bounded['met'] else 'NOT met'})"]
    plateau = analysis.get("positions_plateau")
    if plateau:
        grown = plateau["measured"]
        parts.append(f"over the second half next_position grew {_pct(grown['next_position_growth_second_half'])} and "
                     f"memory_tokens {_pct(grown['memory_tokens_growth_second_half'])} (target <= 5%: "
                     f"{'met' if plateau['met'] else 'NOT met'})")
    parts.append(f"all acceptance checks met: {report['acceptance'].get('all_met')}")
    return "; ".join(parts)


def stream_long_section(path: Path, report: dict) -> list[str]:
    from benchmarks.plot_stream_long import plot_stream_long

    figure = plot_stream_long(report, path.with_suffix(".png"))
    machine, settings, analysis = report["machine"], report["settings"], report["analysis"]
    load = analysis.get("load_average_1min") or {}
    lines = [f"### Long stream: one hour of video in the server-held memory ({path.name}"
             f"{', QUICK' if report.get('quick') else ''})", "", f"![long stream]({figure.name})", "",
             f"- command: `{report.get('command')}`",
             f"- machine: {_where(machine)}, torch {machine.get('torch')}, sglang {machine.get('sglang')}; load average "
             f"over the run: mean {_cell(load.get('mean'))}, max {_cell(load.get('max'))}",
             f"- model {settings['model']} ({settings['dtype']}), cap {settings['kv_cap']}, base retention "
             f"{settings['base_retention']}, footprint {settings['footprint_s']:g} s, server context length "
             f"{settings['context_length']}, {settings['fps']:g} fps, {settings['chunk_frames']} frames a chunk; "
             f"planted scene: {settings['planted_scene']}",
             f"- {stream_long_headline(report)}", ""]
    rows = [[name, _measured(check.get("measured")), check.get("target"), "met" if check.get("met") else "NOT met"]
            for name, check in report["acceptance"].items() if name != "all_met"]
    lines += _table(["check", "measured", "target", ""], rows)
    planted = analysis["planted_scene"]
    lines += ["**The planted scene.** " + planted["explanation"], ""]
    lines += _table(["", "planted chunks", "neighbour chunks (+-1 segment)", "all other chunks"],
                    [["kept visual tokens per chunk at the end", planted.get("kept_per_chunk"),
                      planted.get("neighbour_kept_per_chunk"), planted.get("all_chunks_kept_per_chunk")],
                     ["visual tokens kept in its own append (per chunk)", _cell(_mean_of(planted.get("planted_kept_at_admission"))),
                      planted.get("neighbour_kept_at_admission_mean"), None],
                     ["retention asked at admission", _cell(_mean_of(planted.get("planted_retention_at_admission"))),
                      planted.get("neighbour_retention_at_admission_mean"), None]])
    bounded = analysis["positions_bounded"]
    lines += [f"Positions: the probe measured {bounded['probe'].get('first_chunk_positions')} positions for the header "
              f"and the first chunk and {bounded['probe'].get('per_chunk_positions')} per further chunk "
              f"({bounded['probe'].get('per_chunk_tokens')} tokens); without re-basing the stream would end at "
              f"position {bounded['unrebased_positions']}; with it, `next_position` peaked at "
              f"{bounded['max_next_position']} (after the cap: `{json.dumps(bounded['next_position_after_cap'])}`).", ""]
    lines += [f"- kept visual tokens per {settings['segment_s']:g} s segment at the end: "
              f"`{analysis['footprint']['tokens_per_segment']}`"]
    for name in ("append_latency", "append_server_ms"):
        lines += [f"- {name}: `{json.dumps(analysis.get(name))}`"]
    lines += [f"- questions about the start: prompt tokens {analysis['questions']['prompt_tokens']}, TTFT ms "
              f"{analysis['questions']['ttft_ms']}", ""]
    if "error" in report["raw"]:
        lines += [f"- run error: {report['raw']['error'][:300]}", ""]
    return lines


def _pct(value: Any) -> str:
    return f"{value:.1%}" if isinstance(value, (int, float)) else "-"


def _mean_of(values: Optional[list]) -> Optional[float]:
    present = [v for v in values or [] if isinstance(v, (int, float))]
    return sum(present) / len(present) if present else None


def video_overhead_line(report: dict) -> str:
    per_video = report.get("ms_per_video")
    processor = report.get("processor_ms_per_video")
    return (f"each request re-processes every video of its prompt even when all are cached: "
            f"{per_video:.1f} ms per video of request latency"
            + (f", {processor:.1f} ms of it in SGLang's video processor" if processor is not None else ""))


def video_overhead_section(path: Path, report: dict) -> list[str]:
    lines = [f"### Video overhead per request ({path.name})", "",
             f"- command: `{report.get('command')}`; machine: {_where(report['machine'])}; model "
             f"{report['settings']['model']}",
             f"- {video_overhead_line(report)}", ""]
    rows = [[r["videos"], r["prompt_tokens"], r["median_latency_ms"], r.get("median_load_ms"),
             r.get("median_preprocess_ms"), r.get("median_process_ms"), r.get("median_rope_ms"), r["min_cached_share"]]
            for r in report["rows"]]
    return lines + _table(["videos", "prompt tokens", "median latency ms (fully cached)", "load ms", "preprocess ms",
                           "HF processor ms", "rope ms", "cached share"], rows)


# ---------------------------------------------------------------------------------------- kernels
def kernels_section(group: list[tuple[Path, dict]]) -> list[str]:
    device = group[0][1]["device"].get("device_name", "unknown device")
    files = [str(path) for path, _ in group]
    plotted = subprocess.run([sys.executable, str(HERE / "plot_kernels.py"), *files], capture_output=True, text=True)
    lines = [f"### Kernels: whole-model compression time on {device} ({', '.join(p.name for p, _ in group)})", ""]
    if plotted.returncode == 0:
        lines += [f"![kernels]({group[0][0].with_suffix('.png').name})", ""]
    else:
        lines += [f"_plot_kernels.py failed: {plotted.stderr.strip().splitlines()[-1:]}_", ""]
    rows = []
    for _, report in group:
        for row in report["results"]:
            rows.append([row["num_tokens"], row.get("engine", {}).get("median_ms"), row.get("stream", {}).get("median_ms"),
                         row.get("torch_reference", {}).get("median_ms"), row.get("floor", {}).get("median_ms"),
                         row.get("paper_ms"), (report.get("target_ms") or {}).get(str(row["num_tokens"]))])
    rows.sort(key=lambda r: r[0])
    return lines + _table(["tokens", "engine (score + rank + select) ms", "+ stream move ms",
                           "torch reference ms", "bandwidth floor ms",
                           "paper ms", "target ms"], rows)


# ---------------------------------------------------------------------------------------- fidelity
def fidelity_section(path: Path, report: dict) -> list[str]:
    config = report["config"]
    lines = [f"### Fidelity: {config.get('model_name')}, context {config.get('context')}, continuation "
             f"{config.get('continuation')} ({path.name})", ""]
    try:
        from benchmarks import fidelity

        fidelity._plot(report, str(path.with_suffix(".png")))
        lines += [f"![fidelity]({path.with_suffix('.png').name})", ""]
    except Exception as error:  # noqa: BLE001 - the table is still useful without the figure
        lines += [f"_figure not regenerated: {type(error).__name__}: {error}_", ""]
    targets = report.get("targets") or {}
    split = targets.get("split", "all")

    def cell(row: dict) -> str:
        summary = row.get(split, row)["ppl_ratio"]
        if "ci95" not in summary:  # reports written before the 95% intervals
            return f"{summary['mean']:.3f}"
        low, high = summary["ci95"]
        return f"{summary['mean']:.3f} [{low:.3f}, {high:.3f}]"

    rows = [[r["policy"], r["retention"], cell(r), r.get(split, r)["attn_error"]["mean"]]
            for r in sorted(report["main"], key=lambda r: (-r["retention"], r.get(split, r)["ppl_ratio"]["mean"]))]
    label = "held-out text" if split == "held_out" else "all windows"
    lines += _table(["policy", "retention", f"perplexity ratio, {label} (mean [95% CI])", "attention error"], rows)
    if targets.get("checks"):
        verdict = "met" if targets.get("met") else "NOT met"
        lines += [f"acceptance on {label}: {verdict}: `{json.dumps(targets['checks'])}`", ""]
    return lines


def _shown(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(HERE.parent))
    except ValueError:
        return str(path)


def build_report(results: Path) -> tuple[str, dict[str, list[str]]]:
    """REPORT.md's text and, per kind, the JSON files used."""
    found: dict[str, list[tuple[Path, dict]]] = {"serving": [], "soak": [], "stream_long": [], "video_overhead": [],
                                                 "kernels": [], "fidelity": []}
    ignored = []
    for path in sorted(results.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            ignored.append(f"{path.name} (unreadable: {error})")
            continue
        kind = kind_of(data)
        if kind is None:
            ignored.append(f"{path.name} (not a known result format)")
        else:
            found[kind].append((path, data))
    lines = ["# Benchmark report", "",
             f"Generated by `python benchmarks/make_report.py` from {_shown(results)}/*.json; rerun it after any "
             "benchmark to refresh these tables and the figures beside them.", ""]
    sections: list[tuple[str, str, Callable[[], list[str]]]] = []
    for path, data in found["serving"]:
        sections.append(("serving", path.name, lambda p=path, d=data: serving_section(p, d)))
    # Server-memory soaks first, the old resend design after them.
    for path, data in sorted(found["soak"], key=lambda item: not _is_server_memory_soak(item[1])):
        sections.append(("soak", path.name, lambda p=path, d=data: soak_section(p, d)))
    for path, data in found["stream_long"]:
        sections.append(("stream_long", path.name, lambda p=path, d=data: stream_long_section(p, d)))
    for path, data in found["video_overhead"]:
        sections.append(("video_overhead", path.name, lambda p=path, d=data: video_overhead_section(p, d)))
    by_device: dict[str, list[tuple[Path, dict]]] = {}
    for path, data in found["kernels"]:
        by_device.setdefault(data["device"].get("device_name", "unknown"), []).append((path, data))
    for device, group in by_device.items():
        sections.append(("kernels", device, lambda g=group: kernels_section(g)))
    for path, data in found["fidelity"]:
        sections.append(("fidelity", path.name, lambda p=path, d=data: fidelity_section(p, d)))
    for kind, name, render in sections:
        try:
            lines += render()
        except Exception as error:  # noqa: BLE001 - one malformed file must not hide the others
            lines += [f"### {kind}: {name}", "", f"_skipped: {type(error).__name__}: {error}_", ""]
    hints = {"serving": "python -m benchmarks.serving", "soak": "python -m benchmarks.soak",
             "stream_long": "python -m benchmarks.stream_long",
             "video_overhead": "python -m benchmarks.video_overhead", "kernels": "bash benchmarks/run_gpu_suite.sh (GPU)",
             "fidelity": "python -m benchmarks.fidelity ..."}
    missing = [f"- {kind}: none found (run `{hints[kind]}`)" for kind in found if not found[kind]]
    if missing or ignored:
        lines += ["### Not included", ""] + missing + [f"- ignored {name}" for name in ignored] + [""]
    return "\n".join(lines), {kind: [p.name for p, _ in items] for kind, items in found.items()}


README_START, README_END = "<!-- performance:start -->", "<!-- performance:end -->"


def readme_block(results: Path) -> list[str]:
    """The README's Performance section: headlines and figures, all read from the JSON files."""
    lines = [README_START, "",
             f"_Generated by `python benchmarks/make_report.py` from `{_shown(results)}/*.json`; full tables in "
             f"[{_shown(results)}/REPORT.md]({_shown(results)}/REPORT.md)._", ""]
    loaded = []
    for path in sorted(results.glob("*.json")):
        try:
            loaded.append((path, json.loads(path.read_text())))
        except (OSError, ValueError):
            continue
    # Headlines first (sessions held), then the rest by file name (old-design soaks after the new ones).
    loaded.sort(key=lambda item: (not (isinstance(item[1], dict) and item[1].get("headline")),
                                  kind_of(item[1]) == "soak" and not _is_server_memory_soak(item[1]), item[0].name))
    for path, data in loaded:
        kind = kind_of(data)
        figure = path.with_suffix(".png")
        if kind == "serving":
            machine = data.get("machine", {})
            where = f"{machine.get('cpu_model')} ({machine.get('cores')} cores, {machine.get('device')})"
            headline = data.get("headline")
            if headline and isinstance(headline.get("ratio"), (int, float)):
                lines.append(f"- **Sessions held in the same KV pool** ({where}, {data['settings']['model']}, "
                             f"retention {headline['retention']}): vanilla SGLang {headline['sessions_held_vanilla']}, "
                             f"FlashCache {headline['sessions_held_flashcache']}: **x{headline['ratio']:.2f}** "
                             f"(`{path.name}`)")
            for name, workload in data.get("workloads", {}).items():
                ratios = workload.get("ratios", {})
                shown = {k: ratios[k] for k in ("prefix_kv_slots", "mean_prompt_kv_slots", "request_throughput",
                                                "median_ttft_ms", "median_tpot_ms", "max_running_requests",
                                                "prompts_fitting_in_pool")
                         if isinstance(ratios.get(k), (int, float))}
                if shown and name != "sessions-held":
                    lines.append(f"- {name} ({where}), FlashCache / vanilla: "
                                 + ", ".join(f"{k} x{v:.2f}" for k, v in shown.items()) + f" (`{path.name}`)")
        elif kind == "soak" and _is_server_memory_soak(data):
            lines.append(f"- **Soak, server-held stream memory vs resend baseline** ({_where(data.get('machine', {}))}, "
                         f"{data['settings']['model']}{', quick' if data.get('quick') else ''}): {soak_headline(data)} "
                         f"(`{path.name}`)")
        elif kind == "soak":
            shared = "" if "video_per_stream" in data["settings"] else (
                "; every stream replayed the same video, so vanilla's streams shared one cached memory: its pool "
                "numbers understate distinct streams (see REPORT.md)")
            lines.append(f"- Soak, OLD resend design (both backends resent the prompt window; before issue 13) "
                         f"({_where(data.get('machine', {}))}, {data['settings']['model']}"
                         f"{', quick' if data.get('quick') else ''}): {old_soak_headline(data)}{shared} (`{path.name}`)")
        elif kind == "stream_long":
            lines.append(f"- **Long stream** ({_where(data.get('machine', {}))}, {data['settings']['model']}"
                         f"{', quick' if data.get('quick') else ''}): {stream_long_headline(data)} (`{path.name}`)")
        elif kind == "video_overhead":
            lines.append(f"- Video overhead ({_where(data.get('machine', {}))}, {data['settings']['model']}): "
                         f"{video_overhead_line(data)} (`{path.name}`)")
        elif kind == "kernels":
            lines.append(f"- kernels on {data['device'].get('device_name', '?')}: see REPORT.md (`{path.name}`)")
        elif kind == "fidelity":
            lines.append(f"- fidelity of every policy on {data.get('model', 'the model')}: `{path.name}`")
        if figure.exists():
            lines += ["", f"![{path.stem}]({_shown(results)}/{figure.name})", ""]
    return lines + ["", README_END]


def update_readme(readme: Path, results: Path) -> bool:
    """Replace the block between the markers in ``readme``; False if the markers are absent."""
    text = readme.read_text()
    if README_START not in text or README_END not in text:
        return False
    head, rest = text.split(README_START, 1)
    tail = rest.split(README_END, 1)[1]
    readme.write_text(head + "\n".join(readme_block(results)) + tail)
    return True


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)
    text, used = build_report(args.results)
    output = args.results / "REPORT.md"
    output.write_text(text)
    print(f"wrote {output} ({', '.join(f'{k}: {len(v)}' for k, v in used.items())})")
    readme = HERE.parent / "README.md"
    if args.results.resolve() == (HERE / "results").resolve() and readme.exists() and update_readme(readme, args.results):
        print(f"updated the Performance section of {readme}")


if __name__ == "__main__":
    main()
