"""Reference path on Hugging Face transformers: prefill, compress the cache, keep decoding.

The ground truth the SGLang integration is compared against. Batch size 1, any decoder LM whose
attention goes through transformers' attention interface (Llama, Qwen2, the Qwen2.5-VL
language model).

How it works: while a :func:`reference_attention` block is active, the decoder's attention
layers run :func:`_reference_attention` (registered with transformers' ``AttentionInterface``):
plain softmax attention whose causal mask is *bottom-right aligned* - query ``i`` of a block of
``q`` queries sees every cached key plus the block's keys up to ``i``. That is the right mask for
a cache of any length, so each layer may hold a different number of kept tokens. Continuation
tokens get their *logical* positions (``context_len + i``) through explicit position ids, so
RoPE is exactly what it would be without compression; the kept keys stay as the full prefill
rotated them.

Contract used by the engine tests: ``continuation_nll(model, input_ids, context_len, keep)``.
"""

from __future__ import annotations

import contextvars
import math
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .method.rope import UnsupportedRopeError, recorded_positions, rotary_spec_from_hf
from .policies.base import KeepSet, KVSpan, text_candidate_mask

__all__ = [
    "ATTENTION_NAME",
    "KVQuantization",
    "Prefill",
    "attention_output_error",
    "build_cache",
    "continuation_nll",
    "continue_from_prefill",
    "kv_quantization",
    "prefill",
    "reference_attention",
]

ATTENTION_NAME = "flashcache_reference"


@dataclass
class _Recording:
    """Per-layer (query, key, value) of the last forward, batch row 0: ``[heads, seq, head_dim]``."""

    queries: dict[int, torch.Tensor] = field(default_factory=dict)
    keys: dict[int, torch.Tensor] = field(default_factory=dict)
    values: dict[int, torch.Tensor] = field(default_factory=dict)
    query_window: int | None = None  # keep only the last this-many queries (memory)


_RECORDING: contextvars.ContextVar[_Recording | None] = contextvars.ContextVar("_RECORDING", default=None)

# KV dtypes an engine may store, for fidelity studies of a quantised KV cache.
_KV_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp8_e4m3": torch.float8_e4m3fn,
              "fp8_e5m2": torch.float8_e5m2}


