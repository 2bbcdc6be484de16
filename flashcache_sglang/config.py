"""FlashCache settings for the SGLang integration, validated once and carried by environment.

The launcher validates the ``--flashcache-*`` flags, then puts the settings in
``FLASHCACHE_CONFIG`` (JSON) so that SGLang's spawned scheduler process, which loads our plugin,
sees exactly the same settings. A request may lower or raise retention for itself through
``sampling_params["custom_params"]["flashcache"]["retention"]``; compressed prefixes are
namespaced by the settings that produced them, so requests with other settings never reuse them.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any, Mapping, Optional

ENV_VAR = "FLASHCACHE_CONFIG"
CANDIDATE_MODES = ("auto", "multimodal", "text")


@dataclass(frozen=True)
class FlashCacheConfig:
    """What the engine compresses, and how much it keeps.

    Attributes:
        retention: share of candidate tokens kept, in (0, 1]. 1.0 keeps everything (the cache
            then behaves exactly like SGLang's own radix cache).
        gamma: low-pass cutoff of the DCT as a fraction of the span length, in (0, 1).
        policy: name of a policy that runs without attention scores (see ``policies``).
        candidates: which prompt tokens may be dropped. ``multimodal``: image/video tokens only;
            ``text``: every prompt token but the first ``sink_tokens`` and the last
            ``recent_tokens``; ``auto``: multimodal tokens when the request has any, else text.
        sink_tokens / recent_tokens: protected ends of the prompt in ``text`` mode.
        min_candidates: spans with fewer candidate tokens are left alone (a DCT over a handful of
            tokens says nothing).

    Per request only (``custom_params.flashcache``), for memories that grow, such as streams:
        namespace: requests with the same explicit namespace share compressed prefixes whatever
            their retention (a stream sends ``stream/<id>`` with every ingest and question).
        memory_cap_tokens: after compressing its new candidates, a request whose prompt still
            holds more candidate KV slots (media tokens and their delimiters) than this
            re-scores the older kept ones of its prefix and drops the lowest until they fit
            (see CompressedRadixCache).
        keep_sink: never shrink the first ``sink_items`` multimodal items (the stream's first
            chunk: a client that sends a chunk as several videos sets ``sink_items`` to match).
    """

    retention: float = 0.2
    gamma: float = 0.2
    policy: str = "flashcache"
    candidates: str = "auto"
    sink_tokens: int = 4
    recent_tokens: int = 64
    min_candidates: int = 16
    namespace_override: Optional[str] = None
    memory_cap_tokens: Optional[int] = None
    keep_sink: bool = True
    sink_items: int = 1

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def need(ok: bool, flag: str, value: Any, valid: str) -> None:
            if not ok:
                raise ValueError(f"--flashcache-{flag}={value!r} is invalid: must be {valid}")

        need(isinstance(self.retention, (int, float)) and 0.0 < self.retention <= 1.0,
             "retention", self.retention, "in (0, 1]")
        need(isinstance(self.gamma, (int, float)) and 0.0 < self.gamma < 1.0,
             "gamma", self.gamma, "in (0, 1)")
        need(self.candidates in CANDIDATE_MODES, "candidates", self.candidates,
             f"one of {', '.join(CANDIDATE_MODES)}")
        for flag in ("sink_tokens", "recent_tokens", "min_candidates", "sink_items"):
            value = getattr(self, flag)
            need(isinstance(value, int) and value >= 0, flag.replace("_", "-"), value,
                 "an integer >= 0")
        need(self.memory_cap_tokens is None or (isinstance(self.memory_cap_tokens, int)
                                                and self.memory_cap_tokens >= 1),
             "memory-cap-tokens", self.memory_cap_tokens, "an integer >= 1")
        need(self.namespace_override is None or (isinstance(self.namespace_override, str)
                                                 and 0 < len(self.namespace_override) <= 256),
             "namespace", self.namespace_override, "a non-empty string of at most 256 characters")

    def with_overrides(self, overrides: Optional[Mapping[str, Any]]) -> "FlashCacheConfig":
        """This config with a request's own settings applied (unknown keys are an error)."""
        if not overrides:
            return self
        renamed = {"namespace": "namespace_override"}
        allowed = {"retention", "gamma", "namespace", "memory_cap_tokens", "keep_sink", "sink_items"}
        unknown = set(overrides) - allowed
        if unknown:
            raise ValueError(
                f"custom_params.flashcache has unknown keys {sorted(unknown)}; "
                f"allowed: {sorted(allowed)}"
            )
        return dataclasses.replace(self, **{renamed.get(k, k): v for k, v in overrides.items()})

    @property
    def enabled(self) -> bool:
        """Whether requests with these settings may drop tokens at all."""
        return self.retention < 1.0 or self.memory_cap_tokens is not None

    def namespace(self) -> str:
        """Radix-tree namespace: compressed prefixes are shared only within equal settings."""
        if self.namespace_override is not None:
            return f"flashcache/ns={self.namespace_override}"
        if not self.enabled:
            return ""
        return (f"flashcache/{self.policy}/r={self.retention:g}/g={self.gamma:g}/{self.candidates}"
                f"/s={self.sink_tokens}/w={self.recent_tokens}")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "FlashCacheConfig":
        return cls(**json.loads(text))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Optional["FlashCacheConfig"]:
        """The settings the launcher exported, or None when FlashCache is not active."""
        text = environ.get(ENV_VAR)
        return cls.from_json(text) if text else None
