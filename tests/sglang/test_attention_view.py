"""attention.compact_rows and PhysicalKVAttention against plain per-row references, on CPU.

The reference of a compacted row is ``row[:seq_len][row[:seq_len] != 0]`` (slot 0 is the sentinel
of a dropped token). End-to-end, SGLang's real TorchNativeAttnBackend wrapped in
PhysicalKVAttention must equal attention over the kept KV only.
"""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch

from flashcache_sglang.attention import PhysicalKVAttention, compact_rows

MAX_CONTEXT_LEN = 128


def reference_rows(req_to_token, req_pool_indices, seq_lens) -> list[list[int]]:
    rows = []
    for index, length in zip(req_pool_indices.tolist(), seq_lens.tolist()):
        row = req_to_token[index, :length]
        rows.append(row[row != 0].tolist())
    return rows


def make_table(lengths, drop_probability, seed, num_rows=None, dtype=torch.int32):
    """A req_to_token with distinct non-zero slots, dropped entries zeroed at random."""
    generator = torch.Generator().manual_seed(seed)
    num_rows = num_rows or len(lengths) + 3
    table = torch.zeros(num_rows, MAX_CONTEXT_LEN, dtype=dtype)
    # Rows in a shuffled order, so req_pool_indices are not 0..batch_size-1.
    rows = torch.randperm(num_rows - 1, generator=generator)[: len(lengths)] + 1
    next_slot = 1
    for row, length in zip(rows.tolist(), lengths):
        table[row, :length] = torch.arange(next_slot, next_slot + length, dtype=dtype)
        # Junk past seq_len must never be read.
        table[row, length:length + 5] = 10_000 + row
        next_slot += length
        drop = torch.rand(length, generator=generator) < drop_probability
        if drop_probability > 0 and row == int(rows[0]):
            drop[length // 2] = True  # at least one dropped entry per batch
        table[row, :length][drop] = 0
    return table, rows.to(torch.int64)


class _Mode:
    def __init__(self, name: str) -> None:
        self.name = name

    def is_idle(self) -> bool:
        return self.name == "idle"

    def is_decode(self) -> bool:
        return self.name == "decode"

    def is_extend(self) -> bool:
        return self.name == "extend"

    def is_mixed(self) -> bool:
        return False


class FakeForwardBatch:
    """The ForwardBatch fields the wrapper and the attention backends read."""

    def __init__(self, mode, req_pool_indices, seq_lens, *, extend_prefix_lens=None,
                 extend_seq_lens=None, with_cpu=True) -> None:
        self.forward_mode = _Mode(mode)
        self.req_pool_indices = req_pool_indices
        self.seq_lens = seq_lens
        self.seq_lens_cpu = seq_lens.cpu().clone() if with_cpu else None
        self.seq_lens_sum = int(seq_lens.sum()) if seq_lens is not None else 0
        self.extend_prefix_lens = extend_prefix_lens
        self.extend_prefix_lens_cpu = extend_prefix_lens.tolist() if extend_prefix_lens is not None else None
        self.extend_seq_lens = extend_seq_lens
        self.extend_seq_lens_cpu = extend_seq_lens.tolist() if extend_seq_lens is not None else None
        self.encoder_lens = None
        self.encoder_out_cache_loc = None
        self.out_cache_loc = None


class RecordingBackend:
    """A minimal inner backend: records what it was given and the table it would read."""

    def __init__(self, pool) -> None:
        self.req_to_token_pool = pool
        self.calls = []
        self.some_setting = 42

    def _gather(self, forward_batch):
        table = self.req_to_token_pool.req_to_token
        return [table[i, :n].tolist() for i, n in
                zip(forward_batch.req_pool_indices.tolist(), forward_batch.seq_lens.tolist())]

    def init_forward_metadata(self, forward_batch):
        self.calls.append(("init", forward_batch, self._gather(forward_batch)))

    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        self.calls.append(("extend", forward_batch, self._gather(forward_batch)))
        return "extend-out"

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        self.calls.append(("decode", forward_batch, self._gather(forward_batch)))
        return "decode-out"

    def forward(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        self.calls.append(("forward", forward_batch, self._gather(forward_batch)))
        return "out"


# ============================================================================ compact_rows
@pytest.mark.parametrize("lengths", [[1], [63], [97, 1, 64], [5, 63, 97, 2, 31, 127, 17]],
                         ids=["1", "63", "97-1-64", "7-rows"])
@pytest.mark.parametrize("drop_probability", [0.1, 0.5, 0.97])
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64], ids=["int32", "int64"])
def test_compact_rows_matches_reference(lengths, drop_probability, dtype):
    table, indices = make_table(lengths, drop_probability, seed=len(lengths) * 7 + int(drop_probability * 100),
                                dtype=dtype)
    seq_lens = torch.tensor(lengths, dtype=torch.int64)
    expected = reference_rows(table, indices, seq_lens)
    before = table.clone()
    out = torch.full((len(lengths) + 2, MAX_CONTEXT_LEN), -1, dtype=dtype)
    dropped = compact_rows(table, indices, seq_lens, out)
    assert torch.equal(table, before)  # the logical table is never edited
    assert dropped.dtype == torch.int64
    assert dropped.tolist() == [n - len(row) for row, n in zip(expected, lengths)]
    for b, row in enumerate(expected):
        assert out[b, :len(row)].tolist() == row, f"row {b}"
    assert (out[len(lengths):] == -1).all()  # rows past the batch are untouched


