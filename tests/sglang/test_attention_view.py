"""PhysicalKVAttention on CPU: the view it hands the inner backend, and what real backends read.

The reference of what attention must read for a request is ``row[:seq_len][row[:seq_len] != 0]``
(slot 0 is the sentinel of a dropped token). Checked here:

- the view: physical lengths (device and host), prefix lengths, the packed table the inner
  backend reads permanently (its pool view, its own ``req_to_token``, the KV index translator
  while it plans); the scheduler's batch stays logical;
- SGLang's real TorchNativeAttnBackend attends to kept KV only (decode and extend);
- the decode CUDA-graph path of SGLang's real TritonAttnBackend and FlashAttentionBackend (fa3):
  metadata captured once with ``init_forward_metadata_out_graph(in_capture=True)``, then refreshed
  before each "replay" through SGLang's own ``build_replay_fb_view`` with a padded batch while
  lengths grow and rows get compressed between steps. The captured buffers (same objects, same
  addresses) must hold exactly the kept slots, and the Triton decode kernel run on those captured
  buffers (what a replay executes) must equal the eager path and attention over the kept KV.
  Triton kernels run under TRITON_INTERPRET on CPU (tests/conftest.py); fa3's attention kernel
  (sgl_kernel.flash_attn) has no CPU build, so for fa3 the captured page table and lengths are
  checked, and the kernel itself is left to the GPU pack (benchmarks/run_gpu_suite.sh).
"""

from __future__ import annotations

import math
import sys
import types
from types import SimpleNamespace

import pytest
import torch

from sglang.srt.model_executor.forward_batch_info import ForwardBatch, ForwardMode

from flashcache_sglang import kept_table, plugin
from flashcache_sglang.attention import PhysicalKVAttention
from flashcache_sglang.config import FlashCacheConfig

MAX_CONTEXT_LEN = 96
NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 4, 2, 8


def reference_rows(req_to_token, req_pool_indices, seq_lens) -> list[list[int]]:
    rows = []
    for index, length in zip(req_pool_indices.tolist(), seq_lens.tolist()):
        row = req_to_token[index, :length]
        rows.append(row[row != 0].tolist())
    return rows


def extend_batch(rows, prefix_lens, seq_lens, req_to_token) -> ForwardBatch:
    rows = torch.tensor(rows, dtype=torch.int64)
    prefix = torch.tensor(prefix_lens, dtype=torch.int64)
    seq_lens = torch.tensor(seq_lens, dtype=torch.int64)
    out_cache_loc = torch.cat([req_to_token[r, p:n].long() for r, p, n in zip(rows.tolist(), prefix.tolist(),
                                                                            seq_lens.tolist())])
    extend = seq_lens - prefix
    return ForwardBatch(forward_mode=ForwardMode.EXTEND, batch_size=len(rows), input_ids=torch.zeros_like(out_cache_loc),
                        req_pool_indices=rows.clone(), seq_lens=seq_lens, out_cache_loc=out_cache_loc,
                        seq_lens_sum=int(seq_lens.sum()), seq_lens_cpu=seq_lens.clone(), req_pool_indices_cpu=rows,
                        extend_prefix_lens=prefix, extend_seq_lens=extend, extend_prefix_lens_cpu=prefix.tolist(),
                        extend_seq_lens_cpu=extend.tolist(), extend_num_tokens=int(extend.sum()),
                        positions=torch.zeros_like(out_cache_loc))


def decode_batch(rows, seq_lens, req_to_token, pool) -> ForwardBatch:
    rows = torch.tensor(rows, dtype=torch.int64)
    seq_lens = torch.tensor(seq_lens, dtype=torch.int64)
    out_cache_loc = torch.stack([req_to_token[r, n - 1].long() for r, n in zip(rows.tolist(), seq_lens.tolist())])
    batch = ForwardBatch(forward_mode=ForwardMode.DECODE, batch_size=len(rows), input_ids=torch.zeros_like(rows),
                         req_pool_indices=rows.clone(), seq_lens=seq_lens, out_cache_loc=out_cache_loc,
                         seq_lens_sum=int(seq_lens.sum()), seq_lens_cpu=seq_lens.clone(),
                         positions=seq_lens - 1)
    # What plugin's ForwardBatch.init_new hook does with the ScheduleBatch's host rows.
    plugin._note_forward_rows(batch, SimpleNamespace(req_pool_indices_cpu=rows), SimpleNamespace(req_to_token_pool=pool))
    return batch


