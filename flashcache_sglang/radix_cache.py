"""A radix cache whose nodes hold compressed prefixes: logical keys, physical accounting.

Three layers, named as in SGLang's mem_cache:

- index (this tree): a node keeps its full token key, so a later prompt still matches it, and one
  value entry per logical token: the KV slot of a kept token, or the sentinel slot 0 for a
  dropped one. Match lengths, ``req.prefix_len`` and therefore every position SGLang derives
  from them stay exactly what they would be without compression;
- allocator: slot 0 is never allocated, so a value of 0 always means "dropped". Every free path
  (eviction, duplicate frees on insert, a request's row release) goes through the allocator's
  ``free``, which :func:`upstream.filter_sentinel_frees` wraps to skip 0 (SGLang's own ``free``
  does not filter it); each dropped slot was given back exactly once, at compression time;
- accounting: evictable / protected sizes and eviction counts are *physical* (kept slots), so
  the scheduler's admission control and its idle-time leak check
  (available + evictable + protected == total) see the memory compression really freed.

Compression happens in :meth:`checkpoint`, the one call SGLang makes after a forward wrote a
request's KV and before the tree takes it (both for a request going on to decode and for a
finished one). A request whose candidate span is not fully prefilled yet (chunked prefill) keeps
its KV private until it is: its intermediate checkpoints do not publish, so no other request can
have copied slots that compression later frees.
"""

from __future__ import annotations

import heapq
import logging
import time
from typing import Optional

import torch

from . import kept_table, upstream
from .compressor import SENTINEL_SLOT, RowCompressor, candidate_positions
from .config import FlashCacheConfig
from .stats import CompressionStats

logger = logging.getLogger(__name__)

RadixCache = upstream.RadixCache


def _dropped_count(value: Optional[torch.Tensor]) -> int:
    if value is None or value.numel() == 0:
        return 0
    return int((value == SENTINEL_SLOT).sum())