def test_compact_rows_without_drops_returns_none_and_leaves_out_alone():
    table, indices = make_table([7, 63, 2], 0.0, seed=1)
    out = torch.full((4, MAX_CONTEXT_LEN), -1, dtype=torch.int32)
    assert compact_rows(table, indices, torch.tensor([7, 63, 2]), out) is None
    assert (out == -1).all()


def test_compact_rows_ignores_zeros_past_seq_len():
    table = torch.zeros(3, MAX_CONTEXT_LEN, dtype=torch.int32)
    table[1, :4] = torch.tensor([5, 6, 7, 8])  # zeros after position 4 are not "dropped"
    out = torch.zeros_like(table)
    assert compact_rows(table, torch.tensor([1]), torch.tensor([4]), out) is None


def test_compact_rows_of_an_empty_batch():
    table = torch.zeros(3, MAX_CONTEXT_LEN, dtype=torch.int32)
    empty = torch.empty(0, dtype=torch.int64)
    assert compact_rows(table, empty, empty, torch.zeros_like(table)) is None


# ============================================================================ physical_batch
def _wrapped(table):
    pool = SimpleNamespace(req_to_token=table, size=table.shape[0] - 1)
    inner = RecordingBackend(pool)
    return PhysicalKVAttention(inner), inner, pool


@pytest.mark.parametrize("with_cpu", [True, False], ids=["seq_lens_cpu", "no_seq_lens_cpu"])
@pytest.mark.parametrize("lengths", [[9], [63, 97, 1], [5, 17, 33, 64, 3]], ids=["1", "3", "5"])
def test_physical_batch_extend(lengths, with_cpu):
    table, indices = make_table(lengths, 0.4, seed=sum(lengths))
    extend = torch.tensor([min(n, 1 + n % 3) for n in lengths])
    seq_lens = torch.tensor(lengths)
    prefix = seq_lens - extend
    # New tokens are never dropped: give them back their slots.
    for row, n, e in zip(indices.tolist(), lengths, extend.tolist()):
        table[row, n - e:n] = torch.arange(5000 + row * 10, 5000 + row * 10 + e, dtype=torch.int32)
    batch = FakeForwardBatch("extend", indices, seq_lens, extend_prefix_lens=prefix,
                             extend_seq_lens=extend, with_cpu=with_cpu)
    snapshot = copy.copy(batch.__dict__)
    wrapper, inner, pool = _wrapped(table)
    expected = reference_rows(table, indices, seq_lens)
    dropped = [n - len(row) for row, n in zip(expected, lengths)]
    assert any(dropped)
    view = wrapper.physical_batch(batch)
    assert view is not batch
    assert batch.__dict__ == snapshot  # the scheduler's batch stays logical
    physical = [n - d for n, d in zip(lengths, dropped)]
    assert view.seq_lens.tolist() == physical
    assert view.seq_lens.dtype == seq_lens.dtype
    assert view.seq_lens_sum == sum(physical)
    if with_cpu:
        assert view.seq_lens_cpu.tolist() == physical
    else:
        assert view.seq_lens_cpu is None
    assert view.extend_prefix_lens.tolist() == [p - d for p, d in zip(prefix.tolist(), dropped)]
    assert view.extend_prefix_lens_cpu == [p - d for p, d in zip(prefix.tolist(), dropped)]
    assert view.extend_seq_lens is batch.extend_seq_lens
    assert view.req_pool_indices.tolist() == list(range(len(lengths)))
    assert view.req_pool_indices.dtype == indices.dtype
    scratch = wrapper._scratch
    for b, row in enumerate(expected):
        assert scratch[b, :physical[b]].tolist() == row
        # The new tokens' slots sit at the end of the compacted row.
        e = int(extend[b])
        assert scratch[b, physical[b] - e:physical[b]].tolist() == table[indices[b], lengths[b] - e:lengths[b]].tolist()


