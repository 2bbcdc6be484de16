"""RotarySpec and the reference rotation against SGLang's own rotary embeddings (CPU).

SGLang applies RoPE before caching keys; the reference must rotate exactly as the model's module
does (plain, Llama-3 scaled, YaRN, M-RoPE with its axis map), and invert it.
"""

from __future__ import annotations

import pytest
import torch

from flashcache_sglang.kernels.rotary import RotarySpec, apply_rotary_reference, rerotate_slots_reference

HEAD_DIM = 16


def _sglang_rope(kind: str):
    from sglang.srt.layers.rotary_embedding.factory import get_rope

    scaling = {
        "default": None,
        "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 64},
        "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
        "mrope": {"rope_type": "default", "mrope_section": [2, 3, 3]},
    }[kind]
    return get_rope(HEAD_DIM, HEAD_DIM, 512, 10000, True, scaling, torch.float32)


@pytest.mark.parametrize("kind", ["default", "llama3", "yarn", "mrope"])
def test_reference_equals_sglang_forward_native(kind):
    from flashcache_sglang import upstream

    rope = _sglang_rope(kind)
    spec = upstream.rotary_spec_of(rope)
    generator = torch.Generator().manual_seed(0)
    num_tokens, num_heads = 37, 3
    keys = torch.randn(num_tokens, num_heads, HEAD_DIM, generator=generator)
    if kind == "mrope":
        positions = torch.randint(0, spec.max_positions, (3, num_tokens), generator=generator)
        assert spec.is_multimodal and spec.axis_of_pair.tolist() == [0, 0, 1, 1, 1, 2, 2, 2]
    else:
        positions = torch.randint(0, spec.max_positions, (num_tokens,), generator=generator)
    query = torch.zeros(num_tokens, num_heads * HEAD_DIM)
    _, expected = rope.forward_native(positions, query, keys.reshape(num_tokens, -1).clone())
    got = apply_rotary_reference(keys, positions, spec)
    torch.testing.assert_close(got, expected.reshape(num_tokens, num_heads, HEAD_DIM), rtol=1e-5, atol=1e-5)
    back = apply_rotary_reference(got, positions, spec, inverse=True)
    torch.testing.assert_close(back, keys, rtol=1e-4, atol=1e-4)


