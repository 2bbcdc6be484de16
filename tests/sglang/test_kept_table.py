"""The kept-KV table against a per-step rebuild, over randomized scheduling with SGLang's real pools.

The reference (here, not in the product) is what the old per-forward path computed: for every
request of a batch, ``req_to_token[row, :seq_len]`` without its sentinel entries. The table must
equal it at every forward, whatever happened between forwards: new requests adopting
compressed prefixes from the tree (node splits), chunked prefill, decode, compression and memory
caps editing rows, finishes, aborts, evictions and cache flushes, in both the plain order and the
overlap order (batch N+1 prepared before batch N's result is processed).

Requests are driven through the same Harness as test_compressed_radix_cache.py (SGLang's real
ReqToTokenPool, TokenToKVPoolAllocator, MHATokenToKVPool, release path, and flashcache's
CompressedRadixCache), and every forward goes through PhysicalKVAttention around SGLang's real
TorchNativeAttnBackend with real ForwardBatch objects.

Host syncs are counted by patching torch.Tensor's device->host conversions (item, tolist, cpu,
numpy, __bool__, __int__, __float__, __index__) for every tensor but the batch's own host
tensors: a decode step makes none, an extend forward exactly one.
"""

from __future__ import annotations

import collections
import contextlib
import importlib.util
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend
from sglang.srt.model_executor.forward_batch_info import ForwardBatch, ForwardMode

from flashcache_sglang import plugin
from flashcache_sglang.attention import PhysicalKVAttention
from flashcache_sglang.config import FlashCacheConfig
from flashcache_sglang.kept_table import KeptKVTable

_spec = importlib.util.spec_from_file_location(
    "_flashcache_radix_harness", Path(__file__).with_name("test_compressed_radix_cache.py"))
_harness = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_harness)
FakeReq, Harness = _harness.FakeReq, _harness.Harness


@pytest.fixture(scope="module", autouse=True)
def _sglang_runtime_context():
    from sglang.srt.runtime_context import get_context

    override = get_context().override_server_args()
    override.install()
    yield
    override.restore()


# ------------------------------------------------------------------ the reference
def reference_row(req_to_token: torch.Tensor, row: int, length: int) -> list[int]:
    """What attention must read for a request: its kept slots, in position order."""
    logical = req_to_token[row, :length]
    return logical[logical != 0].tolist()


# ------------------------------------------------------------------ host-sync counting
_HOST_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")


@contextlib.contextmanager
def count_host_reads(host_tensors=()):
    """Count device->host conversions on any tensor except ``host_tensors`` (already on the host)."""
    allowed = {id(t) for t in host_tensors if t is not None}
    counts: collections.Counter = collections.Counter()
    saved = {name: getattr(torch.Tensor, name) for name in _HOST_READS}

    def counting(name, original):
        def method(self, *args, **kwargs):
            if id(self) not in allowed:
                counts[name] += 1
            return original(self, *args, **kwargs)
        return method

    for name, original in saved.items():
        setattr(torch.Tensor, name, counting(name, original))
    try:
        yield counts
    finally:
        for name, original in saved.items():
            setattr(torch.Tensor, name, original)


# ------------------------------------------------------------------ batches
def extend_batch(entries) -> ForwardBatch:
    """entries: (row, prefix_len, seq_len, out_cache_loc [n] int64)."""
    rows = torch.tensor([e[0] for e in entries], dtype=torch.int64)
    prefix = torch.tensor([e[1] for e in entries], dtype=torch.int64)
    seq_lens = torch.tensor([e[2] for e in entries], dtype=torch.int64)
    extend = seq_lens - prefix
    out_cache_loc = torch.cat([e[3] for e in entries])
    return ForwardBatch(
        forward_mode=ForwardMode.EXTEND, batch_size=len(entries), input_ids=torch.zeros_like(out_cache_loc),
        req_pool_indices=rows.clone(), seq_lens=seq_lens, out_cache_loc=out_cache_loc,
        seq_lens_sum=int(seq_lens.sum()), seq_lens_cpu=seq_lens.clone(), req_pool_indices_cpu=rows,
        extend_prefix_lens=prefix, extend_seq_lens=extend, extend_prefix_lens_cpu=prefix.tolist(),
        extend_seq_lens_cpu=extend.tolist(), extend_num_tokens=int(extend.sum()),
    )