def test_physical_batch_passes_through_when_nothing_to_do():
    table, indices = make_table([7, 9, 11], 0.0, seed=3)
    wrapper, inner, pool = _wrapped(table)
    batch = FakeForwardBatch("decode", indices, torch.tensor([7, 9, 11]))
    assert wrapper.physical_batch(batch) is batch
    idle = FakeForwardBatch("idle", indices, torch.tensor([7, 9, 11]))
    assert wrapper.physical_batch(idle) is idle
    no_rows = FakeForwardBatch("decode", indices, torch.tensor([7, 9, 11]))
    no_rows.req_pool_indices = None
    assert wrapper.physical_batch(no_rows) is no_rows


def test_init_forward_metadata_and_forwards_see_the_physical_view():
    table, indices = make_table([13, 63, 4], 0.5, seed=11)
    seq_lens = torch.tensor([13, 63, 4])
    wrapper, inner, pool = _wrapped(table)
    expected = reference_rows(table, indices, seq_lens)
    batch = FakeForwardBatch("decode", indices, seq_lens)
    wrapper.init_forward_metadata(batch)
    kind, seen, gathered = inner.calls[-1]
    assert kind == "init" and seen is not batch
    assert gathered == expected
    assert wrapper.forward_decode(None, None, None, None, batch) == "decode-out"
    assert inner.calls[-1][1] is seen and inner.calls[-1][2] == expected
    assert wrapper.forward_extend(None, None, None, None, batch) == "extend-out"
    assert inner.calls[-1][1] is seen
    assert wrapper.forward(None, None, None, None, batch) == "out"
    assert inner.calls[-1][2] == expected
    # Another batch object (not the one metadata was built for) goes through as it is.
    other = FakeForwardBatch("decode", indices, seq_lens)
    wrapper.forward_decode(None, None, None, None, other)
    assert inner.calls[-1][1] is other
    # A following batch without drops reads the real table again.
    clean, clean_indices = make_table([5, 6], 0.0, seed=2, num_rows=table.shape[0])
    table.copy_(clean)
    plain = FakeForwardBatch("decode", clean_indices, torch.tensor([5, 6]))
    wrapper.init_forward_metadata(plain)
    assert inner.calls[-1][1] is plain
    assert inner.req_to_token_pool.req_to_token is table
    assert inner.calls[-1][2] == reference_rows(table, clean_indices, torch.tensor([5, 6]))


def test_wrapper_delegates_and_refuses_backends_without_a_pool():
    table, indices = make_table([3], 0.0, seed=0)
    wrapper, inner, pool = _wrapped(table)
    assert wrapper.some_setting == 42
    assert inner.req_to_token_pool.size == pool.size  # the view delegates the pool's attributes
    with pytest.raises(ValueError, match="has no req_to_token_pool"):
        PhysicalKVAttention(SimpleNamespace())


# ============================================================================ real torch_native
NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 4, 2, 8