def fill_rows(req_to_token, lengths, rows, generator, drop_probability=0.5, protect_last=1):
    """Distinct slots per row; random entries (not the last ``protect_last``) dropped to 0.

    The rows are compressed here behind the cache's back: callers tell the kept table that rows
    hold dropped entries (``table.any_dropped``), as the cache's first report would.
    """
    next_slot = 1
    for row, length in zip(rows, lengths):
        req_to_token[row, :length] = torch.arange(next_slot, next_slot + length, dtype=req_to_token.dtype)
        req_to_token[row, length:length + 4] = 10_000 + row  # junk past seq_len is never read
        next_slot += length
        drop = torch.rand(length - protect_last, generator=generator) < drop_probability
        req_to_token[row, :length - protect_last][drop] = 0
    return next_slot


def wrap(inner) -> PhysicalKVAttention:
    """The wrapper over rows this test compresses itself (see fill_rows)."""
    wrapper = PhysicalKVAttention(inner)
    wrapper.table.any_dropped = True
    return wrapper


# ============================================================================ the view
class RecordingBackend:
    """A minimal inner backend: records what it was given and the rows it would read."""

    def __init__(self, pool) -> None:
        self.req_to_token_pool = pool
        self.req_to_token = pool.req_to_token
        self.calls = []
        self.some_setting = 42

    def _gather(self, forward_batch):
        table = self.req_to_token_pool.req_to_token
        return [table[i, :n].tolist() for i, n in
                zip(forward_batch.req_pool_indices.tolist(), forward_batch.seq_lens.tolist())]

    def init_forward_metadata(self, forward_batch):
        self.calls.append(("init", forward_batch, self._gather(forward_batch)))

    def init_forward_metadata_out_graph(self, forward_batch, in_capture=False):
        self.calls.append(("out_graph", forward_batch, self._gather(forward_batch)))

    def init_forward_metadata_in_graph(self, forward_batch):
        self.calls.append(("in_graph", forward_batch, self._gather(forward_batch)))

    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        self.calls.append(("extend", forward_batch, self._gather(forward_batch)))
        return "extend-out"

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        self.calls.append(("decode", forward_batch, self._gather(forward_batch)))
        return "decode-out"

    def forward(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        self.calls.append(("forward", forward_batch, self._gather(forward_batch)))
        return "out"


def _wrapped(num_rows=8):
    table = torch.zeros(num_rows, MAX_CONTEXT_LEN, dtype=torch.int32)
    pool = SimpleNamespace(req_to_token=table, size=num_rows - 1)
    inner = RecordingBackend(pool)
    return wrap(inner), inner, pool


@pytest.mark.parametrize("with_cpu", [True, False], ids=["seq_lens_cpu", "no_seq_lens_cpu"])
@pytest.mark.parametrize("lengths", [[9], [63, 90, 1], [5, 17, 33, 64, 3]], ids=["1", "3", "5"])
def test_extend_view_has_physical_lengths_and_packed_rows(lengths, with_cpu):
    wrapper, inner, pool = _wrapped()
    generator = torch.Generator().manual_seed(sum(lengths))
    rows = torch.randperm(pool.size, generator=generator)[: len(lengths)].add(1).tolist()
    extend = [min(n, 1 + n % 3) for n in lengths]
    # New tokens are never dropped.
    fill_rows(pool.req_to_token, lengths, rows, generator, 0.4, protect_last=max(extend))
    prefix = [n - e for n, e in zip(lengths, extend)]
    batch = extend_batch(rows, prefix, lengths, pool.req_to_token)
    if not with_cpu:
        batch.seq_lens_cpu = None
    snapshot = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in batch.__dict__.items()}
    view = wrapper.physical_batch(batch)
    assert view is not batch
    for key, value in snapshot.items():  # the scheduler's batch stays logical
        current = getattr(batch, key)
        assert torch.equal(current, value) if isinstance(value, torch.Tensor) else current == value, key
    expected = reference_rows(pool.req_to_token, batch.req_pool_indices, batch.seq_lens)
    physical = [len(row) for row in expected]
    dropped = [n - p for n, p in zip(lengths, physical)]
    assert view.seq_lens.tolist() == physical and view.seq_lens.dtype == batch.seq_lens.dtype
    assert view.seq_lens_sum == sum(physical)
    assert (view.seq_lens_cpu.tolist() if with_cpu else view.seq_lens_cpu) == (physical if with_cpu else None)
    assert view.extend_prefix_lens.tolist() == [p - d for p, d in zip(prefix, dropped)]
    assert view.extend_prefix_lens_cpu == [p - d for p, d in zip(prefix, dropped)]
    assert view.extend_seq_lens is batch.extend_seq_lens
    assert view.req_pool_indices is batch.req_pool_indices  # rows are unchanged: the table is per row
    packed = wrapper.table.physical
    assert inner.req_to_token_pool.req_to_token is packed and inner.req_to_token is packed
    for row, kept in zip(rows, expected):
        assert packed[row, :len(kept)].tolist() == kept


