"""Random eviction: the floor any scoring rule must beat."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import KVSpan, Policy, register_policy

__all__ = ["RandomPolicy"]


@register_policy
@dataclass
class RandomPolicy(Policy):
    """Uniformly random scores from a seeded CPU generator (reproducible on any device).

    Args:
        seed: generator seed.
    """

    seed: int = 0

    name: ClassVar[str] = "random"
    needs_queries: ClassVar[bool] = False

    def score(self, span: KVSpan) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed)
        shape = (1, 1, span.num_tokens) if self.granularity == "shared" else (
            span.num_layers, span.num_kv_heads, span.num_tokens)
        return torch.rand(shape, generator=generator).to(span.keys.device)
