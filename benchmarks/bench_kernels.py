"""Whole-model FlashCache compression time for one sequence: our kernels vs torch vs the floor.

Through the project's public kernels API (flashcache_sglang.kernels), for every N:
  engine   what the SGLang integration runs after a request's prefill: score pre-RoPE keys
           (all layers, straight from the pool's buffers, the model's M-RoPE undone in the
           kernel's loads) -> the policy's one shared ranking (FlashCachePolicy.shared_scores)
           -> the selection kernel (the dropped slots then go back to the allocator)
  stream   engine + what a stream append adds: the kept tokens copied to fresh slots and their
           keys re-rotated to contiguous positions (copy_slots + rerotate_slots)

Variants timed in the same run:
  triton          flashcache_sglang.kernels (folded low-pass matmul scoring with fused inverse
                  RoPE, Triton selection, slot copy and re-rotation)
  torch_reference the float32 references (gather, FFT-based DCT, stable sorts, index copies)
  torch_matmul    scoring only: gather + cuBLAS low-pass projection (transform-choice evidence)
  floor           bytes that must move / measured device copy bandwidth

Usage:
  python benchmarks/bench_kernels.py --dry-run                          # CPU, tiny, interpreted
  python benchmarks/bench_kernels.py --device cuda --sizes paper        # 2K, 4K, 8K
  python benchmarks/bench_kernels.py --device cuda --sizes 32k
  add --sweep-configs to time a few scoring tile configurations as well, --time-budget S to stop
  adding sizes once S seconds have passed (the JSON is rewritten after every size).
Writes JSON (machine, versions, median and spread of every timing) to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import torch

if __package__ in (None, ""):  # run as a script: the repository root is the package root
    sys.path.append(str(Path(__file__).resolve().parents[1]))

RESULTS = Path(__file__).resolve().parent / "results"
PAPER_MS = {2048: 1.66, 4096: 3.86, 8192: 6.77}  # FlashCache paper, whole model, one sequence
TARGET_MS = {8192: 0.7}  # issue 4: H100


@dataclass(frozen=True)
class ModelShape:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype


SIZES = {
    # Qwen2.5-VL-7B's KV cache.
    "paper": (ModelShape(28, 4, 128, torch.bfloat16), [2048, 4096, 8192]),
    "32k": (ModelShape(28, 4, 128, torch.bfloat16), [32768]),
    # Keeps the script working on a CPU in seconds.
    "tiny": (ModelShape(2, 2, 64, torch.float32), [63, 200]),
}
GAMMA, RETENTION = 0.2, 0.2
ROPE_THETA, MROPE_SECTION = 1_000_000.0, (16, 24, 24)  # Qwen2.5-VL (tiny sizes scale the sections)


def timings_ms(fn: Callable[[], object], device: torch.device, repeats: int) -> list[float]:
    """Per-call times in ms; on CUDA triton.testing.do_bench (flushes L2 between calls).

    ``repeats`` 0 (a dry run): one call, no warm-up: it proves the code runs, nothing more.
    """
    if repeats == 0:
        start = time.perf_counter()
        fn()
        return [(time.perf_counter() - start) * 1e3]
    fn()  # compile / warm caches outside the measurement
    if device.type == "cuda":
        import triton.testing

        return list(triton.testing.do_bench(fn, warmup=25, rep=max(100, repeats), return_mode="all"))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def summary(times: list[float]) -> dict:
    ordered = sorted(times)
    quantile = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {
        "median_ms": statistics.median(ordered),
        "p10_ms": quantile(0.1),
        "p90_ms": quantile(0.9),
        "min_ms": ordered[0],
        "count": len(ordered),
    }


def copy_bandwidth_gbps(device: torch.device) -> float:
    """Device-to-device copy bandwidth (read + write bytes per second) on a large buffer."""
    num_bytes = (1 << 30) if device.type == "cuda" else (64 << 20)
    source = torch.empty(num_bytes, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    times = timings_ms(lambda: target.copy_(source), device, repeats=20)
    return 2 * num_bytes / (statistics.median(times) * 1e-3) / 1e9


def make_problem(shape: ModelShape, num_tokens: int, device: torch.device, seed: int = 0):
    """A pool with a video span on scattered slots (M-RoPE positions of 16x16-token frames),
    a protected tail, fresh slots for a stream append's copy, and the model's rotary table."""
    from flashcache_sglang.kernels.rotary import RotarySpec

    generator = torch.Generator().manual_seed(seed)
    budget = max(1, int(RETENTION * num_tokens))
    num_slots = num_tokens + budget + 2

    def buffer() -> torch.Tensor:
        x = torch.randn(num_slots, shape.num_kv_heads, shape.head_dim, generator=generator)
        return x.to(shape.dtype).to(device)

    k_buffers = [buffer() for _ in range(shape.num_layers)]
    v_buffers = [buffer() for _ in range(shape.num_layers)]
    order = torch.randperm(num_slots - 1, generator=generator) + 1
    slots, fresh = order[:num_tokens].to(device), order[num_tokens:num_tokens + budget].to(device)
    side = 16
    index = torch.arange(num_tokens)
    frame, cell = index // (side * side), index % (side * side)
    positions = torch.stack([frame, cell // side, cell % side]) + 1  # after a text token
    half = shape.head_dim // 2
    section = [half * s // sum(MROPE_SECTION) for s in MROPE_SECTION]
    section[-1] = half - sum(section[:-1])
    rotary = RotarySpec.default_rope(shape.head_dim, ROPE_THETA, int(positions.max()) + 2,
                                     mrope_section=section).to(device)
    protected = torch.zeros(num_tokens, dtype=torch.bool, device=device)
    protected[-max(1, num_tokens // 64) :] = True  # e.g. the text after the video
    return dict(k_buffers=k_buffers, v_buffers=v_buffers, slots=slots, budget=budget, protected=protected,
                positions=positions.to(device), rotary=rotary, fresh=fresh)


def _policy():
    from flashcache_sglang.policies import make_policy

    # What the engine ranks visual candidates with (CompressionController.policy, multimodal).
    return make_policy("flashcache", retention=RETENTION, gamma=GAMMA, recency=False)


def engine_pipeline(problem, backend: str):
    """What the integration runs after a prefill: score, the shared ranking, select."""
    from flashcache_sglang.kernels import score_span, select_kept

    p, policy = problem, _policy()

    def run():
        scores = score_span(p["k_buffers"], p["v_buffers"], p["slots"], GAMMA, positions=p["positions"],
                            rotary=p["rotary"], backend=backend)
        return select_kept(policy.shared_scores(scores), p["budget"], p["protected"], backend=backend)

    return run


def stream_pipeline(problem, backend: str):
    """engine_pipeline + a stream append's move: kept tokens to fresh slots, keys re-rotated
    to contiguous positions."""
    from flashcache_sglang.kernels import copy_slots
    from flashcache_sglang.kernels.rotary import rerotate_slots

    p, engine = problem, engine_pipeline(problem, backend)

    def run():
        kept = engine()
        old = p["positions"][:, kept]
        new = torch.arange(kept.numel(), device=kept.device).expand(3, -1)
        copy_slots(p["k_buffers"], p["v_buffers"], p["slots"][kept], p["fresh"][: kept.numel()], backend=backend)
        rerotate_slots(p["k_buffers"], p["fresh"][: kept.numel()], old, new, p["rotary"], backend=backend)
        return kept

    return run


def stage_functions(problem, backend: str) -> dict[str, Callable[[], object]]:
    from flashcache_sglang.kernels import copy_slots, score_span, select_kept
    from flashcache_sglang.kernels.rotary import rerotate_slots

    p, policy = problem, _policy()
    scores = score_span(p["k_buffers"], p["v_buffers"], p["slots"], GAMMA, positions=p["positions"],
                        rotary=p["rotary"], backend=backend)
    combined = policy.shared_scores(scores)
    kept = select_kept(combined, p["budget"], p["protected"], backend=backend)
    fresh = p["fresh"][: kept.numel()]
    new = torch.arange(kept.numel(), device=kept.device).expand(3, -1)
    return {
        "score": lambda: score_span(p["k_buffers"], p["v_buffers"], p["slots"], GAMMA, positions=p["positions"],
                                    rotary=p["rotary"], backend=backend),
        "shared_ranking": lambda: policy.shared_scores(scores),
        "select_shared": lambda: select_kept(combined, p["budget"], p["protected"], backend=backend),
        "copy_kept": lambda: copy_slots(p["k_buffers"], p["v_buffers"], p["slots"][kept], fresh, backend=backend),
        "rerotate_kept": lambda: rerotate_slots(p["k_buffers"], fresh, p["positions"][:, kept], new, p["rotary"],
                                                backend=backend),
    }


def torch_matmul_scoring(problem):
    """Scoring by gather + two cuBLAS matmuls with the dense low-pass DCT rows (unfolded)."""
    from flashcache_sglang.kernels.scoring.reference import gather_span
    from flashcache_sglang.method.dct import cutoff_index

    k_buffers, v_buffers, slots = problem["k_buffers"], problem["v_buffers"], problem["slots"]
    num_tokens = slots.numel()
    cutoff = cutoff_index(num_tokens, GAMMA)
    n = torch.arange(num_tokens, device=slots.device, dtype=torch.float64)
    m = torch.arange(cutoff + 1, device=slots.device, dtype=torch.float64)
    table = torch.cos(math.pi * (2 * n[None, :] + 1) * m[:, None] / (2 * num_tokens))
    table = table * torch.where(m == 0, math.sqrt(1 / num_tokens), math.sqrt(2 / num_tokens))[:, None]
    table = table.to(k_buffers[0].dtype)

    def run():
        keys, values = gather_span(k_buffers, slots), gather_span(v_buffers, slots)
        x = torch.cat([keys, values]).transpose(0, 1).reshape(num_tokens, -1)  # [N, 2L*H*D]
        base = table.t() @ (table @ x)
        residual = (x.float() - base.float()).square()
        return residual.view(num_tokens, 2, len(k_buffers), keys.shape[2], -1).mean(-1).sum(1)

    return run


def floor_bytes(shape: ModelShape, num_tokens: int) -> int:
    """Read the span's K/V of every layer once, then read + write the kept share (a stream
    append's copy to fresh slots)."""
    element = torch.tensor([], dtype=shape.dtype).element_size()
    span = 2 * shape.num_layers * num_tokens * shape.num_kv_heads * shape.head_dim * element
    return span + 2 * int(span * RETENTION)


