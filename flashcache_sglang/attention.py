"""Attention over kept KV only: a wrapper that hands the inner backend a physical view.

The scheduler's view of a request stays logical (one row entry per token, dropped ones holding
the sentinel slot 0, lengths and positions as without compression). The inner backend
(torch_native on CPU; triton, flashinfer or fa3 on GPU) must read kept KV only, so:

- every table it reads rows from (``req_to_token_pool.req_to_token``, its own ``req_to_token``,
  the model runner's KV index translator while it plans) is the :class:`KeptKVTable`'s packed
  table, permanently, whatever the batch;
- per forward it gets a shallow copy of the ForwardBatch with physical lengths
  (``seq_lens``, ``seq_lens_cpu``, ``seq_lens_sum``, ``extend_prefix_lens(_cpu)``); rows
  (``req_pool_indices``) and everything else are unchanged.

Decode costs O(batch) device work and no host sync (:meth:`KeptKVTable.decode`), and the
physical ``seq_lens`` it hands over is a slice of one static buffer, so SGLang's decode CUDA
graphs work: at capture (``init_forward_metadata_out_graph(in_capture=True)``) the backend binds
the buffers it reads, and before each replay SGLang calls the same method with its padded replay
view, which refreshes the table and the buffer in place. Positions and RoPE were applied before
attention from logical lengths, so they are untouched.
"""

from __future__ import annotations

import contextlib
import copy
import logging

import torch

from .kept_table import KeptKVTable

logger = logging.getLogger(__name__)


