"""Float32 torch reference for span scoring: gather the span from the pool, then score it.

The math lives in one place, :func:`flashcache_sglang.method.scoring.frequency_energies`; this
module only turns SGLang's pool layout into its input: gather the slots, dequantise FP8
(``stored * scale``, as SGLang stored ``x / scale``) and hand positions + RoPE spec on for
pre-RoPE keys. It works one (layer, KV-head block) at a time, so the float32 copies it makes
stay a small share of the span's K/V (``REFERENCE_BLOCK_ELEMENTS``; the engine runs this path on
CPU), and assembles the per-layer ratios exactly from the blocks' raw energies.
"""

from __future__ import annotations

from typing import Sequence

import torch

from flashcache_sglang.method.scoring import FrequencyScores, SpanEnergies, frequency_energies

from ..rotary.reference import apply_rotary_reference
from .inputs import RotaryInputs


# Elements of K (and as many of V) gathered at once: a block of KV heads of one layer (at least
# one head). The float32 block and the temporaries the low-pass and the un-rotation make of it
# (about six copies) are the path's extra memory: ~6% of a bf16 Qwen2.5-VL-7B span's K/V when a
# block is one head (benchmarks/compression_memory.py).
REFERENCE_BLOCK_ELEMENTS = 1 << 16


def gather_span(
    buffers: Sequence[torch.Tensor], slot_indices: torch.Tensor, scales: torch.Tensor | None = None
) -> torch.Tensor:
    """``[num_layers, num_tokens, num_kv_heads, head_dim]`` float32 copy of the span, each layer
    multiplied by ``scales[layer]`` (``[num_layers]`` float32) when given."""
    slots = slot_indices.long()
    span = torch.stack([buffer.index_select(0, slots).to(torch.float32) for buffer in buffers])
    if scales is not None:
        span = span * scales.to(span.device)[:, None, None, None]
    return span


def score_span_reference(
    k_buffers: Sequence[torch.Tensor],
    v_buffers: Sequence[torch.Tensor],
    slot_indices: torch.Tensor,
    gamma: float,
    rotary: RotaryInputs | None = None,
    scales: torch.Tensor | None = None,
) -> FrequencyScores:
    """FlashCache scores of the tokens at ``slot_indices`` (in position order), FFT-based DCT.

    Args:
        rotary: validated positions + spec (:func:`.inputs.check_rotary`): keys are scored
            pre-RoPE; None scores the cached (post-RoPE) keys.
        scales: ``[2 * num_layers]`` float32 dequantisation factors, keys then values, or None.
    """
    num_layers = len(k_buffers)
    slots = slot_indices.long()
    num_tokens = slots.numel()
    num_kv_heads, head_dim = k_buffers[0].shape[1:]
    heads_per_block = max(1, min(num_kv_heads, REFERENCE_BLOCK_ELEMENTS // max(1, num_tokens * head_dim)))
    cos_sin = None
    if rotary is not None:  # the same tokens in every block: their cos/sin once
        from ..rotary.reference import _check_positions, cos_sin_for

        _check_positions(rotary.positions, rotary.spec, num_tokens, "positions")
        cos_sin = cos_sin_for(rotary.positions, rotary.spec)
    layers = []
    for layer in range(num_layers):
        blocks = []
        for head in range(0, num_kv_heads, heads_per_block):
            heads = slice(head, head + heads_per_block)
            keys = k_buffers[layer][:, heads].index_select(0, slots).to(torch.float32)[None]
            values = v_buffers[layer][:, heads].index_select(0, slots).to(torch.float32)[None]
            if scales is not None:
                keys, values = keys * scales[layer], values * scales[num_layers + layer]
            if rotary is not None:
                keys = apply_rotary_reference(keys[0], rotary.positions, rotary.spec, inverse=True,
                                              cos_sin=cos_sin)[None]
            blocks.append(frequency_energies(keys, values, gamma))
        layers.append(SpanEnergies.cat(blocks, dim=1))
    return SpanEnergies.cat(layers, dim=0).scores("post_rope" if rotary is None else "pre_rope")
