"""What a request costs per video in its prompt when every video is already cached.

    python -m benchmarks.video_overhead                    # tiny Qwen2.5-VL on CPU
    python -m benchmarks.video_overhead --counts 2 8 32 64 --repeats 5 --output benchmarks/results/video_overhead_cpu.json

A stream's memory is a prompt prefix holding every chunk's videos, and each request (ingest or
question) sends that whole prompt again: the radix cache then skips the prefill of the cached
prefix, but SGLang 0.5.23 still opens, decodes, resizes and processes every video of the
request before the prefix match (its preprocessing cache covers images only). This tool
measures that cost on a vanilla server: for each count N it sends a prompt of N 2-frame videos
once (prefill), then ``--repeats`` more times fully cached, and records the client latency
(``max_new_tokens=1``) and SGLang's own per-stage timings of the processor (its debug log
lines ``[QwenVLProcessor Perf]``: load, preprocess, process, get_rope_index). The slope in
ms per video is what every request of a stream pays per video of its horizon, FlashCache or
not; it is why question TTFT tracks the prompt horizon rather than the KV memory.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional, Sequence

import requests

from benchmarks.serving import load_average, machine_info
from benchmarks.soak import TINY_MAX_PIXELS, generate_video

RESULTS_DIR = Path(__file__).resolve().parent / "results"
PERF_LINE = re.compile(r"\[QwenVLProcessor Perf\].*?load_time: ([0-9.]+) ms, preprocess_time: ([0-9.]+) ms, "
                       r"process_time: ([0-9.]+) ms, get_rope_index_time: ([0-9.]+) ms, total_time: ([0-9.]+) ms")
STAGES = ("load_ms", "preprocess_ms", "process_ms", "rope_ms", "processor_total_ms")


def parse_perf_lines(text: str) -> list[dict[str, float]]:
    """SGLang's per-request processor timings from its debug log."""
    return [dict(zip(STAGES, map(float, match.groups()))) for match in PERF_LINE.finditer(text)]


def slope(xs: Sequence[float], ys: Sequence[float]) -> Optional[float]:
    """Least-squares slope of ys over xs (None with fewer than two distinct xs)."""
    if len(set(xs)) < 2:
        return None
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sum((x - mean_x) ** 2 for x in xs)


def make_videos(folder: Path, count: int, fps: float, max_pixels: int) -> list[str]:
    from flashcache_sglang.streaming.sglang_backend import encode_mp4
    from flashcache_sglang.streaming.sources import DecordFileSource, SamplingSettings

    source = generate_video(folder / "source.mp4", count * 2 / fps + 2, fps)
    frames = list(DecordFileSource(str(source), SamplingSettings(fps=fps, max_pixels=max_pixels)).frames())
    paths = []
    for index in range(count):
        path = folder / f"video_{index:04d}.mp4"
        path.write_bytes(encode_mp4(frames[2 * index: 2 * index + 2], fps))
        paths.append(str(path))
    return paths


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.video_overhead", description=__doc__.split("\n\n")[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[2, 8, 16, 32, 64])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--fps", type=float, default=2.0)
    parser.add_argument("--max-pixels", type=int, default=TINY_MAX_PIXELS)
    parser.add_argument("--model-path", help="a Qwen2.5-VL model (default: the tiny random-weight one)")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "video_overhead_cpu.json")
    args = parser.parse_args(argv)
    bad = [n for n in args.counts if n < 1]
    if bad or args.repeats < 1:
        parser.error(f"--counts {bad} and --repeats {args.repeats} must be >= 1")

    from flashcache_sglang.streaming.sglang_backend import PromptTemplate
    from flashcache_sglang.testing.models import tiny_qwen2_5_vl_dir
    from flashcache_sglang.testing.server import SGLangServer

    model = args.model_path or str(tiny_qwen2_5_vl_dir())
    workdir = Path(tempfile.mkdtemp(prefix="flashcache-video-overhead-"))
    paths = make_videos(workdir, max(args.counts), args.fps, args.max_pixels)
    mm = {"video": {"fps": args.fps, "min_pixels": 28 * 28 * 4, "max_pixels": args.max_pixels}}
    server = SGLangServer(model, extra_args=["--log-level", "debug", "--enable-multimodal",
                                             "--mm-process-config", json.dumps(mm)],
                          max_total_tokens=16384, log_dir=workdir, startup_timeout=600)
    template = PromptTemplate()
    rows = []
    load_start = load_average()
    server.start()
    try:
        for count in sorted(set(args.counts)):
            body = {"text": template.header.format(system=template.system) + template.video * count,
                    "video_data": paths[:count],
                    "sampling_params": {"max_new_tokens": 1, "temperature": 0.0}}
            first = requests.post(f"{server.url}/generate", json=body, timeout=600).json()["meta_info"]
            offset = server.log_path.stat().st_size
            latencies, cached = [], []
            for _ in range(args.repeats):
                started = time.perf_counter()
                meta = requests.post(f"{server.url}/generate", json=body, timeout=600).json()["meta_info"]
                latencies.append((time.perf_counter() - started) * 1e3)
                cached.append(meta["cached_tokens"] / max(1, meta["prompt_tokens"]))
            time.sleep(0.5)  # let the log catch up
            with open(server.log_path, "rb") as log:
                log.seek(offset)
                stages = parse_perf_lines(log.read().decode(errors="replace"))
            row: dict[str, Any] = {"videos": count, "prompt_tokens": first["prompt_tokens"],
                                   "median_latency_ms": statistics.median(latencies), "latencies_ms": latencies,
                                   "min_cached_share": min(cached), "processor_lines": len(stages)}
            for stage in STAGES:
                row[f"median_{stage}"] = statistics.median(s[stage] for s in stages) if stages else None
            rows.append(row)
            print(f"[video_overhead] {count:4d} videos ({first['prompt_tokens']} tokens): "
                  f"{row['median_latency_ms']:.0f} ms a fully cached request, processor "
                  f"{row['median_processor_total_ms']} ms", file=sys.stderr, flush=True)
    finally:
        server.stop()
    xs = [row["videos"] for row in rows]
    report = {
        "benchmark": "video_overhead",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m benchmarks.video_overhead " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": {**machine_info(), "load_average_start": load_start, "load_average_end": load_average()},
        "settings": {"model": Path(model).name, "fps": args.fps, "max_pixels": args.max_pixels,
                     "frames_per_video": 2, "repeats": args.repeats, "server": "vanilla sglang.launch_server"},
        "rows": rows,
        "ms_per_video": slope(xs, [row["median_latency_ms"] for row in rows]),
        "processor_ms_per_video": (slope(xs, [row["median_processor_total_ms"] for row in rows])
                                   if all(row["median_processor_total_ms"] is not None for row in rows) else None),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=1))
    print(f"[video_overhead] {report['ms_per_video']:.2f} ms per cached video in a request "
          f"(processor: {report['processor_ms_per_video']}); wrote {args.output}", file=sys.stderr)
    return 0 if all(row["min_cached_share"] > 0.9 for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
