"""SGLang plug-in entry point (group ``sglang.srt.plugins``), loaded in every SGLang process.

It always registers the ``flashcache`` radix-cache backend (harmless unless selected with
``--radix-cache-backend flashcache``). Only when the launcher exported FlashCache settings
(``FLASHCACHE_CONFIG``) does it also wrap the attention backends so attention reads kept KV only;
a plain ``sglang.launch_server`` in the same environment stays vanilla.
"""

from __future__ import annotations

import logging

from .config import FlashCacheConfig

logger = logging.getLogger(__name__)

RADIX_BACKEND_NAME = "flashcache"
WRAPPED_ATTENTION_BACKENDS = ("torch_native", "triton", "flashinfer", "fa3")


def make_radix_cache(ctx):
    """Factory for SGLang's registry: build the compressed radix cache, or refuse with a reason."""
    from .radix_cache import CompressedRadixCache
    from .stats import CompressionStats

    config = FlashCacheConfig.from_env() or FlashCacheConfig(retention=1.0)
    refuse = {
        ctx.disable_radix_cache: "--disable-radix-cache (flashcache is a radix cache)",
        ctx.is_hybrid_swa: "hybrid sliding-window models (KV index != position under SWA)",
        ctx.is_hybrid_ssm: "hybrid SSM/Mamba models",
        ctx.is_dsa: "DSA/NSA sparse-attention models",
        ctx.enable_hierarchical_cache: "--enable-hierarchical-cache",
        ctx.params.page_size != 1: f"--page-size {ctx.params.page_size} (only 1 is supported)",
        bool(getattr(ctx.params, "is_eagle", False)): "speculative decoding (EAGLE)",
    }
    reasons = [reason for bad, reason in refuse.items() if bad]
    if getattr(ctx.model_config, "attention_arch", None) is not None and "MLA" in str(ctx.model_config.attention_arch):
        reasons.append("MLA attention")
    if reasons:
        raise ValueError("flashcache radix cache cannot serve this configuration: " + "; ".join(reasons))
    allocator = ctx.params.token_to_kv_pool_allocator
    kv_pool = allocator.get_kvcache()
    stats = CompressionStats()
    cache = CompressedRadixCache(ctx.params, config, kv_pool=kv_pool, stats=stats)
    stats.probe = lambda: {
        "allocator_available": int(allocator.available_size()),
        "allocator_size": int(allocator.size),
        "tree_evictable": int(cache.evictable_size()),
        "tree_protected": int(cache.protected_size()),
        "tree_dropped_entries": int(cache.dropped_total()),
    }
    stats.publish()
    logger.info(
        "flashcache: compressed radix cache active: retention=%g gamma=%g policy=%s candidates=%s "
        "sink_tokens=%d recent_tokens=%d min_candidates=%d",
        config.retention, config.gamma, config.policy, config.candidates, config.sink_tokens,
        config.recent_tokens, config.min_candidates,
    )
    return cache


def _note_forward_rows(forward_batch, schedule_batch, model_runner) -> None:
    """Keep a decode batch's host rows for the kept-KV table (its ForwardBatch drops them)."""
    from . import upstream
    from .kept_table import KeptKVTable

    if upstream.is_decode_batch(forward_batch):
        table = KeptKVTable.for_pool(upstream.model_runner_req_to_token_pool(model_runner))
        table.note_rows(upstream.batch_out_cache_loc(forward_batch), upstream.batch_rows_cpu(schedule_batch))


def load() -> None:
    from . import upstream

    upstream.register_radix_backend(RADIX_BACKEND_NAME, make_radix_cache)
    if FlashCacheConfig.from_env() is None:
        return
    upstream.require_upstream()
    from .attention import PhysicalKVAttention

    upstream.wrap_attention_backends(PhysicalKVAttention, WRAPPED_ATTENTION_BACKENDS)
    upstream.install_forward_batch_hook(_note_forward_rows)
    upstream.install_admission_hook()