@dataclass(frozen=True)
class KVQuantization:
    """A KV cache stored in a lower precision, as SGLang's ``--kv-cache-dtype`` stores it.

    Attributes:
        kv_dtype: "bf16", "fp16", "fp8_e4m3" or "fp8_e5m2".
        key_scales, value_scales: ``[num_layers]`` float32: the stored value is
            ``x / scale`` cast to the dtype (SGLang divides by ``layer.k_scale``); 1.0 for 16-bit.
    """

    kv_dtype: str
    key_scales: torch.Tensor
    value_scales: torch.Tensor

    def __post_init__(self) -> None:
        if self.kv_dtype not in _KV_DTYPES:
            raise ValueError(f"kv_dtype must be one of {sorted(_KV_DTYPES)}, got {self.kv_dtype!r}")

    @classmethod
    def for_prefill(cls, prefilled: "Prefill", kv_dtype: str) -> "KVQuantization":
        """Per-layer scales from the prefill's K and V: ``amax / dtype_max`` for FP8 (the
        dtype's range is used fully), 1.0 for 16-bit dtypes."""
        if kv_dtype not in _KV_DTYPES:
            raise ValueError(f"kv_dtype must be one of {sorted(_KV_DTYPES)}, got {kv_dtype!r}")
        num_layers = prefilled.keys.shape[0]
        dtype = _KV_DTYPES[kv_dtype]
        if dtype.is_floating_point and torch.finfo(dtype).bits == 8:
            top = torch.finfo(dtype).max
            scale = lambda x: (x.abs().amax(dim=(1, 2, 3)).float() / top).clamp_min(1e-12)
            return cls(kv_dtype, scale(prefilled.keys), scale(prefilled.values))
        ones = torch.ones(num_layers)
        return cls(kv_dtype, ones, ones)

    def quantize(self, x: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
        """``x`` (any shape) stored and read back: float32."""
        dtype = _KV_DTYPES[self.kv_dtype]
        return (x.float() / scale).to(dtype).float() * scale

    def apply_to_span(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[num_layers, num_tokens, num_kv_heads, head_dim]`` K and V as the cache holds them."""
        shape = (-1, 1, 1, 1)
        return (self.quantize(keys, self.key_scales.reshape(shape)),
                self.quantize(values, self.value_scales.reshape(shape)))


_QUANTIZATION: contextvars.ContextVar[KVQuantization | None] = contextvars.ContextVar("_QUANTIZATION", default=None)


@contextmanager
def kv_quantization(quantization: KVQuantization | None):
    """Inside the block, every K/V the reference attention reads (cache and new tokens) is
    quantised as ``quantization`` stores it; None is a no-op."""
    token = _QUANTIZATION.set(quantization)
    try:
        yield
    finally:
        _QUANTIZATION.reset(token)


def _reference_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """query ``[1, num_heads, q, D]``; key/value ``[1, num_kv_heads, kv, D]`` (cache included).
    Returns ``([1, q, num_heads, D], None)`` like transformers' sdpa_attention_forward."""
    quantization = _QUANTIZATION.get()
    if quantization is not None:
        layer = module.layer_idx
        key = quantization.quantize(key, float(quantization.key_scales[layer])).to(query.dtype)
        value = quantization.quantize(value, float(quantization.value_scales[layer])).to(query.dtype)
    recording = _RECORDING.get()
    if recording is not None and getattr(module, "layer_idx", None) is not None:
        window = recording.query_window
        recording.queries[module.layer_idx] = query[0, :, -window:] if window else query[0]
        recording.keys[module.layer_idx] = key[0]
        recording.values[module.layer_idx] = value[0]
    group = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(group, dim=1)
    value = value.repeat_interleave(group, dim=1)
    if getattr(module, "is_causal", True):
        q_len, kv_len = query.shape[2], key.shape[2]
        query_position = torch.arange(kv_len - q_len, kv_len, device=query.device)[:, None]
        mask = torch.arange(kv_len, device=query.device)[None, :] <= query_position
    else:
        mask = attention_mask
    output = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling)
    return output.transpose(1, 2).contiguous(), None


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, _reference_attention)


def _decoder_config(model):
    return model.config.get_text_config(decoder=True)


@contextmanager
def reference_attention(model, recording: _Recording | None = None):
    """Route the decoder's attention through :func:`_reference_attention` (and optionally record
    q/k/v) for the duration of the block; the previous implementation is always restored."""
    _register()
    config = _decoder_config(model)
    previous = config._attn_implementation
    token = _RECORDING.set(recording)
    config._attn_implementation = ATTENTION_NAME
    try:
        yield
    finally:
        config._attn_implementation = previous
        _RECORDING.reset(token)


@dataclass
class Prefill:
    """What a prefill leaves behind.

    Attributes:
        keys: ``[num_layers, num_tokens, num_kv_heads, head_dim]`` float32, post-RoPE, as cached.
        values: same shape.
        queries: ``[num_layers, window, num_heads, head_dim]`` float32, post-RoPE queries of the
            last ``window`` context tokens (the observation window).
        last_logits: ``[vocab_size]`` float32 logits at the last context token.
        positions: ``[num_tokens]`` (``[3, num_tokens]`` for M-RoPE) int64, the positions the
            model's rotary embedding rotated the keys with; None for a model without RoPE.
        rotary: the model's :class:`~flashcache_sglang.kernels.rotary.RotarySpec`, or None.
    """

    keys: torch.Tensor
    values: torch.Tensor
    queries: torch.Tensor
    last_logits: torch.Tensor
    positions: torch.Tensor | None = None
    rotary: object | None = None

    def span(self, candidate_mask: torch.Tensor | None = None, sink_tokens: int = 4, recent_window: int = 64) -> KVSpan:
        """A :class:`KVSpan` of the context (text candidate mask unless one is given), with the
        keys' positions and the model's RoPE, so policies can score pre-RoPE keys."""
        if candidate_mask is None:
            candidate_mask = text_candidate_mask(self.keys.shape[1], sink_tokens, recent_window)
        return KVSpan(self.keys, self.values, candidate_mask, queries=self.queries,
                      positions=self.positions, rotary=self.rotary)