class CompressedRadixCache(RadixCache):
    """SGLang's RadixCache with FlashCache-compressed values (page_size 1).

    Args:
        params: SGLang's CacheInitParams (req_to_token_pool, allocator, page_size, ...).
        config: server-wide settings; a request may override retention/gamma.
        kv_pool: the KV pool to score on; None only in simulations (no compression then).
    """

    def __init__(self, params, config: FlashCacheConfig, kv_pool=None, stats: Optional[CompressionStats] = None):
        if params.page_size != 1:
            raise ValueError(
                f"flashcache needs --page-size 1 (got {params.page_size}): with larger pages a "
                "dropped token cannot be freed without compacting pages"
            )
        self.config = config
        self.stats = stats or CompressionStats()
        # Physical accounting: sentinel entries currently in evictable / protected nodes.
        self._dropped_evictable = 0
        self._dropped_protected = 0
        super().__init__(params)
        allocator = self.token_to_kv_pool_allocator
        if allocator is not None:
            upstream.filter_sentinel_frees(allocator)
        self.compressor = (
            RowCompressor(kv_pool, allocator.free) if kv_pool is not None and allocator is not None else None
        )
        # rid -> compression state of requests still running (dropped when they are released)
        self._pending: dict[str, dict] = {}
        self._freed_slots = 0  # since the scheduler last asked (take_freed_slots)

    # ---------------------------------------------------------------- settings and namespaces
    def settings_for(self, req) -> FlashCacheConfig:
        overrides = upstream.request_overrides(req)
        try:
            return self.config.with_overrides(overrides)
        except (TypeError, ValueError) as error:
            # A bad per-request override must not take the server down; it is reported and the
            # request runs with the server's settings.
            logger.warning("request %s: ignoring custom_params.flashcache: %s", upstream.request_id(req), error)
            return self.config

    def match_prefix(self, params):
        req = params.req
        if req is not None:
            upstream.set_namespace(req, self.settings_for(req).namespace())
            params = upstream.with_extra_key(params, req.extra_key)
        return super().match_prefix(params)

    # ---------------------------------------------------------------- compression
    def checkpoint(self, req, *, up_to: int, **kwargs):
        if self.disable:
            return
        if self.compressor is not None:
            if not self._maybe_compress(req, up_to):
                return  # span still being prefilled: keep the KV private for now
        super().checkpoint(req, up_to=up_to, **kwargs)
        kept_table.rows_changed(self.req_to_token_pool, [upstream.request_pool_row(req)], [up_to], self.settings_for(req))
        self.stats.publish()

    def _maybe_compress(self, req, up_to: int) -> bool:
        """Compress the request's new candidates once they are all prefilled.

        Returns False when the request must not publish yet (candidates not fully prefilled).
        """
        rid = upstream.request_id(req)
        state = self._pending.setdefault(rid, {"done": False})
        if state["done"]:
            return True
        settings = self.settings_for(req)
        prompt_len = upstream.prompt_len(req)
        start = upstream.cache_protected_len(req)
        spans = upstream.multimodal_spans(req)
        if not settings.enabled:
            state["done"] = True
            return True
        if up_to < prompt_len and self._has_candidates(settings, spans, prompt_len, start, prompt_len):
            # Chunked prefill: the span continues in a later chunk.
            return False
        positions = candidate_positions(settings, spans, prompt_len, start, min(up_to, prompt_len))
        row = upstream.request_row(self.req_to_token_pool, req)
        started = time.perf_counter()
        result = self.compressor.compress(row, positions, settings)
        elapsed = time.perf_counter() - started
        state["done"] = True
        self.stats.record(result.num_candidates, result.num_kept, elapsed, publish=False)
        self._freed_slots += result.num_dropped
        capped = None
        if settings.memory_cap_tokens is not None:
            capped = self._shrink_to_cap(req, row, settings, spans, prompt_len)
        held = row[:prompt_len] != SENTINEL_SLOT
        media = torch.zeros_like(held)
        for begin, end in spans:
            media[begin:end] = True
        upstream.report_to_request(req, candidates=result.num_candidates, kept=result.num_kept,
                                   prompt_tokens=prompt_len, prompt_kv_slots=int(held.sum()),
                                   media_kv_slots=int((held & media).sum()), capped_kv_slots=capped)
        if result.num_dropped:
            logger.debug("request %s: kept %d of %d candidates (%.1f ms)", rid, result.num_kept,
                         result.num_candidates, elapsed * 1e3)
            upstream.dump_kept_positions(req, positions, result.dropped_positions)
        return True

    def _shrink_to_cap(self, req, row, settings: FlashCacheConfig, spans, prompt_len: int) -> int:
        """Re-score the prompt's kept candidates and drop the lowest until they fit the cap.
        Returns how many the prompt holds afterwards (what the cap counts).

        In multimodal mode the candidates here are the media tokens and their delimiters.

        Positions before ``cache_protected_len`` live in tree nodes: they are dropped in the
        nodes themselves, and only where this request is the node's sole holder (lock_ref 1), so
        no other running request can still read a slot that is freed here. The first multimodal
        item is left alone when ``keep_sink`` is set.
        """
        cap = settings.memory_cap_tokens
        # Each media item is wrapped in delimiter tokens (<|vision_start|> ... <|vision_end|>):
        # they shrink with their item, or an endless stream would still grow by two per item.
        wrapped = [(max(begin - 1, 0), min(end + 1, prompt_len)) for begin, end in spans]
        positions = candidate_positions(settings, wrapped, prompt_len, 0, prompt_len).to(row.device)
        kept = positions[row[positions] != SENTINEL_SLOT]
        if kept.numel() <= cap:
            return int(kept.numel())
        protected_len = upstream.cache_protected_len(req)
        owners = self._path_owners(req.last_node, protected_len)
        shrinkable = torch.ones(kept.numel(), dtype=torch.bool, device=kept.device)
        if settings.keep_sink:
            for begin, end in wrapped[: settings.sink_items]:
                shrinkable &= (kept < begin) | (kept >= end)
        for index, position in enumerate(kept.tolist()):
            if position < protected_len and owners[position][0].lock_ref > 1:
                shrinkable[index] = False
        candidates = kept[shrinkable]
        num_keep = max(candidates.numel() - (kept.numel() - cap), 0)
        if candidates.numel() == 0 or num_keep >= candidates.numel():
            return int(kept.numel())
        slots = row[candidates].to(torch.int64)
        keep = self.compressor.keep_mask(slots, num_keep, settings)
        dropped = candidates[~keep]
        for position in dropped.tolist():
            if position < protected_len:
                node, offset = owners[position]
                node.value[offset] = SENTINEL_SLOT
                node.fc_dropped = getattr(node, "fc_dropped", 0) + 1
                self._dropped_protected += 1  # the node is locked by this request
        self.compressor.free_slots(slots[~keep])
        row[dropped] = SENTINEL_SLOT
        self.stats.record_shrink(int(dropped.numel()))
        self._freed_slots += int(dropped.numel())
        return int(kept.numel() - dropped.numel())

    def _path_owners(self, last_node, length: int) -> dict:
        """Logical position -> (tree node, offset in its value) for positions < ``length``."""
        nodes = list(self._walk_to_root(last_node))[::-1]
        owners, start = {}, 0
        for node in nodes:
            for offset in range(len(node.value)):
                if start + offset >= length:
                    return owners
                owners[start + offset] = (node, offset)
            start += len(node.value)
        return owners

    @staticmethod
    def _has_candidates(settings, spans, prompt_len, start, end) -> bool:
        return candidate_positions(settings, spans, prompt_len, start, end).numel() > 0

    def take_freed_slots(self) -> int:
        """Slots compression returned since the last call (the scheduler's admission hook)."""
        freed, self._freed_slots = self._freed_slots, 0
        return freed

    def on_release(self, req, *, checkpointed: bool) -> None:
        self._pending.pop(upstream.request_id(req), None)
        super().on_release(req, checkpointed=checkpointed)
        self.stats.publish(min_interval=0.2)  # live numbers for monitors, rate-limited

    # ---------------------------------------------------------------- physical accounting
    def reset(self):
        allocator = self.token_to_kv_pool_allocator
        if getattr(self, "_pending", None) is not None and allocator is not None:
            # SGLang's flush clears the allocator wholesale after this; evicting first gives
            # every cached slot back through the allocator, so the published free count proves
            # the tree held exactly the slots it accounted for.
            self.evict(upstream.EvictParams(num_tokens=self.evictable_size_ + 1))
            self.stats.last_flush = {"available_after_evict": int(allocator.available_size()),
                                     "allocator_size": int(allocator.size),
                                     "tree_protected": int(self.protected_size())}
            self._pending.clear()
        super().reset()
        self._dropped_evictable = 0
        self._dropped_protected = 0
        if getattr(self, "stats", None) is not None:
            self.stats.publish()

    def _insert_helper(self, node, key, value, priority: int = 0, inserted_len: int = 0):
        prefix_len, last = super()._insert_helper(node, key, value, priority, inserted_len)
        if last is not self.root_node and not hasattr(last, "fc_dropped"):
            # A node just created by this insert: unlocked, so evictable.
            last.fc_dropped = _dropped_count(last.value)
            self._dropped_evictable += last.fc_dropped
        return prefix_len, last

    def _split_node(self, key, child, split_len: int):
        new_node = super()._split_node(key, child, split_len)
        # Both halves share the lock state of the old node: totals are unchanged.
        new_node.fc_dropped = _dropped_count(new_node.value)
        child.fc_dropped = _dropped_count(child.value)
        return new_node

    def _walk_to_root(self, node):
        while node is not None and node is not self.root_node:
            yield node
            node = node.parent

    def inc_lock_ref(self, node):
        if not self.disable:
            for current in self._walk_to_root(node):
                if current.lock_ref == 0:
                    dropped = getattr(current, "fc_dropped", 0)
                    self._dropped_evictable -= dropped
                    self._dropped_protected += dropped
        return super().inc_lock_ref(node)

    def dec_lock_ref(self, node, params=None):
        if not self.disable:
            for current in self._walk_to_root(node):
                if current.lock_ref == 1:
                    dropped = getattr(current, "fc_dropped", 0)
                    self._dropped_evictable += dropped
                    self._dropped_protected -= dropped
        return super().dec_lock_ref(node, params)

    def _delete_leaf(self, node):
        self._dropped_evictable -= getattr(node, "fc_dropped", 0)
        super()._delete_leaf(node)

    def evict(self, params):
        """LRU (or the configured strategy) eviction that counts freed *physical* slots."""
        if self.disable:
            return upstream.EvictResult()
        started = time.perf_counter()
        heap = [(self.eviction_strategy.get_priority(node), node) for node in self.evictable_leaves]
        heapq.heapify(heap)
        num_evicted = 0
        while num_evicted < params.num_tokens and heap:
            _, node = heapq.heappop(heap)
            self.token_to_kv_pool_allocator.free_segment(node.value, start_pos=0)
            num_evicted += len(node.value) - getattr(node, "fc_dropped", 0)
            self._delete_leaf(node)
            parent = node.parent
            if len(parent.children) == 0 and parent.lock_ref == 0 and parent is not self.root_node:
                heapq.heappush(heap, (self.eviction_strategy.get_priority(parent), parent))
            self.kv_events.record_remove(node)
        self.update_eviction_metrics(num_evicted, started)
        return upstream.EvictResult(num_tokens_evicted=num_evicted)

    def evictable_size(self):
        return self.evictable_size_ - self._dropped_evictable

    def protected_size(self):
        return self.protected_size_ - self._dropped_protected

    def full_evictable_size(self):
        return self.evictable_size()

    def full_protected_size(self):
        return self.protected_size()

    def total_size(self):
        return super().total_size() - self.dropped_total()

    def dropped_total(self) -> int:
        """Sentinel entries in the whole tree (= slots compression saved for cached prefixes)."""
        return self._dropped_evictable + self._dropped_protected

    def logical_size(self) -> int:
        return self.evictable_size_ + self.protected_size_
