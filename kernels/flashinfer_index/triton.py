"""FlashInfer paged indices in Triton for rows that hold dropped tokens.

After compression a request's req_to_token row keeps one entry per logical token (positions
and prefix matching stay logical) and dropped tokens hold a sentinel slot (slot 0, which
SGLang never allocates). Attention only needs the physical tokens: one program per request
walks its row, keeps the non-sentinel slots with a running prefix sum, and writes the first
slot of every page as a page index. kv_indptr comes from the physical lengths the caller
already knows, so nothing synchronises with the host.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._common import interpreter_enabled, new_output

GPU_BLOCK = 1024
INTERPRETER_BLOCK = 512


@triton.jit
def _flashinfer_indices_kernel(
    req_to_token_ptr,
    req_pool_indices_ptr,
    seq_lens_ptr,
    kv_indptr_ptr,
    kv_indices_ptr,
    row_stride,
    sentinel,
    PAGE_SIZE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    request = tl.program_id(0)
    row = tl.load(req_pool_indices_ptr + request).to(tl.int64)
    seq_len = tl.load(seq_lens_ptr + request)
    out = kv_indices_ptr + tl.load(kv_indptr_ptr + request)
    row_ptr = req_to_token_ptr + row * row_stride
    written = seq_len * 0
    for start in range(0, seq_len, BLOCK):
        positions = start + tl.arange(0, BLOCK)
        in_row = positions < seq_len
        slot = tl.load(row_ptr + positions, mask=in_row, other=0)
        valid = in_row & (slot != sentinel)
        physical = written + tl.cumsum(valid.to(seq_len.dtype), axis=0) - 1
        if PAGE_SIZE == 1:
            tl.store(out + physical, slot.to(tl.int32), mask=valid)
        else:
            page_start = valid & (physical % PAGE_SIZE == 0)
            tl.store(out + physical // PAGE_SIZE, (slot // PAGE_SIZE).to(tl.int32), mask=page_start)
        written += tl.sum(valid.to(seq_len.dtype), axis=0)


def build_flashinfer_indices_triton(
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    seq_lens: torch.Tensor,
    kv_indptr: torch.Tensor,
    num_pages_total: int,
    page_size: int,
    sentinel: int,
) -> torch.Tensor:
    """kv_indices ``[num_pages_total]`` torch.int32 for a validated batch and its kv_indptr."""
    kv_indices = new_output((num_pages_total,), torch.int32, req_to_token.device)
    batch_size = req_pool_indices.numel()
    if batch_size == 0 or num_pages_total == 0:
        return kv_indices
    _flashinfer_indices_kernel[(batch_size,)](
        req_to_token, req_pool_indices.contiguous(), seq_lens.contiguous(), kv_indptr, kv_indices,
        req_to_token.stride(0), sentinel,
        PAGE_SIZE=page_size,
        BLOCK=INTERPRETER_BLOCK if interpreter_enabled() else GPU_BLOCK,
    )
    return kv_indices
