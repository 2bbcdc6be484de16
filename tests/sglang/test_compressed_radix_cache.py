"""CompressedRadixCache against SGLang's real pools, allocator and release path, on CPU.

Every test builds SGLang's own ReqToTokenPool, TokenToKVPoolAllocator and MHATokenToKVPool
(small sizes, device "cpu") and drives requests through the same calls the scheduler makes:
``match_prefix`` (with ``req``), a row allocation, ``checkpoint`` (directly or through
``common.release_kv_cache``) and ``release_kv_cache`` for finishing and aborting.

The invariant checked after every step is the scheduler's idle-time leak check, made exact:
the allocator's free slots, the tree's kept slots and the slots live request rows own form a
partition of ``1..pool_size`` (slot 0, the sentinel, belongs to nobody), and
``available + evictable + protected + held_by_rows == pool_size``.
"""

from __future__ import annotations

import random
from array import array
from typing import Optional

import pytest
import torch

from sglang.srt.managers.schedule_batch import ReqKvInfo
from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator
from sglang.srt.mem_cache.base_prefix_cache import EvictParams, InsertParams, MatchPrefixParams
from sglang.srt.mem_cache.cache_init_params import CacheInitParams
from sglang.srt.mem_cache.common import release_kv_cache
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool
from sglang.srt.mem_cache.radix_cache import RadixCache, RadixKey

from flashcache_sglang import upstream
from flashcache_sglang.config import FlashCacheConfig
from flashcache_sglang.radix_cache import CompressedRadixCache

NUM_LAYERS, NUM_KV_HEADS, HEAD_DIM = 2, 2, 8

# Small text-mode settings: candidates are [sink_tokens, prompt_len - recent_tokens).
TEXT = dict(candidates="text", sink_tokens=4, recent_tokens=8, min_candidates=4)


# ---------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module", autouse=True)
def _sglang_runtime_context():
    """release_kv_cache reads get_spec()/get_serving(): publish SGLang's test dummy config."""
    from sglang.srt.runtime_context import get_context

    override = get_context().override_server_args()
    override.install()
    yield
    override.restore()


@pytest.fixture(autouse=True)
def _debug_double_free(monkeypatch):
    """filter_sentinel_frees reads FLASHCACHE_DEBUG when the cache is built: set it first."""
    monkeypatch.setenv("FLASHCACHE_DEBUG", "1")


# ---------------------------------------------------------------------------------- a Req
class _SamplingParams:
    def __init__(self, custom_params: Optional[dict]) -> None:
        self.custom_params = custom_params
        self.max_new_tokens = 1 << 30


class _MultimodalItem:
    def __init__(self, offsets) -> None:
        self.offsets = offsets  # [(begin, end_inclusive)], as SGLang's MultimodalDataItem


class _MultimodalInputs:
    def __init__(self, spans) -> None:
        self.mm_items = [_MultimodalItem([(begin, end - 1)]) for begin, end in spans]


class FakeReq:
    """Exactly what RadixCache.checkpoint, common.release_kv_cache and flashcache read."""

    def __init__(self, rid: str, token_ids, *, retention: Optional[float] = None,
                 flashcache: Optional[dict] = None, extra_key: Optional[str] = None,
                 multimodal_spans=None) -> None:
        self.rid = rid
        self.extra_key = extra_key
        self.cache_salt = None
        self.priority = None
        self.origin_input_ids = array("q", token_ids)
        self.output_ids = array("q")
        self.full_untruncated_fill_ids = array("q", token_ids)
        self.multimodal_inputs = _MultimodalInputs(multimodal_spans) if multimodal_spans else None
        overrides = dict(flashcache or {})
        if retention is not None:
            overrides["retention"] = retention
        self.sampling_params = _SamplingParams({"flashcache": overrides} if overrides else None)
        self.customized_info = None
        self.lock = None
        self.last_node = None
        self.prefix_len = 0
        self.kv = ReqKvInfo()
        self.skip_radix_cache_insert = False
        self.finished_reason = None
        self.finished_len = None
        self.to_finish = None
        self.origin_input_ids_unpadded = self.origin_input_ids

    def finished(self) -> bool:
        return self.finished_reason is not None

    def set_finish_with_abort(self, error_msg, status_code=400, err_type="BadRequestError") -> None:
        self.to_finish = (int(status_code), error_msg)

    def owned_kv_len(self) -> int:
        return self.kv.kv_committed_len

    def refresh_fill_ids(self) -> None:
        self.full_untruncated_fill_ids = self.origin_input_ids + self.output_ids