def _check_ids(input_ids: torch.Tensor, context_len: int) -> None:
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"input_ids must be [1, num_tokens], got shape {tuple(input_ids.shape)}")
    if not 1 <= context_len < input_ids.shape[1]:
        raise ValueError(f"context_len must be in [1, {input_ids.shape[1] - 1}], got {context_len}")


def _position_ids(model, start: int, length: int, device) -> torch.Tensor:
    """Logical positions ``start .. start + length - 1``; M-RoPE models (Qwen2.5-VL) get their
    three axes shifted by the prefill's rope delta."""
    positions = torch.arange(start, start + length, device=device)[None]
    rope_deltas = getattr(getattr(model, "model", None), "rope_deltas", None)
    if rope_deltas is not None:
        return (positions + rope_deltas.to(device)).expand(3, 1, length)
    return positions


@torch.no_grad()
def prefill(model, context_ids: torch.Tensor, observation_window: int = 64, **model_inputs) -> Prefill:
    """Run the context through ``model`` and return its cache, window queries and last logits.

    Args:
        model: a transformers causal LM (batch size 1).
        context_ids: ``[1, num_tokens]`` torch.int64.
        observation_window: how many trailing queries to keep (for SnapKV/TOVA), clipped to
            num_tokens.
        model_inputs: extra forward inputs (e.g. ``pixel_values``, ``image_grid_thw``).
    """
    _check_ids(torch.cat([context_ids, context_ids[:, :1]], dim=1), context_ids.shape[1])
    recording = _Recording(query_window=min(observation_window, context_ids.shape[1]))
    with reference_attention(model, recording), recorded_positions(model, required=False) as seen:
        output = model(input_ids=context_ids, use_cache=False, **model_inputs)
    positions = rotary = None
    if seen.calls:
        positions = seen.last
        default = int(_decoder_config(model).max_position_embeddings)
        try:
            rotary = rotary_spec_from_hf(model, max_positions=max(default, int(positions.max()) + 1))
        except UnsupportedRopeError:
            positions = None  # not invertible (dynamic RoPE): pre-RoPE scoring refuses the span
    num_layers = _decoder_config(model).num_hidden_layers
    stack = lambda parts: torch.stack([parts[i] for i in range(num_layers)]).float().transpose(1, 2)
    return Prefill(
        keys=stack(recording.keys).contiguous(),
        values=stack(recording.values).contiguous(),
        queries=stack(recording.queries).contiguous(),
        last_logits=output.logits[0, -1].float(),
        positions=positions,
        rotary=rotary,
    )


def build_cache(model, keys: torch.Tensor, values: torch.Tensor, keep: KeepSet | None = None):
    """A transformers ``DynamicCache`` holding the kept tokens of each layer.

    Args:
        keys, values: ``[num_layers, num_tokens, num_kv_heads, head_dim]``.
        keep: which tokens to keep (None = all). All heads of a layer must keep the same count;
            layers may differ.
    """
    from transformers import DynamicCache

    dtype = next(model.parameters()).dtype
    cache = DynamicCache(config=model.config)
    for layer in range(keys.shape[0]):
        layer_keys = keys[layer].transpose(0, 1)  # [H, N, D]
        layer_values = values[layer].transpose(0, 1)
        if keep is not None:
            index = keep.indices(layer).to(keys.device)[..., None].expand(-1, -1, keys.shape[-1])
            layer_keys = layer_keys.gather(1, index)
            layer_values = layer_values.gather(1, index)
        cache.update(layer_keys[None].to(dtype), layer_values[None].to(dtype), layer)
    return cache


