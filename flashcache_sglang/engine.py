"""SGLang's offline Engine with FlashCache.

    from flashcache_sglang.engine import Engine

    if __name__ == "__main__":          # SGLang spawns its scheduler: keep this guard
        llm = Engine(model_path=..., flashcache_retention=0.2, flashcache_candidates="text")
        out = llm.generate("...", {"max_new_tokens": 32})
        llm.shutdown()

Takes every ``sglang.Engine`` keyword plus ``flashcache_*`` keywords (the launcher's
``--flashcache-*`` flags, same validation). Settings travel to the spawned scheduler through the
environment, so this must run before the first Engine of the process is created.
"""

from __future__ import annotations

import os
from typing import Any

from . import cpu_compat, support
from .config import ENV_VAR, FlashCacheConfig
from .launch_server import CPU_MAX_TOTAL_TOKENS

_FIELDS = {"retention", "gamma", "policy", "candidates", "sink_tokens", "recent_tokens", "min_candidates",
           "stream_max", "stream_idle_timeout_s"}

CPU_ENGINE_DEFAULTS = {"device": "cpu", "attention_backend": "torch_native", "disable_cuda_graph": True,
                       "sampling_backend": "pytorch", "grammar_backend": "none"}
GPU_ENGINE_DEFAULTS = {"cuda_graph_backend_prefill": "disabled"}


def engine_kwargs(kwargs: dict[str, Any], cpu: bool) -> tuple[FlashCacheConfig, dict[str, Any]]:
    """Split ``flashcache_*`` keywords off; validate against the one table of refused settings
    (flashcache_sglang.support); return the config and SGLang's keywords (with the launcher's
    defaults: see flashcache_sglang.launch_server)."""
    ours = {key[len("flashcache_"):]: kwargs.pop(key) for key in list(kwargs) if key.startswith("flashcache_")}
    unknown = set(ours) - _FIELDS
    if unknown:
        raise ValueError(f"unknown flashcache options {sorted('flashcache_' + k for k in unknown)}; "
                         f"valid: {sorted('flashcache_' + k for k in _FIELDS)}")
    config = FlashCacheConfig(**ours)
    support.check({**support.environment_settings(), **support.settings_from_keywords(kwargs)}, config,
                  keywords=True)
    kwargs.setdefault("radix_cache_backend", "flashcache")
    if cpu:
        for key, value in CPU_ENGINE_DEFAULTS.items():
            kwargs.setdefault(key, value)
        if "max_total_tokens" not in kwargs and "mem_fraction_static" not in kwargs:
            kwargs["max_total_tokens"] = CPU_MAX_TOTAL_TOKENS
    elif not kwargs.get("disable_cuda_graph"):
        for key, value in GPU_ENGINE_DEFAULTS.items():
            kwargs.setdefault(key, value)
    return config, kwargs


def Engine(**kwargs: Any):
    """Create ``sglang.Engine`` with the FlashCache radix cache (see module docstring)."""
    cpu = cpu_compat.needed()
    config, sglang_kwargs = engine_kwargs(dict(kwargs), cpu)
    os.environ.update(cpu_compat.environment())
    os.environ[ENV_VAR] = config.to_json()
    if cpu:
        cpu_compat.activate()
    import sglang

    return sglang.Engine(**sglang_kwargs)
