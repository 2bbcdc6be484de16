"""The soak's picture: KV memory, ingest fps and question TTFT over time, vanilla vs FlashCache.

    python -m benchmarks.plot_soak benchmarks/results/soak_cpu.json   # writes soak_cpu.png beside it
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path
from typing import Any

from benchmarks.soak import ingest_fps_series

COLORS = {"vanilla": "#d62728", "flashcache": "#1f77b4"}
LABELS = {"vanilla": "vanilla SGLang", "flashcache": "FlashCache"}


def rolling_median(points: list[tuple[float, float]], width: float) -> list[tuple[float, float]]:
    """Median of the values in the trailing ``width`` seconds at every point."""
    out = []
    for i, (t, _) in enumerate(points):
        window = [v for u, v in points[: i + 1] if t - u <= width]
        out.append((t, statistics.median(window)))
    return out


def plot_soak(report: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = report["settings"]
    fig, axes = plt.subplots(3, 1, figsize=(10, 10.5), sharex=True)
    memory, fps_axis, ttft_axis = axes
    for name, run in report["backends"].items():
        if "samples" not in run:
            continue
        color = COLORS.get(name, "gray")
        label = LABELS.get(name, name)
        samples = run["samples"]
        minutes = [s["t"] / 60 for s in samples]
        per_stream = [sum(x["kv_slots"] for x in s["streams"]) / max(1, len(s["streams"])) for s in samples]
        memory.plot(minutes, per_stream, color=color, lw=2, label=f"{label}: KV slots a stream's memory holds")
        pooled = [(s["t"] / 60, s["pool"].get("kv_used", 0) + s["pool"].get("kv_evictable", 0))
                  for s in samples if s.get("pool")]
        if pooled:
            memory.plot(*zip(*pooled), color=color, lw=1, ls="--", alpha=0.8,
                        label=f"{label}: pool slots cached (all streams, incl. evictable)")
        # Samples of the run itself (older JSON has no "final" mark on the post-shutdown one).
        during = [s for s in samples if s["t"] < settings["duration_s"]]
        series = ingest_fps_series(during, settings["chunk_frames"], window_s=settings["window_s"])
        if series:
            fps_axis.plot([p["t"] / 60 for p in series], [p["fps"] for p in series], color=color, lw=1.5, label=label)
        answered = [(q["t"], q["ttft_s"] * 1e3) for q in run["questions"] if not q.get("error") and q.get("ttft_s")]
        if answered:
            ttft_axis.scatter([t / 60 for t, _ in answered], [v for _, v in answered], s=8, color=color, alpha=0.35)
            smooth = rolling_median(answered, settings["window_s"])
            ttft_axis.plot([t / 60 for t, _ in smooth], [v for _, v in smooth], color=color, lw=2,
                           label=f"{label} (rolling median, {settings['window_s']:g} s)")
    memory.axhline(settings["max_total_tokens"], color="black", lw=0.8, ls=":", label="KV pool (both servers)")
    memory.set_ylabel("KV slots")
    memory.legend(fontsize=7, loc="lower right", bbox_to_anchor=(1.0, 0.12))
    memory.set_title("KV memory over time")
    source_fps = settings["fps"] * settings["pace"]
    fps_axis.axhline(source_fps, color="black", lw=0.8, ls=":", label=f"source: {source_fps:g} frames/s per stream")
    fps_axis.set_ylabel("frames ingested / s / stream")
    fps_axis.set_ylim(0, source_fps * 1.3)
    fps_axis.legend(fontsize=8, loc="lower left")
    fps_axis.set_title(f"Ingest rate over the last {settings['window_s']:g} s (frames beyond it are dropped, oldest first)")
    ttft_axis.set_ylabel("question TTFT (ms)")
    ttft_axis.set_yscale("log")
    ttft_axis.set_xlabel("minutes since the streams started")
    ttft_axis.legend(fontsize=8, loc="upper left")
    ttft_axis.set_title("Question time to first token")
    machine = report["machine"]
    where = machine.get("gpu_name") or f"CPU: {machine.get('cpu_model')}, {machine.get('cores')} cores"
    fig.suptitle(f"Soak: {settings['streams']} streams x {settings['duration_s'] / 60:g} min, {settings['model']}, "
                 f"pool {settings['max_total_tokens']} slots, cap {settings['kv_cap']} visual slots/stream, "
                 f"horizon {settings['max_prompt_chunks']} chunks\n{where}", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    import json

    for name in sys.argv[1:]:
        source = Path(name)
        print(plot_soak(json.loads(source.read_text()), source.with_suffix(".png")))
