"""The soak's picture: KV memory, ingest rate, question TTFT, ingest latency and request bytes over time.

    python -m benchmarks.plot_soak benchmarks/results/soak_server_memory_cpu.json   # writes the .png beside it

It draws both report formats: the current one (``"design": "server-memory"``: FlashCache's
server-held memory beside the resend baseline on vanilla SGLang) and the soaks recorded before
issue 13, where *both* backends resent the stream's prompt window (their titles say so).
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path
from typing import Any

from benchmarks.soak import DESIGN, ingest_fps_series

COLORS = {"vanilla": "#d62728", "flashcache": "#1f77b4"}
LABELS = {"vanilla": "resend baseline (vanilla SGLang)", "flashcache": "FlashCache, server-held memory"}
OLD_LABELS = {"vanilla": "vanilla SGLang (resend)", "flashcache": "FlashCache (resend, old design)"}


def rolling_median(points: list[tuple[float, float]], width: float) -> list[tuple[float, float]]:
    """Median of the values in the trailing ``width`` seconds at every point (points sorted by time)."""
    out, start = [], 0
    points = sorted(points)
    for i, (t, _) in enumerate(points):
        while t - points[start][0] > width:
            start += 1
        out.append((t, statistics.median(v for _, v in points[start: i + 1])))
    return out


def _scatter_with_median(axis, points: list[tuple[float, float]], color: str, label: str, width: float,
                         style: str = "-", dots: bool = True) -> None:
    if not points:
        return
    if dots:
        axis.scatter([t / 60 for t, _ in points], [v for _, v in points], s=6, color=color, alpha=0.25)
    smooth = rolling_median(points, width)
    axis.plot([t / 60 for t, _ in smooth], [v for _, v in smooth], color=color, lw=2 if style == "-" else 1.2,
              ls=style, label=label)


def plot_soak(report: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = report["settings"]
    new = report.get("design") == DESIGN
    labels = LABELS if new else OLD_LABELS
    width = settings["window_s"]
    fig, axes = plt.subplots(5, 1, figsize=(10, 16), sharex=True)
    memory, fps_axis, ttft_axis, ingest_axis, bytes_axis = axes
    for name, run in report["backends"].items():
        if "samples" not in run:
            continue
        color = COLORS.get(name, "gray")
        label = labels.get(name, name)
        samples = run["samples"]
        minutes = [s["t"] / 60 for s in samples]
        per_stream = [sum(x["kv_slots"] for x in s["streams"]) / max(1, len(s["streams"])) for s in samples]
        memory.plot(minutes, per_stream, color=color, lw=2, label=f"{label}: KV slots of a stream's memory (mean)")
        pooled = [(s["t"] / 60, s["pool"].get("kv_used", 0) + s["pool"].get("kv_evictable", 0))
                  for s in samples if s.get("pool")]
        if pooled:
            memory.plot(*zip(*pooled), color=color, lw=1, ls="--", alpha=0.8,
                        label=f"{label}: pool slots cached (all streams, incl. evictable)")
        during = [s for s in samples if s["t"] < settings["duration_s"] and not s.get("final")]
        series = ingest_fps_series(during, settings["chunk_frames"], window_s=width)
        if series:
            fps_axis.plot([p["t"] / 60 for p in series], [p["fps"] for p in series], color=color, lw=1.5, label=label)
        questions = [q for q in run["questions"] if not q.get("error")]
        _scatter_with_median(ttft_axis, [(q["t"], q["ttft_s"] * 1e3) for q in questions if q.get("ttft_s")], color,
                             f"{label} (rolling median, {width:g} s)", width)
        _scatter_with_median(ttft_axis, [(q["t"], q["server_e2e_s"] * 1e3) for q in questions
                                         if q.get("server_e2e_s") is not None], color,
                             f"{label}: server processing time (e2e_latency)", width, style=":", dots=False)
        ingests = [i for i in run["ingests"] if not i.get("error")]
        _scatter_with_median(ingest_axis, [(i["t"], i["seconds"] * 1e3) for i in ingests], color,
                             f"{label}: client latency", width)
        _scatter_with_median(ingest_axis, [(i["t"], i["server_e2e_s"] * 1e3) for i in ingests
                                           if i.get("server_e2e_s") is not None], color,
                             f"{label}: server processing time", width, style=":", dots=False)
        _scatter_with_median(bytes_axis, [(q["t"], q["request_bytes"]) for q in questions
                                          if q.get("request_bytes") is not None], color, f"{label}: per question",
                             width, dots=False)
        _scatter_with_median(bytes_axis, [(i["t"], i["request_bytes"]) for i in ingests
                                          if i.get("request_bytes") is not None], color, f"{label}: per ingest",
                             width, style="--", dots=False)
    memory.axhline(settings["max_total_tokens"], color="black", lw=0.8, ls=":", label="KV pool (both servers)")
    memory.set_ylabel("KV slots")
    memory.legend(fontsize=7, loc="upper right")
    memory.set_title("KV memory over time")
    source_fps = settings["fps"] * settings["pace"]
    fps_axis.axhline(source_fps, color="black", lw=0.8, ls=":", label=f"source: {source_fps:g} frames/s per stream")
    fps_axis.set_ylabel("frames ingested / s / stream")
    fps_axis.set_ylim(0, source_fps * 1.3)
    fps_axis.legend(fontsize=8, loc="lower left")
    fps_axis.set_title(f"Ingest rate over the last {width:g} s (frames beyond it are dropped, oldest first)")
    ttft_axis.set_ylabel("question TTFT (ms)")
    ttft_axis.set_yscale("log")
    ttft_axis.legend(fontsize=7, loc="upper left")
    ttft_axis.set_title("Questions: client time to first token (dots, rolling median) and server processing time")
    ingest_axis.set_ylabel("ingest latency (ms)")
    ingest_axis.set_yscale("log")
    ingest_axis.legend(fontsize=7, loc="upper left")
    ingest_axis.set_title("Ingest of one chunk: client latency (dots, rolling median) and server processing time")
    bytes_axis.set_ylabel("request bytes")
    bytes_axis.set_yscale("log")
    bytes_axis.set_xlabel("minutes since the streams started")
    if bytes_axis.has_data():
        bytes_axis.legend(fontsize=7, loc="upper left")
    else:
        bytes_axis.text(0.5, 0.5, "request bytes were not recorded by this (older) soak", ha="center",
                        transform=bytes_axis.transAxes)
    bytes_axis.set_title(f"Request bytes (rolling median, {width:g} s; video transport: "
                         f"{settings.get('video_transport', 'path')})")
    where = machine_label(report["machine"])
    design = ("FlashCache server-held memory vs resend baseline" if new
              else "OLD resend design: both backends resend the prompt window")
    cap = f"cap {settings['kv_cap']} slots/stream"
    fig.suptitle(f"Soak ({design})\n{settings['streams']} streams x {settings['duration_s'] / 60:g} min at "
                 f"{settings['pace']:g}x real time, {settings['model']}, pool {settings['max_total_tokens']} slots, "
                 f"{cap}, resend horizon {settings['max_prompt_chunks']} chunks\n{where}", fontsize=9)
    return save_figure(fig, path)


def machine_label(machine: dict) -> str:
    """The machine a benchmark ran on, for a figure's title."""
    return machine.get("gpu_name") or f"CPU: {machine.get('cpu_model')}, {machine.get('cores')} cores"


def save_figure(fig, path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


if __name__ == "__main__":
    import json

    for name in sys.argv[1:]:
        source = Path(name)
        print(plot_soak(json.loads(source.read_text()), source.with_suffix(".png")))