def _torch_native(num_rows=6, pool_size=600, seed=0):
    from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool

    kv_pool = MHATokenToKVPool(pool_size, 1, torch.float32, NUM_KV_HEADS, HEAD_DIM, 1, "cpu", False)
    generator = torch.Generator().manual_seed(seed)
    kv_pool.k_buffer[0].copy_(torch.randn(kv_pool.k_buffer[0].shape, generator=generator))
    kv_pool.v_buffer[0].copy_(torch.randn(kv_pool.v_buffer[0].shape, generator=generator))
    req_pool = ReqToTokenPool(num_rows, MAX_CONTEXT_LEN, "cpu", False)
    runner = SimpleNamespace(device="cpu", req_to_token_pool=req_pool, token_to_kv_pool=kv_pool)
    backend = TorchNativeAttnBackend(runner)
    layer = SimpleNamespace(layer_id=0, tp_q_head_num=NUM_HEADS, tp_k_head_num=NUM_KV_HEADS,
                            qk_head_dim=HEAD_DIM, v_head_dim=HEAD_DIM, scaling=1 / math.sqrt(HEAD_DIM),
                            is_cross_attention=False, sliding_window_size=None, attn_type=None,
                            logit_cap=0.0)
    return backend, kv_pool, req_pool, layer, generator


def _reference_attention(q, keys, values, causal_offset=None):
    """q [n_q, H, D] over keys/values [n_kv, H_kv, D]; query j sees kv[: causal_offset + j + 1]."""
    group = NUM_HEADS // NUM_KV_HEADS
    keys = keys.repeat_interleave(group, dim=1)
    values = values.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, keys) / math.sqrt(HEAD_DIM)
    if causal_offset is not None:
        n_q, n_kv = q.shape[0], keys.shape[0]
        visible = torch.arange(n_kv)[None, :] <= (causal_offset + torch.arange(n_q))[:, None]
        scores = scores.masked_fill(~visible[None], float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), values)


@pytest.mark.parametrize("lengths", [[17], [63, 5, 97]], ids=["1", "3"])
def test_torch_native_decode_attends_to_kept_kv_only(lengths):
    backend, kv_pool, req_pool, layer, generator = _torch_native()
    wrapper = PhysicalKVAttention(backend)
    table = req_pool.req_to_token
    rows = list(range(1, len(lengths) + 1))[::-1]
    next_slot = 1
    for row, n in zip(rows, lengths):
        table[row, :n] = torch.arange(next_slot, next_slot + n, dtype=torch.int32)
        next_slot += n
        drop = torch.rand(n - 1, generator=generator) < 0.6  # the decoded token is never dropped
        table[row, :n - 1][drop] = 0
    indices = torch.tensor(rows)
    seq_lens = torch.tensor(lengths)
    batch = FakeForwardBatch("decode", indices, seq_lens)
    q = torch.randn(len(lengths), NUM_HEADS * HEAD_DIM, generator=generator)
    wrapper.init_forward_metadata(batch)
    out = wrapper.forward_decode(q, None, None, layer, batch, save_kv_cache=False)
    for b, slots in enumerate(reference_rows(table, indices, seq_lens)):
        slots = torch.tensor(slots)
        expected = _reference_attention(q[b].view(1, NUM_HEADS, HEAD_DIM), kv_pool.k_buffer[0][slots],
                                        kv_pool.v_buffer[0][slots])
        torch.testing.assert_close(out[b].view(NUM_HEADS, HEAD_DIM), expected[0], atol=1e-5, rtol=1e-5)
    # Without the wrapper, slot 0 (a dropped token) would be attended to: the outputs differ.
    backend.req_to_token_pool = req_pool
    logical = backend.forward_decode(q, None, None, layer, batch, save_kv_cache=False)
    assert not torch.allclose(logical, out, atol=1e-3)