def decode_batch(entries, table: KeptKVTable, pool) -> ForwardBatch:
    """entries: (row, seq_len, slot). Notes the host rows as plugin's init_new hook does."""
    rows = torch.tensor([e[0] for e in entries], dtype=torch.int64)
    seq_lens = torch.tensor([e[1] for e in entries], dtype=torch.int64)
    out_cache_loc = torch.tensor([e[2] for e in entries], dtype=torch.int64)
    batch = ForwardBatch(
        forward_mode=ForwardMode.DECODE, batch_size=len(entries), input_ids=torch.zeros_like(rows),
        req_pool_indices=rows.clone(), seq_lens=seq_lens, out_cache_loc=out_cache_loc,
        seq_lens_sum=int(seq_lens.sum()), seq_lens_cpu=seq_lens.clone(),
    )
    plugin._note_forward_rows(batch, SimpleNamespace(req_pool_indices_cpu=rows),
                              SimpleNamespace(req_to_token_pool=pool))
    return batch


# ------------------------------------------------------------------ the randomized scheduler
class Scheduler:
    """A small scheduler over the Harness: extend / decode batches, results processed later."""

    def __init__(self, harness: Harness, rng: random.Random, overlap: bool) -> None:
        self.harness = harness
        self.rng = rng
        self.overlap = overlap
        self.pool = harness.req_to_token_pool
        backend = TorchNativeAttnBackend(SimpleNamespace(device="cpu", req_to_token_pool=self.pool,
                                                         token_to_kv_pool=harness.kv_pool))
        self.wrapper = PhysicalKVAttention(backend)
        self.table = self.wrapper.table
        self.table.debug = False  # its self-checks read back from the device; the test checks more
        self.waiting: list[FakeReq] = []
        self.prefilling: dict[str, int] = {}   # rid -> end of the part prefilled so far
        self.chunk_ready: set[str] = set()     # rid whose previous chunk's result was processed
        self.decoding: set[str] = set()        # rid that may decode (prefill forward done)
        self.counts = collections.Counter()
        self.decode_syncs: list[int] = []
        self.extend_syncs: list[int] = []

    # -- scheduling (writes rows, like SGLang's prepare_for_extend / prepare_for_decode)
    def schedule(self):
        h = self.harness
        ready_chunks = [rid for rid in self.chunk_ready if rid in h.live]
        if (self.waiting or ready_chunks) and (not self.decoding or self.rng.random() < 0.5):
            entries, done = [], []
            for rid in sorted(ready_chunks)[:2]:
                req = h.live[rid]
                start = self.prefilling[rid]
                end = min(len(req.origin_input_ids), start + self.rng.randrange(8, 40))
                if h.allocator.available_size() + h.cache.evictable_size() < end - start:
                    continue  # no room for this chunk now
                h.extend(req, end)
                self.chunk_ready.discard(rid)
                entries.append((req, start, end))
            while self.waiting and len(entries) < 3 and self.pool.available_size() > 0:
                req = self.waiting.pop(0)
                first = None
                if len(req.origin_input_ids) > 30 and self.rng.random() < 0.4:
                    matched = h.match(req)  # what start() will adopt; a chunk starts after it
                    if matched + 2 < len(req.origin_input_ids):
                        first = self.rng.randrange(matched + 1, len(req.origin_input_ids) - 1)
                if not h.start(req, prefill_up_to=first):
                    self.counts["oom"] += 1
                    continue
                entries.append((req, req.prefix_len, req.kv.kv_allocated_len))
            if not entries:
                return None
            for req, start, end in entries:
                self.prefilling[req.rid] = end
            return ("extend", entries)
        entries = []
        for rid in sorted(self.decoding):
            req = h.live.get(rid)
            if req is None or req.kv.kv_allocated_len >= self.pool.req_to_token.shape[1] or not h.decode(req, 1):
                continue
            entries.append(req)
        return ("decode", entries) if entries else None

    # -- the forward: metadata through the wrapper, then the checks
    def forward(self, batch) -> None:
        kind, entries = batch
        table = self.pool.req_to_token
        if kind == "extend":
            forward_batch = extend_batch([
                (req.kv.req_pool_idx, start, end, table[req.kv.req_pool_idx, start:end].to(torch.int64))
                for req, start, end in entries])
            lengths = [end for _, _, end in entries]
        else:
            forward_batch = decode_batch([
                (req.kv.req_pool_idx, req.kv.kv_allocated_len, int(table[req.kv.req_pool_idx, req.kv.kv_allocated_len - 1]))
                for req in entries], self.table, self.pool)
            lengths = [req.kv.kv_allocated_len for req in entries]
        with count_host_reads([forward_batch.seq_lens_cpu, forward_batch.req_pool_indices_cpu]) as counts:
            self.wrapper.init_forward_metadata(forward_batch)
        (self.extend_syncs if kind == "extend" else self.decode_syncs).append(sum(counts.values()))
        view = self.wrapper._physical
        for lane, (row, length) in enumerate(zip(forward_batch.req_pool_indices.tolist(), lengths)):
            expected = reference_row(table, row, length)
            assert self.table.physical[row, :len(expected)].tolist() == expected, (kind, row)
            assert int(view.seq_lens[lane]) == len(expected)
            assert int(view.seq_lens_cpu[lane]) == len(expected)
            if kind == "extend":
                start = entries[lane][1]
                assert int(view.extend_prefix_lens[lane]) == len(reference_row(table, row, start))
                assert view.extend_prefix_lens_cpu[lane] == len(reference_row(table, row, start))
        assert view.seq_lens_sum == int(view.seq_lens.sum())
        self.counts[kind] += 1

    # -- processing a batch's result (compression happens here, in the cache's checkpoint)
    def process(self, batch) -> None:
        h = self.harness
        kind, entries = batch
        if kind == "extend":
            for req, _, end in entries:
                if req.rid not in h.live:
                    continue
                if end < len(req.origin_input_ids):
                    h.cache.checkpoint(req, up_to=end)  # a middle chunk: nothing is published yet
                    self.chunk_ready.add(req.rid)
                    self.counts["chunk"] += 1
                else:
                    h.cache.checkpoint(req, up_to=len(req.origin_input_ids))
                    self.decoding.add(req.rid)
        else:
            for req in entries:
                if req.rid not in h.live:
                    continue
                roll = self.rng.random()
                if roll < 0.12:
                    self._drop(req)
                    h.finish(req)
                    self.counts["finish"] += 1
                elif roll < 0.16:
                    self._drop(req)
                    h.abort(req)
                    self.counts["abort"] += 1
        # Overlap: the batch prepared before this result may have decoded a request that has
        # just finished; SGLang discards that result, as the next schedule does here.
        self.check_host_mirror()

    def _drop(self, req) -> None:
        self.decoding.discard(req.rid)
        self.prefilling.pop(req.rid, None)
        self.chunk_ready.discard(req.rid)

    def check_host_mirror(self) -> None:
        for req in self.harness.live.values():
            row = req.kv.req_pool_idx
            logical = self.pool.req_to_token[row, :req.kv.kv_allocated_len]
            if req.rid in self.decoding or req.rid in self.chunk_ready:
                assert self.table.dropped_host[row] == int((logical == 0).sum()), req.rid


