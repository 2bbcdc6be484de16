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

import dataclasses
import logging

import torch

from .config import FlashCacheConfig
from .kernels import copy_slots, score_span, select_kept
from .kernels.rotary import rerotate_slots
from .policies import FlashCachePolicy, KVSpan, make_policy

SENTINEL_SLOT = 0

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RowCompression:
    """What one compression did to a row (positions are logical row positions)."""

    num_candidates: int
    num_kept: int
    dropped_positions: torch.Tensor  # [num_dropped] int64, ascending, on the row's device

    @property
    def num_dropped(self) -> int:
        return self.num_candidates - self.num_kept


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


class CompressionController:
    """Scores candidates on the pool's KV, selects, frees, and moves kept KV (stream re-basing).

    The FlashCache family runs as a device pipeline on the pool itself: deviation and energy
    straight from the per-layer buffers through the slot indices (``kernels.score_span``: the
    Triton kernel on GPU, its reference on CPU; no gathered copy of the candidates' K/V), the
    layers combined into one ranking on the device, and the top ``num_keep`` chosen by the
    selection kernel (``kernels.select_kept``). Host synchronisations per compressed request:
    one (the dropped count, read when the allocator is handed the dropped slots). Baseline
    policies (KNorm, Random, ...) gather the candidates' K/V and run the policy's own hooks.

    Args:
        kv_pool: SGLang's KV pool (``get_key_buffer(layer_id)`` / ``get_value_buffer``, each
            ``[num_slots + page_size, num_kv_heads, head_dim]``) with ``start_layer`` and
            ``layer_num``.
        free_slots: the allocator's ``free`` (``[n] int64`` slots).
        rotary: callable returning the model's RotarySpec (for re-basing stream memories), or
            None when the model's rotary embedding is not a table rotation.
        reduce: with tensor parallelism, a callable summing a tensor over the TP group (each rank
            holds its own KV heads): scores are reduced before selection, so every rank keeps
            the same tokens. None with one rank.
    """

    def __init__(self, kv_pool, free_slots, rotary=None, reduce=None, kv_scales=None) -> None:
        self.kv_pool = kv_pool
        self.free_slots = free_slots
        # Dropped candidates are never the sentinel: free them without the filtering pass.
        self._free_known = getattr(free_slots, "unfiltered", free_slots)
        self.rotary = rotary
        self.reduce = reduce
        # FP8 pools store x / scale per layer: a callable returning (k_scales, v_scales), or None.
        self.kv_scales = kv_scales
        self._spec_cache: tuple = (None, None)
        self._warned_post_rope = False

    def rotary_spec(self, device):
        """The model's RotarySpec on ``device`` (converted once per table SGLang holds)."""
        if self.rotary is None:
            return None
        spec = self.rotary()
        key, converted = self._spec_cache
        if key is not spec.cos_sin_cache or converted is None or converted.cos_sin_cache.device != torch.device(device):
            converted = spec.to(device)
            self._spec_cache = (spec.cos_sin_cache, converted)
        return converted

    # ------------------------------------------------------------------ buffers
    def _layers(self):
        pool = self.kv_pool
        return range(pool.start_layer, pool.start_layer + pool.layer_num)

    def key_buffers(self) -> list[torch.Tensor]:
        return [self.kv_pool.get_key_buffer(layer) for layer in self._layers()]

    def value_buffers(self) -> list[torch.Tensor]:
        return [self.kv_pool.get_value_buffer(layer) for layer in self._layers()]

    @staticmethod
    def policy(config: FlashCacheConfig, retention: float | None = None, *, multimodal: bool = False):
        """The configured policy. The default ``flashcache`` adds a recency prior measured on text
        only (benchmarks/results/fidelity_smollm2.md); visual candidates are ranked by content alone."""
        kwargs = {"retention": min(max(retention if retention is not None else config.retention, 1e-6), 1.0)}
        if config.policy.startswith("flashcache"):
            kwargs["gamma"] = config.gamma
        if config.policy == "flashcache" and multimodal:
            kwargs["recency"] = False
        policy = make_policy(config.policy, **kwargs)
        if getattr(policy, "needs_queries", False):
            raise ValueError(
                f"policy {config.policy!r} needs attention queries, which the engine does not "
                "keep; use it in the reference path (flashcache_sglang.reference) only"
            )
        return policy

    # ------------------------------------------------------------------ scoring
    def shared_scores(self, slots: torch.Tensor, config: FlashCacheConfig,
                      positions: torch.Tensor | None = None, *, multimodal: bool = False) -> torch.Tensor:
        """One importance score per candidate (higher = keep), for the one token set a request
        keeps across all layers and heads.

        Args:
            slots: ``[n]`` int64 slots of the candidates in position order, on the pool's device.
            positions: the candidates' RoPE positions as SGLang applied them (``[n]``, or
                ``[3, n]`` M-RoPE), for policies that score pre-RoPE keys; without them (or
                without the model's rotary table) keys are scored as cached.
            multimodal: the candidates are visual tokens (see :meth:`policy`).
        Returns:
            ``[n]`` float32 on the pool's device.
        """
        policy = self.policy(config, multimodal=multimodal)
        if isinstance(policy, FlashCachePolicy):
            device = slots.device
            spec = self.rotary_spec(device) if policy.key_space == "pre_rope" else None
            if policy.key_space == "pre_rope" and (spec is None or positions is None):
                if not self._warned_post_rope:
                    logger.warning("flashcache: scoring cached (post-RoPE) keys: %s", "no positions given"
                                   if spec is not None else "the model's rotary embedding is not supported")
                    self._warned_post_rope = True
                policy = dataclasses.replace(policy, key_space="post_rope")
            k_scales, v_scales = self.kv_scales() if self.kv_scales is not None else (None, None)
            scores = score_span(self.key_buffers(), self.value_buffers(), slots, policy.gamma,
                                positions=None if spec is None or policy.key_space != "pre_rope"
                                else positions.to(device, non_blocking=True),
                                rotary=spec if policy.key_space == "pre_rope" else None,
                                k_scale=k_scales, v_scale=v_scales)
            return policy.shared_scores(scores, reduce=self.reduce)
        keys = torch.stack([buffer[slots] for buffer in self.key_buffers()])
        values = torch.stack([buffer[slots] for buffer in self.value_buffers()])
        span = KVSpan(keys=keys, values=values,
                      candidate_mask=torch.ones(slots.numel(), dtype=torch.bool, device=keys.device))
        raw = torch.broadcast_to(policy.score(span).to(torch.float32),
                                 (span.num_layers, span.num_kv_heads, span.num_tokens))
        if self.reduce is None:
            layer = policy.reduce_heads(raw, span)
        else:  # the mean over every rank's heads
            packed = self.reduce(torch.cat([raw.sum(dim=1).flatten(), raw.new_tensor([raw.shape[1]])]))
            layer = packed[:-1].view(raw.shape[0], raw.shape[2]) / packed[-1]
        return policy.combine_layers(layer, span).to(torch.float32)

    def keep_mask(self, slots: torch.Tensor, num_keep: int, config: FlashCacheConfig,
                  protected: torch.Tensor | None = None, positions: torch.Tensor | None = None, *,
                  multimodal: bool = False) -> torch.Tensor:
        """Which of ``slots`` ([n] int64, position order) to keep: exactly ``num_keep``, bool [n]
        (``protected`` [n] bool are kept first)."""
        count = int(slots.numel())
        if num_keep >= count:
            return torch.ones(count, dtype=torch.bool, device=slots.device)
        if num_keep <= 0 and protected is None:
            return torch.zeros(count, dtype=torch.bool, device=slots.device)
        scores = self.shared_scores(slots, config, positions, multimodal=multimodal)
        kept = select_kept(scores, int(num_keep), protected)
        mask = torch.zeros(count, dtype=torch.bool, device=slots.device)
        mask[kept] = True
        return mask

    def compress(self, row: torch.Tensor, positions: torch.Tensor, config: FlashCacheConfig,
                 rope_positions: torch.Tensor | None = None, *, multimodal: bool = False) -> RowCompression:
        """Drop the low-deviation candidates at ``positions`` of ``row`` (edited in place).

        ``rope_positions``: the candidates' RoPE positions (``[n]`` or ``[3, n]``), see
        :meth:`shared_scores`.

        No host synchronisation: counts are known on the host (``num_keep`` is decided before
        scoring), the dropped candidates are taken with a stable sort instead of a boolean mask
        (a data-dependent shape), and their slots go to the allocator without the sentinel filter.
        """
        num_candidates = int(positions.numel())
        empty = torch.empty(0, dtype=torch.int64)
        if config.retention >= 1.0 or num_candidates < max(config.min_candidates, 1):
            return RowCompression(num_candidates, num_candidates, empty)
        positions = positions.to(row.device, non_blocking=True)
        slots = row[positions].to(torch.int64)
        if _debug() and bool((slots == SENTINEL_SLOT).any()):
            raise RuntimeError("compressing a row position that is already dropped: double compression")
        num_keep = round(config.retention * num_candidates)
        keep = self.keep_mask(slots, num_keep, config, positions=rope_positions, multimodal=multimodal)
        dropped = torch.argsort(keep.to(torch.int8), stable=True)[: num_candidates - num_keep]
        self._free_known(slots[dropped])
        dropped_positions = positions[dropped]
        row[dropped_positions] = SENTINEL_SLOT
        return RowCompression(num_candidates, num_keep, dropped_positions)

    # ------------------------------------------------------------------ moving kept KV
    def move_slots(self, source: torch.Tensor, destination: torch.Tensor,
                   old_positions: torch.Tensor, new_positions: torch.Tensor) -> int:
        """Put the KV of ``source`` slots into ``destination`` slots at new positions.

        Values are copied; keys are copied and re-rotated from ``old_positions`` to
        ``new_positions`` (``[n]`` or ``[3, n]``) with the model's rotary table, so a re-based
        memory attends exactly as if its tokens had been cached at their new positions. A slot
        may be its own destination (rotated in place). Returns how many keys were re-rotated.
        """
        if source.numel() == 0:
            return 0
        source, destination = source.long(), destination.long()
        copy = source != destination
        if bool(copy.any()):
            copy_slots(self.key_buffers(), self.value_buffers(), source[copy], destination[copy])
        moved = (old_positions != new_positions)
        if moved.dim() == 2:
            moved = moved.any(dim=0)
        moved = moved.to(destination.device)
        count = int(moved.sum())
        if count:
            if self.rotary is None:
                raise RuntimeError("re-basing a stream memory needs the model's rotary table, which this "
                                   "model does not expose (see upstream.rotary_spec_of)")
            spec = self.rotary()
            select = moved.nonzero().flatten()
            rerotate_slots(self.key_buffers(), destination[select],
                           old_positions[..., select.cpu()].to(destination.device),
                           new_positions[..., select.cpu()].to(destination.device), spec)
        return count


def _debug() -> bool:
    import os

    return os.environ.get("FLASHCACHE_DEBUG") == "1"
