"""KV compaction in Triton: one launch copies the kept slots of all layers' K and V.

Grid: (token blocks, 2 * num_layers). Each program moves BLOCK_TOKENS slots of one buffer,
whole rows of num_kv_heads * head_dim elements, through the pool's address table (the
pattern of SGLang's copy_all_layer_kv_cache). Pure data movement: bandwidth-bound at
2 * bytes(kept K/V of all layers).
"""

from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from .._common import interpreter_enabled, pointer_table

GPU_BLOCK_TOKENS = 8
INTERPRETER_BLOCK_TOKENS = 128
BLOCK_COLUMNS = 512


@triton.jit
def _copy_slots_kernel(
    pool_ptrs,
    pool_ref,
    source_ptr,
    destination_ptr,
    num_moves,
    slot_stride,
    ROW: tl.constexpr,
    BLOCK_TOKENS: tl.constexpr,
    BLOCK_COLUMNS: tl.constexpr,
):
    token_block = tl.program_id(0)
    buffer = tl.program_id(1)
    base = tl.load(pool_ptrs + buffer).to(tl.pointer_type(pool_ref.dtype.element_ty))
    t = token_block * BLOCK_TOKENS + tl.arange(0, BLOCK_TOKENS)
    t_mask = t < num_moves
    source = tl.load(source_ptr + t, mask=t_mask, other=0).to(tl.int64) * slot_stride
    destination = tl.load(destination_ptr + t, mask=t_mask, other=0).to(tl.int64) * slot_stride
    for start in tl.static_range(0, ROW, BLOCK_COLUMNS):
        columns = start + tl.arange(0, BLOCK_COLUMNS)
        mask = t_mask[:, None] & (columns < ROW)[None, :]
        values = tl.load(base + source[:, None] + columns[None, :], mask=mask)
        tl.store(base + destination[:, None] + columns[None, :], values, mask=mask)


def copy_slots_triton(
    k_buffers: Sequence[torch.Tensor],
    v_buffers: Sequence[torch.Tensor],
    source_slots: torch.Tensor,
    destination_slots: torch.Tensor,
    slot_stride: int,
) -> None:
    """Same contract as :func:`..reference.copy_slots_reference` (inputs already validated)."""
    num_moves = source_slots.numel()
    if num_moves == 0:
        return
    device = k_buffers[0].device
    num_kv_heads, head_dim = k_buffers[0].shape[1:]
    row = num_kv_heads * head_dim
    block_tokens = INTERPRETER_BLOCK_TOKENS if interpreter_enabled() else GPU_BLOCK_TOKENS
    grid = (triton.cdiv(num_moves, block_tokens), 2 * len(k_buffers))
    _copy_slots_kernel[grid](
        pointer_table(k_buffers, v_buffers, device), k_buffers[0],
        source_slots.contiguous(), destination_slots.contiguous(), num_moves, slot_stride,
        ROW=row, BLOCK_TOKENS=block_tokens, BLOCK_COLUMNS=min(BLOCK_COLUMNS, triton.next_power_of_2(row)),
    )
