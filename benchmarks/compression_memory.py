"""Extra memory the engine's compression takes, as a share of the candidates' K/V (issue target <= 5%).

    python -m benchmarks.compression_memory --output benchmarks/results/compression_memory_cpu.json

For Qwen2.5-VL-7B's KV shapes (28 layers, 4 KV heads, head_dim 128, bf16) and N candidate
tokens, it runs what the engine runs after a prefill (CompressionController.keep_mask: scores
straight from SGLang's real MHATokenToKVPool, the policy's shared ranking, the selection kernel)
and records the peak of the bytes held by tensors it creates (a TorchDispatchMode following
every tensor storage until it is freed), against the bytes of the candidates' K and V in the pool:

- ``reference``: the path the engine runs on CPU (float32 torch, a few KV heads of one layer at
  a time), executed for real;
- ``triton``: the GPU path's allocations (its launcher's outputs and temporaries: low-pass
  coefficients, energy partials, deviations), with the two kernel launches replaced by no-ops so
  it runs on a CPU in seconds (the kernels themselves allocate no device memory).

The low-pass DCT table is cached across calls (one per span length) and reported apart.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

LAYERS, HEADS, HEAD_DIM, DTYPE = 28, 4, 128, torch.bfloat16


class PeakStorage(TorchDispatchMode):
    """Peak bytes of the storages created inside the block (freed ones subtracted)."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.outside: set[int] = set()  # storages that existed before (the pool's buffers, inputs)
        self.current = self.peak = 0

    def _free(self, key: int, size: int) -> None:
        if self.live.pop(key, None) is not None:
            self.current -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for tensor in tree_flatten((args, kwargs))[0]:
            if isinstance(tensor, torch.Tensor) and tensor.device.type != "meta":
                key = id(tensor.untyped_storage())
                if key not in self.live:
                    self.outside.add(key)  # a view of it is no new memory
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor) and tensor.device.type != "meta":
                storage = tensor.untyped_storage()
                key, size = id(storage), storage.nbytes()
                if key not in self.live and key not in self.outside and size:
                    self.live[key] = size
                    self.current += size
                    self.peak = max(self.peak, self.current)
                    weakref.finalize(storage, self._free, key, size)
        return out


def make_controller(num_tokens: int):
    from flashcache_sglang import cpu_compat

    cpu_compat.activate()
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

    from flashcache_sglang.compressor import CompressionController
    from flashcache_sglang.kernels.rotary import RotarySpec

    pool = MHATokenToKVPool(num_tokens + 8, 1, DTYPE, HEADS, HEAD_DIM, LAYERS, "cpu", False)
    generator = torch.Generator().manual_seed(0)
    slots = torch.arange(1, num_tokens + 1)
    for layer in range(LAYERS):
        pool.k_buffer[layer][slots] = torch.randn(num_tokens, HEADS, HEAD_DIM, generator=generator).to(DTYPE)
        pool.v_buffer[layer][slots] = torch.randn(num_tokens, HEADS, HEAD_DIM, generator=generator).to(DTYPE)
    spec = RotarySpec.default_rope(HEAD_DIM, 1_000_000.0, num_tokens + 8, mrope_section=[16, 24, 24])
    return CompressionController(pool, lambda s: None, rotary=lambda: spec), slots


def measure(num_tokens: int, path: str) -> dict:
    import flashcache_sglang.kernels.api as api
    from flashcache_sglang.config import FlashCacheConfig
    from flashcache_sglang.kernels.scoring import triton as scoring_triton

    controller, slots = make_controller(num_tokens)
    positions = torch.arange(num_tokens).expand(3, -1)
    config = FlashCacheConfig(retention=0.2)
    budget = round(0.2 * num_tokens)
    backend = {"reference": "reference", "triton": "triton"}[path]
    original_score = api.score_span
    originals = {}
    if path == "triton":
        class _NoLaunch:
            def __getitem__(self, grid):
                return lambda *args, **kwargs: None

        for name in ("_lowpass_coefficients_kernel", "_lowpass_residual_kernel"):
            originals[name] = getattr(scoring_triton, name)
            setattr(scoring_triton, name, _NoLaunch())
    import flashcache_sglang.compressor as compressor

    compressor.score_span = lambda *a, **k: original_score(*a, **dict(k, backend=backend))
    try:
        controller.keep_mask(slots, budget, config, positions=positions, multimodal=True)  # warm the caches
        table = scoring_triton.lowpass_table.cache_info() if hasattr(scoring_triton.lowpass_table, "cache_info") else None
        started = time.perf_counter()
        with PeakStorage() as tracker:
            controller.keep_mask(slots, budget, config, positions=positions, multimodal=True)
        seconds = time.perf_counter() - started
    finally:
        compressor.score_span = original_score
        for name, kernel in originals.items():
            setattr(scoring_triton, name, kernel)
    span_bytes = 2 * LAYERS * num_tokens * HEADS * HEAD_DIM * torch.tensor([], dtype=DTYPE).element_size()
    from flashcache_sglang.method.dct import cutoff_index

    from flashcache_sglang.method.scoring import MATMUL_MAX_TOKENS

    if path == "triton":
        table_bytes = (cutoff_index(num_tokens, 0.2) + 1) * ((num_tokens + 1) // 2) * 2
    else:  # a float32 low-pass basis up to MATMUL_MAX_TOKENS (at most 8 cached), FFT above it (no table)
        table_bytes = (cutoff_index(num_tokens, 0.2) + 1) * num_tokens * 4 if num_tokens <= MATMUL_MAX_TOKENS else 0
    return {"num_tokens": num_tokens, "path": path, "peak_extra_bytes": tracker.peak,
            "candidates_kv_bytes": span_bytes, "extra_fraction": tracker.peak / span_bytes,
            "cached_dct_table_bytes": table_bytes, "layers_per_launch": (
                api.scoring_layer_group(num_tokens, 0.2, api.check_kv_buffers(controller.key_buffers(),
                                                                              controller.value_buffers()))
                if path == "triton" else None),
            "seconds": seconds, "table_cache": str(table)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.compression_memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[2048, 4096, 8192])
    parser.add_argument("--paths", nargs="+", default=["triton", "reference"], choices=["triton", "reference"])
    parser.add_argument("--target", type=float, default=0.05)
    parser.add_argument("--output", default="benchmarks/results/compression_memory_cpu.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    import os

    # The triton path's launcher must accept CPU tensors (its kernels are replaced by no-ops).
    os.environ.setdefault("TRITON_INTERPRET", "1")
    from benchmarks.serving import machine_info

    rows = []
    for num_tokens in args.tokens:
        for path in args.paths:
            row = measure(num_tokens, path)
            row["meets_target"] = row["extra_fraction"] <= args.target
            rows.append(row)
            print(f"N={num_tokens:5d} {path:9s}: extra {row['peak_extra_bytes'] / 2**20:7.1f} MiB = "
                  f"{row['extra_fraction']:.1%} of the candidates' K/V ({row['candidates_kv_bytes'] / 2**20:.0f} MiB); "
                  f"cached DCT table {row['cached_dct_table_bytes'] / 2**20:.1f} MiB", flush=True)
    result = {"benchmark": "compression_memory", "machine": machine_info(), "target_fraction": args.target,
              "shape": {"layers": LAYERS, "kv_heads": HEADS, "head_dim": HEAD_DIM, "dtype": str(DTYPE)},
              "results": rows, "all_met": all(r["meets_target"] for r in rows)}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
