"""Span scoring in Triton: low-pass projection with tensor-core matmuls, straight from the pool.

The base K/V of FlashCache is ``P x`` with ``P = C_w^T C_w``, where ``C_w`` holds the rows
m <= w = floor(gamma * N) of the orthonormal DCT-II matrix. Two kernels compute it without ever
writing a gathered copy of K/V or the base itself:

1. ``_lowpass_coefficients_kernel``: ``coefficients = C_w @ X`` for every (K/V, layer, head)
   column block, with the rows of ``X`` gathered through the slot indices inside the kernel.
   The sum of squared coefficients is the low-frequency energy (Parseval).
2. ``_lowpass_residual_kernel``: per token tile, ``base = C_w^T @ coefficients``, then the
   squared residual against the token's K/V (loaded from the pool again) reduced over
   head_dim; K and V are summed in registers, so the deviation is written once.

Even/odd folding halves the FLOPs. DCT-II rows satisfy C[m, N-1-n] = (-1)^m C[m, n], so
even frequencies only see x[n] + x[N-1-n] and odd ones x[n] - x[N-1-n] over the first
ceil(N/2) tokens; on the way back, base[n] = even + odd and base[N-1-n] = even - odd.
Cost: 2 * gamma * N^2 * channels multiply-adds instead of 4x that for the unfolded form
(see kernels/README.md for why this beats an FFT up to ~8K tokens and not beyond).

Every pool read goes through ``_load_rows``, which also (a) dequantises FP8 pools
(``stored * scale`` per layer and K/V; SGLang stores ``x / scale`` as float8) and (b) undoes RoPE
on key rows when positions are given: the partner channel of each pair is loaded from the same
row (same cache lines), cos/sin come from the model's table at the token's position (per pair
axis for M-RoPE), and the pre-RoPE value is formed in registers. No extra pass over the pool,
no rotated copy. Deviations are written per K and per V (``[2, L, H, N]``).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Sequence

import torch
import triton
import triton.language as tl

from flashcache_sglang.method.dct import cutoff_index
from flashcache_sglang.method.scoring import FrequencyScores

from .._common import (
    FP8_KV_DTYPES,
    KV_DTYPES,
    check_index_tensor,
    check_kv_buffers,
    debug_checks_enabled,
    interpreter_enabled,
    new_output,
    pointer_table,
)
from ..rotary import RotarySpec
from .inputs import RotaryInputs, Scale, check_rotary, check_scales

TORCH_TO_TRITON = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}
# The matmul dtype of each pool dtype: FP8 pools are dequantised to float32 on load and then
# multiply in bfloat16 (tensor cores, float32 accumulation), like a bfloat16 pool.
COMPUTE_DTYPE = {torch.float16: torch.float16, torch.bfloat16: torch.bfloat16, torch.float32: torch.float32,
                 torch.float8_e4m3fn: torch.bfloat16, torch.float8_e5m2: torch.bfloat16}


@dataclass(frozen=True)
class KernelTiles:
    """Tile sizes of one scoring kernel (no autotuning: fixed tiles keep sums deterministic)."""

    block_rows: int  # DCT frequencies per tile
    block_tokens: int  # tokens per tile
    block_dim: int  # head_dim chunk of the residual kernel; 0 = the whole head at once
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class ScoringConfig:
    coefficients: KernelTiles
    residual: KernelTiles


# First guesses, chosen so that ptxas (sm_90a) reports no or small register spills; to be
# confirmed by `benchmarks/run_gpu_suite.sh sweep`. The residual kernel holds two float32
# accumulators (even and odd frequencies), hence its head_dim chunking.
GPU_CONFIG = ScoringConfig(
    coefficients=KernelTiles(block_rows=128, block_tokens=64, block_dim=0, num_warps=8, num_stages=3),
    residual=KernelTiles(block_rows=64, block_tokens=64, block_dim=64, num_warps=8, num_stages=3),
)
# Pre-RoPE scoring loads per token tile also the partner channels, positions and cos/sin; with
# the tiles above Triton's 2-3 stage pipeline needs 164-460 KB of shared memory (over the
# H100's 227 KB for M-RoPE and fp32 pools). 32-token tiles, 2 stages: 82-180 KB
# (kernels/compile_check.py checks the limit).
GPU_CONFIG_PRE_ROPE = ScoringConfig(
    coefficients=KernelTiles(block_rows=128, block_tokens=32, block_dim=0, num_warps=8, num_stages=2),
    residual=GPU_CONFIG.residual,
)


def gpu_config(pre_rope: bool) -> ScoringConfig:
    """The GPU tiles of a launch: :data:`GPU_CONFIG_PRE_ROPE` when keys are un-rotated."""
    return GPU_CONFIG_PRE_ROPE if pre_rope else GPU_CONFIG


# The interpreter pays per program and per loop step, not per FLOP: few, large tiles.
INTERPRETER_CONFIG = ScoringConfig(
    coefficients=KernelTiles(block_rows=64, block_tokens=128, block_dim=0, num_warps=4, num_stages=1),
    residual=KernelTiles(block_rows=64, block_tokens=128, block_dim=0, num_warps=4, num_stages=1),
)


@functools.lru_cache(maxsize=4)
def lowpass_table(
    num_tokens: int, cutoff: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """Folded DCT-II rows ``[num_even + num_odd, ceil(N / 2)]`` in ``dtype``.

    Rows are the kept frequencies m <= cutoff, even m first, then odd m; columns are the first
    ceil(N/2) tokens. Built in float64 with the angle reduced in exact integer arithmetic,
    since (2n + 1) * m reaches ~N^2 and a float32 angle would lose the phase at 32K tokens.
    """
    frequencies = torch.cat(
        [torch.arange(0, cutoff + 1, 2, device=device), torch.arange(1, cutoff + 1, 2, device=device)]
    )
    tokens = torch.arange((num_tokens + 1) // 2, device=device)
    phase = ((2 * tokens[None, :] + 1) * frequencies[:, None]) % (4 * num_tokens)
    table = torch.cos(phase.double() * (math.pi / (2 * num_tokens)))
    scale = torch.where(frequencies == 0, math.sqrt(1.0 / num_tokens), math.sqrt(2.0 / num_tokens))
    table = table * scale.double()[:, None]
    if num_tokens % 2 == 1:
        # The middle token pairs with itself; odd rows vanish there (cos(pi m / 2) = 0), and
        # exact zeros keep its folded odd part (x - 0 = x) out of the odd coefficients.
        table[cutoff // 2 + 1 :, -1] = 0.0
    return table.to(dtype).contiguous()


@triton.jit
def _load_rows(
    base, slot, token, token_mask, d, d_mask, head, slot_stride, scale, rotate,
    positions_ptr, cos_sin_ptr, axis_ptr, num_tokens,
    HEAD_DIM: tl.constexpr, ROTARY_DIM: tl.constexpr, IS_NEOX: tl.constexpr,
    ROTARY: tl.constexpr, MROPE: tl.constexpr,
):
    """``[BLOCK_N, BLOCK_D]`` float32 channels ``d`` of one head at ``slot`` (tokens ``token`` of
    the span): dequantised (``* scale``) and, when ``rotate`` (a key buffer) and ROTARY, with
    RoPE undone: first = x1 cos + x2 sin, second = x2 cos - x1 sin, divided by cos^2 + sin^2
    (YaRN's magnitude factor)."""
    row = base + slot[:, None] * slot_stride + head * HEAD_DIM
    mask = token_mask[:, None] & d_mask[None, :]
    x = tl.load(row + d[None, :], mask=mask, other=0.0).to(tl.float32)
    if ROTARY:
        if IS_NEOX:  # pair i = channels (i, i + ROTARY_DIM / 2)
            first = d < ROTARY_DIM // 2
            pair = tl.where(first, d, d - ROTARY_DIM // 2)
            partner = tl.where(first, d + ROTARY_DIM // 2, d - ROTARY_DIM // 2)
        else:  # GPT-J: pair i = channels (2i, 2i + 1)
            first = d % 2 == 0
            pair = d // 2
            partner = tl.where(first, d + 1, d - 1)
        sign = tl.where(first, 1.0, -1.0)
        turned = mask & (d < ROTARY_DIM)[None, :] & rotate
        x_partner = tl.load(row + partner[None, :], mask=turned, other=0.0).to(tl.float32)
        if MROPE:
            axis = tl.load(axis_ptr + pair, mask=d_mask & (d < ROTARY_DIM), other=0).to(tl.int64)
            position = tl.load(positions_ptr + axis[None, :] * num_tokens + token[:, None], mask=turned, other=0)
        else:
            position = tl.load(positions_ptr + token, mask=token_mask, other=0)[:, None]
        entry = cos_sin_ptr + position.to(tl.int64) * ROTARY_DIM + pair[None, :]
        cos = tl.load(entry, mask=turned, other=1.0)
        sin = tl.load(entry + ROTARY_DIM // 2, mask=turned, other=0.0)
        x = (x * cos + sign[None, :] * x_partner * sin) / (cos * cos + sin * sin)
    return x * scale


@triton.jit
def _lowpass_coefficients_kernel(
    pool_ptrs,
    pool_ref,
    slot_ptr,
    table_ptr,
    coefficient_ptr,
    energy_ptr,
    scale_ptr,
    positions_ptr,
    cos_sin_ptr,
    axis_ptr,
    num_tokens,
    num_half,
    num_even,
    num_odd,
    num_even_blocks,
    num_layers,
    num_kv_heads,
    num_columns,
    slot_stride,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_W: tl.constexpr,
    BLOCK_N: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    IEEE_DOT: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    ROTARY: tl.constexpr,
    MROPE: tl.constexpr,
    IS_NEOX: tl.constexpr,
    ROTARY_DIM: tl.constexpr,
):
    row_block = tl.program_id(0)
    column = tl.program_id(1)  # (K/V, layer, head), K/V slowest
    buffer = column // num_kv_heads
    head = column % num_kv_heads
    base = tl.load(pool_ptrs + buffer).to(tl.pointer_type(pool_ref.dtype.element_ty))
    rotate = buffer < num_layers  # key buffers come first in the pointer table
    if HAS_SCALE:
        scale = tl.load(scale_ptr + buffer)
    else:
        scale = 1.0

    if row_block >= num_even_blocks:
        row_start = num_even + (row_block - num_even_blocks) * BLOCK_W
        row_end = num_even + num_odd
        sign = -1.0
    else:
        row_start = row_block * BLOCK_W
        row_end = num_even
        sign = 1.0
    rows = row_start + tl.arange(0, BLOCK_W)
    row_mask = rows < row_end
    d = tl.arange(0, BLOCK_D)
    d_mask = d < HEAD_DIM

    acc = tl.zeros((BLOCK_W, BLOCK_D), dtype=tl.float32)
    for start in range(0, num_half, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        n_mask = n < num_half
        mirror = num_tokens - 1 - n
        mirror_mask = n_mask & (mirror != n)
        slot = tl.load(slot_ptr + n, mask=n_mask, other=0).to(tl.int64)
        mirror_slot = tl.load(slot_ptr + mirror, mask=mirror_mask, other=0).to(tl.int64)
        x = _load_rows(
            base, slot, n, n_mask, d, d_mask, head, slot_stride, scale, rotate,
            positions_ptr, cos_sin_ptr, axis_ptr, num_tokens,
            HEAD_DIM, ROTARY_DIM, IS_NEOX, ROTARY, MROPE,
        )
        x_mirror = _load_rows(
            base, mirror_slot, mirror, mirror_mask, d, d_mask, head, slot_stride, scale, rotate,
            positions_ptr, cos_sin_ptr, axis_ptr, num_tokens,
            HEAD_DIM, ROTARY_DIM, IS_NEOX, ROTARY, MROPE,
        )
        folded = (x + sign * x_mirror).to(COMPUTE_DTYPE)
        table = tl.load(
            table_ptr + rows[:, None] * num_half + n[None, :],
            mask=row_mask[:, None] & n_mask[None, :],
            other=0.0,
        )
        # UPCAST_DOT works around the CPU interpreter (Triton 3.8), which multiplies bfloat16
        # dot operands as their raw uint16 bits; upcasting already-rounded values is exact.
        # (Written out rather than as a helper: nested jit calls cost ~5 ms each interpreted.)
        if UPCAST_DOT:
            acc = tl.dot(table.to(tl.float32), folded.to(tl.float32), acc, input_precision="ieee")
        elif IEEE_DOT:
            acc = tl.dot(table, folded, acc, input_precision="ieee")
        else:
            acc = tl.dot(table, folded, acc)

    tl.store(energy_ptr + row_block * num_columns + column, tl.sum(tl.sum(acc * acc, axis=1), axis=0))
    tl.store(
        coefficient_ptr + rows[:, None] * (num_columns * HEAD_DIM) + column * HEAD_DIM + d[None, :],
        acc.to(COMPUTE_DTYPE),
        mask=row_mask[:, None] & d_mask[None, :],
    )


@triton.jit
def _reconstruct_rows(
    acc, table_ptr, coefficient_ptr, n, n_mask, d, d_mask, column, row_start, row_end, num_half,
    num_columns,
    HEAD_DIM: tl.constexpr, BLOCK_W: tl.constexpr, UPCAST_DOT: tl.constexpr, IEEE_DOT: tl.constexpr,
):
    """acc += C[rows, n]^T @ coefficients[rows] over rows in [row_start, row_end)."""
    for start in range(row_start, row_end, BLOCK_W):
        rows = start + tl.arange(0, BLOCK_W)
        row_mask = rows < row_end
        table_t = tl.load(
            table_ptr + rows[None, :] * num_half + n[:, None],
            mask=n_mask[:, None] & row_mask[None, :],
            other=0.0,
        )
        coefficients = tl.load(
            coefficient_ptr + rows[:, None] * (num_columns * HEAD_DIM) + column * HEAD_DIM + d[None, :],
            mask=row_mask[:, None] & d_mask[None, :],
            other=0.0,
        )
        if UPCAST_DOT:
            acc = tl.dot(table_t.to(tl.float32), coefficients.to(tl.float32), acc, input_precision="ieee")
        elif IEEE_DOT:
            acc = tl.dot(table_t, coefficients, acc, input_precision="ieee")
        else:
            acc = tl.dot(table_t, coefficients, acc)
    return acc


@triton.jit
def _reconstruct(
    table_ptr, coefficient_ptr, n, n_mask, d, d_mask, column, num_even, num_odd, num_half,
    num_columns,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_W: tl.constexpr,
    UPCAST_DOT: tl.constexpr, IEEE_DOT: tl.constexpr,
):
    """(even, odd) parts of the base at tokens n: sums over the even rows, then the odd rows."""
    even = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    even = _reconstruct_rows(
        even, table_ptr, coefficient_ptr, n, n_mask, d, d_mask, column, 0, num_even, num_half,
        num_columns, HEAD_DIM, BLOCK_W, UPCAST_DOT, IEEE_DOT,
    )
    odd = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    odd = _reconstruct_rows(
        odd, table_ptr, coefficient_ptr, n, n_mask, d, d_mask, column, num_even,
        num_even + num_odd, num_half, num_columns, HEAD_DIM, BLOCK_W, UPCAST_DOT, IEEE_DOT,
    )
    return even, odd


@triton.jit
def _lowpass_residual_kernel(
    pool_ptrs,
    pool_ref,
    slot_ptr,
    table_ptr,
    coefficient_ptr,
    deviation_ptr,
    energy_ptr,
    scale_ptr,
    positions_ptr,
    cos_sin_ptr,
    axis_ptr,
    num_tokens,
    num_half,
    num_even,
    num_odd,
    num_layers,
    num_kv_heads,
    num_columns,
    slot_stride,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_W: tl.constexpr,
    BLOCK_N: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    IEEE_DOT: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    ROTARY: tl.constexpr,
    MROPE: tl.constexpr,
    IS_NEOX: tl.constexpr,
    ROTARY_DIM: tl.constexpr,
):
    token_block = tl.program_id(0)
    layer_head = tl.program_id(1)  # (layer, head)
    layer = layer_head // num_kv_heads
    head = layer_head % num_kv_heads

    n = token_block * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < num_half
    mirror = num_tokens - 1 - n
    mirror_mask = n_mask & (mirror != n)
    slot = tl.load(slot_ptr + n, mask=n_mask, other=0).to(tl.int64)
    mirror_slot = tl.load(slot_ptr + mirror, mask=mirror_mask, other=0).to(tl.int64)
    # Runtime loops on purpose: unrolled, K and V (or several head_dim chunks) would be live
    # together, and the two [BLOCK_N, BLOCK_D] float32 accumulators already fill the registers.
    for kv in range(2):
        buffer = kv * num_layers + layer
        column = buffer * num_kv_heads + head
        base = tl.load(pool_ptrs + buffer).to(tl.pointer_type(pool_ref.dtype.element_ty))
        if HAS_SCALE:
            scale = tl.load(scale_ptr + buffer)
        else:
            scale = 1.0
        deviation = tl.zeros((BLOCK_N,), dtype=tl.float32)
        deviation_mirror = tl.zeros((BLOCK_N,), dtype=tl.float32)
        energy = tl.zeros((), dtype=tl.float32)
        for d_start in range(0, HEAD_DIM, BLOCK_D):
            d = d_start + tl.arange(0, BLOCK_D)
            d_mask = d < HEAD_DIM
            even, odd = _reconstruct(
                table_ptr, coefficient_ptr, n, n_mask, d, d_mask, column, num_even, num_odd,
                num_half, num_columns, HEAD_DIM, BLOCK_N, BLOCK_D, BLOCK_W, UPCAST_DOT, IEEE_DOT,
            )
            x = _load_rows(
                base, slot, n, n_mask, d, d_mask, head, slot_stride, scale, kv == 0,
                positions_ptr, cos_sin_ptr, axis_ptr, num_tokens,
                HEAD_DIM, ROTARY_DIM, IS_NEOX, ROTARY, MROPE,
            )
            x_mirror = _load_rows(
                base, mirror_slot, mirror, mirror_mask, d, d_mask, head, slot_stride, scale, kv == 0,
                positions_ptr, cos_sin_ptr, axis_ptr, num_tokens,
                HEAD_DIM, ROTARY_DIM, IS_NEOX, ROTARY, MROPE,
            )
            residual = x - (even + odd)
            residual_mirror = x_mirror - (even - odd)
            deviation += tl.sum(residual * residual, axis=1) / HEAD_DIM
            deviation_mirror += tl.sum(residual_mirror * residual_mirror, axis=1) / HEAD_DIM
            energy += tl.sum(tl.sum(x * x + x_mirror * x_mirror, axis=1), axis=0)
        tl.store(energy_ptr + token_block * num_columns + column, energy)
        # deviation is [2 (K, V), num_layers * num_kv_heads, num_tokens]
        row = deviation_ptr + (kv * num_layers * num_kv_heads + layer_head) * num_tokens
        tl.store(row + n, deviation, mask=n_mask)
        tl.store(row + mirror, deviation_mirror, mask=mirror_mask)


def _check_gamma(gamma: float) -> None:
    if not isinstance(gamma, (int, float)) or isinstance(gamma, bool) or not 0.0 < gamma < 1.0:
        raise ValueError(f"gamma must be a float in (0, 1), got {gamma!r}")


def score_span_triton(
    k_buffers: Sequence[torch.Tensor],
    v_buffers: Sequence[torch.Tensor],
    slot_indices: torch.Tensor,
    gamma: float,
    config: ScoringConfig | None = None,
    *,
    positions: torch.Tensor | None = None,
    rotary: RotarySpec | None = None,
    k_scale: Scale = None,
    v_scale: Scale = None,
) -> FrequencyScores:
    """FlashCache scores of a span read in place from SGLang's pool (no gathered copy).

    Args:
        k_buffers: per layer ``[num_slots, num_kv_heads, head_dim]`` float16 / bfloat16 /
            float32 / float8_e4m3fn / float8_e5m2 (SGLang's fp8 pools: ``get_key_buffer``'s
            float8 view of the uint8 storage), contiguous within a slot; all layers alike.
        v_buffers: same as ``k_buffers``.
        slot_indices: ``[num_tokens]`` torch.int32 or torch.int64, the span's slots in
            position order (num_tokens >= 1).
        gamma: low-pass cutoff fraction in (0, 1); frequencies m <= floor(gamma * N) are kept.
        config: tile sizes of both kernels; defaults to :func:`gpu_config` (INTERPRETER_CONFIG
            when the kernels run interpreted).
        positions: ``[num_tokens]`` (or ``[3, num_tokens]`` M-RoPE) int32/int64 positions
            the keys were rotated with, on the pool's device; with ``rotary`` the keys are
            scored pre-RoPE (the rotation undone in the kernel's loads).
        rotary: the model's :class:`RotarySpec` (pass one already on the pool's device to
            avoid a copy; others are copied once and cached).
        k_scale, v_scale: dequantisation factors (value = stored * scale): None (1.0), a
            float, one float per layer, or a ``[num_layers]`` float tensor on the device.

    Returns:
        FrequencyScores: key_deviation and value_deviation ``[num_layers, num_kv_heads,
        num_tokens]`` float32, high_freq_ratio ``[num_layers]`` and high_freq_ratio_per_head
        ``[num_layers, num_kv_heads]`` float32, the same quantities as
        :func:`flashcache_sglang.method.scoring.frequency_scores`; key_space "pre_rope" with
        positions, else "post_rope".
    """
    layout = check_kv_buffers(k_buffers, v_buffers, KV_DTYPES + FP8_KV_DTYPES)
    check_index_tensor(slot_indices, "slot_indices", layout.device)
    _check_gamma(gamma)
    num_tokens = slot_indices.numel()
    if num_tokens == 0:
        raise ValueError("slot_indices is empty: the span needs num_tokens >= 1")
    rope = check_rotary(positions, rotary, num_tokens, layout.head_dim, layout.device)
    scales = check_scales(k_scale, v_scale, layout.num_layers, layout.device)
    return _launch(k_buffers, v_buffers, slot_indices, gamma, layout, rope, scales, config)


def _launch(
    k_buffers: Sequence[torch.Tensor],
    v_buffers: Sequence[torch.Tensor],
    slot_indices: torch.Tensor,
    gamma: float,
    layout,
    rope: RotaryInputs | None,
    scales: torch.Tensor | None,
    config: ScoringConfig | None,
) -> FrequencyScores:
    """Both kernels on validated inputs (see :func:`score_span_triton`)."""
    num_tokens = slot_indices.numel()
    if config is None:
        config = INTERPRETER_CONFIG if interpreter_enabled() else gpu_config(rope is not None)
    if rope is not None and debug_checks_enabled():
        low, high = int(rope.positions.min()), int(rope.positions.max())
        if low < 0 or high >= rope.cos_sin.shape[0]:
            raise ValueError(f"positions must lie in [0, {rope.cos_sin.shape[0]}) (the rotary table), "
                             f"got [{low}, {high}]")

    device = layout.device
    num_layers, num_kv_heads, head_dim = layout.num_layers, layout.num_kv_heads, layout.head_dim
    cutoff = cutoff_index(num_tokens, gamma)
    num_half = (num_tokens + 1) // 2
    num_even = cutoff // 2 + 1
    num_odd = (cutoff + 1) // 2
    num_columns = 2 * num_layers * num_kv_heads
    tiles_a, tiles_b = config.coefficients, config.residual
    num_even_blocks = triton.cdiv(num_even, tiles_a.block_rows)
    num_row_blocks = num_even_blocks + triton.cdiv(num_odd, tiles_a.block_rows)
    num_token_blocks = triton.cdiv(num_half, tiles_b.block_tokens)

    compute_dtype = COMPUTE_DTYPE[layout.dtype]
    table = lowpass_table(num_tokens, cutoff, compute_dtype, device)
    pool_ptrs = pointer_table(k_buffers, v_buffers, device)
    slots = slot_indices.contiguous()
    coefficients = new_output((num_even + num_odd, num_columns, head_dim), compute_dtype, device)
    low_energy = new_output((num_row_blocks, num_columns), torch.float32, device)
    total_energy = new_output((num_token_blocks, num_columns), torch.float32, device)
    deviation = new_output((2, num_layers, num_kv_heads, num_tokens), torch.float32, device)
    whole_head = max(16, triton.next_power_of_2(head_dim))
    # Unused pointer arguments get a real tensor of the right kind; the constexpr flags keep
    # the kernels from reading them.
    placeholder = table
    rotary_args = (
        placeholder if scales is None else scales,
        placeholder if rope is None else rope.positions,
        placeholder if rope is None else rope.cos_sin,
        placeholder if rope is None or rope.axis_of_pair is None else rope.axis_of_pair,
    )
    flags = dict(
        UPCAST_DOT=interpreter_enabled(),
        IEEE_DOT=compute_dtype == torch.float32,
        HAS_SCALE=scales is not None,
        ROTARY=rope is not None,
        MROPE=rope is not None and rope.is_multimodal,
        IS_NEOX=True if rope is None else rope.spec.is_neox_style,
        ROTARY_DIM=2 if rope is None else rope.spec.rotary_dim,
    )
    _lowpass_coefficients_kernel[(num_row_blocks, num_columns)](
        pool_ptrs, k_buffers[0], slots, table, coefficients, low_energy, *rotary_args,
        num_tokens, num_half, num_even, num_odd, num_even_blocks, num_layers, num_kv_heads,
        num_columns, layout.slot_stride,
        HEAD_DIM=head_dim,
        BLOCK_D=whole_head,
        BLOCK_W=tiles_a.block_rows,
        BLOCK_N=tiles_a.block_tokens,
        COMPUTE_DTYPE=TORCH_TO_TRITON[compute_dtype],
        num_warps=tiles_a.num_warps,
        num_stages=tiles_a.num_stages,
        **flags,
    )
    _lowpass_residual_kernel[(num_token_blocks, num_layers * num_kv_heads)](
        pool_ptrs, k_buffers[0], slots, table, coefficients, deviation, total_energy, *rotary_args,
        num_tokens, num_half, num_even, num_odd, num_layers, num_kv_heads, num_columns,
        layout.slot_stride,
        HEAD_DIM=head_dim,
        BLOCK_D=min(tiles_b.block_dim, whole_head) if tiles_b.block_dim else whole_head,
        BLOCK_W=tiles_b.block_rows,
        BLOCK_N=tiles_b.block_tokens,
        num_warps=tiles_b.num_warps,
        num_stages=tiles_b.num_stages,
        **flags,
    )
    return _scores_from_energies(
        deviation,
        low_energy.sum(0).view(2, num_layers, num_kv_heads),
        total_energy.sum(0).view(2, num_layers, num_kv_heads),
        "post_rope" if rope is None else "pre_rope",
    )


def _scores_from_energies(
    deviation: torch.Tensor, low: torch.Tensor, total: torch.Tensor, key_space: str
) -> FrequencyScores:
    """Ratios from ``[2, num_layers, num_kv_heads]`` low / total energies (K first, then V);
    ``deviation`` is ``[2, num_layers, num_kv_heads, num_tokens]`` (K, V)."""
    high = (total - low).clamp_min(0.0)
    tiny = torch.finfo(torch.float32).tiny
    per_head = (high / total.clamp_min(tiny)).sum(0)
    per_layer = (high.sum(2) / total.sum(2).clamp_min(tiny)).sum(0)
    return FrequencyScores(
        key_deviation=deviation[0], value_deviation=deviation[1], high_freq_ratio=per_layer,
        high_freq_ratio_per_head=per_head, key_space=key_space,
    )
