"""Torch reference for FlashInfer paged indices of requests whose rows hold dropped tokens."""

from __future__ import annotations

import torch


def build_flashinfer_indices_reference(
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    seq_lens: torch.Tensor,
    page_size: int,
    sentinel: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(kv_indptr ``[batch_size + 1]``, kv_indices ``[total_pages]``, kv_last_page_len
    ``[batch_size]``), all torch.int32. A row's physical tokens are its first ``seq_lens[b]``
    entries that are not ``sentinel``; page p of request b is ``physical_slot[p * page_size] //
    page_size``; an empty request has 0 pages and last_page_len 0."""
    indptr, indices, last_page_len = [0], [], []
    for row, seq_len in zip(req_pool_indices.tolist(), seq_lens.tolist()):
        slots = req_to_token[row, :seq_len].long()
        physical = slots[slots != sentinel]
        pages = physical[::page_size] // page_size
        indices.append(pages)
        indptr.append(indptr[-1] + pages.numel())
        last_page_len.append(physical.numel() - (pages.numel() - 1) * page_size if pages.numel() else 0)
    device = req_to_token.device
    return (
        torch.tensor(indptr, dtype=torch.int32, device=device),
        torch.cat(indices).to(torch.int32) if indices else torch.empty(0, dtype=torch.int32, device=device),
        torch.tensor(last_page_len, dtype=torch.int32, device=device),
    )
