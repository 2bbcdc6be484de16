"""FlashCache: keep the outlier KVs, the tokens farthest from the low-pass "base" KV.

Per layer and KV head, K and V are viewed as signals along the token axis; the orthonormal
DCT-II keeps the lowest ``gamma`` of frequencies, the inverse gives the base KV, and a token's
deviation is its MSE to the base. No attention scores are needed, so every variant here runs
inside an engine (``needs_queries = False``).

Two formulations, one class each:

- ``flashcache-paper`` (:class:`FlashCachePaperPolicy`): the paper as written (arXiv
  2511.16786): post-RoPE keys, ``Dev = MSE(K, K_base) + MSE(V, V_base)``, Dynamic Budget
  Allocation (DBA) from each layer's high-frequency energy. A shared token set weights each
  layer's mean-normalised deviation by DBA's energy ratio (DBA's budgets collapse to a layer
  weighting when all layers must keep the same tokens).
- ``flashcache`` (:class:`FlashCachePolicy`, the default): the setting chosen on tuning text for
  the one token set an engine keeps per request (benchmarks/results/fidelity_smollm2.md):
  deviation of pre-RoPE keys (the model's rotation undone, so the low-pass sees content, not
  rotation phase), K and V deviations each normalised per (layer, head) and V weighted above K,
  per-(layer, head) ranks averaged into one content rank, plus a recency prior: a token's score
  is its position in the span (0 = oldest, 1 = newest) plus ``content_weight`` times its content
  rank, so the most deviating token competes with tokens up to ``content_weight`` of the span
  more recent. Measured on SmolLM2 text: far better than the paper's shared set, within 3% of
  SnapKV, but not significantly better than StreamingLLM on held-out text, and the recency prior
  does nearly all of the work (random content ranks under the same prior are as good). The
  prior was measured on text only; for visual candidates ``recency=False`` (or
  ``flashcache-paper``) is the unmeasured alternative.

:meth:`FlashCachePolicy.shared_scores` is the one definition of the shared-set ranking: the
reference path calls it through :meth:`Policy.select`, the engine calls it on the scores
:func:`flashcache_sglang.kernels.score_span` reads straight from the KV pool.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..method.budget import allocate_budgets
from ..method.scoring import KEY_SPACES, FrequencyScores, frequency_scores
from .base import KVSpan, Policy, register_policy

__all__ = ["FlashCacheNoDBAPolicy", "FlashCachePaperPolicy", "FlashCachePolicy", "LAYER_COMBINES"]

LAYER_COMBINES = ("rank", "energy", "mean", "max")


def _row_rank(scores: torch.Tensor) -> torch.Tensor:
    """Rank of each entry within its last-axis row, scaled to [0, 1): float32, same shape.
    Ties go to the earlier token (stable sort), so the ranking is deterministic."""
    num_tokens = scores.shape[-1]
    order = torch.argsort(scores, dim=-1, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(num_tokens, device=scores.device).expand_as(order))
    return rank.to(torch.float32) / num_tokens


@register_policy
@dataclass
class FlashCachePolicy(Policy):
    """FlashCache as tuned for one shared token set (see the module docstring).

    Args:
        retention: share of candidate tokens kept, in (0, 1].
        granularity: "shared" | "layer" | "head" (see :mod:`flashcache_sglang.policies.base`).
        gamma: low-pass cutoff as a fraction of the scored span, in (0, 1); frequencies
            ``m <= floor(gamma * num_candidates)`` form the base KV.
        key_space: "pre_rope" (un-rotate keys before scoring; the span needs ``positions`` and
            ``rotary``) or "post_rope" (keys as cached).
        key_weight: weight of the key deviation against the value deviation (1), >= 0.
        normalise_kv: divide K and V deviation each by its mean over the span, per (layer,
            head), before weighting (keys and values differ in scale by orders of magnitude).
        layer_combine: how per-(layer, head) content becomes one shared ranking, one of
            ``LAYER_COMBINES``: "rank" (mean of per-row ranks, scale-free), "energy" (layer
            means normalised and weighted by DBA's high-frequency ratio), "mean", "max".
        recency: add the position prior (position in the span + content_weight * content rank).
        content_weight: reach of the content rank in span fractions, > 0 (with ``recency``).
        dba: per-layer budgets from high-frequency energy ("layer"/"head" granularity) and the
            weights of ``layer_combine="energy"``.
        dba_floor: every layer keeps at least ``floor(dba_floor * budget)`` candidates, in [0, 1].
        dba_cap: no layer keeps more than ``ceil(dba_cap * budget)`` candidates, >= 1.
    """

    gamma: float = 0.2
    key_space: str = "pre_rope"
    key_weight: float = 0.25
    normalise_kv: bool = True
    layer_combine: str = "rank"
    recency: bool = True
    content_weight: float = 0.15
    dba: bool = True
    dba_floor: float = 0.25
    dba_cap: float = 4.0

    name: ClassVar[str] = "flashcache"
    needs_queries: ClassVar[bool] = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (isinstance(self.gamma, (int, float)) and 0.0 < self.gamma < 1.0):
            raise ValueError(f"gamma must be in (0, 1), got {self.gamma!r}")
        if self.key_space not in KEY_SPACES:
            raise ValueError(f"key_space must be one of {KEY_SPACES}, got {self.key_space!r}")
        if not (isinstance(self.key_weight, (int, float)) and math.isfinite(self.key_weight)
                and self.key_weight >= 0.0):
            raise ValueError(f"key_weight must be a finite float >= 0, got {self.key_weight!r}")
        if self.layer_combine not in LAYER_COMBINES:
            raise ValueError(f"layer_combine must be one of {LAYER_COMBINES}, got {self.layer_combine!r}")
        if not (isinstance(self.content_weight, (int, float)) and math.isfinite(self.content_weight)
                and self.content_weight > 0.0):
            raise ValueError(f"content_weight must be a finite float > 0, got {self.content_weight!r}")
        if not 0.0 <= self.dba_floor <= 1.0:
            raise ValueError(f"dba_floor must be in [0, 1], got {self.dba_floor!r}")
        if not self.dba_cap >= 1.0:
            raise ValueError(f"dba_cap must be >= 1, got {self.dba_cap!r}")

    # ---------------------------------------------------------------- scores of the span
    def frequency_scores(self, span: KVSpan) -> FrequencyScores:
        """Scores of the span's candidate tokens (in position order): deviation
        ``[num_layers, num_kv_heads, num_candidates]`` and energy ratios. Cached on the span
        object (select() asks from several hooks); scores an engine computed in the pool are
        given with :meth:`use_scores`."""
        cached = getattr(span, "_flashcache_scores", None)
        if cached is not None and cached[0] == (self.gamma, self.key_space):
            return cached[1]
        index = span.candidate_mask.nonzero().squeeze(-1).to(span.keys.device)
        positions = rotary = None
        if self.key_space == "pre_rope":
            if span.positions is None or span.rotary is None:
                raise ValueError(
                    f"policy {self.name!r} scores pre-RoPE keys (key_space='pre_rope'): the span needs "
                    "positions and rotary (the model's RotarySpec); or pass key_space='post_rope'"
                )
            positions, rotary = span.positions.to(span.keys.device)[..., index], span.rotary
        result = frequency_scores(span.keys[:, index], span.values[:, index], self.gamma,
                                  positions=positions, rotary=rotary)
        object.__setattr__(span, "_flashcache_scores", ((self.gamma, self.key_space), result))
        return result

    def use_scores(self, span: KVSpan, scores: FrequencyScores) -> None:
        """Give ``span`` scores computed elsewhere (the engine's pool-direct kernel,
        :func:`flashcache_sglang.kernels.score_span`) for a span whose tokens are all
        candidates; ``select`` then uses them instead of scoring the gathered K/V again.

        Raises:
            ValueError: the span has non-candidates, the shape differs, or the scores are in
                another key space than this policy's (e.g. post-RoPE scores for the default,
                which needs ``score_span(..., positions=..., rotary=...)``).
        """
        if not bool(span.candidate_mask.all()):
            raise ValueError("precomputed scores need a span whose tokens are all candidates")
        if tuple(scores.key_deviation.shape) != (span.num_layers, span.num_kv_heads, span.num_tokens):
            raise ValueError(f"scores.key_deviation shape {tuple(scores.key_deviation.shape)} does not "
                             f"match the span [{span.num_layers}, {span.num_kv_heads}, {span.num_tokens}]")
        self._check_key_space(scores)
        object.__setattr__(span, "_flashcache_scores", ((self.gamma, self.key_space), scores))

    def _check_key_space(self, scores: FrequencyScores) -> None:
        if scores.key_space != self.key_space:
            raise ValueError(
                f"policy {self.name!r} ranks {self.key_space} key deviation but the scores are "
                f"{scores.key_space}; score_span needs positions= and rotary= for pre-RoPE keys"
            )

    # ---------------------------------------------------------------- the one shared ranking
    def content(self, scores: FrequencyScores, layers: slice = slice(None)) -> torch.Tensor:
        """``[num_layers, num_kv_heads, num_tokens]`` float32 combined K/V deviation (of the
        ``layers`` slice only, when given)."""
        keys, values = scores.key_deviation[layers].float(), scores.value_deviation[layers].float()
        if self.normalise_kv:
            tiny = torch.finfo(torch.float32).tiny
            keys = keys / keys.mean(dim=-1, keepdim=True).clamp_min(tiny)
            values = values / values.mean(dim=-1, keepdim=True).clamp_min(tiny)
        return values + self.key_weight * keys

    def _energy_weights(self, scores: FrequencyScores) -> torch.Tensor:
        num_layers = scores.key_deviation.shape[0]
        device = scores.key_deviation.device
        if not self.dba:
            return torch.full((num_layers,), 1.0 / num_layers, device=device)
        ratio = scores.high_freq_ratio.float().to(device)
        return ratio / ratio.sum().clamp_min(1e-12)

    def shared_scores(self, scores: FrequencyScores, reduce=None) -> torch.Tensor:
        """The shared-set ranking of a scored span: higher = keep.

        Device-side and sync-free (sorts, means and arithmetic on the scores' device; no
        ``.item()``, no host copies), so an engine can call it right after
        :func:`flashcache_sglang.kernels.score_span` and hand the result to
        :func:`flashcache_sglang.kernels.select_kept` with the budget.

        Args:
            scores: :class:`FrequencyScores` of the candidate span in position order
                (``[num_layers, num_kv_heads, num_tokens]``), in this policy's key space.
            reduce: with tensor parallelism, a callable summing a tensor over the TP group
                (each rank scored its own KV heads): the per-head sums are added over the group
                in one collective before they are combined, so every rank ranks alike and as one
                process holding every head would (the "energy" weights then use the heads' mean
                energy ratio). None with one rank.
        Returns:
            ``[num_tokens]`` torch.float32 on the scores' device.
        """
        self._check_key_space(scores)
        num_layers, num_heads, num_tokens = scores.key_deviation.shape
        if self.layer_combine == "rank":
            # One layer at a time: the sort's temporaries stay a layer's worth (engine memory).
            total = torch.zeros(num_tokens, dtype=torch.float32, device=scores.key_deviation.device)
            for layer in range(num_layers):
                total += _row_rank(self.content(scores, slice(layer, layer + 1))).sum(dim=(0, 1))
            count = float(num_layers * num_heads)
            if reduce is not None:
                packed = reduce(torch.cat([total, total.new_tensor([count])]))
                total, count = packed[:-1], packed[-1]
            combined = total / count
        else:
            content = self.content(scores)
            per_layer, heads = content.sum(dim=1), content.new_tensor([float(num_heads)])
            ratio = None
            if reduce is not None:
                ratio = scores.high_freq_ratio_per_head.to(content.device, torch.float32).sum(dim=1)
                packed = reduce(torch.cat([per_layer.flatten(), ratio, heads]))
                per_layer = packed[: per_layer.numel()].view(num_layers, num_tokens)
                ratio, heads = packed[per_layer.numel(): -1], packed[-1:]
            per_layer = per_layer / heads  # the layer's MSE over all its channels
            normalised = per_layer / per_layer.mean(dim=-1, keepdim=True).clamp_min(1e-30)
            if self.layer_combine == "max":
                combined = normalised.max(dim=0).values
            elif self.layer_combine == "mean":
                combined = normalised.mean(dim=0)
            elif ratio is not None and self.dba:
                combined = ((ratio / ratio.sum().clamp_min(1e-12))[:, None] * normalised).sum(dim=0)
            else:
                combined = (self._energy_weights(scores)[:, None] * normalised).sum(dim=0)
        if self.recency:
            position = torch.arange(num_tokens, device=combined.device, dtype=torch.float32) / num_tokens
            combined = position + self.content_weight * _row_rank(combined)
        return combined.to(torch.float32)

    def shared_score(self, span: KVSpan) -> torch.Tensor:
        index = span.candidate_mask.nonzero().squeeze(-1).to(span.keys.device)
        out = torch.zeros(span.num_tokens, dtype=torch.float32, device=span.keys.device)
        out[index] = self.shared_scores(self.frequency_scores(span))
        return out

    # ---------------------------------------------------------------- per layer / per head
    def score(self, span: KVSpan) -> torch.Tensor:
        """Per-(layer, head) scores ``[L, H, N]`` for granularities "layer" and "head": the
        combined deviation, or with ``recency`` its row rank scaled by content_weight plus
        the position prior. Zero outside the candidates (never read there)."""
        scores = self.frequency_scores(span)
        rows = self.content(scores)
        if self.recency:
            num_tokens = rows.shape[-1]
            position = torch.arange(num_tokens, device=rows.device, dtype=torch.float32) / num_tokens
            rows = position + self.content_weight * _row_rank(rows)
        index = span.candidate_mask.nonzero().squeeze(-1).to(span.keys.device)
        out = rows.new_zeros(span.num_layers, span.num_kv_heads, span.num_tokens)
        out[:, :, index] = rows
        return out

    def layer_weights(self, span: KVSpan) -> torch.Tensor:
        """``[num_layers]`` float32 summing to 1: DBA's energy ratios, or uniform without DBA."""
        return self._energy_weights(self.frequency_scores(span)).cpu()

    def layer_budgets(self, span: KVSpan, budget: int) -> torch.Tensor:
        if not self.dba:
            return super().layer_budgets(span, budget)
        floor = int(math.floor(self.dba_floor * budget))
        cap = min(span.num_candidates, int(math.ceil(self.dba_cap * budget)))
        return allocate_budgets(self.layer_weights(span), budget * span.num_layers, floor, cap)


@register_policy
@dataclass
class FlashCachePaperPolicy(FlashCachePolicy):
    """FlashCache exactly as the paper states it: post-RoPE keys, Dev = MSE_K + MSE_V (raw),
    DBA; a shared set weights layers by DBA's energy ratio; no recency prior."""

    key_space: str = "post_rope"
    key_weight: float = 1.0
    normalise_kv: bool = False
    layer_combine: str = "energy"
    recency: bool = False

    name: ClassVar[str] = "flashcache-paper"


@register_policy
@dataclass
class FlashCacheNoDBAPolicy(FlashCachePaperPolicy):
    """The paper's FlashCache without Dynamic Budget Allocation: every layer keeps the same
    budget and layers weigh equally in a shared set (the paper's "w/o DBA" ablation)."""

    dba: bool = False

    name: ClassVar[str] = "flashcache_no_dba"
