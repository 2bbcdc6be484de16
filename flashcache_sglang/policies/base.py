"""The one interface every KV-selection policy shares: a span in, a keep set out.

A policy only writes ``score(span)``; :class:`Policy` owns everything else (validation, the
budget rule, protected tokens, reduction of scores to the requested granularity and the top-k),
so every policy - FlashCache and all baselines - keeps exactly the same number of tokens and
differs only in *which* tokens it keeps.

Vocabulary: ``num_layers`` (L), ``num_kv_heads`` (H), ``num_tokens`` (N), ``head_dim`` (D).

Budget rule (one place, here):
    - every token outside ``candidate_mask`` is kept (text of a multimodal prompt, sinks, the
      recent window: the caller decides which tokens may be dropped);
    - ``budget = round(retention * num_candidates)`` candidates are kept per layer (per KV head),
      on average; the total over layers is exact. A policy may move budget between layers
      (FlashCache's Dynamic Budget Allocation) through :meth:`Policy.layer_budgets`, never the
      total.

Granularity:
    - ``"shared"``: one token set for all layers and heads (what an engine with one index table
      per request needs, e.g. SGLang's ``req_to_token``). Scores are reduced over heads and
      then combined across layers by :meth:`Policy.combine_layers`.
    - ``"layer"``: one set per layer, shared by its KV heads (layers may keep different counts).
    - ``"head"``: one set per (layer, KV head); all heads of a layer keep the same count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

__all__ = [
    "GRANULARITIES",
    "KVSpan",
    "KeepSet",
    "Policy",
    "available_policies",
    "make_policy",
    "register_policy",
    "text_candidate_mask",
]

GRANULARITIES = ("shared", "layer", "head")


@dataclass
class KVSpan:
    """The KV cache of one prompt span, as a policy sees it.

    Attributes:
        keys: ``[num_layers, num_tokens, num_kv_heads, head_dim]``, any float dtype. Post-RoPE,
            as the cache stores them.
        values: same shape as ``keys``.
        candidate_mask: ``[num_tokens]`` torch.bool. True = may be dropped; every False token is
            always kept. See :func:`text_candidate_mask` for text-only prompts.
        queries: optional ``[num_layers, window, num_heads, head_dim]`` post-RoPE queries of the
            observation window, i.e. of the *last* ``window`` tokens of the span (query ``i``
            sits at token ``num_tokens - window + i`` and attends causally). Only attention-based
            policies (``needs_queries``) read it; engines do not keep it.
        frame_index: optional ``[num_tokens]`` torch.int64, the video frame of each token, -1
            for non-visual tokens.
        positions: optional ``[num_tokens]`` (or ``[3, num_tokens]`` for M-RoPE) int64, the
            positions RoPE rotated each key with. With ``rotary`` it lets a policy score
            pre-RoPE keys (FlashCache's default).
        rotary: optional :class:`~flashcache_sglang.kernels.rotary.RotarySpec`, the model's RoPE
            (:func:`flashcache_sglang.method.rope.rotary_spec_from_hf` for transformers models,
            :func:`flashcache_sglang.upstream.rotary_spec_of` for SGLang's).
    """

    keys: torch.Tensor
    values: torch.Tensor
    candidate_mask: torch.Tensor
    queries: torch.Tensor | None = None
    frame_index: torch.Tensor | None = None
    positions: torch.Tensor | None = None
    rotary: object | None = None

    def __post_init__(self) -> None:
        if self.keys.dim() != 4:
            raise ValueError(
                "keys must be [num_layers, num_tokens, num_kv_heads, head_dim], "
                f"got shape {tuple(self.keys.shape)}"
            )
        if not torch.is_floating_point(self.keys) or not torch.is_floating_point(self.values):
            raise ValueError(
                f"keys and values must be floating point, got {self.keys.dtype} and {self.values.dtype}"
            )
        if self.values.shape != self.keys.shape:
            raise ValueError(
                f"values shape {tuple(self.values.shape)} must equal keys shape {tuple(self.keys.shape)}"
            )
        num_layers, num_tokens, num_kv_heads, head_dim = self.keys.shape
        if num_tokens == 0:
            raise ValueError("the span is empty: num_tokens must be >= 1")
        if self.candidate_mask.dtype != torch.bool or tuple(self.candidate_mask.shape) != (num_tokens,):
            raise ValueError(
                f"candidate_mask must be torch.bool [num_tokens={num_tokens}], got "
                f"{self.candidate_mask.dtype} {tuple(self.candidate_mask.shape)}"
            )
        if self.queries is not None:
            shape = tuple(self.queries.shape)
            if (
                self.queries.dim() != 4
                or shape[0] != num_layers
                or shape[3] != head_dim
                or shape[2] % num_kv_heads != 0
                or not 1 <= shape[1] <= num_tokens
            ):
                raise ValueError(
                    "queries must be [num_layers, window, num_heads, head_dim] with "
                    f"num_layers={num_layers}, 1 <= window <= num_tokens={num_tokens}, num_heads a "
                    f"multiple of num_kv_heads={num_kv_heads}, head_dim={head_dim}; got {shape}"
                )
        if self.frame_index is not None and tuple(self.frame_index.shape) != (num_tokens,):
            raise ValueError(
                f"frame_index must be [num_tokens={num_tokens}], got {tuple(self.frame_index.shape)}"
            )
        if (self.positions is None) != (self.rotary is None):
            raise ValueError("positions and rotary go together: give both (pre-RoPE scoring) or neither")
        if self.positions is not None:
            shape = tuple(self.positions.shape)
            if self.positions.dtype not in (torch.int32, torch.int64) or shape not in (
                (num_tokens,), (3, num_tokens)
            ):
                raise ValueError(
                    f"positions must be int32/int64 [num_tokens={num_tokens}] or [3, {num_tokens}], "
                    f"got {self.positions.dtype} {shape}"
                )

    @property
    def num_layers(self) -> int:
        return self.keys.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.keys.shape[1]

    @property
    def num_kv_heads(self) -> int:
        return self.keys.shape[2]

    @property
    def head_dim(self) -> int:
        return self.keys.shape[3]

    @property
    def num_candidates(self) -> int:
        return int(self.candidate_mask.sum())


def text_candidate_mask(num_tokens: int, sink_tokens: int = 4, recent_window: int = 64) -> torch.Tensor:
    """Candidate mask of a text-only span: all tokens but the first ``sink_tokens`` and the last
    ``recent_window`` may be dropped. Returns ``[num_tokens]`` torch.bool."""
    if sink_tokens < 0 or recent_window < 0:
        raise ValueError(
            f"sink_tokens and recent_window must be >= 0, got {sink_tokens} and {recent_window}"
        )
    mask = torch.ones(num_tokens, dtype=torch.bool)
    mask[:sink_tokens] = False
    if recent_window:
        mask[max(0, num_tokens - recent_window) :] = False
    return mask


@dataclass
class KeepSet:
    """Which tokens of a span survive compression.

    Attributes:
        keep: ``[num_layers, num_kv_heads, num_tokens]`` torch.bool, True = kept.
        candidate_mask: ``[num_tokens]`` torch.bool, the span's candidates (for the counts).
    """

    keep: torch.Tensor
    candidate_mask: torch.Tensor

    def shared_mask(self) -> torch.Tensor:
        """``[num_tokens]`` torch.bool: the one token set, if all layers and heads agree.

        Raises:
            ValueError: when the set differs across layers or heads (use granularity "shared").
        """
        first = self.keep[0, 0]
        if not bool((self.keep == first).all()):
            raise ValueError(
                "this KeepSet differs across layers/heads; a single shared token set needs "
                'granularity="shared"'
            )
        return first.clone()

    @property
    def num_kept(self) -> torch.Tensor:
        """``[num_layers, num_kv_heads]`` torch.int64: tokens kept per layer and head."""
        return self.keep.sum(dim=-1)

    @property
    def num_kept_candidates(self) -> torch.Tensor:
        """``[num_layers, num_kv_heads]`` torch.int64: candidates kept per layer and head."""
        return (self.keep & self.candidate_mask).sum(dim=-1)

    @property
    def kept_fraction(self) -> float:
        """Share of all (layer, head, token) KV entries kept."""
        return float(self.keep.float().mean())

    def indices(self, layer: int) -> torch.Tensor:
        """``[num_kv_heads, num_kept]`` torch.int64 ascending token indices kept in ``layer``.

        Raises:
            ValueError: if the heads of ``layer`` keep different counts.
        """
        counts = self.keep[layer].sum(dim=-1)
        if not bool((counts == counts[0]).all()):
            raise ValueError(f"heads of layer {layer} keep different counts {counts.tolist()}")
        positions = torch.arange(self.keep.shape[-1], device=self.keep.device)
        order = torch.where(self.keep[layer], positions, positions + self.keep.shape[-1])
        return order.sort(dim=-1).values[:, : int(counts[0])]


def _check_retention(retention: float) -> None:
    if not (isinstance(retention, (int, float)) and 0.0 < retention <= 1.0):
        raise ValueError(f"retention must be in (0, 1], got {retention!r}")


def _finite_standardise(scores: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """z-score each row over its finite candidate entries; +-inf entries stay infinite."""
    finite = torch.isfinite(scores) & candidates
    count = finite.sum(dim=-1, keepdim=True).clamp_min(1)
    filled = torch.where(finite, scores, torch.zeros_like(scores))
    mean = filled.sum(dim=-1, keepdim=True) / count
    var = torch.where(finite, (scores - mean).square(), torch.zeros_like(scores)).sum(-1, keepdim=True)
    std = (var / count).sqrt().clamp_min(1e-12)
    return torch.where(torch.isfinite(scores), (scores - mean) / std, scores)


@dataclass
class Policy:
    """Base of every KV-selection policy (FlashCache and the baselines).

    Args:
        retention: share of the *candidate* tokens kept, in (0, 1].
        granularity: "shared" (one set for all layers and heads), "layer" (one set per layer)
            or "head" (one set per layer and KV head).
    """

    retention: float = 0.2
    granularity: str = "shared"

    name: ClassVar[str] = "base"
    needs_queries: ClassVar[bool] = False

    def __post_init__(self) -> None:
        _check_retention(self.retention)
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")

    # The one method a policy writes.
    def score(self, span: KVSpan) -> torch.Tensor:
        """Importance of each token, broadcastable to ``[num_layers, num_kv_heads, num_tokens]``;
        higher = keep. ``+inf`` forces a token in (it still counts against the budget)."""
        raise NotImplementedError

    # Hooks a policy may override.
    def reduce_heads(self, scores: torch.Tensor, span: KVSpan) -> torch.Tensor:
        """``[L, H, N] -> [L, N]`` for granularities "layer" and "shared": mean over KV heads."""
        return scores.mean(dim=1)

    def combine_layers(self, scores: torch.Tensor, span: KVSpan) -> torch.Tensor:
        """``[L, N] -> [N]`` for granularity "shared": mean over layers of each layer's z-scored
        candidate scores (so no layer dominates by scale)."""
        return _finite_standardise(scores, span.candidate_mask).mean(dim=0)

    def shared_score(self, span: KVSpan) -> torch.Tensor:
        """``[num_tokens]`` score of the one shared set (granularity "shared"); only candidate
        entries are read. Default: :meth:`combine_layers` of :meth:`reduce_heads` of
        :meth:`score`. A policy with its own shared-set rule overrides this."""
        L, N, H = span.num_layers, span.num_tokens, span.num_kv_heads
        scores = self._checked_scores(span, (L, H, N))
        return self.combine_layers(self.reduce_heads(scores, span), span)

    def _checked_scores(self, span: KVSpan, shape: tuple[int, int, int]) -> torch.Tensor:
        scores = self.score(span)
        try:
            scores = torch.broadcast_to(scores.to(torch.float32), shape)
        except RuntimeError as error:
            raise ValueError(
                f"{self.name}.score returned shape {tuple(scores.shape)}, not broadcastable to "
                f"[num_layers, num_kv_heads, num_tokens] = {list(shape)}"
            ) from error
        if torch.isnan(scores).any():
            raise ValueError(f"{self.name}.score returned NaN")
        return scores

    def layer_budgets(self, span: KVSpan, budget: int) -> torch.Tensor:
        """``[num_layers]`` torch.int64 candidate budgets for "layer"/"head"; they must sum to
        ``budget * num_layers`` and lie in [0, num_candidates]. Default: ``budget`` each."""
        return torch.full((span.num_layers,), budget, dtype=torch.int64)

    # Owned by the base.
    def budget(self, span: KVSpan) -> int:
        """Candidates kept per layer (per head) on average: ``round(retention * num_candidates)``."""
        return int(round(self.retention * span.num_candidates))

    def select(self, span: KVSpan) -> KeepSet:
        """Choose the tokens to keep. Returns a :class:`KeepSet` with ``keep`` of shape
        ``[num_layers, num_kv_heads, num_tokens]``."""
        _check_retention(self.retention)
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        num_candidates = span.num_candidates
        if num_candidates == 0:
            raise ValueError("the candidate set is empty: candidate_mask has no True entry")
        if self.needs_queries and span.queries is None:
            raise ValueError(f"policy {self.name!r} needs span.queries (observation-window queries)")
        L, N, H = span.num_layers, span.num_tokens, span.num_kv_heads
        candidates = span.candidate_mask.to(span.keys.device)
        budget = self.budget(span)
        if self.granularity == "shared":
            combined = self.shared_score(span).to(torch.float32)
            if tuple(combined.shape) != (N,):
                raise ValueError(f"{self.name}.shared_score must return [num_tokens={N}], "
                                 f"got shape {tuple(combined.shape)}")
            if bool(torch.isnan(combined[candidates]).any()):
                raise ValueError(f"{self.name}.shared_score returned NaN for a candidate")
            keep = self._top_candidates(combined[None], candidates, torch.tensor([budget]))[0]
            keep = keep.expand(L, H, N)
        else:
            scores = self._checked_scores(span, (L, H, N))
            budgets = self.layer_budgets(span, budget).to(torch.int64).cpu()
            if budgets.shape != (L,) or int(budgets.sum()) != budget * L:
                raise ValueError(
                    f"layer budgets {budgets.tolist()} must be [num_layers={L}] summing to {budget * L}"
                )
            if bool((budgets < 0).any()) or bool((budgets > num_candidates).any()):
                raise ValueError(f"layer budgets {budgets.tolist()} must lie in [0, {num_candidates}]")
            if self.granularity == "layer":
                keep = self._top_candidates(self.reduce_heads(scores, span), candidates, budgets)
                keep = keep[:, None, :].expand(L, H, N)
            else:
                flat = self._top_candidates(
                    scores.reshape(L * H, N), candidates, budgets.repeat_interleave(H)
                )
                keep = flat.reshape(L, H, N)
        return KeepSet(keep=keep.contiguous(), candidate_mask=candidates.clone())

    @staticmethod
    def _top_candidates(scores: torch.Tensor, candidates: torch.Tensor, budgets: torch.Tensor) -> torch.Tensor:
        """Rows of ``scores [R, N]`` -> bool [R, N]: non-candidates plus the ``budgets[r]``
        best-scored candidates of row r (ties go to the earlier token)."""
        # A candidate scored -inf must still rank before every non-candidate.
        finite_floor = torch.finfo(scores.dtype).min
        masked = torch.where(candidates, scores.clamp_min(finite_floor), torch.full_like(scores, -math.inf))
        order = torch.sort(masked, dim=-1, descending=True, stable=True).indices
        rank = torch.empty_like(order)
        rank.scatter_(-1, order, torch.arange(scores.shape[-1], device=scores.device).expand_as(order))
        chosen = rank < budgets.to(scores.device)[:, None]
        return chosen | ~candidates


_REGISTRY: dict[str, type[Policy]] = {}


def register_policy(cls: type[Policy]) -> type[Policy]:
    """Class decorator: make ``cls`` available to :func:`make_policy` under ``cls.name``."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"policy name {cls.name!r} is already registered by {_REGISTRY[cls.name]}")
    _REGISTRY[cls.name] = cls
    return cls


def available_policies() -> list[str]:
    """Names accepted by :func:`make_policy`, sorted."""
    return sorted(_REGISTRY)


def make_policy(name: str, **kwargs) -> Policy:
    """Build a policy by name, e.g. ``make_policy("flashcache", retention=0.2, gamma=0.2)``.

    Raises:
        ValueError: unknown name (the message lists the valid ones) or a bad option value.
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown policy {name!r}; valid policies: {', '.join(available_policies())}")
    return _REGISTRY[name](**kwargs)
