"""FlashCache: keep the outlier KVs, i.e. the tokens farthest from the low-pass "base" KV.

Per layer, K and V are viewed as signals along the token axis; the orthonormal DCT-II keeps the
lowest ``gamma`` of frequencies, the inverse gives the base KV, and a token's score is
``MSE(K, K_base) + MSE(V, V_base)``. Dynamic Budget Allocation (DBA) gives layers with more
high-frequency energy a larger share of an exact total. No attention scores are needed, so it
runs inside an engine (``needs_queries = False``).

How a shared token set (granularity "shared", the engine's case) is formed: each layer's
deviation is divided by its mean over the candidates (layers differ in KV scale by orders of
magnitude), and the layers are averaged with weights given by ``layer_combine``:
    - "energy": weights proportional to each layer's high-frequency ratio R^l (DBA's signal;
      with ``dba=False`` the weights are uniform);
    - "mean": uniform weights;
    - "max": a token's score is its largest normalised deviation over layers;
    - "rank": mean over layers of the token's rank (scale-free).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..method.budget import allocate_budgets
from ..method.scoring import FrequencyScores, frequency_scores
from .base import KVSpan, Policy, register_policy

__all__ = ["FlashCachePolicy", "FlashCacheNoDBAPolicy", "LAYER_COMBINES"]

LAYER_COMBINES = ("energy", "mean", "max", "rank")


@register_policy
@dataclass
class FlashCachePolicy(Policy):
    """FlashCache (arXiv 2511.16786) with Dynamic Budget Allocation.

    Args:
        retention: share of candidate tokens kept, in (0, 1].
        granularity: "shared" | "layer" | "head" (see :mod:`flashcache_sglang.policies.base`).
        gamma: low-pass cutoff as a fraction of the span length, in (0, 1); frequencies
            ``m <= floor(gamma * num_candidates)`` form the base KV.
        dba: allocate per-layer budgets from high-frequency energy ("layer"/"head"), and weight
            layers by it when combining into a shared set ("shared" with ``layer_combine="energy"``).
        dba_floor: every layer keeps at least ``floor(dba_floor * budget)`` candidates, in [0, 1].
        dba_cap: no layer keeps more than ``ceil(dba_cap * budget)`` candidates (and never more
            than there are), >= 1.
        layer_combine: how per-layer scores become one shared set; one of ``LAYER_COMBINES``.
        candidates_only: compute the spectrum over the candidate tokens only (the visual span),
            not the protected tokens around them; sinks are extreme outliers that would
            otherwise dominate the low-pass.
    """

    gamma: float = 0.2
    dba: bool = True
    dba_floor: float = 0.25
    dba_cap: float = 4.0
    layer_combine: str = "energy"
    candidates_only: bool = True

    name: ClassVar[str] = "flashcache"
    needs_queries: ClassVar[bool] = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.gamma < 1.0:
            raise ValueError(f"gamma must be in (0, 1), got {self.gamma!r}")
        if not 0.0 <= self.dba_floor <= 1.0:
            raise ValueError(f"dba_floor must be in [0, 1], got {self.dba_floor!r}")
        if not self.dba_cap >= 1.0:
            raise ValueError(f"dba_cap must be >= 1, got {self.dba_cap!r}")
        if self.layer_combine not in LAYER_COMBINES:
            raise ValueError(f"layer_combine must be one of {LAYER_COMBINES}, got {self.layer_combine!r}")

    def frequency_scores(self, span: KVSpan) -> FrequencyScores:
        """Deviation ``[L, H, N]`` (0 outside the scored tokens) and high-frequency ratios.
        Cached per span object, since select() asks for it from several hooks."""
        cached = getattr(span, "_flashcache_scores", None)
        if cached is not None and cached[0] == self.gamma and cached[1] == self.candidates_only:
            return cached[2]
        if self.candidates_only:
            index = span.candidate_mask.nonzero().squeeze(-1).to(span.keys.device)
            result = frequency_scores(span.keys[:, index], span.values[:, index], self.gamma)
            deviation = result.deviation.new_zeros(span.num_layers, span.num_kv_heads, span.num_tokens)
            deviation[:, :, index] = result.deviation
            result = FrequencyScores(deviation, result.high_freq_ratio, result.high_freq_ratio_per_head)
        else:
            result = frequency_scores(span.keys, span.values, self.gamma)
        object.__setattr__(span, "_flashcache_scores", (self.gamma, self.candidates_only, result))
        return result

    def use_scores(self, span: KVSpan, scores: FrequencyScores) -> None:
        """Give ``span`` scores computed elsewhere (the engine's pool-direct Triton kernel,
        :func:`flashcache_sglang.kernels.score_span`) for a span whose tokens are all
        candidates; ``select`` then uses them instead of scoring the gathered K/V again."""
        if not bool(span.candidate_mask.all()):
            raise ValueError("precomputed scores need a span whose tokens are all candidates")
        if tuple(scores.deviation.shape) != (span.num_layers, span.num_kv_heads, span.num_tokens):
            raise ValueError(f"scores.deviation shape {tuple(scores.deviation.shape)} does not match the span "
                             f"[{span.num_layers}, {span.num_kv_heads}, {span.num_tokens}]")
        object.__setattr__(span, "_flashcache_scores", (self.gamma, self.candidates_only, scores))

    def score(self, span: KVSpan) -> torch.Tensor:
        return self.frequency_scores(span).deviation

    def layer_weights(self, span: KVSpan) -> torch.Tensor:
        """``[num_layers]`` float32 summing to 1: DBA's energy ratios, or uniform without DBA."""
        if not self.dba:
            return torch.full((span.num_layers,), 1.0 / span.num_layers)
        ratio = self.frequency_scores(span).high_freq_ratio.float().cpu()
        return ratio / ratio.sum().clamp_min(1e-12)

    def layer_budgets(self, span: KVSpan, budget: int) -> torch.Tensor:
        if not self.dba:
            return super().layer_budgets(span, budget)
        floor = int(math.floor(self.dba_floor * budget))
        cap = min(span.num_candidates, int(math.ceil(self.dba_cap * budget)))
        return allocate_budgets(self.layer_weights(span), budget * span.num_layers, floor, cap)

    def combine_layers(self, scores: torch.Tensor, span: KVSpan) -> torch.Tensor:
        candidates = span.candidate_mask.to(scores.device)
        if self.layer_combine == "rank":
            masked = torch.where(candidates, scores, torch.full_like(scores, -math.inf))
            rank = masked.argsort(dim=-1).argsort(dim=-1).float()
            return rank.mean(dim=0)
        mean = (scores * candidates).sum(-1, keepdim=True) / candidates.sum().clamp_min(1)
        normalised = scores / mean.clamp_min(1e-30)
        if self.layer_combine == "max":
            return normalised.max(dim=0).values
        if self.layer_combine == "mean":
            return normalised.mean(dim=0)
        weights = self.layer_weights(span).to(scores.device)
        return (weights[:, None] * normalised).sum(dim=0)


@register_policy
@dataclass
class FlashCacheNoDBAPolicy(FlashCachePolicy):
    """FlashCache without Dynamic Budget Allocation: every layer keeps the same budget and
    layers weigh equally in a shared set (the paper's "w/o DBA" ablation)."""

    dba: bool = False

    name: ClassVar[str] = "flashcache_no_dba"
