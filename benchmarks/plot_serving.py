"""Plot a benchmarks/results/serving_*.json: vanilla SGLang vs FlashCache, one panel per workload.

Usage: python benchmarks/plot_serving.py RESULT.json [--output FIG.png]
(``python -m benchmarks.serving`` and ``benchmarks/make_report.py`` call :func:`plot_serving`.)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLORS = {"vanilla": "#8c8c8c", "flashcache": "#1f77b4"}
LABELS = {"vanilla": "vanilla SGLang", "flashcache": "FlashCache"}


def _number(value) -> float:
    return float(value) if isinstance(value, (int, float)) else float("nan")


def _bars(axes, groups: list[str], values: dict[str, list[float]], ylabel: str, title: str, fmt: str = "{:.3g}"):
    width = 0.38
    for shift, backend in ((-width / 2, "vanilla"), (width / 2, "flashcache")):
        positions = [i + shift for i in range(len(groups))]
        bars = axes.bar(positions, values[backend], width, color=COLORS[backend], label=LABELS[backend])
        for bar, value in zip(bars, values[backend]):
            if value == value:  # not NaN
                axes.annotate(fmt.format(value), (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                              ha="center", va="bottom", fontsize=8)
    axes.set_xticks(range(len(groups)), groups, fontsize=8)
    axes.set(ylabel=ylabel, title=title)
    axes.legend(fontsize=8)


def _sessions_held(axes, workload: dict) -> None:
    keys = ["sessions_held", "sessions_cached_after_fill"]
    values = {b: [_number(workload[b].get(k)) for k in keys] for b in ("vanilla", "flashcache")}
    ratio = workload["ratios"].get("sessions_held")
    sizes = workload["sizes"]
    _bars(axes, ["before first eviction", "cached after fill (probed)"], values, "sessions",
          f"sessions-held: {sizes['session_tokens']}-token contexts"
          + (f"  (x{ratio:.2f})" if isinstance(ratio, (int, float)) else ""), fmt="{:.0f}")
    bounds = [LABELS[b] for b in ("vanilla", "flashcache") if workload[b].get("reached_eviction") is False]
    if bounds:  # stopped by max_sessions or the time limit before any eviction
        axes.set_xlabel("lower bound (no eviction reached): " + ", ".join(bounds), fontsize=8, color="red")


def _latency(axes, name: str, workload: dict, extra: str = "") -> None:
    keys = ["median_ttft_ms", "p99_ttft_ms", "median_tpot_ms", "p99_tpot_ms"]
    values = {b: [_number(workload[b].get(k)) for k in keys] for b in ("vanilla", "flashcache")}
    _bars(axes, ["TTFT p50", "TTFT p99", "TPOT p50", "TPOT p99"], values, "ms", f"{name}{extra}", fmt="{:.0f}")
    axes.set_yscale("log")


def _multi_turn(axes, workload: dict, name: str = "multi-turn") -> None:
    for backend in ("vanilla", "flashcache"):
        turns = workload[backend].get("per_turn") or []
        if not turns:
            continue
        axes.plot([t["turn"] for t in turns], [_number(t.get("median_ttft_ms")) for t in turns], "o-",
                  color=COLORS[backend], label=f"{LABELS[backend]} TTFT")
        for t in turns:
            axes.annotate(f"{100 * _number(t.get('cached_token_share')):.0f}% cached",
                          (t["turn"], _number(t.get("median_ttft_ms"))), fontsize=7, textcoords="offset points",
                          xytext=(4, 4 if backend == "flashcache" else -10), color=COLORS[backend])
    axes.set(xlabel="turn", ylabel="median TTFT (ms)", title=f"{name}: TTFT per turn (cached-token share)")
    axes.xaxis.get_major_locator().set_params(integer=True)
    axes.legend(fontsize=8)


def plot_serving(report: dict, path: str | Path) -> Path:
    """Write the comparison figure for one serving report; returns the path."""
    workloads = report["workloads"]
    panels = []
    if "sessions-held" in workloads:
        panels.append(lambda ax: _sessions_held(ax, workloads["sessions-held"]))
    if "long-prompt" in workloads:
        w = workloads["long-prompt"]
        running = "/".join(str(w[b].get("max_running_requests")) for b in ("vanilla", "flashcache"))
        panels.append(lambda ax: _latency(ax, "long-prompt", w, f" (max #running-req {running})"))
    if "multi-turn" in workloads:
        panels.append(lambda ax: _multi_turn(ax, workloads["multi-turn"]))
    for name in ("shared-prefix", "video-shared-prefix"):
        if name in workloads:
            shared = workloads[name]
            slots = "/".join(str(shared[b].get("prefix_kv_slots")) for b in ("vanilla", "flashcache"))
            panels.append(lambda ax, n=name, w=shared, s=slots: _latency(ax, n, w, f" (prefix KV slots {s})"))
    if "video-multi-turn" in workloads:
        panels.append(lambda ax: _multi_turn(ax, workloads["video-multi-turn"], "video-multi-turn"))
    count = max(1, len(panels))
    figure, axes = plt.subplots(1, count, figsize=(max(7.5, 5.2 * count), 4.8), squeeze=False)
    for panel, ax in zip(panels, axes[0]):
        panel(ax)
    machine, settings = report["machine"], report["settings"]
    figure.suptitle(
        f"{settings['model']} {settings['dtype']}, KV pool {settings['max_total_tokens']} tokens, retention "
        f"{settings['flashcache']['retention']}\n{machine.get('cpu_model')} x{machine.get('cores')} | "
        f"load {machine.get('load_average_start', ['?'])[0]} -> {machine.get('load_average_end', ['?'])[0]}"
        + (" | QUICK" if report.get("quick") else ""), fontsize=9)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("result", type=Path)
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    report = json.loads(args.result.read_text())
    print(f"wrote {plot_serving(report, args.output or args.result.with_suffix('.png'))}")


if __name__ == "__main__":
    main()