# ---------------------------------------------------------------------------------- harness
class Harness:
    """SGLang's three memory layers + the cache, and the scheduler's calls on them."""

    def __init__(self, config: Optional[FlashCacheConfig] = None, *, pool_size: int = 256,
                 num_rows: int = 8, max_context_len: int = 256, with_kv_pool: bool = True,
                 seed: int = 0, need_sort: bool = False, rotary=None,
                 multimodal_positions: bool = False) -> None:
        self.pool_size = pool_size
        self.kv_pool = MHATokenToKVPool(pool_size, 1, torch.float32, NUM_KV_HEADS, HEAD_DIM,
                                        NUM_LAYERS, "cpu", False)
        self.allocator = TokenToKVPoolAllocator(pool_size, torch.float32, "cpu", self.kv_pool,
                                                need_sort)
        self.req_to_token_pool = ReqToTokenPool(num_rows, max_context_len, "cpu", False)
        params = CacheInitParams(disable=False, req_to_token_pool=self.req_to_token_pool,
                                 token_to_kv_pool_allocator=self.allocator, page_size=1)
        self.config = config or FlashCacheConfig(retention=1.0)
        self.cache = CompressedRadixCache(params, self.config,
                                          kv_pool=self.kv_pool if with_kv_pool else None,
                                          rotary=rotary, multimodal_positions=multimodal_positions)
        self.live: dict[str, FakeReq] = {}
        self.kv_writer = None  # (harness, req, slots, first position) -> None: custom prefill KV
        self.generator = torch.Generator().manual_seed(seed)
        self.start_available = self.allocator.available_size()

    # -- the scheduler's steps
    def match(self, req: FakeReq) -> int:
        """match_kv_cache, reduced: at least one token is always computed."""
        key = RadixKey(req.origin_input_ids, req.extra_key, cache_salt=req.cache_salt,
                       limit=len(req.origin_input_ids) - 1)
        result = self.cache.match_prefix(MatchPrefixParams(key=key, req=req))
        req.prefix_len = result.device_prefix_len
        req.last_node = result.last_device_node
        return req.prefix_len

    def start(self, req: FakeReq, *, prefill_up_to: Optional[int] = None) -> bool:
        """Match, lock, allocate the row (up to ``prefill_up_to``: a first chunk) and write KV.

        Returns False, holding nothing, when the pool is out of memory even after eviction.
        """
        prefix_len = self.match(req)
        req.lock = self.cache.lock(req.last_node)
        end = len(req.origin_input_ids) if prefill_up_to is None else prefill_up_to
        slots = self._alloc(end - prefix_len)
        if slots is None:
            self.cache.unlock(req.lock)
            req.lock = None
            return False
        self.req_to_token_pool.alloc([req])
        row = self.req_to_token_pool.req_to_token[req.kv.req_pool_idx]
        row[:prefix_len] = self.cache.path_device_indices(req.last_node)[:prefix_len].to(row.dtype)
        row[prefix_len:end] = slots.to(row.dtype)
        row[end:] = 0
        req.kv.cache_protected_len = prefix_len
        req.kv.kv_allocated_len = req.kv.kv_committed_len = end
        self.write_kv(slots, req, prefix_len)
        self.live[req.rid] = req
        return True

    def _alloc(self, num_tokens: int) -> Optional[torch.Tensor]:
        if self.allocator.available_size() < num_tokens:
            self.allocator.evict_to_free_tokens(self.cache, num_tokens)
        return self.allocator.alloc(num_tokens)

    def extend(self, req: FakeReq, end: int) -> None:
        """The next chunk of a chunked prefill: row positions [kv_allocated_len, end)."""
        start = req.kv.kv_allocated_len
        slots = self._alloc(end - start)
        assert slots is not None
        self.row(req)[start:end] = slots.to(torch.int32)
        req.kv.kv_allocated_len = req.kv.kv_committed_len = end
        self.write_kv(slots)

    def write_kv(self, slots: torch.Tensor, req=None, start: int = 0) -> None:
        if self.kv_writer is not None and req is not None:
            self.kv_writer(self, req, slots, start)
            return
        for layer in range(NUM_LAYERS):
            shape = (slots.numel(), NUM_KV_HEADS, HEAD_DIM)
            self.kv_pool.k_buffer[layer][slots] = torch.randn(shape, generator=self.generator)
            self.kv_pool.v_buffer[layer][slots] = torch.randn(shape, generator=self.generator)

    def decode(self, req: FakeReq, num_tokens: int) -> bool:
        slots = self._alloc(num_tokens)
        if slots is None:
            return False
        row = self.row(req)
        start = req.kv.kv_allocated_len
        row[start:start + num_tokens] = slots.to(row.dtype)
        req.output_ids.extend(range(50_000 + start, 50_000 + start + num_tokens))
        req.kv.kv_allocated_len += num_tokens
        req.kv.kv_committed_len += num_tokens
        self.write_kv(slots)
        return True

    def finish(self, req: FakeReq) -> None:
        req.finished_reason = "length"
        release_kv_cache(req, self.cache, checkpoint=True)
        del self.live[req.rid]

    def abort(self, req: FakeReq) -> None:
        release_kv_cache(req, self.cache, checkpoint=False)
        del self.live[req.rid]

    def run(self, req: FakeReq) -> FakeReq:
        assert self.start(req)
        self.finish(req)
        return req

    def row(self, req: FakeReq) -> torch.Tensor:
        return self.req_to_token_pool.req_to_token[req.kv.req_pool_idx]

    def evict_all(self) -> int:
        return self.cache.evict(EvictParams(num_tokens=10**9)).num_tokens_evicted

    # -- the invariants
    def nodes(self):
        stack = list(self.cache.root_node.children.values())
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())

    def free_slots(self) -> list[int]:
        return self.allocator.free_pages.tolist() + self.allocator.release_pages.tolist()

    def check(self) -> None:
        tree_evictable = tree_protected = 0
        owners: dict[int, str] = {}

        def own(slot: int, who: str) -> None:
            assert slot not in owners, f"slot {slot} owned by {owners[slot]} and {who}"
            owners[slot] = who

        for node in self.nodes():
            kept = [int(s) for s in node.value.tolist() if s != 0]
            assert getattr(node, "fc_dropped", None) == len(node.value) - len(kept), node.key
            if node.lock_ref == 0:
                tree_evictable += len(kept)
            else:
                tree_protected += len(kept)
            for slot in kept:
                own(slot, f"tree node {node.id}")
        held = 0
        for rid, req in self.live.items():
            row = self.row(req)[req.kv.cache_protected_len:req.kv.kv_allocated_len]
            for slot in row.tolist():
                if slot != 0:
                    own(slot, f"request {rid}")
                    held += 1
        free = self.free_slots()
        assert 0 not in free, "the sentinel slot 0 was given to the allocator"
        for slot in free:
            own(slot, "allocator")
        assert set(owners) == set(range(1, self.pool_size + 1)), (
            f"leaked slots: {sorted(set(range(1, self.pool_size + 1)) - set(owners))[:10]}"
        )
        assert self.cache.evictable_size() == tree_evictable
        assert self.cache.protected_size() == tree_protected
        assert (self.allocator.available_size() + self.cache.evictable_size()
                + self.cache.protected_size() + held) == self.pool_size
        assert self.cache.total_size() == tree_evictable + tree_protected


def tokens(n: int, start: int = 1000) -> list[int]:
    return list(range(start, start + n))


def key(ids, extra_key=None) -> RadixKey:
    return RadixKey(array("q", ids), extra_key)


def value(ids) -> torch.Tensor:
    return torch.tensor(ids, dtype=torch.int64)


def simulated(mock_allocator=None) -> CompressedRadixCache:
    params = CacheInitParams(disable=False, req_to_token_pool=None,
                             token_to_kv_pool_allocator=mock_allocator, page_size=1)
    return CompressedRadixCache(params, FlashCacheConfig(retention=1.0), kv_pool=None)


