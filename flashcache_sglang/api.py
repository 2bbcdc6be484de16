"""The small public API: choose which KV tokens to keep, and gather them.

    from flashcache_sglang.api import select_tokens, gather_kept

    spec = rotary_spec_from_hf(model)                            # the model's RoPE
    keep = select_tokens(keys, values, retention=0.2,            # FlashCache, one shared set
                         positions=torch.arange(num_tokens), rotary=spec)
    kept = gather_kept(keys, values, keep)                       # per layer: (keys, values, index)

Shapes: ``keys``/``values`` are ``[num_layers, num_tokens, num_kv_heads, head_dim]`` (post-RoPE,
as a KV cache holds them). The default FlashCache scores pre-RoPE keys, so it needs the keys'
positions and the model's :class:`RotarySpec`; ``policy="flashcache-paper"`` (or
``key_space="post_rope"``) scores the cached keys as they are. Policies:
:func:`available_policies`; the ones SGLang can run (no attention scores needed):
:func:`engine_policies`.
"""

from __future__ import annotations

import torch

from .kernels.rotary import RotarySpec
from .method.rope import rotary_spec_from_hf
from .policies import (
    KeepSet,
    KVSpan,
    available_policies,
    engine_policies,
    make_policy,
    text_candidate_mask,
)

__all__ = [
    "KVSpan",
    "KeepSet",
    "RotarySpec",
    "available_policies",
    "engine_policies",
    "gather_kept",
    "make_policy",
    "rotary_spec_from_hf",
    "select_tokens",
    "text_candidate_mask",
]


def select_tokens(
    keys: torch.Tensor,
    values: torch.Tensor,
    retention: float = 0.2,
    *,
    policy: str = "flashcache",
    candidate_mask: torch.Tensor | None = None,
    sink_tokens: int = 4,
    recent_window: int = 64,
    queries: torch.Tensor | None = None,
    frame_index: torch.Tensor | None = None,
    positions: torch.Tensor | None = None,
    rotary: RotarySpec | None = None,
    **options,
) -> KeepSet:
    """Pick the KV tokens to keep.

    Args:
        keys, values: ``[num_layers, num_tokens, num_kv_heads, head_dim]``, any float dtype.
        retention: share of the candidate tokens kept, in (0, 1].
        policy: a name from :func:`available_policies` (default FlashCache).
        candidate_mask: ``[num_tokens]`` torch.bool, True = may be dropped (e.g. visual tokens).
            Default: all but the first ``sink_tokens`` and the last ``recent_window``.
        queries: ``[num_layers, window, num_heads, head_dim]`` for attention-based policies.
        frame_index: ``[num_tokens]`` torch.int64 video frame per token (-1 = not visual).
        positions: ``[num_tokens]`` (``[3, num_tokens]`` for M-RoPE) int positions the keys
            were rotated with; needed, with ``rotary``, by policies scoring pre-RoPE keys.
        rotary: the model's :class:`RotarySpec` (:func:`rotary_spec_from_hf`).
        options: policy options, e.g. ``gamma=0.2``, ``granularity="layer"``.
    Returns:
        :class:`KeepSet`; ``.keep`` is ``[num_layers, num_kv_heads, num_tokens]`` torch.bool and
        ``.shared_mask()`` the ``[num_tokens]`` set when ``granularity="shared"`` (the default).
    """
    if candidate_mask is None:
        candidate_mask = text_candidate_mask(keys.shape[1], sink_tokens, recent_window)
    span = KVSpan(keys, values, candidate_mask, queries=queries, frame_index=frame_index,
                  positions=positions, rotary=rotary)
    return make_policy(policy, retention=retention, **options).select(span)


def gather_kept(
    keys: torch.Tensor, values: torch.Tensor, keep: KeepSet
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The kept K/V of each layer.

    Args:
        keys, values: ``[num_layers, num_tokens, num_kv_heads, head_dim]``.
        keep: from :func:`select_tokens`.
    Returns:
        one ``(keys [num_kv_heads, num_kept, head_dim], values [same], token_index
        [num_kv_heads, num_kept] torch.int64)`` per layer, tokens in ascending order.
    """
    if tuple(keep.keep.shape) != (keys.shape[0], keys.shape[2], keys.shape[1]):
        raise ValueError(
            f"keep shape {tuple(keep.keep.shape)} does not match keys "
            f"[num_layers, num_tokens, num_kv_heads, head_dim] = {tuple(keys.shape)}"
        )
    out = []
    for layer in range(keys.shape[0]):
        index = keep.indices(layer).to(keys.device)
        gather = index[..., None].expand(-1, -1, keys.shape[-1])
        out.append((
            keys[layer].transpose(0, 1).gather(1, gather),
            values[layer].transpose(0, 1).gather(1, gather),
            index,
        ))
    return out
