"""RotarySpec built from a transformers model equals the model's own rotary embedding.

Every case rotates random keys with the model's own ``rotary_emb`` + ``apply_rotary_pos_emb``
and compares with :func:`apply_rotary_reference` on the spec :func:`rotary_spec_from_hf` built;
the inverse must give the keys back. End to end, the prefill's recorded positions un-rotate the
cached keys to exactly what ``k_proj`` produced.
"""

from __future__ import annotations

import pytest
import torch

from flashcache_sglang.kernels.rotary import apply_rotary_reference
from flashcache_sglang.method.rope import (
    UnsupportedRopeError,
    find_rotary_module,
    recorded_positions,
    rotary_spec_from_hf,
)
from flashcache_sglang.method.scoring import unrotate_span_keys
from flashcache_sglang.reference import prefill


def _llama(rope_parameters=None, head_dim=16, **extra):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim,
                         max_position_embeddings=512, rope_parameters=rope_parameters, **extra)
    return LlamaForCausalLM(config).eval()


def _hf_rotate(model, keys, positions, apply):
    """keys [N, H, D] rotated by the model's own module: positions [N] or [3, N]."""
    module = find_rotary_module(model)
    position_ids = positions[None] if positions.dim() == 1 else positions[:, None]
    cos, sin = module(keys.new_zeros(1, keys.shape[0], keys.shape[-1]), position_ids)
    rotary_dim = cos.shape[-1]
    head = keys.transpose(0, 1)[None]  # [1, H, N, D]
    rotated, _ = apply(head[..., :rotary_dim], head[..., :rotary_dim], cos, sin)
    out = torch.cat([rotated, head[..., rotary_dim:]], dim=-1)
    return out[0].transpose(0, 1)


LLAMA_CASES = {
    "default": dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    "llama3": dict(rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                    "original_max_position_embeddings": 64}),
    "linear": dict(rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}),
    "yarn": dict(rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                  "original_max_position_embeddings": 64}),
    "head_dim_64": dict(rope_parameters={"rope_type": "default", "rope_theta": 100000.0}, head_dim=64),
}


@pytest.mark.parametrize("case", list(LLAMA_CASES))
def test_spec_equals_llama_rotary_embedding(case):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    model = _llama(**LLAMA_CASES[case])
    spec = rotary_spec_from_hf(model)
    head_dim = model.config.head_dim
    assert spec.head_dim == head_dim and spec.rotary_dim == head_dim and not spec.is_multimodal
    generator = torch.Generator().manual_seed(1)
    keys = torch.randn(97, 2, head_dim, generator=generator)
    positions = torch.randint(0, 512, (97,), generator=generator)
    expected = _hf_rotate(model, keys, positions, apply_rotary_pos_emb)
    got = apply_rotary_reference(keys, positions, spec)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(apply_rotary_reference(expected, positions, spec, inverse=True), keys,
                               rtol=1e-4, atol=1e-4)