# ================================================================= 1. upstream behaviours
class TestUpstreamBehaviour:
    """What SGLang's test_radix_cache_unit.py checks, on CompressedRadixCache with compression off."""

    def test_page_size_other_than_one_is_refused(self):
        params = CacheInitParams(disable=False, req_to_token_pool=None,
                                 token_to_kv_pool_allocator=None, page_size=4)
        with pytest.raises(ValueError, match="--page-size 1"):
            CompressedRadixCache(params, FlashCacheConfig(retention=1.0))

    def test_match_on_empty_tree(self):
        cache = simulated()
        result = cache.match_prefix(MatchPrefixParams(key=key([1, 2, 3])))
        assert result.device_prefix_len == 0
        assert result.last_device_node is cache.root_node
        assert cache.match_prefix(MatchPrefixParams(key=key([]))).device_prefix_len == 0
        assert (cache.total_size(), cache.evictable_size(), cache.protected_size()) == (0, 0, 0)

    def test_insert_and_match(self):
        cache = simulated()
        result = cache.insert(InsertParams(key=key([1, 2, 3]), value=value([10, 20, 30])))
        assert result.prefix_len == 0
        assert (cache.total_size(), cache.evictable_size()) == (3, 3)
        match = cache.match_prefix(MatchPrefixParams(key=key([1, 2, 3])))
        assert match.device_prefix_len == 3
        assert cache.path_device_indices(match.last_device_node).tolist() == [10, 20, 30]
        # Re-inserting the same key reports it all as prefix and adds nothing.
        assert cache.insert(InsertParams(key=key([1, 2, 3]), value=value([11, 21, 31]))).prefix_len == 3
        assert cache.total_size() == 3
        cache.insert(InsertParams(key=key([4, 5]), value=value([40, 50])))
        assert cache.total_size() == 5
        assert sorted(cache.all_values_flatten().tolist()) == [10, 20, 30, 40, 50]

    def test_partial_match_splits_a_node(self):
        cache = simulated()
        cache.insert(InsertParams(key=key([1, 2, 3, 4]), value=value([10, 20, 30, 40])))
        assert len(cache.root_node.children) == 1
        match = cache.match_prefix(MatchPrefixParams(key=key([1, 2, 9])))
        assert match.device_prefix_len == 2
        node = match.last_device_node
        assert node.value.tolist() == [10, 20]
        assert [child.value.tolist() for child in node.children.values()] == [[30, 40]]
        assert (cache.total_size(), cache.evictable_size()) == (4, 4)
        # A branch at the split point is a second child.
        cache.insert(InsertParams(key=key([1, 2, 7, 8, 9]), value=value([10, 20, 70, 80, 90])))
        assert len(node.children) == 2
        assert cache.total_size() == 7

    def test_extra_key_namespaces_are_disjoint(self):
        cache = simulated()
        cache.insert(InsertParams(key=key([1, 2, 3], "a"), value=value([10, 20, 30])))
        cache.insert(InsertParams(key=key([1, 2, 3], "b"), value=value([40, 50, 60])))
        cache.insert(InsertParams(key=key([1, 2, 3]), value=value([70, 80, 90])))
        for extra, expected in (("a", [10, 20, 30]), ("b", [40, 50, 60]), (None, [70, 80, 90])):
            match = cache.match_prefix(MatchPrefixParams(key=key([1, 2, 3], extra)))
            assert match.device_prefix_len == 3
            assert cache.path_device_indices(match.last_device_node).tolist() == expected
        assert cache.match_prefix(MatchPrefixParams(key=key([1, 2, 3], "c"))).device_prefix_len == 0
        assert cache.total_size() == 9

    def test_evict_frees_lru_leaves_and_counts(self):
        harness = Harness()
        cache, allocator = harness.cache, harness.allocator
        old = allocator.alloc(2)
        new = allocator.alloc(3)
        cache.insert(InsertParams(key=key([1, 2]), value=old.clone()))
        cache.insert(InsertParams(key=key([5, 6, 7]), value=new.clone()))
        cache.match_prefix(MatchPrefixParams(key=key([5, 6, 7])))  # touch: [1, 2] is now LRU
        available = allocator.available_size()
        result = cache.evict(EvictParams(num_tokens=1))
        assert result.num_tokens_evicted == 2
        assert allocator.available_size() == available + 2
        assert set(old.tolist()) <= set(harness.free_slots())
        assert cache.match_prefix(MatchPrefixParams(key=key([1, 2]))).device_prefix_len == 0
        assert cache.match_prefix(MatchPrefixParams(key=key([5, 6, 7]))).device_prefix_len == 3
        assert (cache.total_size(), cache.evictable_size()) == (3, 3)
        assert cache.evict(EvictParams(num_tokens=100)).num_tokens_evicted == 3
        assert allocator.available_size() == harness.start_available

    def test_evict_walks_up_to_parents(self):
        harness = Harness()
        cache, allocator = harness.cache, harness.allocator
        slots = allocator.alloc(6)
        cache.insert(InsertParams(key=key([1, 2, 3, 4]), value=slots[:4].clone()))
        cache.insert(InsertParams(key=key([1, 2, 8, 9]), value=torch.cat([slots[:2], slots[4:]])))
        assert cache.total_size() == 6
        assert cache.evict(EvictParams(num_tokens=6)).num_tokens_evicted == 6
        assert cache.root_node.children == {}
        assert allocator.available_size() == harness.start_available

    def test_lock_moves_sizes_and_locked_nodes_survive_eviction(self):
        harness = Harness()
        cache, allocator = harness.cache, harness.allocator
        cache.insert(InsertParams(key=key([1, 2, 3]), value=allocator.alloc(3)))
        cache.insert(InsertParams(key=key([1, 2, 3, 4, 5]), value=torch.cat(
            [cache.path_device_indices(cache.match_prefix(MatchPrefixParams(key=key([1, 2, 3]))).last_device_node),
             allocator.alloc(2)])))
        cache.insert(InsertParams(key=key([9, 9]), value=allocator.alloc(2)))
        node = cache.match_prefix(MatchPrefixParams(key=key([1, 2, 3]))).last_device_node
        assert (cache.evictable_size(), cache.protected_size()) == (7, 0)
        lock = cache.lock(node)
        assert (cache.evictable_size(), cache.protected_size()) == (4, 3)
        second = cache.lock(node)
        assert (cache.evictable_size(), cache.protected_size()) == (4, 3)
        assert cache.evict(EvictParams(num_tokens=100)).num_tokens_evicted == 4
        assert cache.match_prefix(MatchPrefixParams(key=key([1, 2, 3]))).device_prefix_len == 3
        assert (cache.evictable_size(), cache.protected_size()) == (0, 3)
        cache.unlock(second)
        assert (cache.evictable_size(), cache.protected_size()) == (0, 3)
        cache.unlock(lock)
        assert (cache.evictable_size(), cache.protected_size()) == (3, 0)
        assert cache.evict(EvictParams(num_tokens=100)).num_tokens_evicted == 3
        assert allocator.available_size() == harness.start_available

    def test_reset(self):
        cache = simulated()
        cache.insert(InsertParams(key=key([1, 2, 3]), value=value([10, 20, 30])))
        cache.lock(cache.match_prefix(MatchPrefixParams(key=key([1, 2]))).last_device_node)
        cache.reset()
        assert (cache.total_size(), cache.evictable_size(), cache.protected_size()) == (0, 0, 0)
        assert cache.dropped_total() == 0
        assert cache.match_prefix(MatchPrefixParams(key=key([1, 2, 3]))).device_prefix_len == 0

    def test_disabled_cache_holds_nothing(self):
        params = CacheInitParams(disable=True, req_to_token_pool=None,
                                 token_to_kv_pool_allocator=None, page_size=1)
        cache = CompressedRadixCache(params, FlashCacheConfig(retention=0.5))
        assert cache.insert(InsertParams(key=key([1, 2, 3]), value=value([1, 2, 3]))).prefix_len == 0
        assert cache.total_size() == 0
        assert cache.evict(EvictParams(num_tokens=5)).num_tokens_evicted == 0

    @pytest.mark.parametrize("with_kv_pool", [True, False], ids=["kv_pool", "no_kv_pool"])
    def test_request_lifecycle_equals_vanilla_radix_cache(self, with_kv_pool):
        """Same requests through CompressedRadixCache (retention 1) and SGLang's RadixCache."""
        ours = Harness(with_kv_pool=with_kv_pool)
        theirs = Harness()
        params = CacheInitParams(disable=False, req_to_token_pool=theirs.req_to_token_pool,
                                 token_to_kv_pool_allocator=theirs.allocator, page_size=1)
        theirs.cache = RadixCache(params)
        prompts = [tokens(40), tokens(30) + tokens(12, 7000), tokens(40) + tokens(5, 9000), tokens(17, 3000)]
        for index, prompt in enumerate(prompts):
            a, b = FakeReq(f"r{index}", prompt), FakeReq(f"r{index}", prompt)
            assert ours.start(a) and theirs.start(b)
            assert a.prefix_len == b.prefix_len
            assert ours.row(a).tolist() == theirs.row(b).tolist()
            ours.decode(a, 3)
            theirs.decode(b, 3)
            ours.finish(a)
            theirs.finish(b)
            ours.check()
            assert ours.cache.evictable_size() == theirs.cache.evictable_size()
            assert ours.allocator.available_size() == theirs.allocator.available_size()
            assert a.customized_info is None  # nothing compressed, nothing reported
        assert ours.evict_all() == theirs.cache.evict(EvictParams(num_tokens=10**9)).num_tokens_evicted
        assert ours.allocator.available_size() == ours.start_available


