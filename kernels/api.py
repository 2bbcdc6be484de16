"""The four operations the SGLang integration calls, each validating its inputs once.

``backend="auto"`` runs Triton on CUDA tensors and the torch reference elsewhere, so CPU
serving needs no TRITON_INTERPRET. ``backend="triton"`` forces the kernels (on CPU that needs
TRITON_INTERPRET=1; the tests do this), ``backend="reference"`` forces torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from flashcache_sglang.method.scoring import FrequencyScores

from ._common import (
    FP8_KV_DTYPES,
    KV_DTYPES,
    check_index_tensor,
    check_kv_buffers,
    check_page_size,
    debug_checks_enabled,
    resolve_backend,
)
from .compaction.reference import copy_slots_reference
from .compaction.triton import copy_slots_triton
from .flashinfer_index.reference import build_flashinfer_indices_reference
from .flashinfer_index.triton import build_flashinfer_indices_triton
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
        return score_span_launch(k_buffers, v_buffers, slot_indices, gamma, layout, rope, scales, None)
    return score_span_reference(k_buffers, v_buffers, slot_indices, gamma, rope, scales)


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


@dataclass(frozen=True)
class CompactionResult:
    """Where the kept tokens live after compaction and what the allocator gets back.

    Attributes:
        kept_slots: ``[num_kept]`` torch.int64, the slot of each kept token, position order.
        slots_to_free: torch.int64 slots for the allocator's ``free()``: the dropped slots
            (page_size 1) or the first slot of every old page of the region (page_size > 1;
            SGLang's paged allocator frees ``unique(slots // page_size)``).
    """

    kept_slots: torch.Tensor
    slots_to_free: torch.Tensor


def compact_kept(
    k_buffers: Sequence[torch.Tensor],
    v_buffers: Sequence[torch.Tensor],
    region_slots: torch.Tensor,
    kept_positions: torch.Tensor,
    page_size: int,
    new_pages: torch.Tensor | None = None,
    *,
    backend: str = "auto",
) -> CompactionResult:
    """Keep ``kept_positions`` of a request's region; move K/V only when pages demand it.

    page_size 1: nothing moves; the dropped slots are returned to free.
    page_size > 1: the kept tokens of all layers are copied, in position order, into the fresh
    dense ``new_pages`` (the last one partly filled, so decoding can append to it), and every
    old page of the region is returned to free. The region must be page-aligned (its slot i
    is ``page(i) * page_size + i % page_size``) and owned by this request alone: include any
    prefix or suffix tokens that share its pages in ``kept_positions``; a page shared with
    another request (radix cache) must not be inside the region.

    Args:
        k_buffers, v_buffers: per layer ``[num_slots, num_kv_heads, head_dim]``, as in
            :func:`score_span`.
        region_slots: ``[region_len]`` torch.int32 / torch.int64 slots in position order.
        kept_positions: ``[num_kept]`` torch.int64 / torch.int32 strictly increasing positions
            in [0, region_len) (the output of :func:`select_kept`).
        page_size: SGLang's page size (>= 1).
        new_pages: ``[ceil(num_kept / page_size)]`` torch.int32 / torch.int64 page indices
            from the allocator, disjoint from the region's pages; required when page_size > 1.
        backend: "auto", "triton" or "reference".
    """
    layout = check_kv_buffers(k_buffers, v_buffers)
    check_index_tensor(region_slots, "region_slots", layout.device)
    check_index_tensor(kept_positions, "kept_positions", layout.device)
    check_page_size(page_size)
    region_len, num_kept = region_slots.numel(), kept_positions.numel()
    if num_kept > region_len:
        raise ValueError(f"kept_positions has {num_kept} entries, more than region_len={region_len}")
    if debug_checks_enabled() and num_kept:
        positions = kept_positions.long()
        if bool((positions[1:] <= positions[:-1]).any()) or int(positions[0]) < 0 or int(positions[-1]) >= region_len:
            raise ValueError(f"kept_positions must be strictly increasing in [0, {region_len})")
    region = region_slots.long()
    kept_old = region[kept_positions.long()]

    if page_size == 1:
        dropped = torch.ones(region_len, dtype=torch.bool, device=layout.device)
        dropped[kept_positions.long()] = False
        return CompactionResult(kept_slots=kept_old, slots_to_free=region[dropped])

    num_new_pages = -(-num_kept // page_size)
    if new_pages is None:
        raise ValueError("new_pages is required when page_size > 1")
    check_index_tensor(new_pages, "new_pages", layout.device)
    if new_pages.numel() != num_new_pages:
        raise ValueError(
            f"new_pages has {new_pages.numel()} pages, expected ceil({num_kept} / {page_size}) = "
            f"{num_new_pages}"
        )
    old_page_slots = region[::page_size]
    if debug_checks_enabled():
        _check_paged_region(region, old_page_slots, new_pages, page_size)
    offsets = torch.arange(num_kept, device=layout.device)
    new_slots = new_pages.long()[offsets // page_size] * page_size + offsets % page_size
    if resolve_backend(backend, layout.device) == "triton":
        copy_slots_triton(k_buffers, v_buffers, kept_old, new_slots, layout.slot_stride)
    else:
        copy_slots_reference(k_buffers, v_buffers, kept_old, new_slots)
    return CompactionResult(kept_slots=new_slots, slots_to_free=old_page_slots)


def _check_paged_region(
    region: torch.Tensor, old_page_slots: torch.Tensor, new_pages: torch.Tensor, page_size: int
) -> None:
    offsets = torch.arange(region.numel(), device=region.device)
    expected = old_page_slots.repeat_interleave(page_size)[: region.numel()] + offsets % page_size
    if bool((old_page_slots % page_size != 0).any()) or not torch.equal(region, expected):
        raise ValueError("region_slots is not page-aligned and dense within its pages")
    if bool(torch.isin(new_pages.long(), old_page_slots // page_size).any()):
        raise ValueError("new_pages overlap the region's own pages")


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
        k_buffers, v_buffers: per layer ``[num_slots, num_kv_heads, head_dim]``.
        source_slots / destination_slots: ``[n]`` torch.int32 / torch.int64 on the pool's device;
            destinations distinct and disjoint from the sources.
    """
    layout = check_kv_buffers(k_buffers, v_buffers)
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


@dataclass(frozen=True)
class FlashInferIndices:
    """FlashInfer's paged-KV description of a batch (all torch.int32).

    Attributes:
        kv_indptr: ``[batch_size + 1]``, request b owns kv_indices[kv_indptr[b]:kv_indptr[b+1]].
        kv_indices: ``[total_pages]`` page indices (slot indices when page_size is 1).
        kv_last_page_len: ``[batch_size]`` tokens in each request's last page, in
            [1, page_size] (0 for a request with no tokens).
    """

    kv_indptr: torch.Tensor
    kv_indices: torch.Tensor
    kv_last_page_len: torch.Tensor


def build_flashinfer_indices(
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    seq_lens: torch.Tensor,
    page_size: int,
    *,
    physical_seq_lens: torch.Tensor | None = None,
    num_pages_total: int | None = None,
    sentinel: int = 0,
    backend: str = "auto",
) -> FlashInferIndices:
    """Paged indices of a batch whose rows hold ``sentinel`` for dropped (compressed) tokens.

    Args:
        req_to_token: ``[num_req_slots, max_context_len]`` torch.int32 (SGLang's
            ReqToTokenPool.req_to_token), contiguous rows.
        req_pool_indices: ``[batch_size]`` torch.int32 / torch.int64 rows of the batch.
        seq_lens: ``[batch_size]`` torch.int32 / torch.int64 logical lengths to cover.
        page_size: SGLang's page size; after compaction the physical tokens of a row must be
            dense within pages (physical token j in page j // page_size at offset
            j % page_size), which :func:`compact_kept` guarantees.
        physical_seq_lens: ``[batch_size]`` int, non-sentinel tokens per request. Pass it
            (the integration tracks it) to avoid counting here.
        num_pages_total: host int, sum of ceil(physical_seq_lens / page_size). Pass it to
            avoid a device sync.
        sentinel: slot value of dropped tokens (slot 0 is never allocated by SGLang).
        backend: "auto", "triton" or "reference".
    """
    if not isinstance(req_to_token, torch.Tensor) or req_to_token.dim() != 2:
        raise ValueError("req_to_token must be a [num_req_slots, max_context_len] tensor")
    device = req_to_token.device
    if req_to_token.dtype not in (torch.int32, torch.int64) or req_to_token.stride(1) != 1:
        raise ValueError(
            f"req_to_token must be int32/int64 with contiguous rows, got {req_to_token.dtype} "
            f"strides {req_to_token.stride()}"
        )
    check_index_tensor(req_pool_indices, "req_pool_indices", device)
    check_index_tensor(seq_lens, "seq_lens", device)
    check_page_size(page_size)
    batch_size = req_pool_indices.numel()
    if seq_lens.numel() != batch_size:
        raise ValueError(f"seq_lens has {seq_lens.numel()} entries, expected batch_size={batch_size}")
    if debug_checks_enabled() and batch_size and int(seq_lens.max()) > req_to_token.shape[1]:
        raise ValueError(f"seq_lens exceed max_context_len={req_to_token.shape[1]}")

    if resolve_backend(backend, device) == "reference":
        kv_indptr, kv_indices, kv_last_page_len = build_flashinfer_indices_reference(
            req_to_token, req_pool_indices, seq_lens, page_size, sentinel
        )
        return FlashInferIndices(kv_indptr, kv_indices, kv_last_page_len)

    if physical_seq_lens is None:
        rows = req_to_token[req_pool_indices.long()]
        in_row = torch.arange(rows.shape[1], device=device)[None, :] < seq_lens[:, None]
        physical_seq_lens = ((rows != sentinel) & in_row).sum(1)
    else:
        check_index_tensor(physical_seq_lens, "physical_seq_lens", device)
        if physical_seq_lens.numel() != batch_size:
            raise ValueError(
                f"physical_seq_lens has {physical_seq_lens.numel()} entries, expected {batch_size}"
            )
    pages = (physical_seq_lens.long() + page_size - 1) // page_size
    kv_indptr = torch.zeros(batch_size + 1, dtype=torch.int32, device=device)
    kv_indptr[1:] = pages.cumsum(0)
    if num_pages_total is None:
        num_pages_total = int(kv_indptr[-1])
    kv_last_page_len = (physical_seq_lens.long() - (pages - 1).clamp_min(0) * page_size).to(torch.int32)
    kv_indices = build_flashinfer_indices_triton(
        req_to_token, req_pool_indices, seq_lens, kv_indptr, num_pages_total, page_size, sentinel
    )
    return FlashInferIndices(kv_indptr, kv_indices, kv_last_page_len)
