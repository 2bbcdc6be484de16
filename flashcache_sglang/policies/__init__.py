"""KV-selection policies: FlashCache and the baselines, one small dataclass per file.

Importing this package registers every policy with :func:`make_policy`.
Policies with ``needs_queries = False`` run inside SGLang (they read only the cached K/V);
the others (SnapKV, TOVA) need observation-window queries and run in the reference path only.
"""

from .base import (
    GRANULARITIES,
    KeepSet,
    KVSpan,
    Policy,
    available_policies,
    make_policy,
    register_policy,
    text_candidate_mask,
)
from .flashcache import FlashCacheNoDBAPolicy, FlashCachePaperPolicy, FlashCachePolicy
from .knorm import KNormPolicy
from .random_policy import RandomPolicy
from .snapkv import SnapKVPolicy
from .streaming_llm import StreamingLLMPolicy
from .tova import TOVAPolicy
from .uniform_frames import UniformFramesPolicy

__all__ = [
    "GRANULARITIES",
    "FlashCacheNoDBAPolicy",
    "FlashCachePaperPolicy",
    "FlashCachePolicy",
    "KNormPolicy",
    "KVSpan",
    "KeepSet",
    "Policy",
    "RandomPolicy",
    "SnapKVPolicy",
    "StreamingLLMPolicy",
    "TOVAPolicy",
    "UniformFramesPolicy",
    "available_policies",
    "engine_policies",
    "make_policy",
    "register_policy",
    "text_candidate_mask",
]


def engine_policies() -> list[str]:
    """Policies that need only the cached K/V (``needs_queries = False``): these can run
    inside SGLang, whose KV pool keeps no queries or attention weights."""
    from .base import _REGISTRY

    return sorted(name for name, cls in _REGISTRY.items() if not cls.needs_queries)