# ================================================================= 2. physical accounting
class TestPhysicalAccounting:
    def _tree_with_dropped_values(self):
        harness = Harness()
        cache, allocator = harness.cache, harness.allocator
        slots = allocator.alloc(8)
        compressed = slots.clone()
        dropped = compressed[[1, 2, 5]].clone()
        compressed[[1, 2, 5]] = 0
        allocator.free(dropped)  # as RowCompressor does: each dropped slot goes back once
        cache.insert(InsertParams(key=key(tokens(8)), value=compressed))
        return harness, compressed

    def test_insert_counts_kept_slots(self):
        harness, compressed = self._tree_with_dropped_values()
        cache = harness.cache
        assert (cache.evictable_size(), cache.protected_size()) == (5, 0)
        assert (cache.total_size(), cache.logical_size(), cache.dropped_total()) == (5, 8, 3)
        harness.check()

    def test_split_keeps_totals(self):
        harness, compressed = self._tree_with_dropped_values()
        cache = harness.cache
        match = cache.match_prefix(MatchPrefixParams(key=key(tokens(3) + [1])))
        assert match.device_prefix_len == 3  # logical length, sentinels included
        node = match.last_device_node
        assert (node.fc_dropped, next(iter(node.children.values())).fc_dropped) == (2, 1)
        assert (cache.evictable_size(), cache.dropped_total()) == (5, 3)
        harness.check()

    def test_lock_unlock_move_kept_slots(self):
        harness, compressed = self._tree_with_dropped_values()
        cache = harness.cache
        node = cache.match_prefix(MatchPrefixParams(key=key(tokens(3) + [1]))).last_device_node
        lock = cache.lock(node)  # [s0, 0, 0] protected, [s3, s4, 0, s6, s7] evictable
        assert (cache.evictable_size(), cache.protected_size()) == (4, 1)
        harness.check()
        cache.unlock(lock)
        assert (cache.evictable_size(), cache.protected_size()) == (5, 0)
        harness.check()

    def test_evict_counts_and_frees_physical_slots(self):
        harness, compressed = self._tree_with_dropped_values()
        cache, allocator = harness.cache, harness.allocator
        cache.match_prefix(MatchPrefixParams(key=key(tokens(3) + [1])))  # split 3 | 5
        before = allocator.available_size()
        result = cache.evict(EvictParams(num_tokens=1))  # the leaf: 4 kept of 5
        assert result.num_tokens_evicted == 4
        assert allocator.available_size() - before == 4
        assert (cache.evictable_size(), cache.dropped_total()) == (1, 2)
        harness.check()
        result = cache.evict(EvictParams(num_tokens=1))
        assert result.num_tokens_evicted == 1
        assert allocator.available_size() == harness.start_available
        assert (cache.evictable_size(), cache.total_size(), cache.dropped_total()) == (0, 0, 0)
        harness.check()

    def test_evict_of_a_fully_dropped_leaf_goes_on_to_free_enough(self):
        harness = Harness()
        cache, allocator = harness.cache, harness.allocator
        all_dropped = allocator.alloc(4)
        allocator.free(all_dropped.clone())
        cache.insert(InsertParams(key=key(tokens(4)), value=torch.zeros(4, dtype=torch.int64)))
        kept = allocator.alloc(3)
        cache.insert(InsertParams(key=key(tokens(3, 5000)), value=kept.clone()))
        cache.match_prefix(MatchPrefixParams(key=key(tokens(3, 5000))))  # all-dropped leaf is LRU
        result = cache.evict(EvictParams(num_tokens=2))
        assert result.num_tokens_evicted == 3  # 0 from the all-dropped leaf, then 3
        assert allocator.available_size() == harness.start_available
        assert cache.root_node.children == {}
        harness.check()

    def test_reset_clears_physical_counters(self):
        harness, _ = self._tree_with_dropped_values()
        cache = harness.cache
        cache.lock(cache.match_prefix(MatchPrefixParams(key=key(tokens(4)))).last_device_node)
        assert cache.protected_size() == 2 and cache.evictable_size() == 3
        cache.reset()
        assert (cache.evictable_size(), cache.protected_size(), cache.dropped_total()) == (0, 0, 0)
        # SGLang's flush clears the allocator together with the tree.
        harness.allocator.clear()
        assert harness.allocator.available_size() == harness.start_available


# ================================================================= 3. allocator invariant
class TestAllocatorInvariant:
    @pytest.mark.parametrize("need_sort", [False, True], ids=["free_pages", "release_pages"])
    def test_randomized_operations_keep_every_slot_owned_once(self, need_sort):
        rng = random.Random(1234)
        config = FlashCacheConfig(retention=0.5, gamma=0.2, candidates="auto", sink_tokens=4,
                                  recent_tokens=8, min_candidates=4)
        harness = Harness(config, pool_size=320, num_rows=6, max_context_len=128, seed=7,
                          need_sort=need_sort)
        base_prompts = [[rng.randrange(1, 400) for _ in range(60)] for _ in range(4)]
        counts = dict(start=0, oom=0, finish=0, abort=0, decode=0, flush=0, evict=0, chunk=0)
        next_rid = 0
        for step in range(300):
            op = rng.random()
            if op < 0.45 and len(harness.live) < 5:
                base = rng.choice(base_prompts)
                shared = rng.randrange(0, len(base) + 1)
                length = rng.randrange(max(2, shared), 90)
                prompt = base[:shared] + [rng.randrange(1, 400) for _ in range(length - shared)]
                retention = rng.choice([None, 1.0, 0.25, 0.5, 0.75])
                # Some requests carry a media span (auto mode compresses only that span).
                spans = [(6, min(40, length - 2))] if rng.random() < 0.3 and length > 20 else None
                req = FakeReq(f"r{next_rid}", prompt, retention=retention, multimodal_spans=spans)
                next_rid += 1
                if harness.start(req):
                    counts["start"] += 1
                    if rng.random() < 0.2 and len(prompt) > 20:
                        # A middle chunk of chunked prefill is checkpointed before the last one.
                        harness.cache.checkpoint(req, up_to=rng.randrange(1, len(prompt)))
                        counts["chunk"] += 1
                else:
                    counts["oom"] += 1
            elif op < 0.6 and harness.live:
                req = harness.live[rng.choice(sorted(harness.live))]
                if harness.decode(req, rng.randrange(1, 6)):
                    counts["decode"] += 1
            elif op < 0.85 and harness.live:
                harness.finish(harness.live[rng.choice(sorted(harness.live))])
                counts["finish"] += 1
            elif op < 0.93 and harness.live:
                harness.abort(harness.live[rng.choice(sorted(harness.live))])
                counts["abort"] += 1
            elif op < 0.97:
                harness.cache.evict(EvictParams(num_tokens=rng.randrange(1, 60)))
                counts["evict"] += 1
            elif not harness.live:
                harness.cache.reset()  # a flush: SGLang clears tree and allocator when idle
                harness.allocator.clear()
                counts["flush"] += 1
            harness.check()
        for req in list(harness.live.values()):
            harness.finish(req)
            harness.check()
        assert harness.cache.protected_size() == 0
        harness.evict_all()
        harness.check()
        assert harness.allocator.available_size() == harness.start_available
        assert harness.cache.dropped_total() == 0
        assert harness.cache.total_size() == 0
        # The run exercised every path, and compression really happened.
        assert min(counts[name] for name in ("start", "finish", "abort", "decode", "evict", "chunk")) > 0
        assert harness.cache.stats.requests_compressed > 10

    def test_evict_result_matches_slots_returned(self):
        config = FlashCacheConfig(retention=0.25, **TEXT)
        harness = Harness(config, seed=3)
        for index in range(4):
            harness.run(FakeReq(f"r{index}", tokens(40, 1000 * (index + 1)), retention=0.25))
            harness.check()
        assert harness.cache.dropped_total() > 0
        while harness.cache.evictable_size():
            before = harness.allocator.available_size()
            evictable = harness.cache.evictable_size()
            result = harness.cache.evict(EvictParams(num_tokens=5))
            freed = harness.allocator.available_size() - before
            assert result.num_tokens_evicted == freed
            assert freed >= min(5, evictable)
            assert harness.cache.evictable_size() == evictable - freed
            harness.check()
        assert harness.allocator.available_size() == harness.start_available

    def test_allocation_pressure_evicts_compressed_prefixes(self):
        """evict_to_free_tokens (SGLang's allocation path) gets its tokens from compressed leaves."""
        config = FlashCacheConfig(retention=0.25, **TEXT)
        harness = Harness(config, pool_size=100, seed=5)
        for index in range(6):  # 40 tokens each, 22 kept after compression
            assert harness.start(FakeReq(f"r{index}", tokens(40, 1000 * (index + 1)), retention=0.25))
            harness.finish(harness.live[f"r{index}"])
            harness.check()
        assert harness.allocator.available_size() < 40 + 22
        assert harness.cache.stats.requests_compressed == 6