def test_decode_view_and_forwards_read_the_packed_rows():
    wrapper, inner, pool = _wrapped()
    generator = torch.Generator().manual_seed(4)
    rows, lengths = [3, 6, 1], [13, 63, 4]
    fill_rows(pool.req_to_token, lengths, rows, generator)
    wrapper.init_forward_metadata(extend_batch(rows, [0, 0, 0], [n - 1 for n in lengths], pool.req_to_token))
    batch = decode_batch(rows, lengths, pool.req_to_token, pool)
    expected = reference_rows(pool.req_to_token, batch.req_pool_indices, batch.seq_lens)
    wrapper.init_forward_metadata(batch)
    kind, seen, gathered = inner.calls[-1]
    assert kind == "init" and seen is not batch and gathered == expected
    assert seen.seq_lens_cpu.tolist() == [len(row) for row in expected]
    assert seen.seq_lens_sum == sum(len(row) for row in expected)
    assert wrapper.forward_decode(None, None, None, None, batch) == "decode-out"
    assert inner.calls[-1][1] is seen and inner.calls[-1][2] == expected
    assert wrapper.forward_extend(None, None, None, None, batch) == "extend-out"
    assert inner.calls[-1][1] is seen
    assert wrapper.forward(None, None, None, None, batch) == "out"
    wrapper.init_forward_metadata_in_graph(batch)
    assert inner.calls[-1][1] is seen
    # Another batch object (not the one metadata was built for) goes through as it is.
    other = decode_batch(rows, lengths, pool.req_to_token, pool)
    wrapper.forward_decode(None, None, None, None, other)
    assert inner.calls[-1][1] is other


def test_idle_batches_pass_through_and_speculative_modes_are_refused():
    wrapper, inner, pool = _wrapped()
    idle = ForwardBatch(forward_mode=ForwardMode.IDLE, batch_size=0, input_ids=torch.zeros(0),
                        req_pool_indices=torch.zeros(0, dtype=torch.int64), seq_lens=torch.zeros(0),
                        out_cache_loc=torch.zeros(0), seq_lens_sum=0)
    assert wrapper.physical_batch(idle) is idle
    verify = decode_batch([1], [3], pool.req_to_token, pool)
    verify.forward_mode = ForwardMode.TARGET_VERIFY
    with pytest.raises(RuntimeError, match="TARGET_VERIFY"):
        wrapper.physical_batch(verify)


def test_wrapper_delegates_and_refuses_backends_without_a_pool():
    wrapper, inner, pool = _wrapped()
    assert wrapper.some_setting == 42
    assert inner.req_to_token_pool.size == pool.size  # the view delegates the pool's attributes
    with pytest.raises(ValueError, match="has no req_to_token_pool"):
        PhysicalKVAttention(SimpleNamespace())