def test_torch_native_extend_after_a_compressed_prefix():
    backend, kv_pool, req_pool, layer, generator = _torch_native()
    wrapper = PhysicalKVAttention(backend)
    table = req_pool.req_to_token
    prefix_lens, extend_lens = [40, 23], [7, 3]
    rows = [4, 2]
    next_slot = 1
    for row, p, e in zip(rows, prefix_lens, extend_lens):
        table[row, :p + e] = torch.arange(next_slot, next_slot + p + e, dtype=torch.int32)
        next_slot += p + e
        drop = torch.rand(p, generator=generator) < 0.5
        table[row, :p][drop] = 0
    indices = torch.tensor(rows)
    seq_lens = torch.tensor([p + e for p, e in zip(prefix_lens, extend_lens)])
    batch = FakeForwardBatch("extend", indices, seq_lens, extend_prefix_lens=torch.tensor(prefix_lens),
                             extend_seq_lens=torch.tensor(extend_lens))
    q = torch.randn(sum(extend_lens), NUM_HEADS * HEAD_DIM, generator=generator)
    wrapper.init_forward_metadata(batch)
    out = wrapper.forward_extend(q, None, None, layer, batch, save_kv_cache=False)
    out = out.view(-1, NUM_HEADS, HEAD_DIM)
    start = 0
    for b, slots in enumerate(reference_rows(table, indices, seq_lens)):
        slots = torch.tensor(slots)
        e = extend_lens[b]
        kept_prefix = len(slots) - e
        expected = _reference_attention(q[start:start + e].view(e, NUM_HEADS, HEAD_DIM),
                                        kv_pool.k_buffer[0][slots], kv_pool.v_buffer[0][slots],
                                        causal_offset=kept_prefix)
        torch.testing.assert_close(out[start:start + e], expected, atol=1e-5, rtol=1e-5)
        start += e


# ============================================================================ GPU backends' paths
class TranslatorReadingBackend(RecordingBackend):
    """Reads rows like SGLang's triton and flashinfer backends: through the ModelRunner's
    KVIndexTranslator (built once from the real req_to_token), not through req_to_token_pool."""

    def __init__(self, pool, translator) -> None:
        super().__init__(pool)
        self.kv_index_translator = translator

    def _gather(self, forward_batch):
        bs = int(forward_batch.seq_lens.numel())
        source = self.kv_index_translator.read_source(None, req_pool_indices=forward_batch.req_pool_indices, bs=bs)
        return [source.ids[row, :n].tolist() for row, n in
                zip(source.row_ids.tolist(), forward_batch.seq_lens.tolist())]


def test_translator_reading_backend_sees_the_compacted_rows():
    from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator
    from sglang.srt.mem_cache.kv_index_translator import KVIndexTranslator
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool
    from sglang.srt.runtime_context import get_context

    override = get_context().override_server_args()
    override.install()
    try:
        kv_pool = MHATokenToKVPool(400, 1, torch.float32, NUM_KV_HEADS, HEAD_DIM, 1, "cpu", False)
        allocator = TokenToKVPoolAllocator(400, torch.float32, "cpu", kv_pool, False)
        req_pool = ReqToTokenPool(6, MAX_CONTEXT_LEN, "cpu", False)
        translator = KVIndexTranslator(req_to_token=req_pool.req_to_token, token_to_kv_pool_allocator=allocator,
                                       token_to_kv_pool=kv_pool, page_size=1, device="cpu")
        table, indices = make_table([13, 40, 7], 0.5, seed=5, num_rows=7)
        req_pool.req_to_token.copy_(table)
        inner = TranslatorReadingBackend(req_pool, translator)
        wrapper = PhysicalKVAttention(inner)
        seq_lens = torch.tensor([13, 40, 7])
        batch = FakeForwardBatch("decode", indices, seq_lens)
        wrapper.init_forward_metadata(batch)
        assert inner.calls[-1][2] == reference_rows(req_pool.req_to_token, indices, seq_lens)
    finally:
        override.restore()


def test_cuda_graph_metadata_path_sees_the_physical_view():
    table, indices = make_table([13, 40, 7], 0.5, seed=9)
    seq_lens = torch.tensor([13, 40, 7])
    wrapper, inner, pool = _wrapped(table)

    def out_graph(forward_batch, in_capture=False):
        inner.calls.append(("out_graph", forward_batch, inner._gather(forward_batch)))

    inner.init_forward_metadata_out_graph = out_graph
    batch = FakeForwardBatch("decode", indices, seq_lens)
    wrapper.init_forward_metadata_out_graph(batch)
    assert inner.calls[-1][2] == reference_rows(table, indices, seq_lens)
