"""Triton kernels for FlashCache on SGLang's KV pool, each beside its float32 torch reference.

Installed as ``flashcache_sglang.kernels`` (a top-level ``kernels`` would shadow Hugging Face's
kernel hub). Imports need torch and triton only: no SGLang, no transformers.

Public API (shapes in each docstring; ``backend="auto"`` = Triton on CUDA, torch elsewhere),
every entry point used by the engine (flashcache_sglang.compressor):

- :func:`score_span` -> FrequencyScores: K and V deviation ``[num_layers, num_kv_heads,
  num_tokens]`` and high-frequency energy ratios of a candidate span read in place from the
  pool, keys optionally un-rotated (pre-RoPE) in the kernel's loads, FP8 pools with scales.
- :func:`select_kept` -> kept positions (torch.int64, ascending): top-``budget`` by score,
  protected tokens forced in; shared (1-D) or per row (2-D).
- :func:`copy_slots`: K and V of every layer from slots to slots in one launch (a stream
  memory's copy-on-write).
- :func:`rotary.rerotate_slots`: cached keys moved from old to new positions with the model's
  rotary table (a stream memory's re-basing).

Sub-packages ``scoring``, ``selection``, ``compaction`` and ``rotary`` each hold a
``reference.py`` and a ``triton.py`` with the raw launchers.
"""

from .api import MATMUL_MAX_TOKENS, copy_slots, score_span, select_kept
from .rotary import rerotate_slots

__all__ = ["MATMUL_MAX_TOKENS", "copy_slots", "rerotate_slots", "score_span", "select_kept"]