def test_decode_without_host_rows_reads_them_back_once_noted():
    wrapper, inner, pool = _wrapped()
    generator = torch.Generator().manual_seed(9)
    fill_rows(pool.req_to_token, [20], [2], generator)
    wrapper.physical_batch(extend_batch([2], [0], [19], pool.req_to_token))
    batch = decode_batch([2], [20], pool.req_to_token, pool)
    wrapper.table._noted_rows.clear()  # as if the init_new hook had not run
    view = wrapper.physical_batch(batch)
    assert view.seq_lens_cpu.tolist() == [len(reference_rows(pool.req_to_token, torch.tensor([2]), torch.tensor([20]))[0])]
    assert wrapper._warned_host_rows


# ============================================================================ real torch_native
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
    return backend, kv_pool, req_pool, _layer(), generator


def _layer():
    return SimpleNamespace(layer_id=0, tp_q_head_num=NUM_HEADS, tp_k_head_num=NUM_KV_HEADS, qk_head_dim=HEAD_DIM,
                           v_head_dim=HEAD_DIM, scaling=1 / math.sqrt(HEAD_DIM), is_cross_attention=False,
                           sliding_window_size=None, attn_type=None, logit_cap=0.0, logit_capping_method="tanh",
                           k_scale=None, v_scale=None, xai_temperature_len=-1)


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


@pytest.mark.parametrize("lengths", [[17], [63, 5, 90]], ids=["1", "3"])
def test_torch_native_decode_attends_to_kept_kv_only(lengths):
    backend, kv_pool, req_pool, layer, generator = _torch_native()
    wrapper = wrap(backend)
    table = req_pool.req_to_token
    rows = list(range(1, len(lengths) + 1))[::-1]
    fill_rows(table, lengths, rows, generator, 0.6)
    wrapper.init_forward_metadata(extend_batch(rows, [0] * len(rows), [n - 1 for n in lengths], table))
    batch = decode_batch(rows, lengths, table, req_pool)
    q = torch.randn(len(lengths), NUM_HEADS * HEAD_DIM, generator=generator)
    wrapper.init_forward_metadata(batch)
    out = wrapper.forward_decode(q, None, None, layer, batch, save_kv_cache=False)
    for b, slots in enumerate(reference_rows(table, batch.req_pool_indices, batch.seq_lens)):
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
    wrapper = wrap(backend)
    table = req_pool.req_to_token
    prefix_lens, extend_lens, rows = [40, 23], [7, 3], [4, 2]
    next_slot = 1
    for row, p, e in zip(rows, prefix_lens, extend_lens):
        table[row, :p + e] = torch.arange(next_slot, next_slot + p + e, dtype=torch.int32)
        next_slot += p + e
        table[row, :p][torch.rand(p, generator=generator) < 0.5] = 0
    seq_lens = [p + e for p, e in zip(prefix_lens, extend_lens)]
    batch = extend_batch(rows, prefix_lens, seq_lens, table)
    q = torch.randn(sum(extend_lens), NUM_HEADS * HEAD_DIM, generator=generator)
    wrapper.init_forward_metadata(batch)
    out = wrapper.forward_extend(q, None, None, layer, batch, save_kv_cache=False).view(-1, NUM_HEADS, HEAD_DIM)
    start = 0
    for b, slots in enumerate(reference_rows(table, batch.req_pool_indices, batch.seq_lens)):
        slots = torch.tensor(slots)
        e = extend_lens[b]
        expected = _reference_attention(q[start:start + e].view(e, NUM_HEADS, HEAD_DIM), kv_pool.k_buffer[0][slots],
                                        kv_pool.v_buffer[0][slots], causal_offset=len(slots) - e)
        torch.testing.assert_close(out[start:start + e], expected, atol=1e-5, rtol=1e-5)
        start += e


