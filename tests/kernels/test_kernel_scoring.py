"""Triton span scoring vs the FFT reference (gather from the pool, then frequency_scores):
post- and pre-RoPE keys (inverse rotation fused into the loads), FP8 pools with their scales."""

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


# ---------------------------------------------------------------- pre-RoPE keys (inverse rotation)
from flashcache_sglang.kernels.rotary import RotarySpec, apply_rotary_reference  # noqa: E402


def _write_rotated_span(k_buffers, v_buffers, slots, positions, spec, seed):
    """Smooth pre-RoPE content written rotated, as SGLang caches keys (values unrotated)."""
    write_smooth_span(k_buffers, v_buffers, slots, seed=seed)
    index = slots.long()
    for buffer in k_buffers:
        pre_rope = buffer[index].float().cpu()
        rotated = apply_rotary_reference(pre_rope, positions.cpu(), spec)
        buffer[index] = rotated.to(buffer.dtype).to(buffer.device)


def _check_scores(actual, expected, dtype, key_space):
    rel_rmse, max_abs, ratio_abs = TOLERANCES.get(dtype, TOLERANCES[torch.bfloat16])
    assert actual.key_space == expected.key_space == key_space
    pairs = [("key_deviation", rel_rmse, max_abs), ("value_deviation", rel_rmse, max_abs),
             ("high_freq_ratio", 10 * ratio_abs, ratio_abs), ("high_freq_ratio_per_head", 10 * ratio_abs, ratio_abs)]
    for what, relative, absolute in pairs:
        got, want = getattr(actual, what), getattr(expected, what)
        if float(want.abs().max()) == 0.0:
            # One token is its own base: exactly 0 in the reference, the squared rounding of
            # its coefficient (pool dtype, |x| <~ 10) in the kernel; no relative error there.
            # (Ratios are relative already: their usual absolute bound applies.)
            bound = absolute if "ratio" in what else 100 * torch.finfo(dtype).eps ** 2
            assert torch.isfinite(got).all() and float(got.abs().max()) < bound, f"{what}: {got.flatten().tolist()}"
        else:
            assert_close(got, want, what, relative, absolute)


@pytest.mark.parametrize("dtype", list(DTYPE_IDS), ids=DTYPE_IDS.get)
@pytest.mark.parametrize("head_dim", [64, 128], ids=lambda d: f"d{d}")
@pytest.mark.parametrize("num_tokens", [1, 63, 97, 500], ids=lambda n: f"n{n}")
def test_pre_rope_scoring_matches_reference(num_tokens, head_dim, dtype):
    num_layers, num_kv_heads, num_slots = 2, 2, 640
    spec = RotarySpec.default_rope(head_dim, 10000.0, 4096)
    k_buffers, v_buffers = make_pool(num_layers, num_slots, num_kv_heads, head_dim, dtype, seed=num_tokens)
    slots = torch.randperm(num_slots - 1, generator=torch.Generator().manual_seed(2))[:num_tokens] + 1
    slots = slots.to(DEVICE, torch.int64 if num_tokens % 2 else torch.int32)
    positions = (torch.arange(num_tokens) * 3 + 11).to(DEVICE, torch.int32 if num_tokens % 2 else torch.int64)
    _write_rotated_span(k_buffers, v_buffers, slots, positions, spec, seed=num_tokens + head_dim)

    actual = score_span(k_buffers, v_buffers, slots, 0.2, positions=positions, rotary=spec, backend="triton")
    expected = score_span(k_buffers, v_buffers, slots, 0.2, positions=positions, rotary=spec, backend="reference")
    _check_scores(actual, expected, dtype, "pre_rope")
    # The rotation matters: post-RoPE key deviation of the same pool differs, value deviation not.
    post = score_span(k_buffers, v_buffers, slots, 0.2, backend="triton")
    assert post.key_space == "post_rope"
    assert torch.equal(post.value_deviation, actual.value_deviation)
    if num_tokens > 1:
        assert (post.key_deviation - actual.key_deviation).abs().max() > 1e-3