def test_gptj_style_and_partial_rotary():
    spec = RotarySpec.default_rope(HEAD_DIM, 10000.0, 128, rotary_dim=8)
    spec = RotarySpec(spec.cos_sin_cache, HEAD_DIM, is_neox_style=False)
    keys = torch.randn(9, 2, HEAD_DIM)
    positions = torch.arange(9) * 7
    rotated = apply_rotary_reference(keys, positions, spec)
    torch.testing.assert_close(rotated[..., 8:], keys[..., 8:])  # pass-through channels
    # GPT-J pairs (0, 1): a rotation by angle p * inv_freq[0] = p.
    angle = positions.float()
    expected0 = keys[..., 0] * angle.cos()[:, None] - keys[..., 1] * angle.sin()[:, None]
    torch.testing.assert_close(rotated[..., 0], expected0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(apply_rotary_reference(rotated, positions, spec, inverse=True), keys,
                               rtol=1e-5, atol=1e-5)


def test_rerotate_slots_moves_keys_in_place_and_only_those():
    spec = RotarySpec.default_rope(HEAD_DIM, 10000.0, 256, mrope_section=[2, 3, 3])
    generator = torch.Generator().manual_seed(1)
    pre_rope = torch.randn(20, 2, HEAD_DIM, generator=generator)
    old = torch.randint(0, 100, (3, 20), generator=generator)
    new = old - 40
    new[new < 0] = 0
    buffers = [torch.zeros(32, 2, HEAD_DIM, dtype=dtype) for dtype in (torch.float32, torch.bfloat16)]
    slots = torch.randperm(31, generator=generator)[:20] + 1
    for buffer in buffers:
        buffer[slots] = apply_rotary_reference(pre_rope, old, spec).to(buffer.dtype)
    untouched = [b.clone() for b in buffers]
    rerotate_slots_reference(buffers, slots, old, new, spec)
    for buffer, before, tol in zip(buffers, untouched, (1e-5, 4e-2)):
        torch.testing.assert_close(buffer[slots].float(), apply_rotary_reference(pre_rope, new, spec),
                                   rtol=tol, atol=tol)
        others = torch.ones(32, dtype=torch.bool)
        others[slots] = False
        assert torch.equal(buffer[others], before[others])


@pytest.mark.parametrize("bad, message", [
    (dict(positions=torch.tensor([0, 999])), r"\[0, 256\)"),
    (dict(positions=torch.zeros(3, 2, dtype=torch.int64)), "M-RoPE spec"),
    (dict(positions=torch.zeros(3)), "int32/int64"),
])
def test_bad_positions_are_named(bad, message):
    spec = RotarySpec.default_rope(HEAD_DIM, 10000.0, 256)
    with pytest.raises(ValueError, match=message):
        apply_rotary_reference(torch.zeros(2, 1, HEAD_DIM), bad["positions"], spec)


def test_unsupported_rotary_module_is_refused():
    from flashcache_sglang import upstream

    class OddRotaryEmbedding(torch.nn.Module):
        pass

    with pytest.raises(upstream.UnsupportedRotaryError, match="OddRotaryEmbedding is not supported"):
        upstream.rotary_spec_of(OddRotaryEmbedding())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("layout", ["neox", "gptj_partial", "mrope"])
@pytest.mark.parametrize("num_tokens", [1, 63, 97])
def test_triton_rerotate_equals_reference(dtype, layout, num_tokens):
    from flashcache_sglang.kernels.rotary import rerotate_slots

    head_dim = 16
    if layout == "mrope":
        spec = RotarySpec.default_rope(head_dim, 10000.0, 300, mrope_section=[2, 3, 3])
    elif layout == "gptj_partial":
        base = RotarySpec.default_rope(head_dim, 10000.0, 300, rotary_dim=12)
        spec = RotarySpec(base.cos_sin_cache, head_dim, is_neox_style=False)
    else:
        spec = RotarySpec.default_rope(head_dim, 500.0, 300)
    generator = torch.Generator().manual_seed(num_tokens)
    shape = (3, num_tokens) if layout == "mrope" else (num_tokens,)
    old = torch.randint(0, 300, shape, generator=generator)
    new = torch.randint(0, 300, shape, generator=generator)
    num_slots = num_tokens + 20
    buffers = [torch.randn(num_slots, 3, head_dim, generator=generator).to(dtype) for _ in range(3)]
    slots = torch.randperm(num_slots - 1, generator=generator)[:num_tokens] + 1
    expected = [b.clone() for b in buffers]
    rerotate_slots_reference(expected, slots, old, new, spec)
    rerotate_slots(buffers, slots, old, new, spec, backend="triton")
    tolerance = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
    for got, want in zip(buffers, expected):
        torch.testing.assert_close(got.float(), want.float(), rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("kind", ["default", "llama3", "yarn", "mrope"])
def test_scoring_undoes_sglangs_own_rotation(kind):
    """Keys rotated by SGLang's own module and written to a pool, scored with the spec
    rotary_spec_of built: the kernel's pre-RoPE deviation equals scoring the raw keys."""
    from flashcache_sglang import upstream
    from flashcache_sglang.kernels import score_span
    from flashcache_sglang.kernels.testing import DEVICE, assert_close
    from flashcache_sglang.method.scoring import frequency_scores

    rope = _sglang_rope(kind)
    spec = upstream.rotary_spec_of(rope)
    generator = torch.Generator().manual_seed(3)
    num_layers, num_tokens, num_heads = 2, 63, 2
    pre_rope = torch.randn(num_layers, num_tokens, num_heads, HEAD_DIM, generator=generator).cumsum(1) / 8
    values = torch.randn(num_layers, num_tokens, num_heads, HEAD_DIM, generator=generator)
    if kind == "mrope":
        positions = torch.randint(0, spec.max_positions, (3, num_tokens), generator=generator)
    else:
        positions = torch.randint(0, spec.max_positions, (num_tokens,), generator=generator)
    slots = torch.randperm(100, generator=generator)[:num_tokens] + 1
    k_buffers, v_buffers = [], []
    for layer in range(num_layers):
        query = torch.zeros(num_tokens, num_heads * HEAD_DIM)
        _, rotated = rope.forward_native(positions, query, pre_rope[layer].reshape(num_tokens, -1).clone())
        k_buffer = torch.zeros(101, num_heads, HEAD_DIM)
        v_buffer = torch.zeros(101, num_heads, HEAD_DIM)
        k_buffer[slots] = rotated.reshape(num_tokens, num_heads, HEAD_DIM)
        v_buffer[slots] = values[layer]
        k_buffers.append(k_buffer.to(DEVICE))
        v_buffers.append(v_buffer.to(DEVICE))
    expected = frequency_scores(pre_rope, values, 0.2)
    for backend in ("triton", "reference"):
        got = score_span(k_buffers, v_buffers, slots.to(DEVICE), 0.2, positions=positions.to(DEVICE),
                         rotary=spec, backend=backend)
        assert got.key_space == "pre_rope"
        assert_close(got.key_deviation, expected.key_deviation, f"{backend} key_deviation", 1e-4, 1e-4)
        assert_close(got.value_deviation, expected.value_deviation, f"{backend} value_deviation", 1e-4, 1e-4)


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2], ids=["fp8e4m3", "fp8e5m2"])
def test_triton_rerotate_and_copy_on_fp8_pools(dtype):
    """FP8 pools (SGLang stores x / scale): rotation commutes with the scale, so keys are
    re-rotated in place as stored; a copy moves the bytes."""
    from flashcache_sglang.kernels import copy_slots
    from flashcache_sglang.kernels.rotary import rerotate_slots

    spec = RotarySpec.default_rope(16, 10000.0, 300, mrope_section=[2, 3, 3])
    generator = torch.Generator().manual_seed(5)
    storage = [torch.zeros(64, 2, 16, dtype=torch.uint8) for _ in range(2)]
    buffers = [b.view(dtype) for b in storage]
    for buffer in buffers:
        buffer[:] = torch.randn(64, 2, 16, generator=generator).to(dtype)
    slots = torch.arange(3, 40)
    old = torch.randint(0, 300, (3, slots.numel()), generator=generator)
    new = torch.randint(0, 300, (3, slots.numel()), generator=generator)
    expected = [b.clone() for b in buffers]
    rerotate_slots_reference(expected, slots, old, new, spec)
    rerotate_slots(buffers, slots, old, new, spec, backend="triton")
    for got, want in zip(buffers, expected):
        got, want = got.float(), want.float()
        differ = got != want
        # Triton 3.8's interpreter converts float32 -> FP8 with its own rounding (GPUs round to
        # nearest even): when rounding carries into the exponent it loses it (-1.97 -> -1, not
        # -2: the reference's power of two, halved), and subnormals may land one step off.
        # Those are the only differences allowed.
        info = torch.finfo(dtype)
        carried = (want.abs() == torch.exp2(torch.round(torch.log2(want.abs().clamp_min(1e-30))))) & (got == want / 2)
        subnormal_step = info.tiny * info.eps
        near_subnormal = (want.abs() <= info.tiny) & ((got - want).abs() <= subnormal_step * 1.01)
        allowed = ~differ | carried | near_subnormal
        assert bool(allowed.all()), (got[~allowed], want[~allowed])
        assert int(differ.sum()) < 0.05 * got.numel()
    values = [b.clone() for b in buffers]
    copy_slots(buffers, values, torch.tensor([5, 6]), torch.tensor([50, 51]), backend="triton")
    for buffer in buffers + values:
        assert torch.equal(buffer[50:52].view(torch.uint8), buffer[5:7].view(torch.uint8))
