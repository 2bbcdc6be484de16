"""Compression of one request's KV row, in place, right after its prefill.

Three layers, as in SGLang's mem_cache (kept apart on purpose):

- the *row* (``req_to_token[req_pool_idx]``) maps logical token positions to KV slots. After
  compression a dropped position holds the sentinel slot 0, which SGLang's allocator never hands
  out; the row keeps one entry per logical token, so prefix lengths and positions stay logical;
- the *allocator* gets every dropped slot back exactly once, here;
- the *pool* (k_buffer / v_buffer per layer) is only read: with page_size 1 no KV moves.

What may be dropped (the candidate positions) is decided per request by
:func:`candidate_positions`; which candidates stay is decided by a policy from
:mod:`flashcache_sglang.policies` on the KV already in the pool.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import FlashCacheConfig
from .kernels import score_span
from .policies import FlashCachePolicy, KVSpan, make_policy

SENTINEL_SLOT = 0


@dataclass(frozen=True)
class RowCompression:
    """What one compression did to a row (positions are logical row positions)."""

    num_candidates: int
    num_kept: int
    dropped_positions: torch.Tensor  # [num_dropped] int64, ascending

    @property
    def num_dropped(self) -> int:
        return int(self.dropped_positions.numel())


def candidate_positions(
    config: FlashCacheConfig,
    multimodal_spans: list[tuple[int, int]],
    prompt_len: int,
    start: int,
    end: int,
) -> torch.Tensor:
    """Logical positions in ``[start, end)`` that ``config`` allows to drop, ascending, int64.

    Args:
        multimodal_spans: half-open ``(begin, end)`` ranges of image/video tokens in the prompt.
        prompt_len: number of prompt tokens; output tokens are never candidates.
        start: first position this compression may touch (positions before it are owned by
            the radix tree and immutable).
        end: one past the last prefilled position.
    """
    end = min(end, prompt_len)
    if end <= start:
        return torch.empty(0, dtype=torch.int64)
    mode = config.candidates
    if mode == "auto":
        mode = "multimodal" if multimodal_spans else "text"
    mask = torch.zeros(end, dtype=torch.bool)
    if mode == "multimodal":
        for begin, stop in multimodal_spans:
            mask[max(begin, 0) : min(stop, end)] = True
    else:
        last = prompt_len - config.recent_tokens
        if last > config.sink_tokens:
            mask[config.sink_tokens : min(last, end)] = True
    mask[:start] = False
    return mask.nonzero().flatten()


class RowCompressor:
    """Scores candidates on the pool's KV and frees the dropped slots.

    Args:
        kv_pool: SGLang's KV pool (``get_key_buffer(layer_id)`` / ``get_value_buffer``, each
            ``[num_slots + page_size, num_kv_heads, head_dim]``) with ``start_layer`` and
            ``layer_num``.
        free_slots: the allocator's ``free`` (``[n] int64`` slots).
    """

    def __init__(self, kv_pool, free_slots) -> None:
        self.kv_pool = kv_pool
        self.free_slots = free_slots

    def _policy(self, config: FlashCacheConfig):
        kwargs = {"retention": config.retention}
        if config.policy.startswith("flashcache"):
            kwargs["gamma"] = config.gamma
        policy = make_policy(config.policy, **kwargs)
        if getattr(policy, "needs_queries", False):
            raise ValueError(
                f"policy {config.policy!r} needs attention queries, which the engine does not "
                "keep; use it in the reference path (flashcache_sglang.reference) only"
            )
        return policy

    def gather(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of ``slots`` for every layer: two ``[num_layers, n, num_kv_heads, head_dim]``."""
        pool = self.kv_pool
        layers = range(pool.start_layer, pool.start_layer + pool.layer_num)
        keys = torch.stack([pool.get_key_buffer(layer)[slots] for layer in layers])
        values = torch.stack([pool.get_value_buffer(layer)[slots] for layer in layers])
        return keys, values

    def keep_mask(self, slots: torch.Tensor, num_keep: int, config: FlashCacheConfig) -> torch.Tensor:
        """Which of ``slots`` ([n] int64, position order) to keep: exactly ``num_keep``, bool [n]."""
        count = int(slots.numel())
        if num_keep >= count:
            return torch.ones(count, dtype=torch.bool, device=slots.device)
        if num_keep <= 0:
            return torch.zeros(count, dtype=torch.bool, device=slots.device)
        keys, values = self.gather(slots)
        span = KVSpan(keys=keys, values=values,
                      candidate_mask=torch.ones(count, dtype=torch.bool, device=keys.device))
        policy = self._policy(config if num_keep == round(config.retention * count)
                              else _with_retention(config, num_keep / count))
        if isinstance(policy, FlashCachePolicy):
            # Score straight from the pool: the Triton kernel on GPU, the reference on CPU.
            pool = self.kv_pool
            layers = range(pool.start_layer, pool.start_layer + pool.layer_num)
            policy.use_scores(span, score_span([pool.get_key_buffer(layer) for layer in layers],
                                               [pool.get_value_buffer(layer) for layer in layers],
                                               slots, policy.gamma))
        return policy.select(span).shared_mask().to(slots.device)

    def compress(self, row: torch.Tensor, positions: torch.Tensor, config: FlashCacheConfig) -> RowCompression:
        """Drop the low-deviation candidates at ``positions`` of ``row`` (edited in place)."""
        num_candidates = int(positions.numel())
        empty = torch.empty(0, dtype=torch.int64)
        if config.retention >= 1.0 or num_candidates < max(config.min_candidates, 1):
            return RowCompression(num_candidates, num_candidates, empty)
        positions = positions.to(row.device)
        slots = row[positions].to(torch.int64)
        if bool((slots == SENTINEL_SLOT).any()):
            raise RuntimeError("compressing a row position that is already dropped: double compression")
        keep = self.keep_mask(slots, round(config.retention * num_candidates), config)
        dropped = positions[~keep]
        self.free_slots(slots[~keep])
        row[dropped] = SENTINEL_SLOT
        return RowCompression(num_candidates, int(keep.sum()), dropped.cpu())


def _with_retention(config: FlashCacheConfig, retention: float) -> FlashCacheConfig:
    import dataclasses

    return dataclasses.replace(config, retention=min(max(retention, 1e-6), 1.0))
