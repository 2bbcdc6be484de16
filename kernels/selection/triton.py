"""Budgeted top-B selection in Triton, output sorted by position, no sort at all.

One program per row (a layer, or the single shared row). Scores become order-preserving
integer keys (float32 bit trick). A bitwise binary search over the 34-bit key range finds
the B-th largest key T in 34 counting passes
over the row (the row stays in L1/L2: 32 KB per 8K tokens). The kept set is then every key
above T plus the first (B - count(key > T)) keys equal to T in position order, and a running
prefix sum writes the kept positions already sorted. Ties resolve to the lower position,
exactly like a stable sort. Protected tokens get 2^32 added to their key: they outrank every
score, and among themselves (budget smaller than the protected count) the higher score wins.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._common import interpreter_enabled, new_output

GPU_BLOCK = 1024
INTERPRETER_BLOCK = 512


@triton.jit
def _keys(score_row, protected_row, offsets, mask):
    score = tl.load(score_row + offsets, mask=mask, other=0.0).to(tl.float32)
    score = tl.where(score == 0.0, 0.0, score)  # -0.0 ties with 0.0, as in the reference
    bits = score.to(tl.int32, bitcast=True).to(tl.int64)
    key = tl.where(bits >= 0, bits + 2147483648, -1 - bits)
    protected = tl.load(protected_row + offsets, mask=mask, other=0)
    key = tl.where(protected != 0, key + 4294967296, key)
    return tl.where(mask, key, -1)


@triton.jit
def _select_kernel(
    score_ptr,
    protected_ptr,
    budget_ptr,
    kept_ptr,
    num_tokens,
    max_budget,
    score_row_stride,
    protected_row_stride,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    score_row = score_ptr + row * score_row_stride
    protected_row = protected_ptr + row * protected_row_stride
    kept_row = kept_ptr + row.to(tl.int64) * max_budget
    budget = tl.load(budget_ptr + row).to(tl.int64)

    threshold = budget * 0
    for step in range(0, 34):  # bits 33..0; a positive step keeps the loop a plain scf.for
        candidate = threshold | ((budget * 0 + 1) << (33 - step))
        count = budget * 0
        for start in range(0, num_tokens, BLOCK):
            offsets = start + tl.arange(0, BLOCK)
            keys = _keys(score_row, protected_row, offsets, offsets < num_tokens)
            count += tl.sum((keys >= candidate).to(tl.int64), axis=0)
        threshold = tl.where(count >= budget, candidate, threshold)

    count_greater = budget * 0
    for start in range(0, num_tokens, BLOCK):
        offsets = start + tl.arange(0, BLOCK)
        keys = _keys(score_row, protected_row, offsets, offsets < num_tokens)
        count_greater += tl.sum((keys > threshold).to(tl.int64), axis=0)
    equal_wanted = budget - count_greater

    written = budget * 0
    equal_seen = budget * 0
    for start in range(0, num_tokens, BLOCK):
        offsets = start + tl.arange(0, BLOCK)
        keys = _keys(score_row, protected_row, offsets, offsets < num_tokens)
        equal = (keys == threshold).to(tl.int64)
        equal_rank = equal_seen + tl.cumsum(equal, axis=0) - 1
        keep = (keys > threshold) | ((equal != 0) & (equal_rank < equal_wanted))
        position = written + tl.cumsum(keep.to(tl.int64), axis=0) - 1
        tl.store(kept_row + position, offsets.to(tl.int64), mask=keep)
        written += tl.sum(keep.to(tl.int64), axis=0)
        equal_seen += tl.sum(equal, axis=0)

    for start in range(0, max_budget, BLOCK):
        columns = start + tl.arange(0, BLOCK)
        padding = tl.full((BLOCK,), -1, dtype=tl.int64)
        tl.store(kept_row + columns, padding, mask=(columns >= written) & (columns < max_budget))


def select_kept_triton(
    scores: torch.Tensor, budgets: torch.Tensor, protected_mask: torch.Tensor, max_budget: int
) -> torch.Tensor:
    """Same contract as :func:`..reference.select_kept_reference` (inputs already validated).

    Args:
        scores: ``[num_rows, num_tokens]`` float16 / bfloat16 / float32, finite.
        budgets: ``[num_rows]`` torch.int32 / torch.int64 on the scores' device.
        protected_mask: ``[num_rows, num_tokens]`` torch.bool (a broadcast view is fine).
        max_budget: columns of the result.
    Returns:
        ``[num_rows, max_budget]`` torch.int64 kept positions, ascending, padded with -1.
    """
    num_rows, num_tokens = scores.shape
    kept = new_output((num_rows, max_budget), torch.int64, scores.device)
    if num_rows == 0:
        return kept
    if scores.stride(1) != 1:
        scores = scores.contiguous()
    protected = protected_mask.view(torch.uint8)
    if protected.stride(1) != 1:
        protected = protected.contiguous()
    _select_kernel[(num_rows,)](
        scores, protected, budgets.contiguous(), kept,
        num_tokens, max_budget, scores.stride(0), protected.stride(0),
        BLOCK=INTERPRETER_BLOCK if interpreter_enabled() else GPU_BLOCK,
    )
    return kept
