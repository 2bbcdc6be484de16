"""Triton span scoring vs the FFT reference (gather from the pool, then frequency_scores)."""

from __future__ import annotations

import pytest
import torch

from flashcache_sglang.kernels import score_span
from flashcache_sglang.kernels.scoring.reference import score_span_reference
from flashcache_sglang.kernels.scoring.triton import (
    INTERPRETER_CONFIG,
    KernelTiles,
    ScoringConfig,
    lowpass_table,
    score_span_triton,
)
from flashcache_sglang.kernels.testing import DEVICE, assert_close, make_pool, write_smooth_span
from flashcache_sglang.method.dct import cutoff_index, dct2

# (dev rel RMSE, dev max abs, ratio max abs): 16-bit pools round the DCT table and the
# coefficients to their own dtype before the tensor-core matmuls.
TOLERANCES = {
    torch.float32: (1e-5, 1e-4, 1e-5),
    torch.float16: (5e-3, 5e-2, 2e-3),
    torch.bfloat16: (2e-2, 2e-1, 1e-2),
}
DTYPE_IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@pytest.mark.parametrize("dtype", list(DTYPE_IDS), ids=DTYPE_IDS.get)
@pytest.mark.parametrize("head_dim", [64, 128], ids=lambda d: f"d{d}")
@pytest.mark.parametrize("num_tokens", [1, 63, 97, 500], ids=lambda n: f"n{n}")
def test_scoring_matches_reference(num_tokens, head_dim, dtype):
    num_layers, num_kv_heads, num_slots = 2, 2, 640
    k_buffers, v_buffers = make_pool(num_layers, num_slots, num_kv_heads, head_dim, dtype, seed=num_tokens)
    slots = torch.randperm(num_slots - 1, generator=torch.Generator().manual_seed(1))[:num_tokens] + 1
    slots = slots.to(DEVICE, torch.int32 if num_tokens % 2 else torch.int64)
    write_smooth_span(k_buffers, v_buffers, slots, seed=num_tokens + head_dim)
    gamma = 0.2

    actual = score_span_triton(k_buffers, v_buffers, slots, gamma)
    expected = score_span_reference(k_buffers, v_buffers, slots, gamma)

    rel_rmse, max_abs, ratio_abs = TOLERANCES[dtype]
    assert_close(actual.deviation, expected.deviation, "deviation", rel_rmse, max_abs)
    assert_close(actual.high_freq_ratio, expected.high_freq_ratio, "high_freq_ratio", 10 * ratio_abs, ratio_abs)
    assert_close(
        actual.high_freq_ratio_per_head, expected.high_freq_ratio_per_head,
        "high_freq_ratio_per_head", 10 * ratio_abs, ratio_abs,
    )


# Small tiles and head_dim chunks (the GPU residual kernel's layout), with head_dim 60 so the
# last chunk and every tile are partly masked.
CHUNKED = ScoringConfig(
    coefficients=KernelTiles(block_rows=32, block_tokens=32, block_dim=0, num_warps=4, num_stages=1),
    residual=KernelTiles(block_rows=32, block_tokens=32, block_dim=32, num_warps=4, num_stages=1),
)


@pytest.mark.parametrize("head_dim", [60, 128], ids=lambda d: f"d{d}")
@pytest.mark.parametrize("config", [CHUNKED, INTERPRETER_CONFIG], ids=["chunked", "interpreter"])
def test_scoring_tiles_and_head_dim_chunks(config, head_dim):
    k_buffers, v_buffers = make_pool(1, 200, 2, head_dim, torch.bfloat16, seed=head_dim)
    slots = torch.arange(100, 3, -1, device=DEVICE)  # 97 tokens, slots descending
    write_smooth_span(k_buffers, v_buffers, slots, seed=5)
    actual = score_span_triton(k_buffers, v_buffers, slots, 0.2, config)
    expected = score_span_reference(k_buffers, v_buffers, slots, 0.2)
    rel_rmse, max_abs, ratio_abs = TOLERANCES[torch.bfloat16]
    assert_close(actual.deviation, expected.deviation, "deviation", rel_rmse, max_abs)
    assert_close(actual.high_freq_ratio, expected.high_freq_ratio, "high_freq_ratio", 10 * ratio_abs, ratio_abs)


