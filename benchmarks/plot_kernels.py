"""Plot benchmarks/results/kernels_*.json: whole-model compression time vs N, floor drawn.

Usage: python benchmarks/plot_kernels.py RESULT.json [MORE.json ...] [--output FIG.png]
Several files (e.g. the paper sizes and the 32K run of one device) merge into one figure.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

SERIES = [
    ("engine", "our kernels: score (pre-RoPE) + rank + select", "o-"),
    ("stream", "+ a stream append's copy and re-rotation", "s-"),
    ("torch_reference", "torch reference (FFT DCT, sorts, index copies)", "s-"),
    ("floor", "bandwidth floor (bytes / measured copy bandwidth)", "k--"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("results", type=Path, nargs="+")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()

    reports = [json.loads(path.read_text()) for path in args.results]
    rows = sorted((row for report in reports for row in report["results"]), key=lambda r: r["num_tokens"])
    device = reports[0]["device"]["device_name"]
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for key, label, style in SERIES:
        points = [(row["num_tokens"], row[key]["median_ms"]) for row in rows if key in row]
        if not points:
            continue
        tokens, medians = zip(*points)
        axes.plot(tokens, medians, style, label=label)
        spread = [(row[key].get("p10_ms"), row[key].get("p90_ms")) for row in rows if key in row]
        if all(low is not None for low, _ in spread):
            axes.fill_between(tokens, [s[0] for s in spread], [s[1] for s in spread], alpha=0.2)
    paper = [(row["num_tokens"], row["paper_ms"]) for row in rows if "paper_ms" in row]
    if paper:
        axes.plot(*zip(*paper), "x:", color="gray", label="FlashCache paper (CuPy)")
    for tokens, target in reports[0].get("target_ms", {}).items():
        axes.axhline(target, color="red", linewidth=0.8, linestyle=":")
        axes.annotate(f"target {target} ms @ {tokens}", (rows[0]["num_tokens"], target), color="red", fontsize=8)
    axes.set_xscale("log", base=2)
    axes.set_yscale("log")
    axes.set_xlabel("candidate tokens N")
    axes.set_ylabel("ms, whole model, one sequence")
    shape = reports[0]["shape"]
    axes.set_title(
        f"{device}: {shape['num_layers']} layers x {shape['num_kv_heads']} KV heads x "
        f"{shape['head_dim']}, {shape['dtype'].replace('torch.', '')}",
        fontsize=9,
    )
    axes.legend(fontsize=8)
    axes.grid(True, which="both", alpha=0.3)
    output = args.output or args.results[0].with_suffix(".png")
    figure.tight_layout()
    figure.savefig(output, dpi=150)
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