# ============================================================================ GPU backends on CPU
@pytest.fixture
def cpu_runtime(monkeypatch):
    """SGLang's process-wide settings and parallel ranks for building GPU backends on CPU, plus
    a stand-in for sgl_kernel.flash_attn (fa3's kernels; its metadata code is pure torch/Triton)."""
    from sglang.srt.runtime_context import get_context, get_parallel

    from flashcache_sglang.cpu_compat import _standins

    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the kernels were decorated so (tests/conftest.py)
    sgl_kernel = types.ModuleType("sgl_kernel")
    sgl_kernel.__getattr__ = _standins.missing_op  # flashattention_backend imports merge_state_v2
    flash_attn = types.ModuleType("sgl_kernel.flash_attn")
    flash_attn.flash_attn_varlen_func = _standins.missing_op("flash_attn_varlen_func")
    flash_attn.flash_attn_with_kvcache = _standins.missing_op("flash_attn_with_kvcache")
    flash_attn.get_scheduler_metadata = lambda *args, **kwargs: None
    monkeypatch.setitem(sys.modules, "sgl_kernel", sys.modules.get("sgl_kernel", sgl_kernel))
    monkeypatch.setitem(sys.modules, "sgl_kernel.flash_attn", flash_attn)
    override = get_context().override_server_args()
    override.install()
    try:
        with get_parallel().override(tp_rank=0, attn_tp_rank=0, attn_cp_rank=0, attn_dp_rank=0, attn_dcp_rank=0):
            yield
    finally:
        override.restore()


def _model_runner(num_rows=6, pool_size=500, seed=0):
    """The ModelRunner fields SGLang's triton / fa3 backends read, over real pools on CPU."""
    import transformers
    from sglang.srt.configs.model_config import AttentionArch
    from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator
    from sglang.srt.mem_cache.kv_index_translator import KVIndexTranslator
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool

    kv_pool = MHATokenToKVPool(pool_size, 1, torch.float32, NUM_KV_HEADS, HEAD_DIM, 1, "cpu", False)
    generator = torch.Generator().manual_seed(seed)
    kv_pool.k_buffer[0].copy_(torch.randn(kv_pool.k_buffer[0].shape, generator=generator))
    kv_pool.v_buffer[0].copy_(torch.randn(kv_pool.v_buffer[0].shape, generator=generator))
    allocator = TokenToKVPoolAllocator(pool_size, torch.float32, "cpu", kv_pool, False)
    req_pool = ReqToTokenPool(num_rows, MAX_CONTEXT_LEN, "cpu", False)
    translator = KVIndexTranslator(req_to_token=req_pool.req_to_token, token_to_kv_pool_allocator=allocator,
                                   token_to_kv_pool=kv_pool, page_size=1, device="cpu")
    hf_config = transformers.LlamaConfig(num_attention_heads=NUM_HEADS, num_key_value_heads=NUM_KV_HEADS,
                                         hidden_size=NUM_HEADS * HEAD_DIM, num_hidden_layers=1)
    model_config = SimpleNamespace(
        attention_arch=AttentionArch.MHA, get_max_num_attention_heads=lambda: NUM_HEADS,
        get_num_kv_heads=lambda *args: NUM_KV_HEADS, v_head_dim=HEAD_DIM, swa_v_head_dim=None,
        context_len=MAX_CONTEXT_LEN, head_dim=HEAD_DIM, is_encoder_decoder=False, linear_attn_registry_result=None,
        hf_config=hf_config, hf_text_config=hf_config, is_multimodal=False, is_local_attention_model=False)
    runner = SimpleNamespace(
        device="cpu", gpu_id=0, req_to_token_pool=req_pool, token_to_kv_pool=kv_pool,
        token_to_kv_pool_allocator=allocator, kv_index_translator=translator, sliding_window_size=None,
        model_config=model_config, page_size=1, is_draft_worker=False, use_mla_backend=False,
        spec_algorithm=SimpleNamespace(is_dspark=lambda: False), decode_num_tokens_per_req=lambda: 1,
        kv_cache_dtype=torch.float32, kv_cache_dtype_str="auto")
    return runner, generator