@torch.no_grad()
def continue_from_prefill(
    model,
    prefilled: Prefill,
    continuation_ids: torch.Tensor,
    keep: KeepSet | None = None,
    recording: _Recording | None = None,
) -> torch.Tensor:
    """Per-token NLL ``[num_continuation]`` float32 of ``continuation_ids [1, num_continuation]``
    teacher-forced after the (compressed) prefill. Token 0 is scored by the prefill's last
    logits, which compression (applied after prefill) cannot change."""
    num_context = prefilled.keys.shape[1]
    if keep is not None and tuple(keep.keep.shape) != (
        prefilled.keys.shape[0], prefilled.keys.shape[2], num_context
    ):
        raise ValueError(
            f"keep shape {tuple(keep.keep.shape)} must be [num_layers, num_kv_heads, context_len] = "
            f"{[prefilled.keys.shape[0], prefilled.keys.shape[2], num_context]}"
        )
    targets = continuation_ids[0]
    first = -torch.log_softmax(prefilled.last_logits, dim=-1)[targets[0]]
    if targets.numel() == 1:
        return first[None]
    cache = build_cache(model, prefilled.keys, prefilled.values, keep)
    inputs = continuation_ids[:, :-1]
    position_ids = _position_ids(model, num_context, inputs.shape[1], inputs.device)
    with reference_attention(model, recording):
        logits = model(input_ids=inputs, past_key_values=cache, position_ids=position_ids, use_cache=True).logits
    rest = F.cross_entropy(logits[0].float(), targets[1:], reduction="none")
    return torch.cat([first[None], rest])


def continuation_nll(model, input_ids: torch.Tensor, context_len: int, keep: KeepSet | None) -> torch.Tensor:
    """Per-token NLL of ``input_ids[:, context_len:]`` after prefilling ``input_ids[:, :context_len]``
    and dropping the context tokens ``keep`` drops (None = keep all).

    Args:
        model: a transformers causal LM.
        input_ids: ``[1, num_tokens]`` torch.int64.
        context_len: length of the prefilled (compressible) context, in [1, num_tokens - 1].
        keep: :class:`KeepSet` over the context (``[num_layers, num_kv_heads, context_len]``) or None.
    Returns:
        ``[num_tokens - context_len]`` float32. With ``keep=None`` this equals the plain
        full-sequence NLL of those tokens (up to float rounding).
    """
    _check_ids(input_ids, context_len)
    prefilled = prefill(model, input_ids[:, :context_len], observation_window=1)
    return continue_from_prefill(model, prefilled, input_ids[:, context_len:], keep)


def attention_output_error(
    queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, keep: KeepSet
) -> torch.Tensor:
    """Relative error of each layer's attention output when context tokens are dropped.

    The continuation's queries attend (causally) to the context plus the continuation itself;
    with compression, dropped context tokens are masked out. Per-layer isolation: every layer
    sees the *uncompressed* model's queries, so errors do not compound.

    Args:
        queries: ``[num_layers, num_heads, num_continuation, head_dim]`` post-RoPE.
        keys, values: ``[num_layers, num_kv_heads, context_len + num_continuation, head_dim]``.
        keep: KeepSet over the first ``context_len`` tokens.
    Returns:
        ``[num_layers]`` float32: ``||O_kept - O_full||_F / ||O_full||_F``.
    """
    num_layers, num_heads, num_queries, head_dim = queries.shape
    num_kv_heads, total = keys.shape[1], keys.shape[2]
    context_len = keep.keep.shape[-1]
    if context_len + num_queries != total:
        raise ValueError(f"keys hold {total} tokens, expected context {context_len} + {num_queries}")
    group = num_heads // num_kv_heads
    keys = keys.float().repeat_interleave(group, dim=1)
    values = values.float().repeat_interleave(group, dim=1)
    logits = queries.float() @ keys.transpose(-1, -2) / math.sqrt(head_dim)
    query_position = torch.arange(context_len, total)[:, None]
    causal = torch.arange(total)[None, :] <= query_position  # [q, total]
    full = logits.masked_fill(~causal, -math.inf).softmax(-1) @ values
    kept_context = keep.keep.repeat_interleave(group, dim=1)  # [L, Hq, context]
    kept = torch.cat(
        [kept_context, torch.ones(num_layers, num_heads, num_queries, dtype=torch.bool)], dim=-1
    )[:, :, None, :] & causal
    compressed = logits.masked_fill(~kept, -math.inf).softmax(-1) @ values
    error = (compressed - full).flatten(1).norm(dim=-1) / full.flatten(1).norm(dim=-1)
    return error
