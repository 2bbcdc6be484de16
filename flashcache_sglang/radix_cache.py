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

Stream memories (flashcache_sglang.stream_memory) live in this tree too: each version of a
stream's memory is a dense path in its own namespace, built by :meth:`_append_to_stream` when an
append request's chunk is prefilled, locked while current or read, and deleted when superseded
and unread. Requests reach them through the request hooks (:meth:`on_request_created`,
:meth:`on_request_queued`), which prepend the memory and set positions.
"""

from __future__ import annotations

import heapq
import logging
import time
from typing import Optional

import torch

from array import array

from . import kept_table, upstream
from .compressor import SENTINEL_SLOT, CompressionController, candidate_positions
from .config import FlashCacheConfig, RequestSettingsError, StreamOp, parse_request
from .kernels import select_kept
from .stats import CompressionStats
from .stream_memory import (
    TOKEN_DELIMITER, TOKEN_MEDIA, TOKEN_SINK, TOKEN_TEXT, MemoryVersion, StreamError, StreamRegistry,
    chunk_time, footprint_floor, rebase_positions, stream_report,
)

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

    def __init__(self, params, config: FlashCacheConfig, kv_pool=None, stats: Optional[CompressionStats] = None,
                 rotary=None, multimodal_positions: bool = False, reduce=None, kv_scales=None):
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
            CompressionController(kv_pool, allocator.free, rotary=rotary, reduce=reduce, kv_scales=kv_scales)
            if kv_pool is not None and allocator is not None else None
        )
        # rid -> compression state of requests still running (dropped when they are released)
        self._pending: dict[str, dict] = {}
        # rid -> (settings, stream op) parsed when the request was created (request hook)
        self._requests: dict[str, tuple[FlashCacheConfig, Optional[StreamOp]]] = {}
        self.streams = StreamRegistry(config.stream_max, config.stream_idle_timeout_s, multimodal_positions)
        self._freed_slots = 0  # since the scheduler last asked (take_freed_slots)

    # ---------------------------------------------------------------- settings and namespaces
    def settings_for(self, req) -> FlashCacheConfig:
        """The settings ``req`` runs with (parsed when it was created; see on_request_created)."""
        known = self._requests.get(upstream.request_id(req))
        if known is not None:
            return known[0]
        try:
            overrides, _ = parse_request(upstream.request_overrides(req))
        except RequestSettingsError:
            return self.config  # refused at creation; never scheduled with these settings
        return self.config.with_overrides(overrides)

    def stream_op(self, req) -> Optional[StreamOp]:
        known = self._requests.get(upstream.request_id(req))
        return known[1] if known is not None else None

    # ---------------------------------------------------------------- request hooks
    def on_request_created(self, req, auto_bos_token_id: Optional[int] = None) -> None:
        """Called by the scheduler's request hook right after SGLang built ``req``.

        Validates ``custom_params.flashcache`` (a bad value aborts the request with 400 naming
        the field), reports the settings the request runs with, and for a stream request
        prepends the stream memory's tokens and namespaces the request to the memory version.
        """
        rid = upstream.request_id(req)
        try:
            overrides, op = parse_request(upstream.request_overrides(req))
            settings = self.config.with_overrides(overrides)
            if op is not None:
                self._admit_stream_request(req, op, auto_bos_token_id)
        except (RequestSettingsError, StreamError) as error:
            upstream.abort_request(req, str(error), getattr(error, "status", 400))
            return
        self._requests[rid] = (settings, op)
        if op is None:
            upstream.attach_weakref_release(req, self._forget_request)
        upstream.report_to_request(req, settings=self._settings_report(settings, op))

    def _settings_report(self, settings: FlashCacheConfig, op: Optional[StreamOp]) -> dict:
        report = {"policy": settings.policy, "retention": settings.retention, "gamma": settings.gamma,
                  "candidates": settings.candidates, "namespace": settings.namespace() or None}
        if op is not None:
            report["retention"] = op.retention if op.op == "append" and op.retention is not None else settings.retention
            report["stream_op"] = op.op
            report["namespace"] = f"flashcache/stream={op.stream_id}"
        return report

    def _admit_stream_request(self, req, op: StreamOp, auto_bos_token_id: Optional[int]) -> None:
        if op.op == "append" and self.compressor is None:
            raise StreamError("stream memories need the KV pool (this cache runs without one)")
        if op.op == "append" and self.compressor.rotary is None:
            raise StreamError("stream memories re-base positions with the model's rotary table, and this "
                              "model's rotary embedding is not supported (see the server log)")
        rid = upstream.request_id(req)
        _, version, released = self.streams.admit(rid, op)
        self._delete_versions(released)
        own = upstream.request_input_ids(req)
        if version.length and auto_bos_token_id is not None and len(own) and own[0] == auto_bos_token_id:
            own = own[1:]  # the tokenizer's own BOS: the memory already starts with one
        if len(own) == 0:
            self.streams.release(rid)
            raise StreamError(f"a stream {op.op} request needs at least one token of its own")
        upstream.set_request_input_ids(req, version.token_ids + own)
        upstream.set_stream_namespace(req, version.namespace)
        upstream.attach_weakref_release(req, self._forget_request)

    def on_request_queued(self, req) -> None:
        """Called when the scheduler queues ``req`` (its multimodal inputs are merged by then):
        a stream request on an M-RoPE model gets positions that continue its memory version."""
        entry = self.streams.lookup(upstream.request_id(req))
        if entry is None or not self.streams.multimodal_positions or upstream.request_finished(req):
            return
        _, version, _ = entry
        upstream.continue_mrope_positions(req, version.length, version.positions, version.next_position)

    def close_stream(self, stream_id: str) -> bool:
        """Forget a stream's memory (SGLang's /close_session with ``flashcache-stream:<id>``)."""
        known = stream_id in self.streams.streams
        self._delete_versions(self.streams.close(stream_id))
        return known

    def _forget_request(self, rid: str) -> None:
        self._requests.pop(rid, None)
        self._pending.pop(rid, None)
        self._delete_versions(self.streams.release(rid))

    def release_aborted_request(self, handle) -> None:
        """A request aborted before it was scheduled (never released through release_kv_cache)."""
        self._forget_request(handle.rid)
        super().release_aborted_request(handle)

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
        op = self.stream_op(req)
        if op is not None and op.op == "append":
            # Published (as a new memory version) once the whole chunk is prefilled; an append
            # finishes right after its prefill, so nothing else of it is ever cached.
            if up_to >= upstream.prompt_len(req) and upstream.request_finished(req):
                self._append_to_stream(req, op, up_to)
            return
        if op is None and self.compressor is not None:
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
        result = self.compressor.compress(row, positions, settings, self._rope_positions(req, positions),
                                          multimodal=bool(spans) and settings.candidates != "text")
        elapsed = time.perf_counter() - started
        state["done"] = True
        self.stats.record(result.num_candidates, result.num_kept, elapsed, publish=False)
        self._freed_slots += result.num_dropped
        held = row[:prompt_len] != SENTINEL_SLOT
        media = torch.zeros(prompt_len, dtype=torch.bool)
        for begin, end in spans:
            media[begin:end] = True
        media = media.to(held.device, non_blocking=True)
        # The request's one host synchronisation: both counts in one read.
        prompt_kv_slots, media_kv_slots = torch.stack([held.sum(), (held & media).sum()]).tolist()
        upstream.report_to_request(req, candidates=result.num_candidates, kept=result.num_kept,
                                   prompt_tokens=prompt_len, prompt_kv_slots=prompt_kv_slots,
                                   media_kv_slots=media_kv_slots)
        if result.num_dropped:
            logger.debug("request %s: kept %d of %d candidates (%.1f ms)", rid, result.num_kept,
                         result.num_candidates, elapsed * 1e3)
            upstream.dump_kept_positions(req, positions, result.dropped_positions)
        return True

    # ---------------------------------------------------------------- stream memories
    def _append_to_stream(self, req, op: StreamOp, up_to: int) -> None:
        """Fold a prefilled chunk into its stream's memory and install the next version.

        The request's row holds the current version (positions ``[0, M)``, the tree's slots) and
        the chunk (``[M, up_to)``, the request's own slots). One FlashCache ranking over every
        candidate of both (visual tokens and their delimiters; the header and the sink never are)
        keeps ``min(cap, kept before + retention * new candidates)``, at least the best visual
        token of every time segment (footprint floor). The kept tokens are re-based to
        contiguous positions; tokens from the current version move with their slots when no
        other request reads it, else get fresh slots (copy-on-write: running questions still
        read the old ones); the chunk's own kept slots are re-rotated in place, its dropped slots are freed, and the kept sequence is inserted as the next
        version's path.
        """
        rid = upstream.request_id(req)
        entry = self.streams.lookup(rid)
        if entry is None:
            return
        state, previous, _ = entry
        started = time.perf_counter()
        settings = self.settings_for(req)
        length = min(up_to, upstream.prompt_len(req))
        memory_len = previous.length
        token_ids = upstream.request_input_ids(req)[:length]
        row = upstream.request_row(self.req_to_token_pool, req)[:length]
        positions = self._request_positions(req, length)
        kind, unit, chunk, times = self._chunk_tokens(req, op, state, memory_len, length)
        kind = torch.cat([previous.kind, kind])
        unit = torch.cat([previous.unit, unit])
        chunk = torch.cat([previous.chunk, chunk])
        times = torch.cat([previous.time_s, times])
        candidates = (kind == TOKEN_MEDIA) | (kind == TOKEN_DELIMITER)
        candidate_index = candidates.nonzero().flatten()
        new_candidates = int(candidates[memory_len:].sum())
        retention = op.retention if op.retention is not None else settings.retention
        budget = int(candidates[:memory_len].sum()) + round(retention * new_candidates)
        if state.cap_tokens is not None:
            budget = min(budget, state.cap_tokens)
        keep = ~candidates
        if budget >= candidate_index.numel():
            keep[:] = True
        elif budget > 0:
            device = row.device
            slots = row[candidate_index.to(device)].long()
            scores = self.compressor.shared_scores(
                slots, settings, positions[..., candidate_index],
                multimodal=bool((unit[candidate_index] >= 0).any())).float().cpu()  # the one host sync
            floor = footprint_floor(times[candidate_index], scores, kind[candidate_index] == TOKEN_MEDIA,
                                    state.footprint_s, max(1, budget // 4))
            chosen = select_kept(scores, budget, floor, backend="reference")
            keep[candidate_index[chosen]] = True
        kept_index = keep.nonzero().flatten()
        new_positions = rebase_positions(positions[..., kept_index], unit[kept_index])
        device = row.device
        source = row[kept_index.to(device)].long()
        from_memory = (kept_index < memory_len).to(device)
        destination = source.clone()
        if previous.refs == {rid}:
            # Nothing else reads the current version: its kept slots move to the next one (keys
            # re-rotated in place), no copy, no allocation. The old nodes forget them (sentinel),
            # so deleting the old version frees only what was dropped.
            self._detach_slots(previous, kept_index[kept_index < memory_len])
            moved_in_place = True
        else:
            # A question still reads the current version: copy-on-write into fresh slots.
            fresh = self._allocate(int(from_memory.sum()))
            if fresh is None:
                upstream.report_to_request(req, stream=stream_report(
                    state, previous, op, retryable=True,
                    error="no free KV slots to copy the memory into while questions read it; the chunk was "
                          "not appended (retry once they finish, or give the server a larger KV pool)"))
                logger.warning("stream %s: chunk not appended, no KV slots free for the new memory version", op.stream_id)
                return
            destination[from_memory] = fresh
            moved_in_place = False
        rotated = self.compressor.move_slots(source, destination, positions[..., kept_index], new_positions)
        dropped_own = (~keep[memory_len:]).nonzero().flatten() + memory_len
        if dropped_own.numel():
            self.token_to_kv_pool_allocator.free(row[dropped_own.to(device)].long())
        version = MemoryVersion(
            op.stream_id, previous.number + 1, array("q", (token_ids[i] for i in kept_index.tolist())),
            new_positions, kind[kept_index], unit[kept_index], chunk[kept_index], times[kept_index])
        result = self.insert(upstream.InsertParams(key=upstream.radix_key(version.token_ids, version.namespace),
                                                   value=destination))
        if result.prefix_len != 0:
            raise RuntimeError(f"stream {op.stream_id}: version {version.number} already in the tree")
        version.node = result.last_device_node
        version.lock = self.lock(version.node)
        released = self.streams.install(state, version)
        if version.superseded:  # the stream was closed while the chunk was prefilled
            released.append(version)
        self._delete_versions(released)
        # Every slot of [memory_len, up_to) now belongs to the new version or was freed here.
        upstream.set_cache_protected_len(req, up_to)
        elapsed = time.perf_counter() - started
        kept_new = int(keep[memory_len:][candidates[memory_len:]].sum())
        self.stats.record(new_candidates, kept_new, elapsed, publish=False)
        self.stats.record_memory_drop(int((~keep[:memory_len]).sum()))
        self._freed_slots += int(dropped_own.numel())
        upstream.report_to_request(
            req, candidates=new_candidates, kept=kept_new, prompt_tokens=length,
            prompt_kv_slots=version.length, media_kv_slots=int((version.kind == TOKEN_MEDIA).sum()),
            stream=stream_report(state, version, op, dropped_from_memory=int((~keep[:memory_len]).sum()),
                                 rerotated_keys=rotated, moved_in_place=moved_in_place,
                                 append_ms=round(elapsed * 1e3, 3)))

    def _detach_slots(self, version: MemoryVersion, positions: torch.Tensor) -> None:
        """Hand the slots at ``positions`` of ``version``'s path over to the caller: their tree
        entries become the sentinel (accounted as dropped), so the path's deletion skips them."""
        if positions.numel() == 0:
            return
        nodes = list(self._walk_to_root(version.node))[::-1]
        wanted = positions.tolist()
        start, index = 0, 0
        for node in nodes:
            end = start + len(node.value)
            picked = []
            while index < len(wanted) and wanted[index] < end:
                picked.append(wanted[index] - start)
                index += 1
            if picked:
                node.value[torch.tensor(picked, dtype=torch.int64)] = SENTINEL_SLOT
                node.fc_dropped = getattr(node, "fc_dropped", 0) + len(picked)
                if node.lock_ref > 0:
                    self._dropped_protected += len(picked)
                else:
                    self._dropped_evictable += len(picked)
            start = end

    def _chunk_tokens(self, req, op: StreamOp, state, memory_len: int, length: int):
        """kind / unit / chunk / time of the request's own tokens ``[memory_len, length)``."""
        count = length - memory_len
        kind = torch.full((count,), TOKEN_TEXT, dtype=torch.int8)
        unit = torch.full((count,), -1, dtype=torch.int64)
        spans = [(b, e) for b, e in upstream.multimodal_spans(req) if b >= memory_len]
        if spans:
            base = (state.appended + 1) << 20  # unique per chunk: units never merge across chunks
            for index, (begin, end) in enumerate(spans):
                kind[begin - memory_len:end - memory_len] = TOKEN_MEDIA
                unit[begin - memory_len:end - memory_len] = base + index
                for delimiter in (begin - 1, end):
                    if memory_len <= delimiter < length and kind[delimiter - memory_len] == TOKEN_TEXT:
                        kind[delimiter - memory_len] = TOKEN_DELIMITER
            if op.start and state.keep_sink:
                kind[kind != TOKEN_TEXT] = TOKEN_SINK
        elif not op.start:
            kind[:] = TOKEN_MEDIA  # a text stream: every appended token may be dropped
        chunk = torch.full((count,), -1 if op.start and not spans else (op.chunk if op.chunk is not None
                                                                           else state.appended), dtype=torch.int64)
        times = torch.full((count,), chunk_time(op, state), dtype=torch.float64)
        return kind, unit, chunk, times

    def _rope_positions(self, req, positions: torch.Tensor) -> torch.Tensor:
        """RoPE positions of the prompt ``positions`` as SGLang applied them: the positions
        themselves, or their M-RoPE columns (``[3, n]``) on a multimodal-RoPE model."""
        if not self.streams.multimodal_positions:
            return positions
        inputs = getattr(req, "multimodal_inputs", None)
        if inputs is None or getattr(inputs, "mrope_positions", None) is None:
            return positions.expand(3, -1)  # a text-only request: all three axes are the position
        return upstream.request_mrope_positions(req)[:, positions.to(torch.int64)].to("cpu", torch.int64)

    def _request_positions(self, req, length: int) -> torch.Tensor:
        if self.streams.multimodal_positions:
            return upstream.request_mrope_positions(req)[:, :length].to("cpu", torch.int64)
        return torch.arange(length, dtype=torch.int64)

    def _allocate(self, count: int) -> Optional[torch.Tensor]:
        if count == 0:
            return torch.empty(0, dtype=torch.int64, device=self.device)
        allocator = self.token_to_kv_pool_allocator
        slots = allocator.alloc(count)
        if slots is None:
            self.evict(upstream.EvictParams(num_tokens=count))
            slots = allocator.alloc(count)
        return None if slots is None else slots.to(torch.int64)

    def _delete_versions(self, versions) -> None:
        """Unlock superseded, unread memory versions and delete their paths (and the question
        branches under them) from the tree, freeing every slot once."""
        for version in versions:
            if version.lock is not None:
                self.unlock(version.lock)
                version.lock = None
            node = version.node
            version.node = None
            if node is None or node.parent is None:
                continue  # flushed with the tree
            while node.parent is not self.root_node:
                node = node.parent
            self._freed_slots += self._delete_subtree(node)

    def _delete_subtree(self, top) -> int:
        order, stack = [], [top]
        while stack:
            node = stack.pop()
            order.append(node)
            stack.extend(node.children.values())
        freed = 0
        for node in reversed(order):  # children before parents
            if node.lock_ref > 0 or node.children:
                logger.error("stream memory node %s still locked (%d) while its version is deleted; left "
                             "for eviction", node.id, node.lock_ref)
                continue
            self.token_to_kv_pool_allocator.free_segment(node.value, start_pos=0)
            freed += len(node.value) - getattr(node, "fc_dropped", 0)
            self._delete_leaf(node)
            self.kv_events.record_remove(node)
        return freed

    @staticmethod
    def _has_candidates(settings, spans, prompt_len, start, end) -> bool:
        return candidate_positions(settings, spans, prompt_len, start, end).numel() > 0

    def take_freed_slots(self) -> int:
        """Slots compression returned since the last call (the scheduler's admission hook)."""
        freed, self._freed_slots = self._freed_slots, 0
        return freed

    def on_release(self, req, *, checkpointed: bool) -> None:
        self._forget_request(upstream.request_id(req))
        super().on_release(req, checkpointed=checkpointed)
        self.stats.publish(min_interval=0.2)  # live numbers for monitors, rate-limited

    # ---------------------------------------------------------------- physical accounting
    def reset(self):
        allocator = self.token_to_kv_pool_allocator
        if getattr(self, "streams", None) is not None:
            # Memories are locked while held; a flush forgets them (clients restart them).
            for version in self.streams.held_versions():
                if version.lock is not None:
                    self.unlock(version.lock)
                    version.lock = None
            self.streams.clear()
            self._requests.clear()
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
