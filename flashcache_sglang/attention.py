"""Attention over kept KV only: a wrapper that hands the inner backend a physical view.

The scheduler's view of a request stays logical (one row entry per token, dropped ones holding
the sentinel slot 0, lengths and positions as without compression). Attention must not read the
sentinel, so before each forward the wrapper builds, for the batch's requests, a compacted table
(kept prefix slots followed by the new tokens' slots) and physical lengths, and gives the inner
backend (torch_native on CPU, triton / flashinfer on GPU) a shallow copy of the ForwardBatch
that points at it. Positions and RoPE were applied before attention from logical lengths, so
they are untouched. A batch without dropped tokens goes through unchanged (no copy at all),
which is why retention 1.0 is token-identical to vanilla SGLang.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Optional

import torch


class _PoolView:
    """Stands in for ReqToTokenPool inside the inner backend; ``req_to_token`` is switchable."""

    def __init__(self, pool) -> None:
        self._pool = pool
        self.req_to_token = pool.req_to_token

    def __getattr__(self, name):
        return getattr(self._pool, name)


def compact_rows(
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    seq_lens: torch.Tensor,
    out: torch.Tensor,
) -> Optional[torch.Tensor]:
    """Compact the batch's rows (drop sentinel entries) into ``out[:batch_size]``.

    Args:
        req_to_token: ``[num_req_slots, max_context_len]`` int32, logical rows.
        req_pool_indices: ``[batch_size]`` int64, the batch's rows.
        seq_lens: ``[batch_size]`` logical lengths.
        out: ``[>= batch_size, max_context_len]``, same dtype as ``req_to_token``.
    Returns:
        ``[batch_size]`` int64 number of dropped entries per request, or None when no row in the
        batch has any (``out`` is then left untouched).
    """
    batch_size = int(req_pool_indices.numel())
    if batch_size == 0:
        return None
    max_len = int(seq_lens.max())
    rows = req_to_token[req_pool_indices.long(), :max_len]
    in_range = torch.arange(max_len, device=rows.device)[None, :] < seq_lens[:, None].to(rows.device)
    kept = (rows != 0) & in_range
    dropped = in_range.sum(1) - kept.sum(1)
    if not bool((dropped > 0).any()):
        return None
    # A stable sort of "not kept" moves kept slots to the front in their original order.
    order = torch.sort((~kept).to(torch.int8), dim=1, stable=True).indices
    out[:batch_size, :max_len] = rows.gather(1, order)
    return dropped.to(torch.int64)


class PhysicalKVAttention:
    """Wraps an SGLang attention backend so it reads only kept KV.

    Everything not overridden here is delegated to the inner backend.
    """

    def __init__(self, inner) -> None:
        self.inner = inner
        pool = getattr(inner, "req_to_token_pool", None)
        if pool is None:
            raise ValueError(
                f"attention backend {type(inner).__name__} has no req_to_token_pool: "
                "flashcache cannot give it a compacted view"
            )
        self._real_pool = pool
        self._view = _PoolView(pool)
        inner.req_to_token_pool = self._view
        # triton / flashinfer gather rows through the ModelRunner's KVIndexTranslator, which holds
        # its own reference to the real table: point it at the compacted one while they plan.
        self._translator = getattr(inner, "kv_index_translator", None)
        self._scratch: Optional[torch.Tensor] = None
        self._source = None
        self._physical = None

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def _scratch_table(self) -> torch.Tensor:
        if self._scratch is None:
            self._scratch = torch.zeros_like(self._real_pool.req_to_token)
        return self._scratch

    def physical_batch(self, forward_batch):
        """The ForwardBatch the inner backend should see (the same object when nothing dropped)."""
        if forward_batch.forward_mode.is_idle() or forward_batch.req_pool_indices is None:
            return forward_batch
        scratch = self._scratch_table()
        dropped = compact_rows(self._real_pool.req_to_token, forward_batch.req_pool_indices,
                               forward_batch.seq_lens, scratch)
        if dropped is None:
            return forward_batch
        view = copy.copy(forward_batch)
        device = forward_batch.seq_lens.device
        view.req_pool_indices = torch.arange(dropped.numel(), device=forward_batch.req_pool_indices.device,
                                             dtype=forward_batch.req_pool_indices.dtype)
        view.seq_lens = forward_batch.seq_lens - dropped.to(device, forward_batch.seq_lens.dtype)
        dropped_cpu = dropped.cpu()
        if forward_batch.seq_lens_cpu is not None:
            view.seq_lens_cpu = forward_batch.seq_lens_cpu - dropped_cpu.to(forward_batch.seq_lens_cpu.dtype)
            view.seq_lens_sum = int(view.seq_lens_cpu.sum())
        else:
            view.seq_lens_sum = int(view.seq_lens.sum())
        if forward_batch.extend_prefix_lens is not None:
            # New tokens are never dropped, so every dropped entry lies in the prefix.
            view.extend_prefix_lens = forward_batch.extend_prefix_lens - dropped.to(
                forward_batch.extend_prefix_lens.device, forward_batch.extend_prefix_lens.dtype)
        if getattr(forward_batch, "extend_prefix_lens_cpu", None) is not None:
            view.extend_prefix_lens_cpu = [int(p) - int(d) for p, d in
                                           zip(forward_batch.extend_prefix_lens_cpu, dropped_cpu)]
        return view

    # -- the calls SGLang makes per batch / per layer
    def _use(self, forward_batch):
        physical = self.physical_batch(forward_batch)
        self._source, self._physical = forward_batch, physical
        table = self._real_pool.req_to_token if physical is forward_batch else self._scratch
        self._view.req_to_token = table
        return physical, table

    @contextlib.contextmanager
    def _translator_reads(self, table):
        translator = self._translator
        if translator is None or translator.req_to_token is table:
            yield
            return
        real, translator.req_to_token = translator.req_to_token, table
        try:
            yield
        finally:
            translator.req_to_token = real

    def init_forward_metadata(self, forward_batch):
        physical, table = self._use(forward_batch)
        with self._translator_reads(table):
            return self.inner.init_forward_metadata(physical)

    def init_forward_metadata_out_graph(self, forward_batch, in_capture: bool = False):
        physical, table = self._use(forward_batch)
        with self._translator_reads(table):
            return self.inner.init_forward_metadata_out_graph(physical, in_capture=in_capture)

    def _for(self, forward_batch):
        if forward_batch is self._source:
            return self._physical
        return forward_batch

    def forward(self, q, k, v, layer, forward_batch, save_kv_cache: bool = True, **kwargs):
        return self.inner.forward(q, k, v, layer, self._for(forward_batch), save_kv_cache, **kwargs)

    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache: bool = True, **kwargs):
        return self.inner.forward_extend(q, k, v, layer, self._for(forward_batch), save_kv_cache, **kwargs)

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache: bool = True, **kwargs):
        return self.inner.forward_decode(q, k, v, layer, self._for(forward_batch), save_kv_cache, **kwargs)