@pytest.mark.parametrize("gamma", [0.05, 0.5, 0.95], ids=lambda g: f"gamma{g}")
def test_scoring_gamma_extremes(gamma):
    k_buffers, v_buffers = make_pool(1, 200, 3, 64, torch.float32, seed=3)
    slots = torch.arange(1, 130, device=DEVICE)
    actual = score_span_triton(k_buffers, v_buffers, slots, gamma)
    expected = score_span_reference(k_buffers, v_buffers, slots, gamma)
    assert_close(actual.deviation, expected.deviation, "deviation", 1e-5, 1e-4)
    assert_close(actual.high_freq_ratio, expected.high_freq_ratio, "high_freq_ratio", 1e-5, 1e-5)


@pytest.mark.parametrize("num_tokens", [1, 2, 7, 64], ids=lambda n: f"n{n}")
def test_lowpass_table_is_folded_dct(num_tokens):
    cutoff = cutoff_index(num_tokens, 0.6)
    table = lowpass_table(num_tokens, cutoff, torch.float64, torch.device("cpu"))
    dct_rows = dct2(torch.eye(num_tokens, dtype=torch.float64), dim=0)  # [m, n] = C[m, n]
    order = list(range(0, cutoff + 1, 2)) + list(range(1, cutoff + 1, 2))
    expected = dct_rows[order, : (num_tokens + 1) // 2]
    if num_tokens % 2:
        expected[cutoff // 2 + 1 :, -1] = 0.0
    assert torch.allclose(table, expected, atol=1e-12), (table - expected).abs().max()


def test_auto_backend_on_cpu_uses_reference_without_interpreter():
    k_buffers, v_buffers = make_pool(2, 50, 2, 64, torch.float32, seed=0)
    slots = torch.arange(3, 40, device=DEVICE)
    actual = score_span(k_buffers, v_buffers, slots, 0.2, backend="reference")
    expected = score_span_reference(k_buffers, v_buffers, slots, 0.2)
    assert torch.equal(actual.deviation, expected.deviation)
    auto = score_span(k_buffers, v_buffers, slots, 0.2)
    assert_close(auto.deviation, expected.deviation, "deviation", 1e-5, 1e-4)


def _pool():
    return make_pool(2, 20, 2, 64, torch.float32, seed=0)


@pytest.mark.parametrize(
    "mutate, argument",
    [
        (lambda k, v, s: (k[:1], v, s, 0.2), "k_buffers has 1 layers"),
        (lambda k, v, s: (k, [v[0], v[1].half()], s, 0.2), r"v_buffers\[1\]"),
        (lambda k, v, s: (k, [v[0], v[1][:, :1]], s, 0.2), r"v_buffers\[1\]"),
        (lambda k, v, s: ([k[0].transpose(1, 2).contiguous().transpose(1, 2), k[1]], v, s, 0.2), r"k_buffers\[0\]"),
        (lambda k, v, s: (k[0], v, s, 0.2), "k_buffers must be a list"),
        (lambda k, v, s: (k, v, s.float(), 0.2), "slot_indices"),
        (lambda k, v, s: (k, v, s[None], 0.2), "slot_indices"),
        (lambda k, v, s: (k, v, s.to("meta"), 0.2), "slot_indices"),
        (lambda k, v, s: (k, v, s[:0], 0.2), "slot_indices"),
        (lambda k, v, s: (k, v, s, 1.0), "gamma"),
        (lambda k, v, s: (k, v, s, 0.0), "gamma"),
    ],
    ids=[
        "layer-count", "dtype", "shape", "strides", "not-a-list", "float-slots", "2d-slots",
        "slots-device", "empty-span", "gamma-1", "gamma-0",
    ],
)
@pytest.mark.parametrize("entry", [score_span, score_span_triton], ids=["score_span", "score_span_triton"])
def test_scoring_rejects_bad_arguments(entry, mutate, argument):
    k_buffers, v_buffers = _pool()
    slots = torch.arange(1, 10, device=DEVICE)
    with pytest.raises(ValueError, match=argument):
        entry(*mutate(k_buffers, v_buffers, slots))
