"""The kept-KV table: each request row's kept KV slots, packed, maintained where rows change.

SGLang's ``req_to_token`` row of a request stays *logical* under compression: one entry per
token, a dropped token holding the sentinel slot 0 (see radix_cache.py). Attention must read the
kept slots only, densely, with *physical* lengths. Rebuilding that packed view on every forward
costs O(batch x context) device work and host syncs per decode step, and cannot be captured in
a CUDA graph. This table keeps it instead, changing it only where it changes:

- ``physical`` ``[num_rows, max_context_len]`` (the dtype of ``req_to_token``): row ``r`` holds
  the kept slots of ``req_to_token[r, :logical_len[r]]`` in position order, packed at the front;
- ``dropped`` ``[num_rows]`` int64 on the device: sentinel entries in that logical range, so a
  request's physical length is ``seq_len - dropped[r]``; ``dropped_host`` mirrors it on the host
  for the backends that plan on the host (FlashInfer);
- ``logical_len`` ``[num_rows]`` int64 on the device: how much of the logical row the packed row
  covers.

Where each changes:

- extend (prefill, a prefill chunk, a mixed batch): the batch's rows may have adopted a prefix
  from the tree, so they are rebuilt from ``req_to_token`` (O(tokens of the batch), like the
  prefill itself) and their dropped counts copied to the host: ONE device->host copy per extend
  forward, none until the cache first reports a dropped token (a server that never compresses
  pays nothing);
- decode: one new token per request, never dropped: it is written at physical index
  ``seq_len - 1 - dropped[r]`` by a device scatter, and physical lengths are
  ``seq_lens - dropped[req_pool_indices]``: O(batch) device work, static shapes, no host sync,
  so it can run before a CUDA-graph replay or inside one;
- a row edit by the cache (compression, a memory cap, a checkpoint adopting the tree's values
  for a span another request inserted first): the cache calls :meth:`rows_changed` after each
  checkpoint, which marks the row and, in a compressed namespace, recounts the host mirror at
  once (one device->host copy); the device row is rebuilt at the start of the next forward's
  metadata preparation, on the forward stream, as wide as the longest marked row (host-known). That ordering is
  what makes overlap scheduling safe: batch N+1 was launched before batch N's result was
  processed (and the row edited), reads the row as it was, and the rebuild runs after N+1 in
  stream order, seeing both the edit and N+1's appended token.

Rows are never cleared when a request finishes: a freed row is not read again until a new
request's extend rebuilds it.

There is one table per ``ReqToTokenPool`` (:meth:`for_pool`), shared by every wrapped attention
backend of the process and by the cache that notifies it.
"""

from __future__ import annotations

import logging
import os
from typing import Optional, Sequence

import torch

from .compressor import SENTINEL_SLOT

logger = logging.getLogger(__name__)

_POOL_ATTRIBUTE = "_flashcache_kept_table"