# ================================================================= 4. compression correctness
def _expected_kept(retention: float, candidates: int) -> int:
    return int(round(retention * candidates))


class TestCompression:
    @pytest.mark.parametrize("prompt_len,retention", [(60, 0.25), (63, 0.5), (97, 0.2), (33, 0.75)])
    def test_text_mode_keeps_the_budget_and_frees_each_dropped_slot_once(self, prompt_len, retention):
        config = FlashCacheConfig(retention=retention, **TEXT)
        harness = Harness(config)
        req = FakeReq("a", tokens(prompt_len))
        assert harness.start(req)
        original = harness.row(req)[:prompt_len].clone()
        available = harness.allocator.available_size()
        harness.cache.checkpoint(req, up_to=prompt_len)
        row = harness.row(req)[:prompt_len]
        candidates = list(range(TEXT["sink_tokens"], prompt_len - TEXT["recent_tokens"]))
        kept = _expected_kept(retention, len(candidates))
        dropped = [p for p in candidates if row[p] == 0]
        assert len(candidates) - len(dropped) == kept
        non_candidates = [p for p in range(prompt_len) if p not in candidates]
        assert row[non_candidates].tolist() == original[non_candidates].tolist()
        kept_positions = [p for p in candidates if row[p] != 0]
        assert row[kept_positions].tolist() == original[kept_positions].tolist()
        assert harness.allocator.available_size() - available == len(dropped)
        free = harness.free_slots()
        for slot in original[dropped].tolist():
            assert free.count(slot) == 1
        # The tree holds the compressed row, logically whole.
        node = req.last_node
        assert harness.cache.path_device_indices(node).tolist() == row.tolist()
        assert (harness.cache.protected_size(), harness.cache.dropped_total()) == (prompt_len - len(dropped), len(dropped))
        info = req.customized_info["flashcache"][0]
        assert (info["candidate_tokens"], info["kept_tokens"], info["prompt_tokens"]) == (
            len(candidates), kept, prompt_len)
        harness.check()
        harness.finish(req)
        harness.check()
        assert harness.evict_all() == prompt_len - len(dropped)
        assert harness.allocator.available_size() == harness.start_available

    def test_multimodal_mode_drops_only_media_tokens(self):
        config = FlashCacheConfig(retention=0.5, candidates="auto", min_candidates=4)
        harness = Harness(config)
        spans = [(10, 30), (41, 55)]
        req = FakeReq("mm", tokens(70), multimodal_spans=spans)
        assert harness.start(req)
        original = harness.row(req)[:70].clone()
        harness.finish(req)
        row = harness.cache.path_device_indices(
            harness.cache.match_prefix(MatchPrefixParams(key=key(tokens(70), req.extra_key))).last_device_node)
        media = [p for begin, end in spans for p in range(begin, end)]
        text = [p for p in range(70) if p not in media]
        assert row[text].tolist() == original[text].tolist()
        assert int((row[media] != 0).sum()) == _expected_kept(0.5, len(media))
        assert int((row == 0).sum()) == len(media) - _expected_kept(0.5, len(media))
        harness.check()

    def test_too_few_candidates_are_left_alone(self):
        config = FlashCacheConfig(retention=0.25, candidates="text", sink_tokens=4, recent_tokens=8,
                                  min_candidates=16)
        harness = Harness(config)
        req = harness.run(FakeReq("short", tokens(25)))  # 13 candidates < 16
        assert harness.cache.dropped_total() == 0
        assert req.customized_info["flashcache"][0]["kept_tokens"] == 13
        harness.check()

    def test_prefix_owned_by_the_tree_is_never_touched(self):
        config = FlashCacheConfig(retention=0.25, **TEXT)
        harness = Harness(config)
        first = harness.run(FakeReq("a", tokens(60)))
        tree_row = harness.cache.path_device_indices(first.last_node).clone()
        second = FakeReq("b", tokens(30) + tokens(30, 8000))
        assert harness.start(second)
        assert second.kv.cache_protected_len == 30
        assert harness.row(second)[:30].tolist() == tree_row[:30].tolist()
        original = harness.row(second)[:60].clone()
        harness.cache.checkpoint(second, up_to=60)
        row = harness.row(second)[:60]
        assert row[:30].tolist() == tree_row[:30].tolist()
        candidates = list(range(30, 60 - TEXT["recent_tokens"]))
        assert int((row[candidates] != 0).sum()) == _expected_kept(0.25, len(candidates))
        assert row[52:].tolist() == original[52:].tolist()
        assert second.customized_info["flashcache"][0]["candidate_tokens"] == len(candidates)
        harness.check()
        harness.finish(second)
        harness.check()

    def test_second_checkpoint_does_not_compress_again(self):
        config = FlashCacheConfig(retention=0.25, **TEXT)
        harness = Harness(config)
        req = FakeReq("a", tokens(60))
        assert harness.start(req)
        harness.cache.checkpoint(req, up_to=60)  # prefill done, request goes on to decode
        after_first = harness.row(req)[:60].clone()
        available = harness.allocator.available_size()
        harness.decode(req, 4)
        harness.cache.checkpoint(req, up_to=64)
        assert harness.row(req)[:60].tolist() == after_first.tolist()
        assert harness.allocator.available_size() == available - 4
        assert harness.cache.stats.requests_compressed == 1
        harness.check()
        harness.finish(req)
        assert harness.cache.stats.requests_compressed == 1
        assert harness.cache.stats.candidate_tokens == 48
        harness.check()

    def test_chunked_prefill_publishes_only_after_the_candidate_span(self):
        config = FlashCacheConfig(retention=0.25, **TEXT)
        harness = Harness(config)
        req = FakeReq("a", tokens(60))
        assert harness.start(req, prefill_up_to=20)
        first_chunk = harness.row(req)[:20].clone()
        harness.cache.checkpoint(req, up_to=20)
        assert harness.cache.total_size() == 0 and harness.cache.logical_size() == 0
        assert req.kv.cache_protected_len == 0
        assert harness.row(req)[:20].tolist() == first_chunk.tolist()
        assert harness.cache.stats.requests_compressed == 0
        harness.check()
        harness.extend(req, 55)
        harness.cache.checkpoint(req, up_to=55)  # candidates end at 52, but the prompt does not
        assert harness.cache.logical_size() == 0
        assert int((harness.row(req)[:55] == 0).sum()) == 0
        harness.check()
        harness.extend(req, 60)
        harness.cache.checkpoint(req, up_to=60)
        assert req.kv.cache_protected_len == 60
        assert harness.cache.logical_size() == 60
        assert harness.cache.dropped_total() == 48 - _expected_kept(0.25, 48)
        harness.check()
        harness.finish(req)
        harness.check()

    @pytest.mark.parametrize("checkpoint", [False, True], ids=["abort", "release_with_checkpoint"])
    def test_release_mid_chunk_frees_the_whole_row(self, checkpoint):
        config = FlashCacheConfig(retention=0.25, **TEXT)
        harness = Harness(config)
        req = FakeReq("a", tokens(60))
        assert harness.start(req, prefill_up_to=20)
        harness.cache.checkpoint(req, up_to=20)
        harness.check()
        if checkpoint:
            harness.finish(req)  # checkpoint(up_to=20) again: still private, nothing published
        else:
            harness.abort(req)
        assert harness.cache.logical_size() == 0
        harness.check()
        assert harness.allocator.available_size() == harness.start_available
        assert harness.cache.stats.requests_compressed == 0

    def test_identical_prompts_share_one_compressed_prefix(self):
        """A request that computed the same prompt concurrently dedups onto the tree's copy."""
        config = FlashCacheConfig(retention=0.25, **TEXT)
        harness = Harness(config)
        first, second = FakeReq("a", tokens(60)), FakeReq("b", tokens(60))
        assert harness.start(first) and harness.start(second)  # both miss: tree is empty
        harness.finish(first)
        harness.check()
        harness.finish(second)
        harness.check()
        assert harness.cache.logical_size() == 60
        assert harness.evict_all() == 60 - (48 - _expected_kept(0.25, 48))
        assert harness.allocator.available_size() == harness.start_available