def sweep_configs(problem, device: torch.device, repeats: int) -> list[dict]:
    """Scoring time for tile variants: each kernel's tiles varied with the other's at default."""
    from flashcache_sglang.kernels.scoring.triton import GPU_CONFIG, KernelTiles, score_span_triton

    k_buffers, v_buffers, slots = problem["k_buffers"], problem["v_buffers"], problem["slots"]
    coefficient_tiles = [(64, 64, 0, 8), (128, 64, 0, 8), (64, 32, 0, 4), (128, 32, 0, 8), (64, 64, 0, 4)]
    residual_tiles = [(64, 64, 64, 8), (64, 64, 32, 8), (128, 64, 32, 8), (64, 32, 64, 4), (64, 64, 128, 8)]
    configs = [
        replace(GPU_CONFIG, coefficients=KernelTiles(*tiles, num_stages=3)) for tiles in coefficient_tiles
    ] + [replace(GPU_CONFIG, residual=KernelTiles(*tiles, num_stages=3)) for tiles in residual_tiles]
    results = []
    for config in configs:
        try:
            times = timings_ms(
                lambda: score_span_triton(k_buffers, v_buffers, slots, GAMMA, config), device, repeats
            )
        except Exception as error:  # e.g. a tile too large for shared memory
            results.append({"config": asdict(config), "error": repr(error)[:300]})
            continue
        results.append({"config": asdict(config), **summary(times)})
        print(f"  {config}: {results[-1]['median_ms']:.3f} ms")
    return results


