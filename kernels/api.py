"""The operations the SGLang integration calls, each validating its inputs once: scoring a span
straight from the pool, selecting the kept set, and copying slots (a stream memory's
copy-on-write; re-rotation lives in :mod:`.rotary`).

``backend="auto"`` runs Triton on CUDA tensors and the torch reference elsewhere, so CPU
serving needs no TRITON_INTERPRET. ``backend="triton"`` forces the kernels (on CPU that needs
TRITON_INTERPRET=1; the tests do this), ``backend="reference"`` forces torch.
"""

from __future__ import annotations

from typing import Sequence

import torch

from flashcache_sglang.method.scoring import FrequencyScores

from ._common import (
    FP8_KV_DTYPES,
    KV_DTYPES,
    check_index_tensor,
    check_kv_buffers,
    debug_checks_enabled,
    resolve_backend,
)
from .compaction.reference import copy_slots_reference
from .compaction.triton import copy_slots_triton
from .rotary import RotarySpec
from .scoring.inputs import Scale, check_rotary, check_scales
from .scoring.reference import score_span_reference
from .scoring.triton import _check_gamma
from .scoring.triton import _launch as score_span_launch
from .selection.reference import select_kept_reference
from .selection.triton import select_kept_triton

# Above this span length "auto" scores with the FFT reference instead of the matmul kernels.
# Estimate (kernels/README.md): the folded matmul's 2 * gamma * N FLOPs per element overtake the
# unfused torch FFT's ~240 bytes moved per element only near 100K tokens on an H100; the cap
# bounds the cached DCT table (215 MB in bf16 at 32K). Unmeasured: benchmarks/run_gpu_suite.sh
# times both at 2K-32K; move this to the measured crossover.
MATMUL_MAX_TOKENS = 32768
# Most temporary memory one Triton scoring launch may take (its low-pass coefficients), as a share
# of the scored span's K/V in the pool; spans that would need more are scored a few layers per
# launch (issue target: compression's extra memory <= 5% of the candidates' KV, the cached DCT
# table aside).
SCORING_EXTRA_FRACTION = 0.02


def score_span(
    k_buffers: Sequence[torch.Tensor],
    v_buffers: Sequence[torch.Tensor],
    slot_indices: torch.Tensor,
    gamma: float = 0.2,
    *,
    positions: torch.Tensor | None = None,
    rotary: RotarySpec | None = None,
    k_scale: Scale = None,
    v_scale: Scale = None,
    backend: str = "auto",
) -> FrequencyScores:
    """FlashCache deviation and high-frequency energy of one request's candidate span.

    Args:
        k_buffers: SGLang's per-layer key buffers, each ``[num_slots, num_kv_heads, head_dim]``
            float16 / bfloat16 / float32, or float8_e4m3fn / float8_e5m2 (``--kv-cache-dtype
            fp8_e4m3`` / ``fp8_e5m2``: pass ``get_key_buffer(layer)``, the float8 view of the
            uint8 storage), all alike, contiguous within a slot.
        v_buffers: the value buffers, same layout.
        slot_indices: ``[num_tokens]`` torch.int32 / torch.int64 slots of the candidate tokens
            in position order, on the pool's device.
        gamma: low-pass cutoff fraction in (0, 1).
        positions: ``[num_tokens]`` torch.int32 / torch.int64 RoPE positions of those tokens as
            SGLang applied them (text: the logical position), or ``[3, num_tokens]`` for
            M-RoPE (Qwen2.5-VL: the request's ``mrope_positions`` columns), on the pool's
            device. With ``rotary``, keys are scored pre-RoPE (``key_space="pre_rope"``).
        rotary: the model's :class:`RotarySpec` (``upstream.rotary_spec_of(rotary_emb)``;
            ideally already ``.to(device)``).
        k_scale, v_scale: FP8 dequantisation (value = stored * scale, as SGLang stores
            ``x / layer.k_scale``): None (1.0), a float, a float per layer, or a
            ``[num_layers]`` float tensor on the pool's device.
        backend: "auto", "triton" or "reference". "auto" on CUDA uses the matmul kernels up
            to MATMUL_MAX_TOKENS tokens and the FFT reference beyond.

    Returns:
        FrequencyScores with key_deviation / value_deviation ``[num_layers, num_kv_heads,
        num_tokens]`` float32 (``.deviation`` their sum, ``.layer_deviation``
        ``[num_layers, num_tokens]``), high_freq_ratio ``[num_layers]`` and
        high_freq_ratio_per_head ``[num_layers, num_kv_heads]`` float32, key_space.
    """
    layout = check_kv_buffers(k_buffers, v_buffers, KV_DTYPES + FP8_KV_DTYPES)
    check_index_tensor(slot_indices, "slot_indices", layout.device)
    _check_gamma(gamma)
    if slot_indices.numel() == 0:
        raise ValueError("slot_indices is empty: the span needs num_tokens >= 1")
    rope = check_rotary(positions, rotary, slot_indices.numel(), layout.head_dim, layout.device)
    scales = check_scales(k_scale, v_scale, layout.num_layers, layout.device)
    chosen = resolve_backend(backend, layout.device)
    if backend == "auto" and slot_indices.numel() > MATMUL_MAX_TOKENS:
        chosen = "reference"
    if chosen == "triton":
        return _score_in_layer_groups(k_buffers, v_buffers, slot_indices, gamma, layout, rope, scales)
    return score_span_reference(k_buffers, v_buffers, slot_indices, gamma, rope, scales)