# ================================================================= 5. namespaces
class TestNamespaces:
    def test_different_retention_never_matches(self):
        config = FlashCacheConfig(retention=0.25, **TEXT)
        harness = Harness(config)
        harness.run(FakeReq("a", tokens(60)))  # server setting 0.25
        for retention in (0.5, 1.0):
            other = FakeReq(f"r{retention}", tokens(60), retention=retention)
            assert harness.match(other) == 0
        same = FakeReq("same", tokens(60), retention=0.25)
        assert harness.match(same) == 59
        harness.check()

    def test_retention_one_matches_vanilla_prefixes(self):
        harness = Harness(FlashCacheConfig(retention=1.0, **TEXT))
        harness.run(FakeReq("a", tokens(40)))
        vanilla = FakeReq("b", tokens(40))
        assert harness.match(vanilla) == 39
        assert vanilla.extra_key is None
        explicit = FakeReq("c", tokens(40), retention=1.0)
        assert harness.match(explicit) == 39
        compressed = FakeReq("d", tokens(40), retention=0.5)
        assert harness.match(compressed) == 0
        assert compressed.extra_key.startswith(upstream.NAMESPACE_MARK)

    def test_namespace_keeps_the_users_extra_key(self):
        harness = Harness(FlashCacheConfig(retention=0.25, **TEXT))
        harness.run(FakeReq("a", tokens(60), extra_key="lora-1"))
        assert harness.match(FakeReq("b", tokens(60), extra_key="lora-2")) == 0
        same = FakeReq("c", tokens(60), extra_key="lora-1")
        assert harness.match(same) == 59
        assert same.extra_key.endswith("|lora-1")
        # Idempotent: a second match (retraction, next round) keeps one namespace prefix.
        namespaced = same.extra_key
        harness.match(same)
        assert same.extra_key == namespaced

    def test_gamma_is_part_of_the_namespace(self):
        harness = Harness(FlashCacheConfig(retention=0.25, **TEXT))
        harness.run(FakeReq("a", tokens(60), flashcache={"gamma": 0.3}))
        assert harness.match(FakeReq("b", tokens(60))) == 0
        assert harness.match(FakeReq("c", tokens(60), flashcache={"gamma": 0.3})) == 59

    def test_bad_override_falls_back_to_the_server_settings(self):
        harness = Harness(FlashCacheConfig(retention=0.25, **TEXT))
        harness.run(FakeReq("a", tokens(60)))
        bad = FakeReq("b", tokens(60), flashcache={"retention": 7.0})
        assert harness.match(bad) == 59
        unknown = FakeReq("c", tokens(60), flashcache={"policy": "random"})
        assert harness.match(unknown) == 59


# ================================================================= 7. upstream contract
class TestUpstreamContract:
    def test_installed_sglang_passes(self):
        assert upstream.check_upstream() == []

    def test_a_missing_method_is_reported(self, monkeypatch):
        monkeypatch.delattr(RadixCache, "_split_node")
        assert upstream.check_upstream() == ["RadixCache._split_node is gone"]

    def test_a_changed_signature_is_reported(self, monkeypatch):
        def checkpoint(self, request, *, up_to):  # renamed parameter
            raise AssertionError

        monkeypatch.setattr(RadixCache, "checkpoint", checkpoint)
        problems = upstream.check_upstream()
        assert len(problems) == 1 and problems[0].startswith("RadixCache.checkpoint(")

    def test_require_upstream_raises_with_the_problem(self, monkeypatch):
        from sglang.srt.mem_cache.base_prefix_cache import BasePrefixCache

        assert "free_kv_row" not in vars(RadixCache)  # inherited: delete it where it lives
        monkeypatch.delattr(BasePrefixCache, "free_kv_row")
        with pytest.raises(RuntimeError, match="RadixCache.free_kv_row is gone"):
            upstream.require_upstream()

    def test_sentinel_filter_never_gives_slot_zero_back(self):
        harness = Harness()
        allocator = harness.allocator
        slots = allocator.alloc(3)
        allocator.free(torch.cat([slots[:1], torch.zeros(2, dtype=torch.int64), slots[1:]]))
        assert 0 not in harness.free_slots()
        assert allocator.available_size() == harness.start_available
        allocator.free(torch.zeros(4, dtype=torch.int64))
        assert allocator.available_size() == harness.start_available

    def test_sentinel_filter_in_a_free_group(self):
        harness = Harness()
        allocator = harness.allocator
        slots = allocator.alloc(4)
        allocator.free_group_begin()
        allocator.free(torch.cat([torch.zeros(1, dtype=torch.int64), slots[:2]]))
        allocator.free(torch.cat([slots[2:], torch.zeros(3, dtype=torch.int64)]))
        assert allocator.available_size() == harness.start_available - 4
        allocator.free_group_end()
        assert 0 not in harness.free_slots()
        assert allocator.available_size() == harness.start_available

    def test_debug_mode_catches_a_double_free(self):
        harness = Harness()
        slots = harness.allocator.alloc(2)
        harness.allocator.free(slots.clone())
        with pytest.raises(RuntimeError, match="double free"):
            harness.allocator.free(slots[:1].clone())
        with pytest.raises(RuntimeError, match="double free"):
            harness.allocator.free(torch.tensor([7, 7], dtype=torch.int64))


