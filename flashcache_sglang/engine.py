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

from . import cpu_compat
from .config import ENV_VAR, FlashCacheConfig

_FIELDS = {"retention", "gamma", "policy", "candidates", "sink_tokens", "recent_tokens", "min_candidates"}

CPU_ENGINE_DEFAULTS = {"device": "cpu", "attention_backend": "torch_native", "disable_cuda_graph": True,
                       "sampling_backend": "pytorch", "grammar_backend": "none"}


def engine_kwargs(kwargs: dict[str, Any], cpu: bool) -> tuple[FlashCacheConfig, dict[str, Any]]:
    """Split ``flashcache_*`` keywords off; validate; return the config and SGLang's keywords."""
    ours = {key[len("flashcache_"):]: kwargs.pop(key) for key in list(kwargs) if key.startswith("flashcache_")}
    unknown = set(ours) - _FIELDS
    if unknown:
        raise ValueError(f"unknown flashcache options {sorted('flashcache_' + k for k in unknown)}; "
                         f"valid: {sorted('flashcache_' + k for k in _FIELDS)}")
    config = FlashCacheConfig(**ours)
    for key, bad in (("page_size", lambda v: v not in (None, 1)),
                     ("speculative_algorithm", lambda v: v is not None),
                     ("disable_radix_cache", bool), ("enable_hierarchical_cache", bool)):
        if key in kwargs and bad(kwargs[key]):
            raise ValueError(f"{key}={kwargs[key]!r} is not supported with flashcache")
    kwargs.setdefault("radix_cache_backend", "flashcache")
    if kwargs["radix_cache_backend"] != "flashcache":
        raise ValueError(f"radix_cache_backend={kwargs['radix_cache_backend']!r} conflicts with flashcache")
    if cpu:
        for key, value in CPU_ENGINE_DEFAULTS.items():
            kwargs.setdefault(key, value)
    else:
        kwargs.setdefault("attention_backend", "flashinfer")
        kwargs.setdefault("disable_cuda_graph", True)
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
