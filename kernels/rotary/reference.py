"""Rotation of cached keys by position, in float32 torch (the reference for any kernel).

Shapes: keys ``[num_tokens, num_kv_heads, head_dim]``; positions ``[num_tokens]`` (one position
per token) or ``[3, num_tokens]`` (M-RoPE: time, height, width).
"""

from __future__ import annotations

from typing import Sequence

import torch

from .spec import RotarySpec

__all__ = ["apply_rotary_reference", "rerotate_slots_reference", "cos_sin_for"]


def _check_positions(positions: torch.Tensor, spec: RotarySpec, num_tokens: int, name: str) -> None:
    if not isinstance(positions, torch.Tensor) or positions.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name} must be an int32/int64 tensor")
    if positions.dim() == 2:
        if not spec.is_multimodal or positions.shape[0] != 3:
            raise ValueError(f"{name} of shape {tuple(positions.shape)}: [3, num_tokens] positions need an "
                             "M-RoPE spec (axis_of_pair set); use [num_tokens] otherwise")
    elif positions.dim() != 1:
        raise ValueError(f"{name} must be [num_tokens] or [3, num_tokens], got {tuple(positions.shape)}")
    if positions.shape[-1] != num_tokens:
        raise ValueError(f"{name} covers {positions.shape[-1]} tokens, expected {num_tokens}")
    if positions.numel():
        low, high = int(positions.min()), int(positions.max())
        if low < 0 or high >= spec.max_positions:
            raise ValueError(f"{name} must lie in [0, {spec.max_positions}) (the rotary table), got [{low}, {high}]")


def cos_sin_for(positions: torch.Tensor, spec: RotarySpec) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of every (token, pair): two ``[num_tokens, rotary_dim // 2]`` float32."""
    cache = spec.cos_sin_cache.to(device=positions.device, dtype=torch.float32)
    half = spec.rotary_dim // 2
    if positions.dim() == 1:
        rows = cache[positions.long()]
        return rows[:, :half], rows[:, half:]
    # M-RoPE: pair i reads the row of its own axis' position (no [3, num_tokens, rotary_dim] copy).
    axes = spec.axis_of_pair.to(positions.device)
    rows = positions.long()[axes].T  # [num_tokens, half]: the table row each (token, pair) reads
    pair = torch.arange(half, device=positions.device)[None, :]
    return cache[rows, pair], cache[rows, pair + half]


def apply_rotary_reference(
    keys: torch.Tensor, positions: torch.Tensor, spec: RotarySpec, *, inverse: bool = False,
    cos_sin: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Rotate ``keys`` (``[num_tokens, num_kv_heads, head_dim]``) to ``positions``, or undo it.

    ``inverse=True`` maps a cached (rotated) key back to the pre-RoPE key, dividing out a
    magnitude scale the table may carry (YaRN). ``cos_sin``: :func:`cos_sin_for` of these
    positions, when the caller rotates several blocks of the same tokens. Returns float32 of the
    input's shape.
    """
    if keys.dim() != 3 or keys.shape[-1] != spec.head_dim:
        raise ValueError(f"keys must be [num_tokens, num_kv_heads, head_dim={spec.head_dim}], got {tuple(keys.shape)}")
    if cos_sin is None:
        _check_positions(positions, spec, keys.shape[0], "positions")
        cos_sin = cos_sin_for(positions.to(keys.device), spec)
    out = keys.to(torch.float32).clone()
    rotary = spec.rotary_dim
    cos, sin = (t[:, None, :] for t in cos_sin)
    if spec.is_neox_style:
        first, second = out[..., : rotary // 2], out[..., rotary // 2 : rotary]
    else:
        first, second = out[..., 0:rotary:2], out[..., 1:rotary:2]
    if inverse:
        scale = (cos.square() + sin.square()).clamp_min(1e-30)
        new_first = (first * cos + second * sin) / scale
        new_second = (second * cos - first * sin) / scale
    else:
        new_first = first * cos - second * sin
        new_second = second * cos + first * sin
    if spec.is_neox_style:
        out[..., : rotary // 2], out[..., rotary // 2 : rotary] = new_first, new_second
    else:
        out[..., 0:rotary:2], out[..., 1:rotary:2] = new_first, new_second
    return out


def rerotate_slots_reference(
    k_buffers: Sequence[torch.Tensor],
    slots: torch.Tensor,
    old_positions: torch.Tensor,
    new_positions: torch.Tensor,
    spec: RotarySpec,
) -> None:
    """Move the cached keys at ``slots`` from ``old_positions`` to ``new_positions``, in place.

    Args:
        k_buffers: per-layer key buffers ``[num_slots, num_kv_heads, head_dim]``.
        slots: ``[num_tokens]`` int32/int64 slots (no duplicates).
        old_positions / new_positions: ``[num_tokens]`` or ``[3, num_tokens]`` int positions.
    """
    if slots.numel() == 0:
        return
    index = slots.long()
    # All layers at once: [num_tokens, num_layers * num_kv_heads, head_dim] rotates like heads do.
    keys = torch.stack([buffer[index] for buffer in k_buffers], dim=1)
    num_tokens, num_layers, num_heads, head_dim = keys.shape
    flat = keys.reshape(num_tokens, num_layers * num_heads, head_dim)
    pre_rope = apply_rotary_reference(flat, old_positions, spec, inverse=True)
    moved = apply_rotary_reference(pre_rope, new_positions, spec).reshape(keys.shape)
    for layer, buffer in enumerate(k_buffers):
        buffer[index] = moved[:, layer].to(buffer.dtype)