class ReplayRunner:
    """SGLang's decode CUDA-graph runner, reduced to the metadata calls and its static buffers:
    capture once at ``capture_bs``, then each step copy the batch into the buffers (padding the
    rest with the fill value), build SGLang's replay view and refresh metadata out of graph."""

    def __init__(self, wrapper, capture_bs: int) -> None:
        from sglang.srt.model_executor.runner.decode_cuda_graph_runner import build_replay_fb_view

        self.build_replay_fb_view = build_replay_fb_view
        self.wrapper = wrapper
        self.bs = capture_bs
        self.fill = wrapper.get_cuda_graph_seq_len_fill_value()
        wrapper.init_cuda_graph_state(capture_bs, capture_bs)
        zeros = lambda: torch.zeros(capture_bs, dtype=torch.int64)  # noqa: E731
        self.buffers = SimpleNamespace(input_ids=zeros(), positions=zeros(), req_pool_indices=zeros(),
                                       seq_lens=torch.full((capture_bs,), self.fill, dtype=torch.int64),
                                       seq_lens_cpu=torch.full((capture_bs,), self.fill, dtype=torch.int64),
                                       out_cache_loc=zeros(), encoder_lens=None, mamba_track_indices=None)
        b = self.buffers
        self.capture_batch = ForwardBatch(
            forward_mode=ForwardMode.DECODE, batch_size=capture_bs, input_ids=b.input_ids, req_pool_indices=b.req_pool_indices,
            seq_lens=b.seq_lens, out_cache_loc=b.out_cache_loc, seq_lens_sum=capture_bs * self.fill,
            seq_lens_cpu=b.seq_lens_cpu, positions=b.positions)
        wrapper.init_forward_metadata_out_graph(self.capture_batch, in_capture=True)
        wrapper.init_forward_metadata_in_graph(self.capture_batch)
        # What the captured kernels were recorded with: this view and these metadata objects.
        self.captured_view = wrapper._physical
        self.captured_metadata = wrapper.inner.forward_metadata

    def replay_prepare(self, forward_batch) -> None:
        raw = forward_batch.batch_size
        b = self.buffers
        b.req_pool_indices[:raw].copy_(forward_batch.req_pool_indices)
        b.req_pool_indices[raw:].zero_()
        b.seq_lens[:raw].copy_(forward_batch.seq_lens)
        b.seq_lens[raw:].fill_(self.fill)
        b.seq_lens_cpu[:raw].copy_(forward_batch.seq_lens_cpu)
        b.seq_lens_cpu[raw:].fill_(self.fill)
        view = self.build_replay_fb_view(forward_batch=forward_batch, buffers=b, bs=self.bs, raw_bs=raw,
                                         num_tokens=self.bs, global_num_tokens_cpu=None,
                                         seq_len_fill_value=self.fill, capture_forward_mode=ForwardMode.DECODE,
                                         is_encoder_decoder=False)
        self.wrapper.init_forward_metadata_out_graph(view)


def _grow_and_compress(step, rows, lengths, req_to_token, next_slot, pool, generator):
    """Between decode steps: one new token per request; at some steps the cache compresses a row."""
    for row, length in zip(rows, lengths):
        req_to_token[row, length] = next_slot
        next_slot += 1
    lengths = [n + 1 for n in lengths]
    if step % 2 == 1:
        row = rows[step % len(rows)]
        length = lengths[rows.index(row)]
        kept = (req_to_token[row, :length - 1] != 0).nonzero().flatten()
        drop = kept[torch.rand(kept.numel(), generator=generator) < 0.4]
        req_to_token[row, drop] = 0
        kept_table.rows_changed(pool, [row], [length - 1], FlashCacheConfig(retention=0.5))
    return lengths, next_slot