# ================================================================= 8. memory cap (streams)
# ================================================================= 8. stream memories
class TestStreamMemory:
    """Stream memories in the tree: append-only ingest, questions off a version, re-basing.

    KV is written as the model would: the key of token ``t`` at position ``p`` is its pre-RoPE key
    rotated to ``p``; so after every append the kept keys must equal the pre-RoPE keys rotated to
    the version's (re-based, contiguous) positions, and values must be untouched.
    """

    CHUNK, CAP = 20, 48
    HEADER = tokens(6, 100)

    @staticmethod
    def spec():
        from flashcache_sglang.kernels.rotary import RotarySpec

        return RotarySpec.default_rope(HEAD_DIM, 100.0, 4096)

    def harness(self, pool_size=600, **config):
        from flashcache_sglang.kernels.rotary import apply_rotary_reference

        spec = self.spec()
        settings = dict(retention=0.5, candidates="text", min_candidates=4)
        settings.update(config)
        harness = Harness(FlashCacheConfig(**settings), pool_size=pool_size, max_context_len=512,
                          rotary=lambda: spec)
        harness.pre_rope = {}

        def vectors(token: int):
            if token not in harness.pre_rope:
                generator = torch.Generator().manual_seed(token)
                harness.pre_rope[token] = (torch.randn(NUM_LAYERS, NUM_KV_HEADS, HEAD_DIM, generator=generator),
                                           torch.randn(NUM_LAYERS, NUM_KV_HEADS, HEAD_DIM, generator=generator))
            return harness.pre_rope[token]

        def writer(h, req, slots, start):
            for offset, slot in enumerate(slots.tolist()):
                position = start + offset
                key, value = vectors(int(req.origin_input_ids[position]))
                for layer in range(NUM_LAYERS):
                    rotated = apply_rotary_reference(key[layer][None], torch.tensor([position]), spec)[0]
                    h.kv_pool.k_buffer[layer][slot] = rotated
                    h.kv_pool.v_buffer[layer][slot] = value[layer]

        harness.kv_writer = writer
        harness.vectors = vectors
        return harness

    @staticmethod
    def request(rid, ids, **stream):
        stream.setdefault("id", "cam")
        return FakeReq(rid, ids, flashcache={"stream": stream})

    def create(self, harness, req):
        harness.cache.on_request_created(req)
        return req

    def append(self, harness, index, **stream):
        ids = (self.HEADER if index == 0 else []) + tokens(self.CHUNK, 10_000 + 100 * index)
        stream = {"op": "append", "cap_tokens": self.CAP, "chunk": index, "time_s": float(index), **stream}
        if index == 0:
            stream["start"] = True
        req = self.create(harness, self.request(f"append-{index}", ids, **stream))
        assert req.to_finish is None, req.to_finish
        assert harness.start(req)
        harness.finish(req)
        return req

    def current(self, harness, stream_id="cam"):
        return harness.cache.streams.streams[stream_id].current

    def check_version(self, harness, version):
        from flashcache_sglang.kernels.rotary import apply_rotary_reference

        slots = harness.cache.path_device_indices(version.node).long()
        assert slots.numel() == version.length and bool((slots != 0).all())
        assert torch.equal(version.positions, torch.arange(version.length))  # contiguous
        for index, (token, slot) in enumerate(zip(version.token_ids.tolist(), slots.tolist())):
            key, value = harness.vectors(token)
            for layer in range(NUM_LAYERS):
                expected = apply_rotary_reference(key[layer][None], torch.tensor([index]), self.spec())[0]
                torch.testing.assert_close(harness.kv_pool.k_buffer[layer][slot], expected, rtol=1e-4, atol=1e-4)
                assert torch.equal(harness.kv_pool.v_buffer[layer][slot], value[layer])

    def test_appends_stay_under_the_cap_with_exact_rebased_keys(self):
        harness = self.harness()
        for index in range(8):
            previous = self.current(harness).length if index else 0
            req = self.append(harness, index)
            assert req.prefix_len == max(previous, 0)  # the whole memory was cached, only the chunk computed
            version = self.current(harness)
            assert version.number == index + 1
            candidates = int(version.candidate_mask().sum())
            assert candidates <= self.CAP
            assert version.token_ids[:len(self.HEADER) + self.CHUNK].tolist() == \
                self.HEADER + tokens(self.CHUNK, 10_000)  # header and sink chunk intact
            report = req.customized_info["flashcache"][0]["stream"]
            assert report["memory_tokens"] == version.length and report["capped_kv_slots"] == candidates
            self.check_version(harness, version)
            harness.check()
        # Only the current version remains in the tree, locked.
        assert harness.cache.protected_size() == self.current(harness).length
        assert harness.cache.close_stream("cam")
        harness.check()
        harness.evict_all()
        assert harness.allocator.available_size() == harness.start_available

    def test_every_chunk_keeps_a_footprint(self):
        harness = self.harness(pool_size=900)
        for index in range(30):
            self.append(harness, index, footprint_s=2.0, cap_tokens=40)
        footprint = self.current(harness).footprint()
        # 30 chunks, one every second, segments of 2 s: at most 10 segments fit the floor (cap / 4),
        # so segments widen to 4 s: every 4-second window keeps a token.
        for window in range(0, 30, 4):
            assert any(footprint.get(chunk, 0) for chunk in range(window, window + 4)), (window, footprint)
        harness.check()

    def test_a_question_reads_its_version_while_appends_replace_it(self):
        harness = self.harness()
        for index in range(3):
            self.append(harness, index)
        version = self.current(harness)
        question = self.create(harness, self.request("ask-1", tokens(5, 7000), op="ask"))
        assert question.origin_input_ids.tolist() == version.token_ids.tolist() + tokens(5, 7000)
        assert harness.start(question)
        assert question.prefix_len == version.length  # the whole memory is cached
        held = harness.row(question)[:version.length].clone().long()
        for index in range(3, 6):
            self.append(harness, index)
        # The question's version is still in the tree, untouched and allocated.
        assert not set(held.tolist()) & set(harness.free_slots())
        self.check_version(harness, version)
        harness.check()
        harness.finish(question)  # its branch joins the old version, which is then deleted
        harness.check()
        assert version.node is None and version.lock is None
        assert harness.cache.protected_size() == self.current(harness).length

    def test_an_unread_memory_moves_in_place_and_a_read_one_is_copied(self):
        harness = self.harness()
        for index in range(4):
            req = self.append(harness, index)
            if index:
                assert req.customized_info["flashcache"][0]["stream"]["moved_in_place"] is True
            # Moving in place allocates nothing: the pool holds exactly the current version.
            assert harness.start_available - harness.allocator.available_size() == self.current(harness).length
        version = self.current(harness)
        question = self.create(harness, self.request("ask-1", tokens(5, 7000), op="ask"))
        assert harness.start(question)
        req = self.append(harness, 4)
        assert req.customized_info["flashcache"][0]["stream"]["moved_in_place"] is False
        self.check_version(harness, version)  # the question's version is untouched
        self.check_version(harness, self.current(harness))
        harness.finish(question)
        harness.check()
        assert harness.start_available - harness.allocator.available_size() == self.current(harness).length

    def test_no_slots_for_a_copy_is_a_retryable_error_that_changes_nothing(self, monkeypatch):
        harness = self.harness()
        for index in range(3):
            self.append(harness, index)
        version = self.current(harness)
        question = self.create(harness, self.request("ask-1", tokens(5, 7000), op="ask"))
        assert harness.start(question)
        monkeypatch.setattr(harness.cache, "_allocate", lambda count: None)
        req = self.append(harness, 3)
        report = req.customized_info["flashcache"][0]["stream"]
        assert report["retryable"] is True and "no free KV slots" in report["error"]
        assert self.current(harness) is version and report["version"] == version.number
        self.check_version(harness, version)
        monkeypatch.undo()
        harness.finish(question)
        harness.check()
        again = self.append(harness, 3)  # the client's retry lands once the question is done
        assert "error" not in again.customized_info["flashcache"][0]["stream"]
        assert self.current(harness).number == version.number + 1
        harness.check()
        assert harness.cache.close_stream("cam")
        harness.evict_all()
        assert harness.allocator.available_size() == harness.start_available

    def test_errors_are_named_and_leave_nothing_behind(self):
        harness = self.harness()
        lost = self.create(harness, self.request("a", tokens(3), op="append"))
        assert lost.to_finish[0] == 404 and "unknown stream memory 'cam'" in lost.to_finish[1]
        bad = self.create(harness, FakeReq("b", tokens(3), flashcache={"stream": {"id": "cam", "op": "fly"}}))
        assert bad.to_finish[0] == 400 and "stream.op='fly'" in bad.to_finish[1]
        worse = self.create(harness, FakeReq("c", tokens(3), retention=2))
        assert worse.to_finish[0] == 400 and "retention=2" in worse.to_finish[1]
        self.append(harness, 0)
        first = self.create(harness, self.request("d", tokens(4, 9000), op="append"))
        second = self.create(harness, self.request("e", tokens(4, 9100), op="append"))
        assert first.to_finish is None and second.to_finish[0] == 409
        harness.cache.release_aborted_request(SimpleHandle("d"))
        harness.check()
        assert not harness.cache.streams.requests

    def test_flush_forgets_memories_and_frees_every_slot(self):
        harness = self.harness()
        for index in range(3):
            self.append(harness, index)
        harness.cache.reset()
        assert not harness.cache.streams.streams
        assert harness.allocator.available_size() == harness.start_available
        lost = self.create(harness, self.request("x", tokens(2), op="ask"))
        assert lost.to_finish[0] == 404


