"""TOVA (arXiv 2401.06104): keep what the last query attends to, averaged over heads.

Needs the last token's query: reference path only. Matches kvpress's TOVAPress (one set per
layer for all heads; the last token always kept).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from .base import KVSpan, Policy, register_policy
from .snapkv import window_attention

__all__ = ["TOVAPolicy"]


@register_policy
@dataclass
class TOVAPolicy(Policy):
    name: ClassVar[str] = "tova"
    needs_queries: ClassVar[bool] = True

    def score(self, span: KVSpan) -> torch.Tensor:
        last = KVSpan(span.keys, span.values, span.candidate_mask, span.queries[:, -1:])
        attention = window_attention(last)[:, :, 0, :-1]  # [L, Hq, N - 1]
        scores = F.pad(attention.mean(dim=1), (0, 1), value=math.inf)  # [L, N]
        return scores[:, None, :]