class _PoolView:
    """Stands in for ReqToTokenPool inside the inner backend: its ``req_to_token`` is packed."""

    def __init__(self, pool, table: torch.Tensor) -> None:
        self._pool = pool
        self.req_to_token = table

    def __getattr__(self, name):
        return getattr(self._pool, name)


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
                "flashcache cannot give it a packed view"
            )
        self.table = KeptKVTable.for_pool(pool)
        inner.req_to_token_pool = _PoolView(pool, self.table.physical)
        # fa3 (and triton's DCP path) keep their own reference to the table.
        if isinstance(getattr(inner, "req_to_token", None), torch.Tensor):
            inner.req_to_token = self.table.physical
        # triton / flashinfer gather rows through the ModelRunner's KVIndexTranslator, shared with
        # the rest of the runner: point it at the packed table only while this backend plans.
        self._translator = getattr(inner, "kv_index_translator", None)
        self._source = None
        self._physical = None
        self._warned_host_rows = False

    def __getattr__(self, name):
        return getattr(self.inner, name)

    # ---------------------------------------------------------------- the physical view
    def _host_rows(self, forward_batch, num_real: int):
        """The batch's real rows on the host (for host physical lengths), without a sync if known."""
        rows = self.table.rows_for(getattr(forward_batch, "out_cache_loc", None))
        if rows is None and getattr(forward_batch, "req_pool_indices_cpu", None) is not None:
            rows = forward_batch.req_pool_indices_cpu.tolist()
        if rows is None or len(rows) < num_real:
            if not self._warned_host_rows:
                logger.warning("flashcache: a forward batch without host request rows: reading them back "
                               "from the device (a host sync per step)")
                self._warned_host_rows = True
            rows = forward_batch.req_pool_indices[:num_real].tolist()
        return rows[:num_real]

    def physical_batch(self, forward_batch, *, in_capture: bool = False):
        """The ForwardBatch the inner backend should see (a shallow copy with physical lengths)."""
        mode = forward_batch.forward_mode
        if mode.is_idle() or forward_batch.req_pool_indices is None:
            return forward_batch
        view = copy.copy(forward_batch)
        if mode.is_decode():
            batch_size = int(forward_batch.seq_lens.shape[0])
            num_real = 0 if in_capture else batch_size - int(getattr(forward_batch, "num_padding", 0) or 0)
            view.seq_lens = self.table.decode(forward_batch.req_pool_indices, forward_batch.seq_lens,
                                              getattr(forward_batch, "out_cache_loc", None), num_real,
                                              append=not in_capture)
            if forward_batch.seq_lens_cpu is not None:
                rows = self._host_rows(forward_batch, num_real) if num_real else []
                view.seq_lens_cpu, total = self.table.physical_lens_host(forward_batch.seq_lens_cpu, rows)
                if forward_batch.seq_lens_sum is not None:
                    view.seq_lens_sum = forward_batch.seq_lens_sum - total
            elif num_real:
                # No host lengths (a sync-free backend's batch): the logical sum stays an upper
                # bound, and the table's later rebuilds must be context-wide.
                self.table.host_len_known = False
            return view
        if not mode.is_extend() or mode.is_target_verify() or mode.is_dllm_extend() or mode.is_split_prefill():
            raise RuntimeError(f"flashcache cannot serve forward mode {mode.name} (speculative decoding, dLLM "
                               "and split prefill are refused at start-up)")
        dropped, dropped_host = self.table.extend(forward_batch.req_pool_indices, forward_batch.seq_lens,
                                                  forward_batch.seq_lens_cpu,
                                                  getattr(forward_batch, "req_pool_indices_cpu", None))
        view.seq_lens = forward_batch.seq_lens - dropped.to(forward_batch.seq_lens.dtype)
        if forward_batch.seq_lens_cpu is not None:
            view.seq_lens_cpu = forward_batch.seq_lens_cpu - torch.tensor(dropped_host,
                                                                          dtype=forward_batch.seq_lens_cpu.dtype)
        if forward_batch.seq_lens_sum is not None:
            view.seq_lens_sum = forward_batch.seq_lens_sum - sum(dropped_host)
        if forward_batch.extend_prefix_lens is not None:
            # New tokens are never dropped, so every dropped entry lies in the prefix.
            view.extend_prefix_lens = forward_batch.extend_prefix_lens - dropped.to(
                forward_batch.extend_prefix_lens.dtype)
        if getattr(forward_batch, "extend_prefix_lens_cpu", None) is not None:
            view.extend_prefix_lens_cpu = [int(p) - d for p, d in zip(forward_batch.extend_prefix_lens_cpu,
                                                                      dropped_host)]
        return view

    # ---------------------------------------------------------------- the calls SGLang makes
    def _use(self, forward_batch, *, in_capture: bool = False):
        physical = self.physical_batch(forward_batch, in_capture=in_capture)
        self._source, self._physical = forward_batch, physical
        return physical

    @contextlib.contextmanager
    def _translator_reads(self):
        translator = self._translator
        table = self.table.physical
        if translator is None or translator.req_to_token is table:
            yield
            return
        real, translator.req_to_token = translator.req_to_token, table
        try:
            yield
        finally:
            translator.req_to_token = real

    def _for(self, forward_batch):
        if forward_batch is self._source:
            return self._physical
        return forward_batch

    def init_forward_metadata(self, forward_batch):
        physical = self._use(forward_batch)
        with self._translator_reads():
            return self.inner.init_forward_metadata(physical)

    def init_forward_metadata_out_graph(self, forward_batch, in_capture: bool = False):
        physical = self._use(forward_batch, in_capture=in_capture)
        with self._translator_reads():
            return self.inner.init_forward_metadata_out_graph(physical, in_capture=in_capture)

    def init_forward_metadata_in_graph(self, forward_batch):
        # Inside a capture: what is recorded reads the packed table and the static lengths.
        with self._translator_reads():
            return self.inner.init_forward_metadata_in_graph(self._for(forward_batch))

    def forward(self, q, k, v, layer, forward_batch, save_kv_cache: bool = True, **kwargs):
        return self.inner.forward(q, k, v, layer, self._for(forward_batch), save_kv_cache, **kwargs)

    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache: bool = True, **kwargs):
        return self.inner.forward_extend(q, k, v, layer, self._for(forward_batch), save_kv_cache, **kwargs)

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache: bool = True, **kwargs):
        return self.inner.forward_decode(q, k, v, layer, self._for(forward_batch), save_kv_cache, **kwargs)
