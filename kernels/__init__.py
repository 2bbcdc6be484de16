"""Triton kernels for FlashCache on SGLang's KV pool, each beside its float32 torch reference.

Installed as ``flashcache_sglang.kernels`` (a top-level ``kernels`` would shadow Hugging Face's
kernel hub). Imports need torch and triton only: no SGLang, no transformers.

Public API (shapes in each docstring; ``backend="auto"`` = Triton on CUDA, torch elsewhere):

- :func:`score_span` -> FrequencyScores: deviation ``[num_layers, num_kv_heads, num_tokens]``
  and high-frequency energy ratios of a candidate span read in place from the pool.
- :func:`select_kept` -> kept positions (torch.int64, ascending): top-``budget`` by score,
  protected tokens forced in; shared (1-D) or per row (2-D).
- :func:`compact_kept` -> CompactionResult: page_size 1 frees dropped slots; page_size > 1
  copies kept K/V of all layers into fresh dense pages and frees the old pages.
- :func:`build_flashinfer_indices` -> FlashInferIndices (kv_indptr, kv_indices,
  kv_last_page_len, torch.int32) for rows whose dropped tokens hold a sentinel slot.

Sub-packages ``scoring``, ``selection``, ``compaction`` and ``flashinfer_index`` each hold a
``reference.py`` and a ``triton.py`` with the raw launchers.
"""

from .api import (
    MATMUL_MAX_TOKENS,
    CompactionResult,
    FlashInferIndices,
    build_flashinfer_indices,
    compact_kept,
    copy_slots,
    score_span,
    select_kept,
)

__all__ = [
    "MATMUL_MAX_TOKENS",
    "CompactionResult",
    "FlashInferIndices",
    "build_flashinfer_indices",
    "compact_kept",
    "copy_slots",
    "score_span",
    "select_kept",
]
