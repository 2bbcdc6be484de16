"""What a model's rotary embedding does to a cached key, in one record.

The record holds the model's own cos/sin table (SGLang's ``RotaryEmbedding.cos_sin_cache``
layout), so every RoPE variant that is a per-position rotation of channel pairs is covered
exactly: plain RoPE, Llama-3 / linear / NTK scaling (they only change the frequencies), YaRN
(its magnitude scale sits in the table), and multimodal RoPE (M-RoPE: each channel pair follows
one of three position axes: time, height, width).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

__all__ = ["RotarySpec"]


@dataclass(frozen=True)
class RotarySpec:
    """A model's rotary embedding, as applied to the keys in its KV cache.

    Attributes:
        cos_sin_cache: ``[max_positions, rotary_dim]`` float32: columns ``[:rotary_dim // 2]``
            are ``cos(position * inv_freq)`` (times the variant's magnitude scale, if any), the
            rest the matching ``sin``; row ``p`` is position ``p``.
        head_dim: channels per KV head; channels ``[rotary_dim:]`` are not rotated.
        is_neox_style: True: pair ``i`` is channels ``(i, i + rotary_dim // 2)`` (Llama, Qwen);
            False: channels ``(2i, 2i + 1)`` (GPT-J).
        axis_of_pair: ``[rotary_dim // 2]`` torch.int64 in {0, 1, 2}: the position axis (time,
            height, width) pair ``i`` rotates with, for M-RoPE; None for one position per token.
    """

    cos_sin_cache: torch.Tensor
    head_dim: int
    is_neox_style: bool = True
    axis_of_pair: Optional[torch.Tensor] = None

    def __post_init__(self) -> None:
        cache = self.cos_sin_cache
        if not isinstance(cache, torch.Tensor) or cache.dim() != 2 or cache.shape[1] % 2:
            shape = tuple(cache.shape) if isinstance(cache, torch.Tensor) else type(cache).__name__
            raise ValueError(f"cos_sin_cache must be [max_positions, rotary_dim] with rotary_dim even, got {shape}")
        if not cache.is_floating_point():
            raise ValueError(f"cos_sin_cache must be floating point, got {cache.dtype}")
        if not (isinstance(self.head_dim, int) and 0 < cache.shape[1] <= self.head_dim):
            raise ValueError(f"head_dim={self.head_dim!r} must be an int >= rotary_dim={cache.shape[1]}")
        if self.axis_of_pair is not None:
            axes = self.axis_of_pair
            if axes.dim() != 1 or axes.numel() != cache.shape[1] // 2:
                raise ValueError(f"axis_of_pair must be [rotary_dim // 2 = {cache.shape[1] // 2}], "
                                 f"got {tuple(axes.shape)}")
            if axes.numel() and (int(axes.min()) < 0 or int(axes.max()) > 2):
                raise ValueError(f"axis_of_pair entries must be 0, 1 or 2, got {sorted(set(axes.tolist()))}")

    @property
    def rotary_dim(self) -> int:
        return int(self.cos_sin_cache.shape[1])

    @property
    def max_positions(self) -> int:
        return int(self.cos_sin_cache.shape[0])

    @property
    def is_multimodal(self) -> bool:
        return self.axis_of_pair is not None

    def to(self, device: torch.device | str) -> "RotarySpec":
        axes = None if self.axis_of_pair is None else self.axis_of_pair.to(device)
        return RotarySpec(self.cos_sin_cache.to(device=device, dtype=torch.float32), self.head_dim,
                          self.is_neox_style, axes)

    @classmethod
    def from_inv_freq(
        cls,
        inv_freq: torch.Tensor,
        max_positions: int,
        head_dim: int,
        *,
        is_neox_style: bool = True,
        attention_scaling: float = 1.0,
        mrope_section: Optional[Sequence[int]] = None,
    ) -> "RotarySpec":
        """Build the table from ``inv_freq`` (``[rotary_dim // 2]``), as SGLang and transformers do.

        ``mrope_section`` (e.g. Qwen2.5-VL's ``[16, 24, 24]``) splits the pairs, in order, among
        the time, height and width axes.
        """
        if max_positions < 1:
            raise ValueError(f"max_positions={max_positions} must be >= 1")
        inv_freq = inv_freq.detach().to(torch.float32).cpu()
        angles = torch.arange(max_positions, dtype=torch.float32)[:, None] * inv_freq[None, :]
        cache = torch.cat([angles.cos(), angles.sin()], dim=-1) * attention_scaling
        axes = None
        if mrope_section is not None:
            sections = [int(s) for s in mrope_section]
            if len(sections) != 3 or sum(sections) != inv_freq.numel():
                raise ValueError(f"mrope_section {sections} must be three sizes summing to "
                                 f"rotary_dim // 2 = {inv_freq.numel()}")
            axes = torch.tensor([axis for axis, size in enumerate(sections) for _ in range(size)],
                                dtype=torch.int64)
        return cls(cache, head_dim, is_neox_style, axes)

    @classmethod
    def default_rope(cls, head_dim: int, base: float, max_positions: int, *, rotary_dim: Optional[int] = None,
                     mrope_section: Optional[Sequence[int]] = None) -> "RotarySpec":
        """Plain RoPE: ``inv_freq[i] = base ** (-2i / rotary_dim)``."""
        rotary_dim = head_dim if rotary_dim is None else rotary_dim
        inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim))
        if not math.isfinite(float(inv_freq[-1])):
            raise ValueError(f"base={base!r} gives non-finite frequencies")
        return cls.from_inv_freq(inv_freq.float(), max_positions, head_dim, mrope_section=mrope_section)