def test_spec_equals_partial_rotary_embedding():
    """StableLM rotates only the first 25% of each head (partial_rotary_factor)."""
    from transformers import StableLmConfig, StableLmForCausalLM
    from transformers.models.stablelm.modeling_stablelm import apply_rotary_pos_emb

    config = StableLmConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                            num_attention_heads=2, num_key_value_heads=2, partial_rotary_factor=0.25,
                            max_position_embeddings=256)
    model = StableLmForCausalLM(config).eval()
    spec = rotary_spec_from_hf(model)
    assert spec.head_dim == 32 and spec.rotary_dim == 8
    keys = torch.randn(63, 2, 32, generator=torch.Generator().manual_seed(2))
    positions = torch.arange(63) * 3
    expected = _hf_rotate(model, keys, positions, apply_rotary_pos_emb)
    torch.testing.assert_close(apply_rotary_reference(keys, positions, spec), expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(expected[..., 8:], keys[..., 8:])


def _tiny_qwen():
    models = pytest.importorskip("flashcache_sglang.testing.models")
    from transformers import Qwen2_5_VLForConditionalGeneration

    directory = models.tiny_qwen2_5_vl_dir()
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(directory, dtype=torch.float32).eval()
    return model, directory


def test_spec_equals_qwen2_5_vl_mrope():
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb

    model, _ = _tiny_qwen()
    spec = rotary_spec_from_hf(model)
    assert spec.is_multimodal and spec.axis_of_pair.tolist() == [0, 0, 1, 1, 1, 2, 2, 2]
    generator = torch.Generator().manual_seed(3)
    keys = torch.randn(97, 2, 16, generator=generator)
    positions = torch.randint(0, 300, (3, 97), generator=generator)
    expected = _hf_rotate(model, keys, positions, apply_rotary_pos_emb)
    torch.testing.assert_close(apply_rotary_reference(keys, positions, spec), expected, rtol=1e-5, atol=1e-5)


def _k_proj_outputs(model, layers):
    captured = {}
    hooks = [layer.self_attn.k_proj.register_forward_hook(
        lambda module, args, output, index=index: captured.setdefault(index, output[0]))
        for index, layer in enumerate(layers)]
    return captured, hooks


def test_prefill_positions_unrotate_to_k_proj_output():
    model = _llama(**LLAMA_CASES["llama3"])
    ids = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(4))
    captured, hooks = _k_proj_outputs(model, model.model.layers)
    try:
        prefilled = prefill(model, ids)
    finally:
        for hook in hooks:
            hook.remove()
    assert torch.equal(prefilled.positions, torch.arange(40))
    pre_rope = unrotate_span_keys(prefilled.keys, prefilled.positions, prefilled.rotary)
    for layer in range(2):
        torch.testing.assert_close(pre_rope[layer], captured[layer].view(40, 2, 16), rtol=1e-4, atol=1e-5)


def test_prefill_records_mrope_positions_of_an_image_prompt():
    from PIL import Image
    from transformers import AutoProcessor

    model, directory = _tiny_qwen()
    processor = AutoProcessor.from_pretrained(directory)
    image = Image.fromarray((torch.rand(56, 84, 3, generator=torch.Generator().manual_seed(5)) * 255)
                            .to(torch.uint8).numpy())
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    # mm_token_type_ids: without it transformers 5 falls back to 1-D text positions.
    inputs = processor(text=[text], images=[image], return_tensors="pt", return_mm_token_type_ids=True)
    layers = model.model.language_model.layers
    captured, hooks = _k_proj_outputs(model, layers)
    try:
        prefilled = prefill(model, inputs["input_ids"], pixel_values=inputs["pixel_values"],
                            image_grid_thw=inputs["image_grid_thw"],
                            mm_token_type_ids=inputs["mm_token_type_ids"])
    finally:
        for hook in hooks:
            hook.remove()
    num_tokens = inputs["input_ids"].shape[1]
    positions = prefilled.positions
    assert positions.shape == (3, num_tokens)
    image_tokens = inputs["input_ids"][0] == model.config.image_token_id
    assert bool(image_tokens.any())
    # Inside the image the height and width axes differ from time; outside all three agree.
    assert not torch.equal(positions[1, image_tokens], positions[0, image_tokens])
    assert torch.equal(positions[0, ~image_tokens], positions[2, ~image_tokens])
    pre_rope = unrotate_span_keys(prefilled.keys, positions, prefilled.rotary)
    for layer in range(len(layers)):
        torch.testing.assert_close(pre_rope[layer], captured[layer].view(num_tokens, 2, 16), rtol=1e-4, atol=1e-5)


def test_dynamic_rope_and_missing_module_are_refused():
    model = _llama(rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0})
    with pytest.raises(UnsupportedRopeError, match="'dynamic'"):
        rotary_spec_from_hf(model)
    with pytest.raises(UnsupportedRopeError, match="no decoder rotary embedding"):
        find_rotary_module(torch.nn.Linear(2, 2))
    with recorded_positions(torch.nn.Linear(2, 2), required=False) as seen:
        pass
    assert seen.calls == []
