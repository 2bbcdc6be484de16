"""SGLang plug-in entry point (group ``sglang.srt.plugins``), loaded in every SGLang process.

It always registers the ``flashcache`` radix-cache backend (harmless unless selected with
``--radix-cache-backend flashcache``). Only when the launcher exported FlashCache settings
(``FLASHCACHE_CONFIG``) does it also wrap the attention backends so attention reads kept KV only;
a plain ``sglang.launch_server`` in the same environment stays vanilla.

The radix-cache factory runs inside the scheduler process while it starts, after the model
runner: it checks the scheduler's resolved settings against flashcache_sglang.support (the one
table of refused settings) and that attention really is wrapped, so a launch that cannot be
served correctly fails before the server reports healthy, whichever way it was started.
"""

from __future__ import annotations

import logging

from . import support
from .config import ENV_VAR, FlashCacheConfig

logger = logging.getLogger(__name__)

RADIX_BACKEND_NAME = "flashcache"
WRAPPED_ATTENTION_BACKENDS = support.WRAPPED_ATTENTION_BACKENDS


def make_radix_cache(ctx):
    """Factory for SGLang's registry: build the compressed radix cache, or refuse with the reasons."""
    from . import upstream
    from .attention import PhysicalKVAttention
    from .radix_cache import CompressedRadixCache
    from .stats import CompressionStats

    config = FlashCacheConfig.from_env()
    if config is None:
        raise support.UnsupportedSetting(
            f"--radix-cache-backend {RADIX_BACKEND_NAME} needs its settings in {ENV_VAR} (without them the "
            "attention backends are not wrapped): start SGLang through python -m flashcache_sglang.launch_server "
            f"or flashcache_sglang.engine.Engine, or export {ENV_VAR}"
        )
    support.check(support.settings_from_scheduler(ctx), config)
    backends = upstream.context_attention_backends(ctx)
    unwrapped = [type(backend).__name__ for backend in backends if not isinstance(backend, PhysicalKVAttention)]
    if unwrapped:
        raise support.UnsupportedSetting(
            f"flashcache cannot serve this configuration: attention backend {', '.join(unwrapped)} reads "
            f"dropped tokens (flashcache wraps {', '.join(WRAPPED_ATTENTION_BACKENDS)})")
    allocator = ctx.params.token_to_kv_pool_allocator
    kv_pool = allocator.get_kvcache()
    stats = CompressionStats()
    rotary = _rotary_provider(ctx)
    cache = CompressedRadixCache(ctx.params, config, kv_pool=kv_pool, stats=stats, rotary=rotary,
                                 multimodal_positions=upstream.model_uses_mrope(ctx),
                                 reduce=upstream.tensor_parallel_sum(ctx),
                                 kv_scales=upstream.fp8_kv_scales(ctx, kv_pool))
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


def _rotary_provider(ctx):
    """A callable returning the model's RotarySpec (re-read each time: SGLang may grow its table),
    or None when the model has no supported rotary embedding (stream appends are then refused)."""
    from . import upstream

    module = upstream.find_rotary_embedding(upstream.context_model(ctx))
    if module is None:
        logger.warning("flashcache: no rotary embedding found in the model; stream memories are disabled")
        return None
    try:
        upstream.rotary_spec_of(module)
    except upstream.UnsupportedRotaryError as error:
        logger.warning("flashcache: %s; stream memories are disabled", error)
        return None
    return lambda: upstream.rotary_spec_of(module)


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
    from .stream_memory import SESSION_PREFIX

    upstream.install_request_hooks(SESSION_PREFIX)