def _new_request(rng: random.Random, index: int, bases) -> FakeReq:
    base = rng.choice(bases)
    shared = rng.randrange(0, len(base) + 1)
    length = rng.randrange(max(12, shared), 80)
    prompt = base[:shared] + [rng.randrange(1, 400) for _ in range(length - shared)]
    if rng.random() < 0.15 and length > 30:
        # A multimodal request in an explicit namespace: only its media spans are candidates.
        return FakeReq(f"r{index}", prompt, multimodal_spans=[(4, 14), (16, 28)],
                       flashcache={"retention": 0.5, "namespace": "media/a"})
    return FakeReq(f"r{index}", prompt, retention=rng.choice([None, None, 1.0, 0.25, 0.5]))


@pytest.mark.parametrize("overlap", [False, True], ids=["in_order", "overlap"])
@pytest.mark.parametrize("seed", [3, 11])
def test_table_equals_the_per_step_rebuild(seed, overlap, monkeypatch):
    monkeypatch.setenv("FLASHCACHE_DEBUG", "1")  # also: sentinel double-free checks, table self-checks
    rng = random.Random(seed)
    config = FlashCacheConfig(retention=0.5, candidates="auto", sink_tokens=2, recent_tokens=4, min_candidates=4)
    harness = Harness(config, pool_size=700, num_rows=8, max_context_len=160, seed=seed)
    scheduler = Scheduler(harness, rng, overlap)
    bases = [[rng.randrange(1, 400) for _ in range(50)] for _ in range(3)]
    pending = None
    for step in range(260):
        if not overlap and pending is not None:
            scheduler.process(pending)
            pending = None
        batch = scheduler.schedule()
        if batch is not None:
            scheduler.forward(batch)
        if overlap and pending is not None:
            scheduler.process(pending)
        pending = batch
        if rng.random() < 0.35 and len(scheduler.waiting) < 3:
            scheduler.waiting.append(_new_request(rng, step, bases))
        if rng.random() < 0.05:
            harness.cache.evict(_harness.EvictParams(num_tokens=rng.randrange(1, 80)))
            scheduler.counts["evict"] += 1
        if not harness.live and not scheduler.waiting and rng.random() < 0.3:
            harness.cache.reset()
            harness.allocator.clear()
            scheduler.counts["flush"] += 1
        harness.check()
    if pending is not None:
        scheduler.process(pending)
    for req in list(harness.live.values()):
        harness.finish(req)
    harness.check()
    # Every path ran, compression really edited rows, and the sync counts are what we state.
    counts = scheduler.counts
    assert min(counts[k] for k in ("extend", "decode", "chunk", "finish", "evict")) > 0, counts
    assert harness.cache.stats.requests_compressed > 5
    assert set(scheduler.decode_syncs) == {0}, "a decode step read something back from the device"
    # Exactly one device->host copy per extend forward, none before anything was ever dropped.
    first = next(i for i, n in enumerate(scheduler.extend_syncs) if n)
    assert set(scheduler.extend_syncs[:first]) == {0} and set(scheduler.extend_syncs[first:]) == {1}


