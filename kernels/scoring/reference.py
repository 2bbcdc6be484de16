"""Float32 torch reference for span scoring: gather the span from the pool, then score it.

The math lives in one place, :func:`flashcache_sglang.method.scoring.frequency_scores`; this
module only turns SGLang's pool layout into its input: gather the slots, dequantise FP8
(``stored * scale``, as SGLang stored ``x / scale``) and hand positions + RoPE spec on for
pre-RoPE keys. It materialises gathered float32 copies of K and V
(``2 * num_layers * num_tokens * num_kv_heads * head_dim`` elements), which the Triton path
avoids.
"""

from __future__ import annotations

from typing import Sequence

import torch

from flashcache_sglang.method.scoring import FrequencyScores, frequency_scores

from .inputs import RotaryInputs


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
    keys = gather_span(k_buffers, slot_indices, None if scales is None else scales[:num_layers])
    values = gather_span(v_buffers, slot_indices, None if scales is None else scales[num_layers:])
    if rotary is None:
        return frequency_scores(keys, values, gamma)
    return frequency_scores(keys, values, gamma, positions=rotary.positions, rotary=rotary.spec)
