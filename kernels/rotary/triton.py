"""Re-rotation of cached keys in Triton: one launch moves every layer's keys to new positions.

Grid: (num_tokens, num_layers). A program reads one token's key in one layer (all KV heads)
through the pool's address table, undoes the rotation at its old position and applies the one
at its new position, with cos/sin read from the model's own table (per channel pair's position
axis for M-RoPE), in float32, and writes it back in the pool's dtype. Pure bandwidth: one read
and one write of the moved keys.
"""

from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from .._common import pointer_table
from .spec import RotarySpec


@triton.jit
def _rerotate_kernel(
    key_ptrs,
    pool_ref,
    slots_ptr,
    old_ptr,
    new_ptr,
    axis_ptr,
    cache_ptr,
    num_tokens,
    slot_stride,
    cache_stride,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    NEOX: tl.constexpr,
    MULTI_AXIS: tl.constexpr,
):
    token = tl.program_id(0)
    layer = tl.program_id(1)
    base = tl.load(key_ptrs + layer).to(tl.pointer_type(pool_ref.dtype.element_ty))
    slot = tl.load(slots_ptr + token).to(tl.int64)
    pair = tl.arange(0, BLOCK_HALF)
    mask = pair < HALF
    if MULTI_AXIS:
        axis = tl.load(axis_ptr + pair, mask=mask, other=0).to(tl.int64)
        old = tl.load(old_ptr + axis * num_tokens + token, mask=mask, other=0).to(tl.int64)
        new = tl.load(new_ptr + axis * num_tokens + token, mask=mask, other=0).to(tl.int64)
    else:
        old = tl.load(old_ptr + token + pair * 0).to(tl.int64)
        new = tl.load(new_ptr + token + pair * 0).to(tl.int64)
    cos_old = tl.load(cache_ptr + old * cache_stride + pair, mask=mask, other=1.0)
    sin_old = tl.load(cache_ptr + old * cache_stride + HALF + pair, mask=mask, other=0.0)
    cos_new = tl.load(cache_ptr + new * cache_stride + pair, mask=mask, other=1.0)
    sin_new = tl.load(cache_ptr + new * cache_stride + HALF + pair, mask=mask, other=0.0)
    scale = cos_old * cos_old + sin_old * sin_old
    for head in tl.static_range(NUM_HEADS):
        row = base + slot * slot_stride + head * HEAD_DIM
        if NEOX:
            first_ptr = row + pair
            second_ptr = row + HALF + pair
        else:
            first_ptr = row + 2 * pair
            second_ptr = row + 2 * pair + 1
        first = tl.load(first_ptr, mask=mask, other=0.0).to(tl.float32)
        second = tl.load(second_ptr, mask=mask, other=0.0).to(tl.float32)
        pre_first = (first * cos_old + second * sin_old) / scale
        pre_second = (second * cos_old - first * sin_old) / scale
        out_first = pre_first * cos_new - pre_second * sin_new
        out_second = pre_second * cos_new + pre_first * sin_new
        tl.store(first_ptr, out_first.to(pool_ref.dtype.element_ty), mask=mask)
        tl.store(second_ptr, out_second.to(pool_ref.dtype.element_ty), mask=mask)


def rerotate_slots_triton(
    k_buffers: Sequence[torch.Tensor],
    slots: torch.Tensor,
    old_positions: torch.Tensor,
    new_positions: torch.Tensor,
    spec: RotarySpec,
) -> None:
    """Same contract as :func:`.reference.rerotate_slots_reference`."""
    from .reference import _check_positions

    first = k_buffers[0]
    if first.dim() != 3 or first.shape[-1] != spec.head_dim or first.stride(2) != 1 or first.stride(1) != spec.head_dim:
        raise ValueError(f"k_buffers must be [num_slots, num_kv_heads, head_dim={spec.head_dim}], contiguous "
                         f"within a slot; got {tuple(first.shape)} strides {first.stride()}")
    num_tokens = slots.numel()
    _check_positions(old_positions, spec, num_tokens, "old_positions")
    _check_positions(new_positions, spec, num_tokens, "new_positions")
    device = first.device
    multi_axis = old_positions.dim() == 2
    axes = spec.axis_of_pair if spec.axis_of_pair is not None else torch.zeros(spec.rotary_dim // 2, dtype=torch.int64)
    cache = spec.cos_sin_cache.to(device=device, dtype=torch.float32).contiguous()
    half = spec.rotary_dim // 2
    grid = (num_tokens, len(k_buffers))
    _rerotate_kernel[grid](
        pointer_table(k_buffers, [], device), first, slots.to(device).contiguous(),
        old_positions.to(device, torch.int64).contiguous(), new_positions.to(device, torch.int64).contiguous(),
        axes.to(device, torch.int64).contiguous(), cache, num_tokens, first.stride(0), cache.stride(0),
        NUM_HEADS=first.shape[1], HEAD_DIM=spec.head_dim, HALF=half, BLOCK_HALF=triton.next_power_of_2(half),
        NEOX=spec.is_neox_style, MULTI_AXIS=multi_axis,
    )