# ------------------------------------------------------------------ the table's own contract
def test_extends_read_nothing_back_until_something_was_dropped():
    req_to_token, table = _table()
    req_to_token[1, :4] = torch.tensor([5, 6, 7, 8], dtype=torch.int32)
    seq_lens_cpu, rows_cpu = torch.tensor([4]), torch.tensor([1])
    with count_host_reads([seq_lens_cpu, rows_cpu]) as counts:
        dropped, dropped_host = table.extend(torch.tensor([1]), torch.tensor([4]), seq_lens_cpu, rows_cpu)
    assert sum(counts.values()) == 0 and dropped_host == [0] and table.physical[1, :4].tolist() == [5, 6, 7, 8]
    req_to_token[1, 2] = 0
    table.rows_changed([1], [4])  # the cache compressed the row
    assert table.any_dropped and table.dropped_host[1] == 1
    with count_host_reads([seq_lens_cpu, rows_cpu]) as counts:
        table.extend(torch.tensor([1]), torch.tensor([4]), seq_lens_cpu, rows_cpu)
    assert sum(counts.values()) == 1 and table.physical[1, :3].tolist() == [5, 6, 8]
    table.debug, table.any_dropped = True, False
    with pytest.raises(RuntimeError, match="never reported"):  # FLASHCACHE_DEBUG catches a silent edit
        table.extend(torch.tensor([1]), torch.tensor([4]), seq_lens_cpu, rows_cpu)


def _table(num_rows=5, width=32):
    req_to_token = torch.zeros(num_rows, width, dtype=torch.int32)
    return req_to_token, KeptKVTable(req_to_token)


def test_rows_changed_recounts_the_host_mirror_and_is_validated():
    req_to_token, table = _table()
    table.any_dropped = True
    req_to_token[1, :6] = torch.tensor([4, 0, 7, 5, 6, 8], dtype=torch.int32)
    table.extend(torch.tensor([1]), torch.tensor([6]), torch.tensor([6]), torch.tensor([1]))
    with pytest.raises(ValueError, match="2 rows but 1 lengths"):
        table.rows_changed([1, 2], [3])
    with pytest.raises(ValueError, match=r"row 9 outside \[0, 5\)"):
        table.rows_changed([9], [1])
    with pytest.raises(ValueError, match=r"length 33 outside \[0, 32\]"):
        table.rows_changed([1], [33])
    req_to_token[1, 2] = 0  # the cache drops position 2 ...
    req_to_token[1, 3] = 9  # ... and adopts the tree's slot for position 3
    with count_host_reads() as counts:
        table.rows_changed([1], [5])
    assert sum(counts.values()) == 1
    assert table.dropped_host[1] == 2 and table._dirty == {1}
    assert table.physical[1, :5].tolist() == [4, 7, 5, 6, 8]  # the device row waits for the next forward
    table.flush()
    assert table.physical[1, :4].tolist() == [4, 9, 6, 8] and int(table.dropped[1]) == 2
    req_to_token[1, 4] = 10  # an edit that cannot change the count: no host read
    with count_host_reads() as counts:
        table.rows_changed([1], [5], recount=False)
    assert sum(counts.values()) == 0
    table.flush()
    assert table.physical[1, :4].tolist() == [4, 9, 10, 8]