def scoring_layer_group(num_tokens: int, gamma: float, layout) -> int:
    """Layers one scoring launch covers, so that its temporary low-pass coefficients
    (``(floor(gamma * N) + 1) x 2 * layers * heads x head_dim`` in the compute dtype) stay under
    SCORING_EXTRA_FRACTION of the span's K/V in the pool (about gamma otherwise)."""
    from flashcache_sglang.method.dct import cutoff_index

    compute_bytes = 4 if layout.dtype == torch.float32 else 2
    pool_bytes = torch.tensor([], dtype=layout.dtype).element_size()
    per_layer = (cutoff_index(num_tokens, gamma) + 1) * 2 * layout.num_kv_heads * layout.head_dim * compute_bytes
    span = num_tokens * 2 * layout.num_layers * layout.num_kv_heads * layout.head_dim * pool_bytes
    return max(1, min(layout.num_layers, int(SCORING_EXTRA_FRACTION * span // per_layer)))


def _score_in_layer_groups(k_buffers, v_buffers, slot_indices, gamma, layout, rope, scales) -> FrequencyScores:
    """Scores are per (layer, head): a span scored a few layers per launch is scored exactly."""
    import dataclasses

    num_layers = layout.num_layers
    group = scoring_layer_group(slot_indices.numel(), gamma, layout)
    if group >= num_layers:
        return score_span_launch(k_buffers, v_buffers, slot_indices, gamma, layout, rope, scales, None)
    shape = (num_layers, layout.num_kv_heads, slot_indices.numel())
    out = FrequencyScores(
        torch.empty(shape, dtype=torch.float32, device=layout.device),
        torch.empty(shape, dtype=torch.float32, device=layout.device),
        torch.empty(num_layers, dtype=torch.float32, device=layout.device),
        torch.empty(shape[:2], dtype=torch.float32, device=layout.device),
        key_space="post_rope" if rope is None else "pre_rope")
    for start in range(0, num_layers, group):
        stop = min(start + group, num_layers)
        part_scales = None if scales is None else torch.cat([scales[start:stop], scales[num_layers + start:num_layers + stop]])
        part = score_span_launch(k_buffers[start:stop], v_buffers[start:stop], slot_indices, gamma,
                                 dataclasses.replace(layout, num_layers=stop - start), rope, part_scales, None)
        for name in ("key_deviation", "value_deviation", "high_freq_ratio", "high_freq_ratio_per_head"):
            getattr(out, name)[start:stop] = getattr(part, name)
    return out


def select_kept(
    scores: torch.Tensor,
    budget: int | torch.Tensor,
    protected_mask: torch.Tensor | None = None,
    *,
    max_budget: int | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """The ``budget`` best tokens of each row, protected tokens forced in, sorted by position.

    Order of preference: protected tokens, then higher score, then lower position (ties are
    deterministic). If more tokens are protected than the budget, the best-scoring protected
    ones are kept. Scores must not be NaN.

    Args:
        scores: ``[num_tokens]`` (one shared keep set) or ``[num_rows, num_tokens]`` (e.g. one
            row per layer), float16 / bfloat16 / float32.
        budget: int in [0, num_tokens] for every row, or ``[num_rows]`` torch.int32 /
            torch.int64 per-row budgets on the scores' device.
        protected_mask: ``[num_tokens]`` or ``[num_rows, num_tokens]`` torch.bool, or None.
        max_budget: width of a 2-D result for tensor budgets; computed with a device sync
            when omitted.
        backend: "auto", "triton" or "reference".

    Returns:
        torch.int64 positions: ``[budget]`` for 1-D scores; ``[num_rows, max_budget]`` for
        2-D scores, each row ascending and padded with -1 after its budget.
    """
    if not isinstance(scores, torch.Tensor) or scores.dim() not in (1, 2):
        shape = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise ValueError(f"scores must be [num_tokens] or [num_rows, num_tokens], got {shape}")
    if scores.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"scores must be float16, bfloat16 or float32, got {scores.dtype}")
    shared = scores.dim() == 1
    rows = scores.unsqueeze(0) if shared else scores
    num_rows, num_tokens = rows.shape
    device = scores.device

    if isinstance(budget, torch.Tensor):
        if shared:
            raise ValueError("budget must be an int when scores is 1-D [num_tokens]")
        check_index_tensor(budget, "budget", device)
        if budget.numel() != num_rows:
            raise ValueError(f"budget has {budget.numel()} entries, expected num_rows={num_rows}")
        budgets = budget
        if max_budget is None:
            max_budget = int(budget.max()) if num_rows else 0
        if debug_checks_enabled() and bool(((budget < 0) | (budget > num_tokens)).any()):
            raise ValueError(f"budget entries must be in [0, {num_tokens}], got {budget.tolist()}")
    elif isinstance(budget, int) and not isinstance(budget, bool):
        if not 0 <= budget <= num_tokens:
            raise ValueError(f"budget must be in [0, num_tokens={num_tokens}], got {budget}")
        budgets = torch.full((num_rows,), budget, dtype=torch.int64, device=device)
        max_budget = budget if max_budget is None else max_budget
    else:
        raise ValueError(f"budget must be an int or an index tensor, got {type(budget).__name__}")
    if not isinstance(max_budget, int) or max_budget < 0 or max_budget > num_tokens:
        raise ValueError(f"max_budget must be an int in [0, {num_tokens}], got {max_budget!r}")

    if protected_mask is None:
        protected = torch.zeros((1, num_tokens), dtype=torch.bool, device=device).expand(num_rows, -1)
    else:
        if not isinstance(protected_mask, torch.Tensor) or protected_mask.dtype != torch.bool:
            raise ValueError("protected_mask must be a torch.bool tensor")
        if protected_mask.device != device:
            raise ValueError(f"protected_mask is on {protected_mask.device}, expected {device}")
        if protected_mask.shape not in ((num_tokens,), (num_rows, num_tokens)):
            raise ValueError(
                f"protected_mask must be [{num_tokens}] or [{num_rows}, {num_tokens}], "
                f"got {tuple(protected_mask.shape)}"
            )
        protected = protected_mask.expand(num_rows, num_tokens)

    if resolve_backend(backend, device) == "triton" and num_tokens > 0:
        kept = select_kept_triton(rows, budgets, protected, max_budget)
    else:
        kept = select_kept_reference(rows, budgets, protected, max_budget)
    return kept[0] if shared else kept


def copy_slots(
    k_buffers: Sequence[torch.Tensor],
    v_buffers: Sequence[torch.Tensor],
    source_slots: torch.Tensor,
    destination_slots: torch.Tensor,
    *,
    backend: str = "auto",
) -> None:
    """Copy the K and V of ``source_slots`` into ``destination_slots`` in every layer (one launch).

    Args:
        k_buffers, v_buffers: per layer ``[num_slots, num_kv_heads, head_dim]``, any KV dtype
            (FP8 pools: their float8 views, copied as bytes).
        source_slots / destination_slots: ``[n]`` torch.int32 / torch.int64 on the pool's device;
            destinations distinct and disjoint from the sources.
    """
    if k_buffers and isinstance(k_buffers[0], torch.Tensor) and k_buffers[0].dtype in FP8_KV_DTYPES:
        # A copy moves bytes: FP8 buffers go through as their uint8 storage (every launcher
        # and index op supports it).
        k_buffers = [buffer.view(torch.uint8) for buffer in k_buffers]
        v_buffers = [buffer.view(torch.uint8) for buffer in v_buffers]
    layout = check_kv_buffers(k_buffers, v_buffers, dtypes=KV_DTYPES + (torch.uint8,))
    check_index_tensor(source_slots, "source_slots", layout.device)
    check_index_tensor(destination_slots, "destination_slots", layout.device)
    if source_slots.numel() != destination_slots.numel():
        raise ValueError(f"source_slots has {source_slots.numel()} entries, destination_slots "
                         f"{destination_slots.numel()}")
    if source_slots.numel() == 0:
        return
    if resolve_backend(backend, layout.device) == "triton":
        copy_slots_triton(k_buffers, v_buffers, source_slots.long(), destination_slots.long(), layout.slot_stride)
    else:
        copy_slots_reference(k_buffers, v_buffers, source_slots.long(), destination_slots.long())
