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
import math
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

    Per request only (``custom_params.flashcache``, see :func:`parse_request`):
        namespace: requests with the same explicit namespace share compressed prefixes whatever
            their retention.
        stream: the request reads or grows a stream memory held by the server (see
            :class:`StreamOp` and flashcache_sglang.stream_memory).
    """

    retention: float = 0.2
    gamma: float = 0.2
    policy: str = "flashcache"
    candidates: str = "auto"
    sink_tokens: int = 4
    recent_tokens: int = 64
    min_candidates: int = 16
    namespace_override: Optional[str] = None
    stream_max: int = 256
    stream_idle_timeout_s: float = 0.0

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
        for flag in ("sink_tokens", "recent_tokens", "min_candidates"):
            value = getattr(self, flag)
            need(isinstance(value, int) and value >= 0, flag.replace("_", "-"), value,
                 "an integer >= 0")
        need(isinstance(self.stream_max, int) and self.stream_max >= 1, "stream-max", self.stream_max,
             "an integer >= 1")
        need(isinstance(self.stream_idle_timeout_s, (int, float)) and self.stream_idle_timeout_s >= 0,
             "stream-idle-timeout", self.stream_idle_timeout_s, "a number of seconds >= 0 (0: never)")
        need(self.namespace_override is None or (isinstance(self.namespace_override, str)
                                                 and 0 < len(self.namespace_override) <= 256),
             "namespace", self.namespace_override, "a non-empty string of at most 256 characters")

    def with_overrides(self, overrides: Optional[Mapping[str, Any]]) -> "FlashCacheConfig":
        """This config with a request's own retention / gamma / namespace (already validated by
        :func:`parse_request`)."""
        if not overrides:
            return self
        renamed = {"namespace": "namespace_override"}
        return dataclasses.replace(self, **{renamed.get(k, k): v for k, v in overrides.items()})

    @property
    def enabled(self) -> bool:
        """Whether requests with these settings may drop tokens at all."""
        return self.retention < 1.0

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


# ---------------------------------------------------------------------------------- requests
STREAM_OPS = ("append", "ask")
REQUEST_KEYS = ("retention", "gamma", "namespace", "stream")
STREAM_KEYS = ("id", "op", "start", "retention", "cap_tokens", "keep_sink", "chunk", "time_s",
               "footprint_s", "report_footprint")


class RequestSettingsError(ValueError):
    """A request's ``custom_params.flashcache`` is invalid (the server answers 400 with this text)."""


@dataclass(frozen=True)
class StreamOp:
    """What a request does to a stream memory (``custom_params.flashcache.stream``).

    Attributes:
        stream_id: the stream (1-128 characters of ``[A-Za-z0-9._:-]``).
        op: ``"append"``: the request's prompt is a new chunk (the first one, with ``start``, also
            carries the prompt header); it is prefilled after the memory and compressed into it.
            ``"ask"``: the prompt (question, history) is answered after the memory and never
            enters it.
        start: (append) begin the memory with this request, replacing one of the same id.
        retention: (append) share of the chunk's candidate tokens kept before the cap applies.
        cap_tokens: (append) most candidate KV slots (visual tokens and their delimiters) the
            whole memory holds; None: no cap.
        keep_sink: (append, start) the first chunk's tokens are never dropped.
        chunk: (append) the client's chunk index (footprint reports).
        time_s: (append) stream time of the chunk's start; the footprint floor keeps at least
            one visual token per ``footprint_s`` segment (segments double in width when there
            are more than a quarter of the cap).
        report_footprint: return the kept tokens per chunk in ``meta_info``.
    """

    stream_id: str
    op: str
    start: bool = False
    retention: Optional[float] = None
    cap_tokens: Optional[int] = None
    keep_sink: bool = True
    chunk: Optional[int] = None
    time_s: Optional[float] = None
    footprint_s: float = 60.0
    report_footprint: bool = False


