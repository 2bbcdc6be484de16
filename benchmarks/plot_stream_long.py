"""The long stream's picture: memory length, positions and logical tokens over stream time; the
footprint per minute at the end with the planted scene marked; the planted scene's tokens over
time; append latency over time.

    python -m benchmarks.plot_stream_long benchmarks/results/stream_long_60min_cpu.json
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from benchmarks.plot_soak import machine_label, rolling_median, save_figure


def plot_stream_long(report: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings, analysis, raw = report["settings"], report["analysis"], report["raw"]
    ingests = [i for i in raw.get("ingests", []) if not i.get("error")]
    fig, (lengths, bars, planted, latency) = plt.subplots(4, 1, figsize=(10, 15))
    minutes = [i["chunk_time_s"] / 60 for i in ingests]

    logical, total = [], 0
    for i in ingests:
        total += i.get("logical_tokens") or 0
        logical.append(total)
    bounded = analysis["positions_bounded"]
    probe = bounded.get("probe") or {}
    lengths.plot(minutes, logical, color="#d62728", lw=2, label="logical tokens appended (what a prompt without "
                                                                  "compression would hold)")
    if probe.get("per_chunk_positions") is not None:
        unrebased = [probe["first_chunk_positions"] + k * probe["per_chunk_positions"] for k in range(len(ingests))]
        lengths.plot(minutes, unrebased, color="#ff7f0e", lw=1.5, ls="--",
                     label="positions without re-basing (measured per chunk by a retention-1 probe)")
    lengths.plot(minutes, [i.get("memory_tokens") for i in ingests], color="#1f77b4", lw=2,
                 label="memory_tokens (KV slots the memory holds)")
    lengths.plot(minutes, [i.get("next_position") for i in ingests], color="#2ca02c", lw=1.5,
                 label="next_position (largest position + 1, re-based)")
    lengths.plot(minutes, [i.get("capped_kv_slots") for i in ingests], color="#9467bd", lw=1, ls=":",
                 label=f"capped KV slots (cap {settings['kv_cap']})")
    context = bounded["context_length"]
    lengths.axhline(context, color="black", lw=1, ls=":", label=f"server context length {context}")
    lengths.set_yscale("log")
    lengths.set_xlabel("stream time (minutes)")
    lengths.set_ylabel("tokens / positions")
    lengths.legend(fontsize=7, loc="upper left")
    factor = bounded.get("unrebased_positions_over_context")
    lengths.set_title("Memory length flat, positions bounded while the stream grows"
                      + (f" (un-rebased positions reach {factor:.1f}x the context)" if factor else ""))

    footprint = analysis["footprint"]
    per_segment = footprint["tokens_per_segment"]
    segment_min = settings["segment_s"] / 60
    planted_segment = int(settings["planted_at_s"] // settings["segment_s"])
    scene = analysis["planted_scene"]
    colors = ["#ff9896" if k == planted_segment else "#1f77b4" for k in range(len(per_segment))]
    bars.bar([k * segment_min for k in range(len(per_segment))], per_segment, width=segment_min * 0.85, align="edge",
             color=colors)
    if 0 <= planted_segment < len(per_segment):
        bars.annotate(f"segment of the planted scene: {per_segment[planted_segment]} tokens, "
                      f"{scene['kept_at_end_total']} of them from its own chunks",
                      (planted_segment * segment_min, per_segment[planted_segment]), xytext=(10, 20),
                      textcoords="offset points", fontsize=8, arrowprops={"arrowstyle": "->", "color": "#d62728"})
    bars.axvspan(settings["planted_at_s"] / 60, (settings["planted_at_s"] + settings["planted_s"]) / 60,
                 color="#d62728", alpha=0.25,
                 label=f"planted scene: {scene['kept_at_end_total']} tokens in {len(scene['chunks'])} chunks "
                       f"({scene.get('kept_per_chunk') or 0:.2f}/chunk; neighbours "
                       f"{scene.get('neighbour_kept_per_chunk') or 0:.2f}/chunk)")
    bars.set_xlabel("stream time (minutes)")
    bars.set_ylabel("kept visual tokens at the end")
    bars.legend(fontsize=8, loc="upper right")
    empty = footprint["measured"]["empty_segments"]
    bars.set_title(f"Footprint at the end: kept visual tokens per {settings['segment_s']:g} s segment "
                   f"(sink chunk not counted; empty segments: {len(empty)})")

    history = [(i["chunk_time_s"] / 60, i["planted_kept"], i.get("neighbour_kept")) for i in ingests
               if "planted_kept" in i and i["chunk_time_s"] >= settings["planted_at_s"]]
    if history:
        planted.plot([h[0] for h in history], [h[1] for h in history], color="#d62728", lw=2,
                     label=f"planted scene ({len(scene['chunks'])} chunks): tokens kept")
        planted.plot([h[0] for h in history], [(h[2] or 0) * len(scene["chunks"]) for h in history], color="#1f77b4",
                     lw=1.5, label=f"neighbour chunks (+-{settings['segment_s']:g} s): mean per chunk x "
                                   f"{len(scene['chunks'])}")
    planted.set_xlabel("stream time (minutes)")
    planted.set_ylabel("kept visual tokens")
    planted.legend(fontsize=8, loc="upper right")
    planted.set_title("The planted scene in the memory over time (the whole memory is re-ranked at every append)")

    points = [(i["chunk_time_s"], i["seconds"] * 1e3) for i in ingests]
    latency.scatter([t / 60 for t, _ in points], [v for _, v in points], s=3, color="#1f77b4", alpha=0.25)
    smooth = rolling_median(points, 120.0)
    latency.plot([t / 60 for t, _ in smooth], [v for _, v in smooth], color="#1f77b4", lw=2,
                 label="append latency, client (rolling median over 2 stream minutes)")
    server = [(i["chunk_time_s"], i["append_ms"]) for i in ingests if i.get("append_ms") is not None]
    if server:
        smooth = rolling_median(server, 120.0)
        latency.plot([t / 60 for t, _ in smooth], [v for _, v in smooth], color="#2ca02c", lw=1.5,
                     label="server append_ms (rank, keep, re-base, install)")
    latency.set_yscale("log")
    latency.set_xlabel("stream time (minutes)")
    latency.set_ylabel("ms")
    latency.legend(fontsize=8, loc="upper left")
    speed = analysis.get("speed_vs_real_time")
    latency.set_title("Append cost over the stream" + (f" (ingest ran at {speed:.1f}x real time)" if speed else ""))

    where = machine_label(report["machine"])
    fig.suptitle(f"Long stream: {settings['stream_minutes']:g} min of video, one stream, {settings['model']}, cap "
                 f"{settings['kv_cap']}, footprint {settings['footprint_s']:g} s, context {context}\n{where}", fontsize=9)
    return save_figure(fig, path)


if __name__ == "__main__":
    import json

    for name in sys.argv[1:]:
        source = Path(name)
        print(plot_stream_long(json.loads(source.read_text()), source.with_suffix(".png")))