def versions(device: torch.device) -> dict:
    import triton

    info = {
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "cuda": torch.version.cuda,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
    }
    return info


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--tokens", type=int, nargs="*", help="override the N list of --sizes")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls (CPU) / min rep ms (CUDA)")
    parser.add_argument("--skip-reference", action="store_true", help="skip the torch reference pipeline")
    parser.add_argument("--sweep-configs", action="store_true", help="also time scoring tile configs")
    parser.add_argument("--time-budget", type=float, default=None,
                        help="seconds: sizes not started by then are skipped (recorded as such)")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, interpreted Triton (no timing value)")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    started = time.monotonic()
    if args.dry_run:
        args.device, args.sizes = "cpu", "tiny"
        args.tokens = args.tokens or [63]
    device = torch.device(args.device)
    if device.type == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are imported
    from benchmarks.serving import machine_info

    shape, token_counts = SIZES[args.sizes]
    token_counts = args.tokens or token_counts
    repeats = 0 if args.dry_run else args.repeats or (100 if device.type == "cuda" else 1)
    bandwidth = copy_bandwidth_gbps(device)
    info = versions(device)
    print(f"device: {info['device_name']}  copy bandwidth {bandwidth:.0f} GB/s  shape {shape}", flush=True)
    slug = re.sub(r"[^a-z0-9]+", "-", info["device_name"].lower()).strip("-") or "cpu"
    output = args.output or RESULTS / f"kernels_{slug}_{args.sizes}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "benchmark": "flashcache whole-model compression, one sequence",
        "device": info,
        "machine": machine_info(),
        "dry_run": args.dry_run,
        "copy_bandwidth_gbps": bandwidth,
        "shape": {**asdict(shape), "dtype": str(shape.dtype)},
        "gamma": GAMMA,
        "retention": RETENTION,
        "timing": "triton.testing.do_bench, L2 flushed" if device.type == "cuda" else "perf_counter, interpreter",
        "target_ms": TARGET_MS,
        "results": [],
        "skipped_sizes": [],
    }

    # On CPU the Triton path runs interpreted: it proves the script works, not speed.
    triton_backend = "triton"
    for num_tokens in token_counts:
        if args.time_budget is not None and time.monotonic() - started > args.time_budget:
            report["skipped_sizes"].append(num_tokens)
            print(f"N={num_tokens}: skipped, the {args.time_budget:.0f} s budget is spent", flush=True)
            continue
        problem = make_problem(shape, num_tokens, device)
        row = {"num_tokens": num_tokens}
        row["floor"] = {
            "bytes": floor_bytes(shape, num_tokens),
            "median_ms": floor_bytes(shape, num_tokens) / (bandwidth * 1e9) * 1e3,
        }
        row["engine"] = summary(timings_ms(engine_pipeline(problem, triton_backend), device, repeats))
        row["stream"] = summary(timings_ms(stream_pipeline(problem, triton_backend), device, repeats))
        row["triton_stages"] = {
            name: summary(timings_ms(fn, device, repeats))
            for name, fn in stage_functions(problem, triton_backend).items()
        }
        if not args.skip_reference:
            row["torch_reference"] = summary(timings_ms(stream_pipeline(problem, "reference"), device, repeats))
            row["torch_reference_stages"] = {
                name: summary(timings_ms(fn, device, repeats))
                for name, fn in stage_functions(problem, "reference").items()
            }
        row["torch_matmul_score"] = summary(timings_ms(torch_matmul_scoring(problem), device, repeats))
        from flashcache_sglang.method.budget import allocate_budgets

        ratios = torch.rand(shape.num_layers, device=device)
        budget = problem["budget"]
        row["allocate_budgets_host"] = summary(
            timings_ms(
                lambda: allocate_budgets(ratios, budget * shape.num_layers, 0, num_tokens),
                device, min(repeats, 20) if repeats else 0,
            )
        )
        if args.sweep_configs:
            row["scoring_config_sweep"] = sweep_configs(problem, device, repeats)
        if num_tokens in PAPER_MS:
            row["paper_ms"] = PAPER_MS[num_tokens]
        if num_tokens in TARGET_MS and not args.dry_run:
            row["meets_target"] = row["engine"]["median_ms"] <= TARGET_MS[num_tokens]
        report["results"].append(row)
        output.write_text(json.dumps(report, indent=2))  # partial results survive a time-out
        reference = row.get("torch_reference", {}).get("median_ms", float("nan"))
        print(
            f"N={num_tokens:6d}  engine {row['engine']['median_ms']:.3f} ms  stream {row['stream']['median_ms']:.3f} ms  "
            f"torch {reference:.3f} ms  floor {row['floor']['median_ms']:.3f} ms  "
            f"score {row['triton_stages']['score']['median_ms']:.3f}  "
            f"torch_matmul_score {row['torch_matmul_score']['median_ms']:.3f}", flush=True
        )
        del problem
        if device.type == "cuda":
            torch.cuda.empty_cache()
    output.write_text(json.dumps(report, indent=2))
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