def _invalid(field: str, value: Any, valid: str) -> RequestSettingsError:
    text = repr(value)
    if len(text) > 80:
        text = text[:77] + "..."
    return RequestSettingsError(f"custom_params.flashcache.{field}={text} is invalid: must be {valid}")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _parse_stream(raw: Any) -> StreamOp:
    if not isinstance(raw, Mapping):
        raise _invalid("stream", raw, "an object with keys " + ", ".join(STREAM_KEYS))
    unknown = sorted(set(raw) - set(STREAM_KEYS))
    if unknown:
        raise RequestSettingsError(f"custom_params.flashcache.stream has unknown keys {unknown}; "
                                   f"allowed: {list(STREAM_KEYS)}")
    stream_id = raw.get("id")
    if not (isinstance(stream_id, str) and 0 < len(stream_id) <= 128
            and all(c.isalnum() or c in "._:-" for c in stream_id)):
        raise _invalid("stream.id", stream_id, "1-128 characters of letters, digits and . _ : -")
    op = raw.get("op")
    if op not in STREAM_OPS:
        raise _invalid("stream.op", op, f"one of {', '.join(STREAM_OPS)}")
    fields: dict[str, Any] = {"stream_id": stream_id, "op": op}
    checks = {
        "start": (lambda v: isinstance(v, bool), "true or false"),
        "retention": (lambda v: _number(v) and 0 < v <= 1, "a number in (0, 1]"),
        "cap_tokens": (lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 1),
                       "an integer >= 1 or null"),
        "keep_sink": (lambda v: isinstance(v, bool), "true or false"),
        "chunk": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "an integer >= 0"),
        "time_s": (lambda v: _number(v) and v >= 0, "a number of seconds >= 0"),
        "footprint_s": (lambda v: _number(v) and v > 0, "a number of seconds > 0"),
        "report_footprint": (lambda v: isinstance(v, bool), "true or false"),
    }
    for key, (ok, valid) in checks.items():
        if key in raw:
            if not ok(raw[key]):
                raise _invalid(f"stream.{key}", raw[key], valid)
            fields[key] = raw[key]
    if op == "ask":
        stray = sorted(set(raw) - {"id", "op", "report_footprint"})
        if stray:
            raise RequestSettingsError(f"custom_params.flashcache.stream: {stray} apply to op 'append' only")
    return StreamOp(**fields)


def parse_request(raw: Any) -> tuple[dict[str, Any], Optional[StreamOp]]:
    """Validate a request's ``custom_params.flashcache``.

    Returns the config overrides (for :meth:`FlashCacheConfig.with_overrides`) and the stream
    operation, if any. Raises RequestSettingsError naming the field and its valid range.
    """
    if raw is None:
        return {}, None
    if not isinstance(raw, Mapping):
        raise RequestSettingsError(
            f"custom_params.flashcache must be an object with keys {list(REQUEST_KEYS)}, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(REQUEST_KEYS))
    if unknown:
        raise RequestSettingsError(f"custom_params.flashcache has unknown keys {unknown}; allowed: {list(REQUEST_KEYS)}")
    overrides: dict[str, Any] = {}
    if "retention" in raw:
        if not (_number(raw["retention"]) and 0 < raw["retention"] <= 1):
            raise _invalid("retention", raw["retention"], "a number in (0, 1]")
        overrides["retention"] = float(raw["retention"])
    if "gamma" in raw:
        if not (_number(raw["gamma"]) and 0 < raw["gamma"] < 1):
            raise _invalid("gamma", raw["gamma"], "a number in (0, 1)")
        overrides["gamma"] = float(raw["gamma"])
    if "namespace" in raw:
        value = raw["namespace"]
        if not (isinstance(value, str) and 0 < len(value) <= 256):
            raise _invalid("namespace", value, "a non-empty string of at most 256 characters")
        overrides["namespace"] = value
    stream = _parse_stream(raw["stream"]) if "stream" in raw else None
    if stream is not None and "namespace" in overrides:
        raise RequestSettingsError("custom_params.flashcache: a stream request has its own namespace; drop 'namespace'")
    return overrides, stream