class SimpleHandle:
    def __init__(self, rid: str) -> None:
        self.rid = rid
        self.attempt_id = 0


# ================================================================= 9. host synchronisations
class HostReadCounter(torch.Tensor):
    """A tensor that counts what would make a CUDA device synchronise with the host: reading
    values (item, tolist, bool/int/float, numpy, cpu) and data-dependent shapes (boolean-mask
    indexing, nonzero, unique). Every op on it returns a counted tensor too."""

    reads: list = []
    _READS = {"item", "tolist", "__bool__", "__int__", "__float__", "numpy", "cpu", "nonzero", "masked_select",
              "unique", "argwhere", "any", "all"}

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in cls._READS and name not in ("any", "all"):
            cls.reads.append(name)
        if name in ("__getitem__", "__setitem__") and len(args) > 1:
            index = args[1] if isinstance(args[1], tuple) else (args[1],)
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in index):
                cls.reads.append("boolean mask " + name)
        return super().__torch_function__(func, types, args, kwargs or {})


class TestHostSyncs:
    """Compression reads nothing back from the device until the request's report (one read)."""

    @pytest.fixture(autouse=True)
    def _no_debug_checks(self, monkeypatch):
        monkeypatch.delenv("FLASHCACHE_DEBUG")  # its double-free checks read the allocator back on purpose

    def harness(self):
        harness = Harness(FlashCacheConfig(retention=0.25, candidates="text", sink_tokens=2, recent_tokens=2,
                                           min_candidates=4), pool_size=256)
        pool = harness.kv_pool
        pool.k_buffer = [b.as_subclass(HostReadCounter) for b in pool.k_buffer]
        pool.v_buffer = [b.as_subclass(HostReadCounter) for b in pool.v_buffer]
        harness.req_to_token_pool.req_to_token = harness.req_to_token_pool.req_to_token.as_subclass(HostReadCounter)
        return harness

    def test_the_compression_pipeline_reads_nothing_back(self):
        harness = self.harness()
        req = FakeReq("a", tokens(60))
        assert harness.start(req)
        row = harness.row(req)
        positions = torch.arange(2, 58)
        HostReadCounter.reads = []
        result = harness.cache.compressor.compress(row, positions, harness.config)
        assert HostReadCounter.reads == [], HostReadCounter.reads
        assert result.num_kept == 14 and int((row[:60] == 0).sum()) == 42
        harness.abort(req)  # (finishing would compress it a second time through checkpoint)
        harness.check()

    def test_a_compressed_request_reads_back_once(self):
        harness = self.harness()
        req = FakeReq("a", tokens(60))
        assert harness.start(req)
        HostReadCounter.reads = []
        assert harness.cache._maybe_compress(req, 60)
        assert HostReadCounter.reads == ["tolist"], HostReadCounter.reads  # the report's two counts
        harness.finish(req)
        harness.check()


# ================================================================= 10. FP8 KV pools
class TestFP8Pool:
    """SGLang's own FP8 KV pool (uint8 storage, float8 views): compression scores the FP8 pool,
    a stream append copies and re-rotates FP8 keys, and every slot is accounted for."""

    def harness(self, dtype=torch.float8_e4m3fn):
        from flashcache_sglang.kernels.rotary import RotarySpec

        spec = RotarySpec.default_rope(HEAD_DIM, 100.0, 4096)
        harness = Harness(FlashCacheConfig(retention=0.5, candidates="text", sink_tokens=2, recent_tokens=2,
                                           min_candidates=4), pool_size=300, rotary=lambda: spec)
        harness.kv_pool = MHATokenToKVPool(300, 1, dtype, NUM_KV_HEADS, HEAD_DIM, NUM_LAYERS, "cpu", False)
        harness.cache.compressor.kv_pool = harness.kv_pool

        def write_through_views(h, req, slots, start):  # as SGLang's set_kv_buffer stores FP8
            for layer in range(NUM_LAYERS):
                shape = (slots.numel(), NUM_KV_HEADS, HEAD_DIM)
                h.kv_pool.get_key_buffer(layer)[slots] = torch.randn(shape, generator=h.generator).to(dtype)
                h.kv_pool.get_value_buffer(layer)[slots] = torch.randn(shape, generator=h.generator).to(dtype)

        harness.kv_writer = write_through_views
        return harness, spec

    def test_fp8_pool_is_stored_as_bytes_and_compressed(self):
        harness, _ = self.harness()
        assert harness.kv_pool.k_buffer[0].dtype == torch.uint8  # SGLang's storage for FP8
        assert harness.kv_pool.get_key_buffer(0).dtype == torch.float8_e4m3fn
        req = FakeReq("a", tokens(40))
        assert harness.start(req)
        harness.finish(req)
        assert harness.cache.stats.requests_compressed == 1
        assert int((harness.cache.path_device_indices(req.last_node) == 0).sum()) == 18  # half of 36 candidates
        harness.check()

    def test_fp8_stream_append_copies_and_rerotates(self):
        from flashcache_sglang.kernels.rotary import apply_rotary_reference

        harness, spec = self.harness()
        pre = {}

        def writer(h, req, slots, start):
            for offset, slot in enumerate(slots.tolist()):
                token, position = int(req.origin_input_ids[start + offset]), start + offset
                generator = torch.Generator().manual_seed(token)
                key = torch.randn(NUM_LAYERS, NUM_KV_HEADS, HEAD_DIM, generator=generator)
                pre[token] = key
                for layer in range(NUM_LAYERS):
                    rotated = apply_rotary_reference(key[layer][None], torch.tensor([position]), spec)[0]
                    h.kv_pool.get_key_buffer(layer)[slot] = rotated.to(torch.float8_e4m3fn)
                    h.kv_pool.get_value_buffer(layer)[slot] = key[layer].to(torch.float8_e4m3fn)

        harness.kv_writer = writer
        for index in range(4):
            ids = (tokens(4, 100) if index == 0 else []) + tokens(16, 10_000 + 100 * index)
            stream = {"id": "cam", "op": "append", "cap_tokens": 20, "chunk": index}
            if index == 0:
                stream["start"] = True
            req = FakeReq(f"append-{index}", ids, flashcache={"stream": stream})
            harness.cache.on_request_created(req)
            assert req.to_finish is None and harness.start(req)
            harness.finish(req)
            harness.check()
        version = harness.cache.streams.streams["cam"].current
        slots = harness.cache.path_device_indices(version.node).long()
        assert int(version.candidate_mask().sum()) <= 20
        for index, (token, slot) in enumerate(zip(version.token_ids.tolist(), slots.tolist())):
            for layer in range(NUM_LAYERS):
                expected = apply_rotary_reference(pre[token][layer][None], torch.tensor([index]), spec)[0]
                got = harness.kv_pool.get_key_buffer(layer)[slot].float()
                # Two FP8 roundings (stored at its old position, again after re-rotation).
                torch.testing.assert_close(got, expected, rtol=0.15, atol=0.15)
        harness.cache.close_stream("cam")
        harness.evict_all()
        assert harness.allocator.available_size() == harness.start_available
