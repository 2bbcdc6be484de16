"""SnapKV (arXiv 2404.14469): keep what the observation window's queries attend to.

Needs the window's queries, which an engine does not keep after prefill: reference path only.
Matches kvpress's SnapKVPress: attention of the last ``window`` queries (causal) over the
span, averaged over the window, avg-pooled along tokens, averaged over the query heads of each
KV head; the window's own tokens are always kept first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from .base import KVSpan, Policy, register_policy

__all__ = ["SnapKVPolicy", "window_attention"]


def window_attention(span: KVSpan) -> torch.Tensor:
    """Softmax attention of the observation window over the whole span.

    Returns:
        ``[num_layers, num_heads, window, num_tokens]`` float32 (rows sum to 1; causal).
    """
    queries = span.queries.to(torch.float32).transpose(1, 2)  # [L, Hq, W, D]
    keys = span.keys.to(torch.float32).transpose(1, 2)  # [L, H, N, D]
    group = queries.shape[1] // keys.shape[1]
    keys = keys.repeat_interleave(group, dim=1)
    window, num_tokens = queries.shape[2], keys.shape[2]
    logits = queries @ keys.transpose(-1, -2) / math.sqrt(span.head_dim)
    query_position = torch.arange(num_tokens - window, num_tokens, device=logits.device)[:, None]
    future = torch.arange(num_tokens, device=logits.device)[None, :] > query_position
    return logits.masked_fill(future, -math.inf).softmax(dim=-1)


@register_policy
@dataclass
class SnapKVPolicy(Policy):
    """Args:
        kernel_size: odd avg-pool width smoothing the scores along tokens (kvpress default 5).
    """

    kernel_size: int = 5

    name: ClassVar[str] = "snapkv"
    needs_queries: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be an odd integer >= 1, got {self.kernel_size!r}")

    def score(self, span: KVSpan) -> torch.Tensor:
        attention = window_attention(span)  # [L, Hq, W, N]
        window = attention.shape[2]
        prefix = span.num_tokens - window
        scores = attention[..., :prefix].mean(dim=2)  # [L, Hq, prefix]
        if prefix > 0:
            scores = F.avg_pool1d(
                scores, kernel_size=self.kernel_size, padding=self.kernel_size // 2, stride=1
            )
        L, num_heads = scores.shape[:2]
        scores = scores.view(L, span.num_kv_heads, num_heads // span.num_kv_heads, prefix).mean(2)
        return F.pad(scores, (0, window), value=math.inf)
