"""Uniform temporal subsampling: keep every k-th video frame's tokens.

For video the natural non-learned baseline: frames spread evenly over time, whole frames kept.
Without ``span.frame_index`` (text), consecutive blocks of ``frame_size`` tokens stand in for
frames.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import KVSpan, Policy, register_policy

__all__ = ["UniformFramesPolicy"]


@register_policy
@dataclass
class UniformFramesPolicy(Policy):
    """Keep ``m = ceil(budget / tokens_per_frame)`` frames evenly spaced over the candidate
    frames (first and last included); the budget then trims the last chosen frame, so the count
    is exact. Non-visual candidate tokens (frame -1) come last.

    Args:
        frame_size: tokens per pseudo-frame when the span has no ``frame_index``, >= 1.
    """

    frame_size: int = 16

    name: ClassVar[str] = "uniform_frames"
    needs_queries: ClassVar[bool] = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.frame_size < 1:
            raise ValueError(f"frame_size must be >= 1, got {self.frame_size!r}")

    def score(self, span: KVSpan) -> torch.Tensor:
        candidates = span.candidate_mask.cpu()
        if span.frame_index is None:
            frame = torch.arange(span.num_tokens) // self.frame_size
        else:
            frame = span.frame_index.cpu().to(torch.int64)
        frames = torch.unique(frame[candidates & (frame >= 0)])
        score = torch.zeros(span.num_tokens)
        if frames.numel() > 0:
            tokens_per_frame = (candidates & (frame >= 0)).sum().item() / frames.numel()
            wanted = max(1, min(frames.numel(), math.ceil(self.budget(span) / tokens_per_frame)))
            chosen = frames[torch.linspace(0, frames.numel() - 1, wanted).round().long()]
            # Chosen frames first, earlier tokens first within them.
            position = torch.arange(span.num_tokens, dtype=torch.float32)
            in_chosen = torch.isin(frame, chosen)
            score = torch.where(in_chosen, 2.0 * span.num_tokens - position, -position)
            score = torch.where(frame < 0, -2.0 * span.num_tokens - position, score)
        return score.to(span.keys.device)
