"""KNorm (arXiv 2406.11430): keys with a *small* L2 norm draw the most attention; keep them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import KVSpan, Policy, register_policy

__all__ = ["KNormPolicy"]


@register_policy
@dataclass
class KNormPolicy(Policy):
    """Score = minus the key norm per KV head. RoPE is a rotation, so post-RoPE keys give the
    same norms as pre-RoPE ones."""

    name: ClassVar[str] = "knorm"
    needs_queries: ClassVar[bool] = False

    def score(self, span: KVSpan) -> torch.Tensor:
        norm = torch.linalg.vector_norm(span.keys, dim=-1, dtype=torch.float32)  # [L, N, H]
        return -norm.transpose(1, 2)
