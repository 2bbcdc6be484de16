"""Rotary position embeddings as the KV pool sees them: a spec, and rotation by position.

SGLang caches keys *after* RoPE. Two things need to undo or redo that rotation on cached keys:
scoring on pre-RoPE keys (a rotation puts high frequencies along the token axis that say
nothing about content) and re-basing a stream memory to contiguous positions (kept keys move
to new positions). Both read the model's own cos/sin table through :class:`RotarySpec`.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .reference import apply_rotary_reference, rerotate_slots_reference
from .spec import RotarySpec

__all__ = ["RotarySpec", "apply_rotary_reference", "rerotate_slots", "rerotate_slots_reference"]


def rerotate_slots(
    k_buffers: Sequence[torch.Tensor],
    slots: torch.Tensor,
    old_positions: torch.Tensor,
    new_positions: torch.Tensor,
    spec: RotarySpec,
    *,
    backend: str = "auto",
) -> None:
    """Move the cached keys at ``slots`` (every layer) from ``old_positions`` to ``new_positions``.

    Args:
        k_buffers: per-layer key buffers ``[num_slots, num_kv_heads, head_dim]``.
        slots: ``[num_tokens]`` int32/int64 distinct slots on the buffers' device.
        old_positions / new_positions: ``[num_tokens]`` or ``[3, num_tokens]`` (M-RoPE) int.
        backend: "auto" (Triton on CUDA, reference elsewhere), "triton" or "reference".
    """
    from .._common import resolve_backend

    if not k_buffers:
        raise ValueError("k_buffers is empty")
    if old_positions.shape != new_positions.shape:
        raise ValueError(f"old_positions {tuple(old_positions.shape)} and new_positions "
                         f"{tuple(new_positions.shape)} must have the same shape")
    if slots.numel() == 0:
        return
    if resolve_backend(backend, k_buffers[0].device) == "triton":
        from .triton import rerotate_slots_triton

        rerotate_slots_triton(k_buffers, slots, old_positions, new_positions, spec)
    else:
        rerotate_slots_reference(k_buffers, slots, old_positions, new_positions, spec)
