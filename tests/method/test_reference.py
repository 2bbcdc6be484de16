"""Reference path (transformers): plain NLL without compression, exact masked attention with it."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from flashcache_sglang.policies import KeepSet, make_policy, text_candidate_mask
from flashcache_sglang.reference import (
    attention_output_error,
    continuation_nll,
    continue_from_prefill,
    prefill,
)

CONTEXT, TOTAL = 48, 64


@pytest.fixture(scope="module")
def tiny_llama():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         attn_implementation="sdpa")
    model = LlamaForCausalLM(config).eval()
    for parameter in model.parameters():  # larger weights: peaked, position-sensitive logits
        parameter.data.normal_(0, 0.2)
    return model


@pytest.fixture(scope="module")
def input_ids():
    return torch.randint(0, 128, (1, TOTAL), generator=torch.Generator().manual_seed(0))


def _plain_nll(model, ids, context_len, mask_4d=None):
    with torch.no_grad():
        logits = model(ids, attention_mask=mask_4d).logits[0, context_len - 1 : -1]
    return torch.nn.functional.cross_entropy(logits.float(), ids[0, context_len:], reduction="none")


def test_no_compression_equals_plain_nll(tiny_llama, input_ids):
    got = continuation_nll(tiny_llama, input_ids, CONTEXT, None)
    want = _plain_nll(tiny_llama, input_ids, CONTEXT)
    assert got.shape == (TOTAL - CONTEXT,)
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


def test_retention_one_equals_no_compression(tiny_llama, input_ids):
    prefilled = prefill(tiny_llama, input_ids[:, :CONTEXT])
    keep = make_policy("flashcache", retention=1.0, granularity="layer").select(
        prefilled.span(text_candidate_mask(CONTEXT, 2, 8)))
    got = continue_from_prefill(tiny_llama, prefilled, input_ids[:, CONTEXT:], keep)
    assert torch.allclose(got, continuation_nll(tiny_llama, input_ids, CONTEXT, None), atol=1e-5)


def test_shared_keep_equals_masked_full_attention(tiny_llama, input_ids):
    """Dropping context tokens == attending over kept context tokens only, original positions."""
    keep_tokens = torch.rand(CONTEXT, generator=torch.Generator().manual_seed(1)) < 0.4
    keep_tokens[0] = True
    keep = KeepSet(keep_tokens.expand(3, 2, CONTEXT).clone(), torch.ones(CONTEXT, dtype=torch.bool))
    got = continuation_nll(tiny_llama, input_ids, CONTEXT, keep)
    allowed = torch.ones(TOTAL, TOTAL, dtype=torch.bool).tril()
    allowed[CONTEXT:, :CONTEXT] &= keep_tokens  # continuation rows see kept context only
    want = _plain_nll(tiny_llama, input_ids, CONTEXT, allowed[None, None])
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()
    assert not torch.allclose(got, continuation_nll(tiny_llama, input_ids, CONTEXT, None), atol=1e-3)


@pytest.mark.parametrize("granularity", ["layer", "head"])
def test_per_layer_and_per_head_sets_run(tiny_llama, input_ids, granularity):
    prefilled = prefill(tiny_llama, input_ids[:, :CONTEXT], observation_window=8)
    span = prefilled.span(text_candidate_mask(CONTEXT, 2, 8))
    for name in ("flashcache", "snapkv", "knorm"):
        keep = make_policy(name, retention=0.3, granularity=granularity).select(span)
        nll = continue_from_prefill(tiny_llama, prefilled, input_ids[:, CONTEXT:], keep)
        assert nll.shape == (TOTAL - CONTEXT,) and bool(torch.isfinite(nll).all())


def test_attention_output_error_is_zero_when_everything_is_kept():
    queries = torch.randn(2, 4, 5, 8)
    keys, values = torch.randn(2, 2, 15, 8), torch.randn(2, 2, 15, 8)
    everything = KeepSet(torch.ones(2, 2, 10, dtype=torch.bool), torch.ones(10, dtype=torch.bool))
    assert attention_output_error(queries, keys, values, everything).abs().max() < 1e-6
    half = KeepSet(torch.arange(10).expand(2, 2, 10) % 2 == 0, torch.ones(10, dtype=torch.bool))
    assert bool((attention_output_error(queries, keys, values, half) > 0).all())


def test_bad_reference_input(tiny_llama, input_ids):
    with pytest.raises(ValueError, match="context_len must be in"):
        continuation_nll(tiny_llama, input_ids, TOTAL, None)
    with pytest.raises(ValueError, match="input_ids must be"):
        continuation_nll(tiny_llama, input_ids[0], 10, None)
    wrong = KeepSet(torch.ones(3, 2, CONTEXT + 1, dtype=torch.bool), torch.ones(CONTEXT + 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="keep shape"):
        continuation_nll(tiny_llama, input_ids, CONTEXT, wrong)


def test_qwen2_5_vl_language_model_text_prompt():
    models = pytest.importorskip("flashcache_sglang.testing.models")
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(models.tiny_qwen2_5_vl_dir(), dtype=torch.float32).eval()
    ids = torch.randint(0, 1000, (1, 40), generator=torch.Generator().manual_seed(2))
    got = continuation_nll(model, ids, 30, None)
    want = _plain_nll(model, ids, 30)
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()


def test_kv_quantization_fp8_and_bf16(tiny_llama, input_ids):
    import dataclasses

    from flashcache_sglang.reference import KVQuantization, kv_quantization

    prefilled = prefill(tiny_llama, input_ids[:, :CONTEXT])
    fp8 = KVQuantization.for_prefill(prefilled, "fp8_e4m3")
    assert fp8.key_scales.shape == (3,)
    keys, values = fp8.apply_to_span(prefilled.keys, prefilled.values)
    # the per-layer scale maps each layer's amax to float8_e4m3's 448: nothing saturates
    torch.testing.assert_close(keys.abs().amax(dim=(1, 2, 3)), prefilled.keys.abs().amax(dim=(1, 2, 3)))
    assert 0 < float((keys - prefilled.keys).abs().max()) < 0.1 * float(prefilled.keys.abs().max())
    again, _ = fp8.apply_to_span(keys, values)
    assert torch.equal(again, keys), "stored values are fixed points"
    bf16 = KVQuantization.for_prefill(prefilled, "bf16")
    assert torch.equal(bf16.key_scales, torch.ones(3))
    full = continue_from_prefill(tiny_llama, prefilled, input_ids[:, CONTEXT:], None)
    quantized = dataclasses.replace(prefilled, keys=keys, values=values)
    with kv_quantization(fp8):
        got = continue_from_prefill(tiny_llama, quantized, input_ids[:, CONTEXT:], None)
    assert 0 < float((got - full).abs().max()) < 0.5
    # inside the block, the continuation's own K/V are stored quantised too
    crushed = KVQuantization("fp8_e4m3", torch.full((3,), 1e6), torch.full((3,), 1e6))
    with kv_quantization(crushed):
        zeroed = continue_from_prefill(tiny_llama, quantized, input_ids[:, CONTEXT:], None)
    assert float((zeroed - got).abs().max()) > 1e-3
    with pytest.raises(ValueError, match="kv_dtype must be one of"):
        KVQuantization.for_prefill(prefilled, "int4")
