"""Float32 torch reference for span scoring: gather the span from the pool, then score it.

The math lives in one place, :func:`flashcache_sglang.method.scoring.frequency_energies`; this
module only turns SGLang's pool layout into its input: gather the slots, dequantise FP8
(``stored * scale``, as SGLang stored ``x / scale``) and un-rotate keys to pre-RoPE. It works on
a few channels of one KV head of one layer at a time (a key's rotary pairs kept together), so
the float32 copies it makes stay a small share of the span's K/V (``REFERENCE_BLOCK_ELEMENTS``;
the engine runs this path on CPU), and adds the blocks' energies up exactly (every part is a
sum over channels).
"""

from __future__ import annotations

from typing import Sequence

import torch

from flashcache_sglang.method.scoring import FrequencyScores, SpanEnergies, token_axis_energies

from .inputs import RotaryInputs


# Float32 elements of one block: the span's tokens x a few channels of one KV head of one layer
# (keys and values in turn). The block and the temporaries the low-pass and the un-rotation make
# of it are the path's extra memory beside the [layers, heads, tokens] deviations it returns
# (benchmarks/compression_memory.py measures the total against the span's K/V).
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
    width = max(2, min(head_dim, REFERENCE_BLOCK_ELEMENTS // max(1, num_tokens)))  # channels per block
    if rotary is not None:
        from ..rotary.reference import _check_positions

        _check_positions(rotary.positions, rotary.spec, num_tokens, "positions")
    device = slots.device
    deviation = torch.zeros(2, num_layers, num_kv_heads, num_tokens, dtype=torch.float32, device=device)
    energy = torch.zeros(2, 2, num_layers, num_kv_heads, dtype=torch.float32, device=device)  # [k/v, high/total]
    for layer in range(num_layers):
        for head in range(num_kv_heads):
            for which, buffer in enumerate((k_buffers[layer], v_buffers[layer])):
                scale = None if scales is None else scales[which * num_layers + layer]
                pre_rope = rotary if which == 0 else None
                for block in _channel_blocks(buffer[:, head], slots, width, pre_rope, scale):
                    dev, high, total = _block_energies(block, gamma)
                    deviation[which, layer, head] += dev
                    energy[which, 0, layer, head] += high
                    energy[which, 1, layer, head] += total
    deviation /= head_dim  # the mean over a head's channels, as frequency_energies gives it
    energies = SpanEnergies(deviation[0], deviation[1], energy[0, 0], energy[0, 1], energy[1, 0], energy[1, 1])
    return energies.scores("post_rope" if rotary is None else "pre_rope")


def _block_energies(block: torch.Tensor, gamma: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token squared deviation from the low-pass base, summed over the block's channels
    ``[num_tokens]``, and the block's high / total spectral energy (sums over channels add up)."""
    dev, high, total = token_axis_energies(block[None, :, None, :], gamma)
    return dev[0, 0] * block.shape[1], high[0, 0], total[0, 0]


def _channel_blocks(head: torch.Tensor, slots: torch.Tensor, width: int, rotary: RotaryInputs | None,
                    scale: torch.Tensor | None):
    """Float32 ``[num_tokens, <= width]`` blocks of one KV head's channels at ``slots``
    (``head``: the pool's ``[pool_size, head_dim]`` view), dequantised; with ``rotary`` a key's
    rotated pairs come un-rotated (both channels of a pair in the same block)."""

    def gather(channels) -> torch.Tensor:
        block = head[:, channels].index_select(0, slots).to(torch.float32)
        return block * scale if scale is not None else block

    head_dim = head.shape[1]
    start = 0
    if rotary is not None:
        spec = rotary.spec
        half = spec.rotary_dim // 2
        for pair in range(0, half, max(1, width // 2)):
            end = min(half, pair + max(1, width // 2))
            if spec.is_neox_style:
                first, second = gather(slice(pair, end)), gather(slice(half + pair, half + end))
            else:
                first, second = gather(slice(2 * pair, 2 * end, 2)), gather(slice(2 * pair + 1, 2 * end, 2))
            cos, sin = _pair_cos_sin(rotary, pair, end)
            norm = (cos.square() + sin.square()).clamp_min(1e-30)
            yield (first * cos + second * sin) / norm
            yield (second * cos - first * sin) / norm
        start = spec.rotary_dim
    for channel in range(start, head_dim, width):
        yield gather(slice(channel, min(head_dim, channel + width)))


def _pair_cos_sin(rotary: RotaryInputs, begin: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of rotary pairs ``[begin, end)`` for every token: two ``[num_tokens, end - begin]``."""
    half = rotary.spec.rotary_dim // 2
    table, positions = rotary.cos_sin, rotary.positions.long()
    if positions.dim() == 1:
        return (table[:, begin:end].index_select(0, positions),
                table[:, half + begin:half + end].index_select(0, positions))
    rows = positions[rotary.axis_of_pair[begin:end].long()].T  # [num_tokens, pairs]: each pair's axis
    pairs = torch.arange(begin, end, device=positions.device)[None, :]
    return table[rows, pairs], table[rows, pairs + half]