def _mrope_spec(head_dim, rotary_dim=None):
    rotary_dim = rotary_dim or head_dim
    half = rotary_dim // 2
    sections = [half // 4, (half - half // 4) // 2, half - half // 4 - (half - half // 4) // 2]
    return RotarySpec.default_rope(head_dim, 10000.0, 2048, rotary_dim=rotary_dim, mrope_section=sections)


ROTARY_VARIANTS = {
    "partial-neox": lambda: RotarySpec.default_rope(64, 10000.0, 2048, rotary_dim=32),
    "gptj": lambda: RotarySpec(RotarySpec.default_rope(64, 10000.0, 2048).cos_sin_cache, 64, is_neox_style=False),
    "partial-gptj": lambda: RotarySpec(RotarySpec.default_rope(64, 10000.0, 2048, rotary_dim=16).cos_sin_cache,
                                       64, is_neox_style=False),
    "magnitude-scaled": lambda: RotarySpec.from_inv_freq(  # YaRN keeps a magnitude factor in the table
        1.0 / (10000.0 ** (torch.arange(0, 64, 2) / 64)), 2048, 64, attention_scaling=1.3),
    "mrope": lambda: _mrope_spec(64),
    "mrope-partial": lambda: _mrope_spec(64, rotary_dim=48),
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("variant", list(ROTARY_VARIANTS))
def test_rotary_variants_match_reference(variant, dtype):
    spec = ROTARY_VARIANTS[variant]()
    num_tokens = 97
    k_buffers, v_buffers = make_pool(2, 200, 3, 64, dtype, seed=7)
    slots = torch.arange(150, 150 - num_tokens, -1, device=DEVICE)
    generator = torch.Generator().manual_seed(8)
    if spec.is_multimodal:  # a 1 x 6 x 8 image grid between text, as Qwen2.5-VL numbers it
        positions = torch.arange(num_tokens).expand(3, num_tokens).clone()
        grid = torch.arange(48)
        positions[:, 20:68] = torch.stack([torch.full((48,), 20), 20 + grid // 8, 20 + grid % 8])
        positions[:, 68:] = torch.arange(28, 28 + num_tokens - 68)
    else:
        positions = torch.randint(0, 2048, (num_tokens,), generator=generator)
    positions = positions.to(DEVICE)
    _write_rotated_span(k_buffers, v_buffers, slots, positions, spec, seed=9)
    actual = score_span(k_buffers, v_buffers, slots, 0.2, positions=positions, rotary=spec, backend="triton")
    expected = score_span(k_buffers, v_buffers, slots, 0.2, positions=positions, rotary=spec, backend="reference")
    _check_scores(actual, expected, dtype, "pre_rope")


@pytest.mark.parametrize("config", [CHUNKED], ids=["chunked"])
def test_pre_rope_head_dim_chunks(config):
    """GPU tiles: head_dim chunks of 32, so a key's rotation partner lies in another chunk."""
    spec = RotarySpec.default_rope(128, 10000.0, 1024)
    k_buffers, v_buffers = make_pool(1, 200, 2, 128, torch.bfloat16, seed=10)
    slots = torch.arange(1, 98, device=DEVICE)
    positions = torch.arange(97, device=DEVICE) + 5
    _write_rotated_span(k_buffers, v_buffers, slots, positions, spec, seed=11)
    actual = score_span_triton(k_buffers, v_buffers, slots, 0.2, config, positions=positions, rotary=spec)
    expected = score_span(k_buffers, v_buffers, slots, 0.2, positions=positions, rotary=spec, backend="reference")
    _check_scores(actual, expected, torch.bfloat16, "pre_rope")


# ---------------------------------------------------------------- FP8 pools
FP8_IDS = {torch.float8_e4m3fn: "e4m3", torch.float8_e5m2: "e5m2"}
# Dequantised exactly; the matmuls then run in bfloat16: relative RMSE, max error relative to
# the largest deviation (the scaled data reach ~100), ratio max abs.
FP8_TOLERANCE = (2e-2, 1e-2, 1e-2)


def _fp8_pool(fp8_dtype, num_layers, num_tokens, head_dim, scales, seed):
    """SGLang's FP8 pool: x / scale cast to float8, stored as uint8 (the buffers handed over are
    the float8 views, like get_key_buffer returns)."""
    k_buffers, v_buffers = make_pool(num_layers, 600, 2, head_dim, torch.float32, seed=seed)
    slots = torch.randperm(599, generator=torch.Generator().manual_seed(seed))[:num_tokens].to(DEVICE) + 1
    write_smooth_span(k_buffers, v_buffers, slots, seed=seed + 1)
    stores = []
    for buffers, layer_scales in ((k_buffers, scales[0]), (v_buffers, scales[1])):
        stored = []
        for buffer, scale in zip(buffers, layer_scales):
            storage = torch.empty(buffer.shape, dtype=torch.uint8, device=DEVICE)
            storage.copy_((buffer * 4.0 / scale).to(fp8_dtype).view(torch.uint8))
            stored.append(storage.view(fp8_dtype))
        stores.append(stored)
    return stores[0], stores[1], slots


@pytest.mark.parametrize("rotated", [False, True], ids=["post-rope", "pre-rope"])
@pytest.mark.parametrize("num_tokens", [63, 500], ids=lambda n: f"n{n}")
@pytest.mark.parametrize("fp8_dtype", list(FP8_IDS), ids=FP8_IDS.get)
def test_fp8_pool_matches_reference(fp8_dtype, num_tokens, rotated):
    k_scale, v_scale = [0.5, 2.0], [0.25, 3.0]
    k_buffers, v_buffers, slots = _fp8_pool(fp8_dtype, 2, num_tokens, 64, (k_scale, v_scale), seed=num_tokens)
    rope = {}
    if rotated:
        rope = dict(positions=torch.arange(num_tokens, device=DEVICE) * 2, rotary=RotarySpec.default_rope(64, 1e4, 2048))
    scale_tensor = torch.tensor(v_scale, device=DEVICE)
    actual = score_span(k_buffers, v_buffers, slots, 0.2, k_scale=k_scale, v_scale=scale_tensor, backend="triton", **rope)
    expected = score_span(k_buffers, v_buffers, slots, 0.2, k_scale=k_scale, v_scale=v_scale, backend="reference", **rope)
    rel_rmse, max_relative, ratio_abs = FP8_TOLERANCE
    for what in ("key_deviation", "value_deviation"):
        want = getattr(expected, what)
        assert_close(getattr(actual, what), want, what, rel_rmse, max_relative * float(want.abs().max()))
    assert_close(actual.high_freq_ratio, expected.high_freq_ratio, "high_freq_ratio", 10 * ratio_abs, ratio_abs)
    # The reference dequantises exactly: stored float8 * scale.
    gathered = k_buffers[1][slots.long()].float() * k_scale[1]
    assert torch.isfinite(gathered).all() and gathered.abs().max() > 0
    # Scales matter: without them the value deviation is off by scale^2 per layer.
    unscaled = score_span(k_buffers, v_buffers, slots, 0.2, backend="reference", **rope)
    torch.testing.assert_close(unscaled.value_deviation[1] * 9.0, expected.value_deviation[1], rtol=1e-5, atol=1e-6)


def test_out_of_table_positions_are_caught_in_debug_mode():
    spec = RotarySpec.default_rope(64, 1e4, 100)
    k_buffers, v_buffers = make_pool(1, 20, 1, 64, torch.float32, seed=0)
    slots = torch.arange(1, 11, device=DEVICE)
    positions = torch.arange(95, 105, device=DEVICE)
    for backend in ("triton", "reference"):
        with pytest.raises(ValueError, match=r"\[0, 100\)"):
            score_span(k_buffers, v_buffers, slots, 0.2, positions=positions, rotary=spec, backend=backend)


_SPEC64 = RotarySpec.default_rope(64, 1e4, 256)


@pytest.mark.parametrize(
    "extra, argument",
    [
        (dict(positions=torch.arange(9)), "positions and rotary go together"),
        (dict(rotary=_SPEC64), "positions and rotary go together"),
        (dict(positions=torch.arange(9).float(), rotary=_SPEC64), "positions must be a torch.int32"),
        (dict(positions=torch.arange(8), rotary=_SPEC64), "positions covers 8 tokens"),
        (dict(positions=torch.zeros(3, 9, dtype=torch.int64), rotary=_SPEC64), "M-RoPE"),
        (dict(positions=torch.zeros(2, 9, 1, dtype=torch.int64), rotary=_SPEC64), r"positions must be \[num_tokens\]"),
        (dict(positions=torch.arange(9, device="meta"), rotary=_SPEC64), "positions is on meta"),
        (dict(positions=torch.arange(9), rotary=RotarySpec.default_rope(32, 1e4, 64)), "rotary.head_dim=32"),
        (dict(positions=torch.arange(9), rotary="rope"), "rotary must be a RotarySpec"),
        (dict(k_scale=[1.0]), "k_scale has 1 entries"),
        (dict(v_scale=[1.0, -2.0]), "v_scale entries must be finite floats > 0"),
        (dict(k_scale=torch.ones(3)), r"k_scale must be a float tensor of \[num_layers=2\]"),
        (dict(v_scale=torch.ones(2, dtype=torch.int64)), "v_scale must be a float tensor"),
    ],
    ids=["positions-alone", "rotary-alone", "float-positions", "positions-length", "3d-without-mrope",
         "positions-rank", "positions-device", "head-dim", "not-a-spec", "k-scale-length", "v-scale-negative",
         "k-scale-shape", "v-scale-int"],
)
@pytest.mark.parametrize("entry", [score_span, score_span_triton], ids=["score_span", "score_span_triton"])
def test_scoring_rejects_bad_rotary_and_scale_arguments(entry, extra, argument):
    k_buffers, v_buffers = _pool()
    slots = torch.arange(1, 10, device=DEVICE)
    if isinstance(extra.get("positions"), torch.Tensor) and extra["positions"].device.type != "meta":
        extra = dict(extra, positions=extra["positions"].to(DEVICE))
    with pytest.raises(ValueError, match=argument):
        entry(k_buffers, v_buffers, slots, 0.2, **extra)


def test_fp8_pools_are_refused_by_kernels_that_do_not_dequantise():
    from flashcache_sglang.kernels import select_kept

    k_buffers, _ = _pool()
    scores = k_buffers[0][:8, 0, 0].to(torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="scores must be float16, bfloat16 or float32"):
        select_kept(scores, 2)


def test_spans_scored_a_few_layers_per_launch_score_exactly(monkeypatch):
    """A long span is scored in layer groups (bounded temporary memory): same scores as one launch."""
    from flashcache_sglang.kernels import api

    k_buffers, v_buffers = make_pool(5, 120, 2, 64, torch.float32, seed=3)
    slots = torch.arange(1, 98, device=DEVICE)
    whole = api.score_span(k_buffers, v_buffers, slots, 0.2, backend="triton")
    monkeypatch.setattr(api, "SCORING_EXTRA_FRACTION", 1e-6)  # one layer per launch
    layout = api.check_kv_buffers(k_buffers, v_buffers)
    assert api.scoring_layer_group(97, 0.2, layout) == 1
    grouped = api.score_span(k_buffers, v_buffers, slots, 0.2, backend="triton")
    for name in ("key_deviation", "value_deviation", "high_freq_ratio", "high_freq_ratio_per_head"):
        torch.testing.assert_close(getattr(grouped, name), getattr(whole, name), rtol=1e-6, atol=1e-7)
