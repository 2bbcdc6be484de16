"""Compile every kernel for a CUDA architecture without a GPU, and report registers and spills.

The CPU interpreter checks the math but not the compiled path (pointer casts, tensor-core
dots, register pressure). Triton can compile ahead of time to a cubin with its bundled ptxas,
no device needed; this catches compile errors in CI and shows register spills of the tiles.

    python -m flashcache_sglang.kernels.compile_check [--arch 90] [--dtypes bf16 fp32 fp8e4nv]

Must run without TRITON_INTERPRET (the kernels must be JIT functions, not interpreted ones).
Exits 1 if any kernel fails to compile.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from .compaction import triton as compaction
from .rotary import triton as rotary
from .scoring import triton as scoring
from .selection import triton as selection

HEAD_DIM = 128  # Qwen2.5-VL-7B
# Largest shared memory one block may use (opt-in), by compute capability: a kernel that
# compiles but needs more fails at launch ("out of resources"), so it fails here.
MAX_SHARED_BYTES = {80: 166912, 86: 101376, 89: 101376, 90: 232448}


# Pool dtypes of the scoring kernels: 16/32-bit pools multiply in their own dtype, FP8 pools
# (SGLang's --kv-cache-dtype fp8_e4m3 / fp8_e5m2) dequantise on load and multiply in bf16.
POOL_DTYPES = {"bf16": ("bf16", tl.bfloat16), "fp16": ("fp16", tl.float16), "fp32": ("fp32", tl.float32),
               "fp8e4nv": ("bf16", tl.bfloat16), "fp8e5": ("bf16", tl.bfloat16)}
# (label, ROTARY, MROPE, IS_NEOX, ROTARY_DIM, HAS_SCALE): post-RoPE, pre-RoPE (Llama),
# pre-RoPE M-RoPE (Qwen2.5-VL), FP8 with scales.
SCORING_VARIANTS = {
    "post-rope": (False, False, True, 2, False),
    "pre-rope": (True, False, True, HEAD_DIM, False),
    "pre-rope mrope": (True, True, True, HEAD_DIM, False),
    "pre-rope fp8-scaled": (True, False, True, HEAD_DIM, True),
}


def _scoring_kernels(dtype_name: str):
    compute_name, dtype = POOL_DTYPES[dtype_name]
    pool = f"*{dtype_name}"
    fp8 = dtype_name.startswith("fp8")
    for variant, (rotary, mrope, neox, rotary_dim, has_scale) in SCORING_VARIANTS.items():
        if fp8 != has_scale:
            continue  # FP8 pools are compiled with their scales, the others without
        shared = dict(pool_ptrs="*u64", pool_ref=pool, slot_ptr="*i64", table_ptr=f"*{compute_name}",
                      coefficient_ptr=f"*{compute_name}")
        extra = dict(scale_ptr="*fp32", positions_ptr="*i64", cos_sin_ptr="*fp32", axis_ptr="*i32")
        sizes = dict(num_tokens="i32", num_half="i32", num_even="i32", num_odd="i32")
        flags = dict(UPCAST_DOT=False, IEEE_DOT=dtype == tl.float32, HAS_SCALE=has_scale, ROTARY=rotary,
                     MROPE=mrope, IS_NEOX=neox, ROTARY_DIM=rotary_dim)
        config = scoring.gpu_config(pre_rope=rotary)
        tiles_a, tiles_b = config.coefficients, config.residual
        label = f"{dtype_name} {variant}"
        yield (
            scoring._lowpass_coefficients_kernel,
            dict(shared, energy_ptr="*fp32", **extra, **sizes, num_even_blocks="i32", num_layers="i32",
                 num_kv_heads="i32", num_columns="i32", slot_stride="i32"),
            dict(HEAD_DIM=HEAD_DIM, BLOCK_D=HEAD_DIM, BLOCK_W=tiles_a.block_rows,
                 BLOCK_N=tiles_a.block_tokens, COMPUTE_DTYPE=dtype, **flags),
            tiles_a.num_warps, tiles_a.num_stages, label,
        )
        yield (
            scoring._lowpass_residual_kernel,
            dict(shared, deviation_ptr="*fp32", energy_ptr="*fp32", **extra, **sizes, num_layers="i32",
                 num_kv_heads="i32", num_columns="i32", slot_stride="i32"),
            dict(HEAD_DIM=HEAD_DIM, BLOCK_D=tiles_b.block_dim or HEAD_DIM, BLOCK_W=tiles_b.block_rows,
                 BLOCK_N=tiles_b.block_tokens, **flags),
            tiles_b.num_warps, tiles_b.num_stages, label,
        )


def _other_kernels():
    yield (
        selection._select_kernel,
        dict(score_ptr="*fp32", protected_ptr="*u8", budget_ptr="*i64", kept_ptr="*i64",
             num_tokens="i32", max_budget="i32", score_row_stride="i32", protected_row_stride="i32"),
        dict(BLOCK=selection.GPU_BLOCK), 4, 1, "fp32 scores",
    )
    yield (
        compaction._copy_slots_kernel,
        dict(pool_ptrs="*u64", pool_ref="*bf16", source_ptr="*i64", destination_ptr="*i64",
             num_moves="i32", slot_stride="i32"),
        dict(ROW=4 * HEAD_DIM, BLOCK_TOKENS=compaction.GPU_BLOCK_TOKENS,
             BLOCK_COLUMNS=compaction.BLOCK_COLUMNS), 4, 1, "bf16",
    )
    for multi_axis in (False, True):
        yield (
            rotary._rerotate_kernel,
            dict(key_ptrs="*u64", pool_ref="*bf16", slots_ptr="*i64", old_ptr="*i64", new_ptr="*i64",
                 axis_ptr="*i64", cache_ptr="*fp32", num_tokens="i32", slot_stride="i32", cache_stride="i32"),
            dict(NUM_HEADS=4, HEAD_DIM=HEAD_DIM, HALF=HEAD_DIM // 2, BLOCK_HALF=HEAD_DIM // 2, NEOX=True,
                 MULTI_AXIS=multi_axis), 4, 1, "bf16 M-RoPE" if multi_axis else "bf16",
        )


def _ptxas_report(ptx: str, arch: int) -> str:
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    suffix = "a" if arch >= 90 else ""
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as handle:
        handle.write(ptx)
    try:
        result = subprocess.run(
            [ptxas, "-v", f"--gpu-name=sm_{arch}{suffix}", handle.name, "-o", os.devnull],
            capture_output=True, text=True, check=False,
        )
    finally:
        os.unlink(handle.name)
    registers = re.search(r"Used (\d+) registers", result.stderr)
    spills = re.search(r"(\d+) bytes spill stores", result.stderr)
    return f"registers={registers.group(1) if registers else '?'} spill_stores={spills.group(1) if spills else '?'}B"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 80, 90")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(POOL_DTYPES), default=["bf16"],
                        help="pool dtypes of the scoring kernels (fp8e4nv / fp8e5: FP8 pools with scales)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("unset TRITON_INTERPRET: interpreted kernels cannot be compiled", file=sys.stderr)
        return 2
    target = GPUTarget("cuda", args.arch, 32)
    kernels = [item for name in args.dtypes for item in _scoring_kernels(name)] + list(_other_kernels())
    failures = 0
    for kernel, signature, constants, num_warps, num_stages, variant in kernels:
        signature = {**signature, **{name: "constexpr" for name in constants}}
        label = f"{kernel.__name__} ({variant})"
        try:
            compiled = triton.compile(
                ASTSource(kernel, signature, constants),
                target=target,
                options=dict(num_warps=num_warps, num_stages=num_stages),
            )
        except Exception as error:  # report every kernel, then fail
            failures += 1
            print(f"FAIL {label}: {error!r}"[:2000])
            continue
        report = _ptxas_report(compiled.asm["ptx"], args.arch)
        limit = MAX_SHARED_BYTES.get(args.arch)
        if limit is not None and compiled.metadata.shared > limit:
            failures += 1
            print(f"FAIL {label}: shared={compiled.metadata.shared}B exceeds sm_{args.arch}'s {limit}B {report}")
            continue
        print(f"ok   {label}: shared={compiled.metadata.shared}B {report}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