@pytest.mark.usefixtures("cpu_runtime")
def test_triton_decode_graph_replay_reads_the_same_kv_as_eager():
    from sglang.srt.layers.attention.triton_backend import TritonAttnBackend

    runner, generator = _model_runner()
    graph = wrap(TritonAttnBackend(runner))
    eager = wrap(TritonAttnBackend(runner))  # the same pool, so the same kept table
    assert graph.table is eager.table
    table, pool, kv_pool, layer = runner.req_to_token_pool.req_to_token, runner.req_to_token_pool, runner.token_to_kv_pool, _layer()
    rows, lengths = [5, 2, 3], [30, 7, 51]
    next_slot = fill_rows(table, lengths, rows, generator, 0.5)
    graph.physical_batch(extend_batch(rows, [0, 0, 0], lengths, table))
    replay = ReplayRunner(graph, capture_bs=4)
    indptr_address = replay.captured_metadata.kv_indptr.data_ptr()
    for step in range(4):
        lengths, next_slot = _grow_and_compress(step, rows, lengths, table, next_slot, pool, generator)
        batch = decode_batch(rows, lengths, table, pool)
        expected = reference_rows(table, batch.req_pool_indices, batch.seq_lens)
        replay.replay_prepare(batch)
        metadata = graph.inner.forward_metadata
        assert metadata is replay.captured_metadata and metadata.kv_indptr.data_ptr() == indptr_address
        indptr = metadata.kv_indptr[:5].tolist()
        for lane, kept in enumerate(expected):
            assert metadata.kv_indices[indptr[lane]:indptr[lane + 1]].tolist() == kept, (step, lane)
        assert indptr[4] - indptr[3] == replay.fill  # the padding lane reads row 0's first entry
        assert replay.captured_view.seq_lens[:3].tolist() == [len(kept) for kept in expected]
        q = torch.randn(4, NUM_HEADS * HEAD_DIM, generator=generator)
        replayed = graph.inner.forward_decode(q, None, None, layer, replay.captured_view, save_kv_cache=False)
        eager.init_forward_metadata(batch)
        eager_out = eager.forward_decode(q[:3], None, None, layer, batch, save_kv_cache=False)
        torch.testing.assert_close(replayed[:3], eager_out, atol=1e-5, rtol=1e-5)
        for lane, kept in enumerate(expected):
            slots = torch.tensor(kept)
            reference = _reference_attention(q[lane].view(1, NUM_HEADS, HEAD_DIM), kv_pool.k_buffer[0][slots],
                                             kv_pool.v_buffer[0][slots])
            torch.testing.assert_close(replayed[lane].view(NUM_HEADS, HEAD_DIM), reference[0], atol=1e-5, rtol=1e-5)


@pytest.mark.usefixtures("cpu_runtime")
def test_fa3_decode_graph_replay_reads_the_kept_slots():
    from sglang.srt.layers.attention.flashattention_backend import FlashAttentionBackend

    runner, generator = _model_runner(seed=1)
    graph = wrap(FlashAttentionBackend(runner))
    eager = wrap(FlashAttentionBackend(runner))
    table, pool = runner.req_to_token_pool.req_to_token, runner.req_to_token_pool
    rows, lengths = [1, 4], [44, 12]
    next_slot = fill_rows(table, lengths, rows, generator, 0.5)
    graph.physical_batch(extend_batch(rows, [0, 0], lengths, table))
    replay = ReplayRunner(graph, capture_bs=3)
    captured = replay.captured_metadata
    page_table_address = captured.page_table.data_ptr()
    for step in range(4):
        lengths, next_slot = _grow_and_compress(step, rows, lengths, table, next_slot, pool, generator)
        batch = decode_batch(rows, lengths, table, pool)
        expected = reference_rows(table, batch.req_pool_indices, batch.seq_lens)
        replay.replay_prepare(batch)
        metadata = graph.inner.forward_metadata
        assert metadata is captured and metadata.page_table.data_ptr() == page_table_address
        assert metadata.cache_seqlens_int32[:2].tolist() == [len(kept) for kept in expected]
        assert metadata.cu_seqlens_k[:3].tolist() == [0, len(expected[0]), len(expected[0]) + len(expected[1])]
        for lane, kept in enumerate(expected):
            assert metadata.page_table[lane, :len(kept)].tolist() == kept, (step, lane)
        eager.init_forward_metadata(batch)
        eager_metadata = eager.inner.forward_metadata
        assert eager_metadata.cache_seqlens_int32.tolist() == [len(kept) for kept in expected]
        for lane, kept in enumerate(expected):
            assert eager_metadata.page_table[lane, :len(kept)].tolist() == kept
