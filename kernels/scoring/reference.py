"""Float32 torch reference for span scoring: gather the span from the pool, then score it.

The math lives in one place, :func:`flashcache_sglang.method.scoring.frequency_scores`; this
module only turns SGLang's pool layout into its input. It materialises gathered copies of K and
V (``2 * num_layers * num_tokens * num_kv_heads * head_dim`` elements), which the Triton path
avoids.
"""

from __future__ import annotations

from typing import Sequence

import torch

from flashcache_sglang.method.scoring import FrequencyScores, frequency_scores


def gather_span(
    buffers: Sequence[torch.Tensor], slot_indices: torch.Tensor
) -> torch.Tensor:
    """``[num_layers, num_tokens, num_kv_heads, head_dim]`` copy of the span, in the pool's dtype."""
    slots = slot_indices.long()
    return torch.stack([buffer.index_select(0, slots) for buffer in buffers])


def score_span_reference(
    k_buffers: Sequence[torch.Tensor],
    v_buffers: Sequence[torch.Tensor],
    slot_indices: torch.Tensor,
    gamma: float,
) -> FrequencyScores:
    """FlashCache scores of the tokens at ``slot_indices`` (in position order), FFT-based DCT."""
    return frequency_scores(
        gather_span(k_buffers, slot_indices), gather_span(v_buffers, slot_indices), gamma
    )