class KeptKVTable:
    """Packed kept-slot rows for one ``req_to_token`` table (see the module docstring).

    Args:
        req_to_token: SGLang's ``[num_rows, max_context_len]`` int32 table of logical rows; only
            read here.
    """

    def __init__(self, req_to_token: torch.Tensor) -> None:
        if req_to_token.dim() != 2:
            raise ValueError(f"req_to_token must be [num_rows, max_context_len], got {tuple(req_to_token.shape)}")
        self.req_to_token = req_to_token
        self.num_rows, self.max_context_len = req_to_token.shape
        self.device = req_to_token.device
        self.physical = torch.zeros_like(req_to_token)
        self.dropped = torch.zeros(self.num_rows, dtype=torch.int64, device=self.device)
        self.logical_len = torch.zeros(self.num_rows, dtype=torch.int64, device=self.device)
        self.dropped_host: list[int] = [0] * self.num_rows
        # Host bound of logical_len, so a rebuild after a row edit is as wide as the row, not the
        # context; unknown (rebuild max_context_len wide) once a forward came without host lengths.
        self.host_len: list[int] = [0] * self.num_rows
        self.host_len_known = True
        # Until the cache first reports a sentinel, no row (and no tree value a row could adopt)
        # holds one: extends then know their dropped counts (0) without reading them back.
        self.any_dropped = False
        self._positions = torch.arange(self.max_context_len, device=self.device)
        self._dirty: set[int] = set()
        # Physical seq_lens handed to the backends in decode: one buffer for the table's life,
        # so a CUDA graph captured over a slice of it reads the refreshed values on replay.
        self._lens_buffer: Optional[torch.Tensor] = None
        # (out_cache_loc, host rows) of the last few forward batches built (see note_rows).
        self._noted_rows: list[tuple[torch.Tensor, list[int]]] = []
        self.debug = os.environ.get("FLASHCACHE_DEBUG") == "1"

    @classmethod
    def for_pool(cls, req_to_token_pool) -> "KeptKVTable":
        """The table of SGLang's ``ReqToTokenPool`` (created on first use)."""
        table = getattr(req_to_token_pool, _POOL_ATTRIBUTE, None)
        if table is None or table.req_to_token is not req_to_token_pool.req_to_token:
            table = cls(req_to_token_pool.req_to_token)
            setattr(req_to_token_pool, _POOL_ATTRIBUTE, table)
        return table

    # ---------------------------------------------------------------- the cache's side (host)
    def rows_changed(self, rows: Sequence[int], lengths: Sequence[int], *, recount: bool = True) -> None:
        """Rows the cache just edited in place, anywhere in ``[0, length)``.

        The cache edits a row when it compresses it and when a
        checkpoint adopts the tree's values for a span another request inserted first (SGLang
        frees the request's duplicate slots and points the row at the tree's: other slot numbers,
        and in a compressed namespace possibly the sentinel where this request kept a token, or
        the reverse). The device rows are rebuilt at the next forward (see the module docstring).

        Args:
            rows: request-pool rows (``req.kv.req_pool_idx``).
            lengths: for each row, a bound of the edited positions (the checkpoint's ``up_to``);
                positions past it hold only tokens that are never dropped.
            recount: the edit may have changed how many entries are the sentinel: recount the host
                mirror now (one device->host copy for all ``rows``, on the caller's stream, which
                has the edits). False for rows that cannot hold the sentinel.
        """
        if len(rows) != len(lengths):
            raise ValueError(f"rows_changed: {len(rows)} rows but {len(lengths)} lengths")
        for row, length in zip(rows, lengths):
            if not 0 <= int(row) < self.num_rows:
                raise ValueError(f"rows_changed: row {row} outside [0, {self.num_rows})")
            if not 0 <= int(length) <= self.max_context_len:
                raise ValueError(f"rows_changed: length {length} outside [0, {self.max_context_len}]")
        self._dirty.update(int(row) for row in rows)
        if not rows or not recount:
            return
        width = max(int(length) for length in lengths)
        logical = self.req_to_token[self._to_device([int(r) for r in rows]), :width]
        in_range = self._positions[:width][None, :] < self._to_device([int(n) for n in lengths])[:, None]
        counts = ((logical == SENTINEL_SLOT) & in_range).sum(1).tolist()  # the one device->host copy
        for row, count in zip(rows, counts):
            self.dropped_host[int(row)] = count
        self.any_dropped = self.any_dropped or any(counts)

    # ---------------------------------------------------------------- per forward (device)
    def _to_device(self, values: list[int]) -> torch.Tensor:
        """A small host list on the table's device without blocking the host."""
        host = torch.tensor(values, dtype=torch.int64)
        if self.device.type == "cuda":
            return host.pin_memory().to(self.device, non_blocking=True)
        return host.to(self.device)

    def _rebuild(self, rows: torch.Tensor, lengths: torch.Tensor, width: int) -> torch.Tensor:
        """Pack ``req_to_token[rows, :lengths]`` into ``physical[rows]``; returns dropped ``[n]``.

        Args:
            rows: ``[n]`` int64 distinct rows, on the device.
            lengths: ``[n]`` int64 logical lengths, on the device, each <= ``width``.
            width: a host bound of ``lengths`` (<= max_context_len), so no sync is needed.
        """
        width = min(int(width), self.max_context_len)
        logical = self.req_to_token[rows, :width]
        in_range = self._positions[:width][None, :] < lengths[:, None]
        kept = in_range & (logical != SENTINEL_SLOT)
        # Kept entries go to their rank among the kept; the others to a spare column.
        destination = torch.where(kept, kept.cumsum(1) - 1, width)
        packed = logical.new_zeros(rows.numel(), width + 1)
        packed.scatter_(1, destination, logical)
        self.physical[rows, :width] = packed[:, :width]
        dropped = (in_range & ~kept).sum(1)
        self.dropped[rows] = dropped
        self.logical_len[rows] = lengths
        return dropped

    def flush(self) -> None:
        """Rebuild the device rows :meth:`rows_changed` marked (on the current stream)."""
        if not self._dirty:
            return
        values = sorted(self._dirty)
        self._dirty.clear()
        width = max(self.host_len[row] for row in values) if self.host_len_known else self.max_context_len
        rows = self._to_device(values)
        self._rebuild(rows, self.logical_len[rows], width)

    def extend(self, req_pool_indices: torch.Tensor, seq_lens: torch.Tensor,
               seq_lens_cpu: Optional[torch.Tensor],
               rows_cpu: Optional[torch.Tensor]) -> tuple[torch.Tensor, list[int]]:
        """Rebuild an extend batch's rows; return each request's dropped count on device and host.

        Args:
            req_pool_indices: ``[batch_size]`` int32/int64 rows, on the device.
            seq_lens: ``[batch_size]`` int64 logical lengths after this forward, on the device.
            seq_lens_cpu: the same on the host, or None (then the rebuild is max_context_len wide).
            rows_cpu: ``req_pool_indices`` on the host, or None (then one more device->host copy).
        Returns:
            ``[batch_size]`` int64 on the device, and the same as host ints.
        """
        self.flush()
        if req_pool_indices.numel() == 0:
            return torch.zeros(0, dtype=torch.int64, device=self.device), []
        width = max(seq_lens_cpu.tolist()) if seq_lens_cpu is not None else self.max_context_len
        dropped = self._rebuild(req_pool_indices.long(), seq_lens.long(), width)
        # The extend forward's one device->host copy (none while nothing was ever dropped).
        dropped_host = dropped.tolist() if self.any_dropped else [0] * int(req_pool_indices.shape[0])
        if self.debug and not self.any_dropped and any(dropped.tolist()):
            raise RuntimeError("kept table: rows hold sentinel entries the cache never reported (rows_changed)")
        rows = rows_cpu.tolist() if rows_cpu is not None else req_pool_indices.tolist()
        for row, count in zip(rows, dropped_host):
            self.dropped_host[row] = count
        if seq_lens_cpu is None:
            self.host_len_known = False
        else:
            for row, length in zip(rows, seq_lens_cpu.tolist()):
                self.host_len[row] = length
        return dropped, dropped_host

    def _lens(self, like: torch.Tensor) -> torch.Tensor:
        buffer = self._lens_buffer
        if buffer is None or buffer.dtype != like.dtype or buffer.device != like.device:
            if buffer is not None:
                logger.warning("flashcache: physical seq_lens buffer reallocated (%s -> %s): a CUDA graph "
                               "captured before now would read a stale buffer", buffer.dtype, like.dtype)
            # Decode batches are at most one request per row (CUDA-graph padding included).
            buffer = torch.zeros(max(self.num_rows, 1), dtype=like.dtype, device=like.device)
            self._lens_buffer = buffer
        return buffer

    def decode(self, req_pool_indices: torch.Tensor, seq_lens: torch.Tensor, out_cache_loc: Optional[torch.Tensor],
               num_real: int, *, append: bool = True) -> torch.Tensor:
        """Append a decode step's new tokens; return the physical seq_lens (a static buffer's slice).

        Args:
            req_pool_indices: ``[batch_size]`` rows on the device (a CUDA-graph batch is padded:
                only the first ``num_real`` are real requests).
            seq_lens: ``[batch_size]`` logical lengths including this step's token.
            out_cache_loc: ``[>= num_real]`` the slots of this step's tokens (None: no append).
            num_real: requests that are not CUDA-graph padding (a host int).
            append: False at CUDA-graph capture, whose batch is made up.
        Returns:
            ``[batch_size]`` physical lengths, the dtype of ``seq_lens``; padding lanes keep
            their (fill) value. Always a slice of the same buffer.
        """
        self.flush()
        batch_size = seq_lens.shape[0]
        buffer = self._lens(seq_lens)
        if batch_size > buffer.shape[0]:
            raise ValueError(f"decode batch of {batch_size} requests exceeds the {buffer.shape[0]} request rows")
        lens = buffer[:batch_size]
        lens.copy_(seq_lens)
        if num_real <= 0:
            return lens
        rows = req_pool_indices[:num_real].long()
        dropped = self.dropped[rows]
        lens[:num_real].sub_(dropped.to(lens.dtype))
        if append and out_cache_loc is not None:
            logical = seq_lens[:num_real].long()
            self.physical[rows, logical - 1 - dropped] = out_cache_loc[:num_real].to(self.physical.dtype)
            self.logical_len[rows] = logical
        if self.debug:
            self.verify(rows)
        return lens

    # ---------------------------------------------------------------- host lengths
    def note_rows(self, out_cache_loc: Optional[torch.Tensor], rows_cpu: Optional[torch.Tensor]) -> None:
        """Remember the host rows of the forward batch that writes ``out_cache_loc``.

        A CUDA-graph replay hands the backends a view without host rows; the batch's
        ``out_cache_loc`` tensor is the same object, so :meth:`rows_for` finds them again. A few
        are kept, in case a batch is built before the previous one's metadata is prepared.
        """
        if out_cache_loc is None or rows_cpu is None:
            return
        self._noted_rows = [(out_cache_loc, rows_cpu.tolist())] + self._noted_rows[:3]

    def rows_for(self, out_cache_loc: Optional[torch.Tensor]) -> Optional[list[int]]:
        for noted, rows in self._noted_rows:
            if noted is out_cache_loc:
                return rows
        return None

    def physical_lens_host(self, seq_lens_cpu: torch.Tensor, rows: Sequence[int]) -> tuple[torch.Tensor, int]:
        """Physical host lengths of a decode batch whose first ``len(rows)`` lanes are real requests
        (and a note of their logical lengths, see ``host_len``).

        Returns the ``[batch_size]`` tensor (dtype of ``seq_lens_cpu``) and the dropped total.
        """
        lengths = seq_lens_cpu.tolist()
        total = 0
        for lane, row in enumerate(rows):
            self.host_len[row] = lengths[lane]
            lengths[lane] -= self.dropped_host[row]
            total += self.dropped_host[row]
        return torch.tensor(lengths, dtype=seq_lens_cpu.dtype), total

    # ---------------------------------------------------------------- checks
    def verify(self, rows: torch.Tensor) -> None:
        """FLASHCACHE_DEBUG: the host mirror and the packed rows agree with ``req_to_token``."""
        for row in rows.tolist():
            length = int(self.logical_len[row])
            logical = self.req_to_token[row, :length]
            kept = logical[logical != SENTINEL_SLOT]
            dropped = length - kept.numel()
            if dropped != int(self.dropped[row]) or dropped != self.dropped_host[row]:
                raise RuntimeError(f"kept table row {row}: {dropped} sentinel entries, device counts "
                                   f"{int(self.dropped[row])}, host {self.dropped_host[row]}")
            if not torch.equal(self.physical[row, :kept.numel()], kept):
                raise RuntimeError(f"kept table row {row}: packed row differs from req_to_token")


def rows_changed(req_to_token_pool, rows: Sequence[int], lengths: Sequence[int], settings=None) -> None:
    """The cache's one call after a checkpoint (see :meth:`KeptKVTable.rows_changed`).

    A no-op when no attention backend reads this pool through a table (none was built). The host
    mirror is recounted only for requests whose ``settings`` (a FlashCacheConfig) put them in a
    compressed namespace: in the default namespace rows are never compressed, and the tree values
    a checkpoint adopts there never hold the sentinel (compressed prefixes live in their own
    namespaces).
    """
    table = getattr(req_to_token_pool, _POOL_ATTRIBUTE, None)
    if table is None:
        return
    table.rows_changed(rows, lengths, recount=settings is None or bool(settings.namespace()))
