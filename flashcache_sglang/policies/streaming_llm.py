"""StreamingLLM (arXiv 2309.17453): attention sinks plus the most recent tokens."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import KVSpan, Policy, register_policy

__all__ = ["StreamingLLMPolicy"]


@register_policy
@dataclass
class StreamingLLMPolicy(Policy):
    """Keep the first ``sink_tokens`` candidates and then the latest ones.

    Args:
        sink_tokens: leading candidates always kept first (kvpress's ``n_sink``), >= 0.
    """

    sink_tokens: int = 4

    name: ClassVar[str] = "streaming_llm"
    needs_queries: ClassVar[bool] = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sink_tokens < 0:
            raise ValueError(f"sink_tokens must be >= 0, got {self.sink_tokens!r}")

    def score(self, span: KVSpan) -> torch.Tensor:
        position = torch.arange(span.num_tokens, dtype=torch.float32, device=span.keys.device)
        candidate_rank = span.candidate_mask.to(position.device).cumsum(0) - 1
        return torch.where(candidate_rank < self.sink_tokens, torch.full_like(position, math.inf), position)