def test_the_cache_notification_recounts_only_in_compressed_namespaces():
    from flashcache_sglang import kept_table

    pool = SimpleNamespace(req_to_token=torch.zeros(3, 8, dtype=torch.int32))
    kept_table.rows_changed(pool, [1], [4], FlashCacheConfig(retention=0.5))
    assert not hasattr(pool, "_flashcache_kept_table")  # no wrapped attention reads this pool
    table = KeptKVTable.for_pool(pool)
    assert KeptKVTable.for_pool(pool) is table
    pool.req_to_token[1, :4] = torch.tensor([3, 0, 9, 0], dtype=torch.int32)
    with count_host_reads() as counts:
        kept_table.rows_changed(pool, [1], [4], FlashCacheConfig(retention=1.0))  # default namespace
    assert sum(counts.values()) == 0 and table.dropped_host[1] == 0 and table._dirty == {1}
    kept_table.rows_changed(pool, [1], [4], FlashCacheConfig(retention=0.5))
    assert table.dropped_host[1] == 2


def test_decode_padding_lanes_keep_their_fill_and_capture_appends_nothing():
    req_to_token, table = _table()
    table.any_dropped = True
    req_to_token[2, :6] = torch.tensor([5, 0, 7, 0, 9, 10], dtype=torch.int32)
    table.extend(torch.tensor([2]), torch.tensor([6]), torch.tensor([6]), torch.tensor([2]))
    before = table.physical.clone()
    # A CUDA-graph capture batch: made-up rows and lengths, nothing may be written.
    lens = table.decode(torch.zeros(4, dtype=torch.int64), torch.ones(4, dtype=torch.int64), None, 0, append=False)
    assert lens.tolist() == [1, 1, 1, 1]
    assert torch.equal(table.physical, before)
    # A replay padded from 2 real requests to 4 lanes (padding reads row 0 with the fill value 1).
    req_to_token[2, 6] = 11
    req_to_token[3, :1] = 12
    table.extend(torch.tensor([3]), torch.tensor([1]), torch.tensor([1]), torch.tensor([3]))
    req_to_token[3, 1] = 13
    replay = table.decode(torch.tensor([2, 3, 0, 0]), torch.tensor([7, 2, 1, 1]), torch.tensor([11, 13]), 2)
    assert replay.data_ptr() == lens.data_ptr()  # the same static buffer
    assert replay.tolist() == [5, 2, 1, 1]
    assert table.physical[2, :5].tolist() == [5, 7, 9, 10, 11]
    assert table.physical[3, :2].tolist() == [12, 13]
    assert table.physical[0].count_nonzero() == 0  # the padding row is never written


def test_decode_is_graph_capturable():
    """Under FakeTensorMode any data-dependent shape or host read raises: decode has none."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        table = KeptKVTable(torch.zeros(6, 64, dtype=torch.int32))
        table.decode(torch.tensor([1, 4, 0]), torch.tensor([9, 3, 1]), torch.tensor([100, 200]), 2)
        table._dirty.add(4)  # a row the cache edited: rebuilt inside decode, still without a host read
        table.decode(torch.tensor([1, 4, 0]), torch.tensor([10, 4, 1]), torch.tensor([101, 201]), 2)


def test_extend_without_host_rows_or_lengths_still_matches():
    req_to_token, table = _table()
    table.any_dropped = True  # the cache has reported a dropped token before
    req_to_token[1, :5] = torch.tensor([3, 0, 0, 4, 8], dtype=torch.int32)
    req_to_token[1, 5:9] = 77  # junk past seq_len is never read
    with count_host_reads() as counts:
        dropped, dropped_host = table.extend(torch.tensor([1]), torch.tensor([5]), None, None)
    assert dropped_host == [2] and dropped.tolist() == [2]
    assert sum(counts.values()) == 2  # the dropped counts, then the rows
    assert table.physical[1, :3].tolist() == [3, 4, 8]
    assert table.dropped_host[1] == 2
