"""The settings FlashCache refuses: ONE table, read by every launch path.

Compressed rows hold the sentinel slot 0 for dropped tokens and are read through a packed
kept-KV table (kept_table.py): anything that reads KV by position, copies rows behind the
tree's back, splits batches behind the attention wrapper, or scores only part of the model
would silently attend to the wrong tokens. Each row of :data:`REFUSALS` names such a setting,
the predicate that refuses its value, and why.

Where it is enforced:

- inside SGLang's scheduler process, by the radix-cache factory (``plugin.make_radix_cache``),
  against the scheduler's *resolved* settings and the loaded model: every launch path meets
  there (``flashcache_sglang.launch_server``, ``flashcache_sglang.engine.Engine`` and a plain
  ``python -m sglang.launch_server --radix-cache-backend flashcache``), and it runs while the
  scheduler starts, so a refused setting fails the launch before the server reports healthy;
- before that, as a fast pre-check on what the user typed, by the launcher and the Engine
  (:func:`settings_from_argv` / the keywords), so the common mistakes fail in a second, not after
  a model load. Both read this same table.

The FlashCache settings themselves are checked here too: the policy must exist and must run on
cached K/V alone (:func:`config_problems`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

WRAPPED_ATTENTION_BACKENDS = ("torch_native", "triton", "flashinfer", "fa3")
SUPPORTED_KV_DTYPES = ("auto", "bf16", "bfloat16", "float16", "float32", "fp8_e4m3", "fp8_e5m2")


class UnsupportedSetting(ValueError):
    """A setting FlashCache cannot serve correctly; the message lists every reason."""


def _truthy(value: Any) -> bool:
    return value not in (None, False, 0, "", "0", "false", "False")


def _greater_than_one(value: Any) -> bool:
    return value is not None and int(value) > 1


def _attention(value: Any) -> bool:
    return value is not None and value not in WRAPPED_ATTENTION_BACKENDS


@dataclass(frozen=True)
class Refusal:
    """One refused setting.

    Attributes:
        setting: the SGLang ServerArgs field / Engine keyword (``page_size``), an environment
            variable (``env:NAME``) or a fact about the loaded model (``model:...``, checked in
            the scheduler only).
        refused: True for a value FlashCache cannot serve (called only when the setting is known).
        reason: why, in words a user can act on.
        switch: the CLI flag takes no value (``--enable-hierarchical-cache``).
    """

    setting: str
    refused: Callable[[Any], bool]
    reason: str
    switch: bool = False

    @property
    def flag(self) -> Optional[str]:
        """The command-line spelling, or None for environment variables and model facts."""
        if ":" in self.setting:
            return None
        return "--" + self.setting.replace("_", "-")

    def describe(self, value: Any, *, keyword: bool = False) -> str:
        """How the user spelled it: a flag, or an Engine keyword when ``keyword``."""
        if self.setting.startswith("env:"):
            return f"{self.setting[4:]}={value}"
        if self.setting.startswith("model:"):
            return f"this model ({self.setting[6:]})"
        if keyword:
            return f"{self.setting}={value!r}"
        if self.switch:
            return self.flag
        return f"{self.flag} {value}"


REFUSALS: tuple[Refusal, ...] = (
    Refusal("disable_radix_cache", _truthy, "flashcache is a radix cache; disabling it disables flashcache",
            switch=True),
    Refusal("radix_cache_backend", lambda v: v not in (None, "flashcache"),
            "conflicts with flashcache's own radix cache backend"),
    Refusal("page_size", lambda v: v is not None and int(v) != 1,
            "only --page-size 1: a dropped token cannot be freed from a larger page without compaction"),
    Refusal("speculative_algorithm", lambda v: v not in (None, "", "NONE"),
            "speculative decoding reads and verifies draft KV by position"),
    Refusal("enable_hierarchical_cache", _truthy, "the hierarchical (host) cache copies rows by position",
            switch=True),
    Refusal("enable_streaming_session", _truthy,
            "streaming sessions live inside SGLang's UnifiedRadixCache, not flashcache's tree "
            "(use flashcache's stream memories: custom_params.flashcache.stream)", switch=True),
    Refusal("dcp_size", _greater_than_one, "decode context parallelism shards KV by position"),
    Refusal("pp_size", _greater_than_one,
            "pipeline parallelism: each stage scores only its own layers, so stages would drop different tokens"),
    Refusal("enable_dp_attention", _truthy, "data-parallel attention pads batches across ranks behind the "
            "attention wrapper", switch=True),
    Refusal("attention_backend", _attention,
            f"flashcache wraps only the {', '.join(WRAPPED_ATTENTION_BACKENDS)} attention backends"),
    Refusal("prefill_attention_backend", _attention,
            f"flashcache wraps only the {', '.join(WRAPPED_ATTENTION_BACKENDS)} attention backends"),
    Refusal("decode_attention_backend", _attention,
            f"flashcache wraps only the {', '.join(WRAPPED_ATTENTION_BACKENDS)} attention backends"),
    Refusal("kv_cache_dtype", lambda v: v is not None and v not in SUPPORTED_KV_DTYPES,
            "this KV dtype is not scored by flashcache (supported: "
            + ", ".join(SUPPORTED_KV_DTYPES) + ")"),
    Refusal("enable_hisparse", _truthy, "hierarchical sparse attention reads KV by position", switch=True),
    Refusal("enable_unified_memory", _truthy,
            "unified (translating) KV pools map rows through page tables flashcache does not pack", switch=True),
    Refusal("enable_two_batch_overlap", _truthy, "two-batch overlap splits forward batches behind the "
            "attention wrapper", switch=True),
    Refusal("disaggregation_mode", lambda v: v not in (None, "null"),
            "prefill/decode disaggregation transfers KV rows by position"),
    Refusal("cuda_graph_backend_prefill", lambda v: v not in (None, "disabled"),
            "prefill CUDA graphs prepare attention metadata outside the attention wrapper (decode CUDA "
            "graphs are supported): pass --cuda-graph-backend-prefill disabled (flashcache's launcher and "
            "Engine do)"),
    Refusal("env:SGLANG_ENABLE_METADATA_GLUE_GRAPH", _truthy,
            "the glue graph replays captured metadata preparation, freezing the kept-KV table's host-side "
            "row rebuilds"),
    Refusal("model:hybrid sliding-window attention", _truthy, "KV index != position under a sliding window"),
    Refusal("model:hybrid SSM / Mamba layers", _truthy, "state layers are not KV that can be dropped"),
    Refusal("model:DSA / NSA sparse attention", _truthy, "sparse-attention models index KV by position"),
    Refusal("model:MLA attention", _truthy, "MLA's latent KV is not scored by flashcache"),
    Refusal("model:sliding-window layers", _truthy, "window masks assume KV index == position"),
)


def refusal_reasons(settings: Mapping[str, Any], *, keywords: bool = False) -> list[str]:
    """One message per refused setting in ``settings`` (absent keys are not checked).

    Args:
        settings: setting name (as in :data:`REFUSALS`) -> value.
        keywords: name settings as Engine keywords rather than command-line flags.
    """
    reasons = []
    for refusal in REFUSALS:
        if refusal.setting not in settings:
            continue
        value = settings[refusal.setting]
        if refusal.refused(value):
            reasons.append(f"{refusal.describe(value, keyword=keywords)}: {refusal.reason}")
    return reasons


def config_problems(config) -> list[str]:
    """What is wrong with a FlashCacheConfig for serving (empty: nothing)."""
    from .policies import available_policies, engine_policies

    problems = []
    servable = engine_policies()
    if config.policy not in available_policies():
        problems.append(f"flashcache policy {config.policy!r} is unknown; valid: {', '.join(servable)}")
    elif config.policy not in servable:
        problems.append(f"flashcache policy {config.policy!r} needs attention queries, which the engine does "
                        f"not keep (it runs in flashcache_sglang.reference only); valid: {', '.join(servable)}")
    return problems


def check(settings: Mapping[str, Any], config=None, *, keywords: bool = False) -> None:
    """Raise :class:`UnsupportedSetting` listing every refused setting (and config problem)."""
    problems = (config_problems(config) if config is not None else []) + refusal_reasons(settings, keywords=keywords)
    if problems:
        raise UnsupportedSetting("flashcache cannot serve this configuration: " + "; ".join(problems))


# ---------------------------------------------------------------- reading settings
def environment_settings(environ: Optional[Mapping[str, str]] = None) -> dict[str, Any]:
    environ = os.environ if environ is None else environ
    return {r.setting: environ[r.setting[4:]] for r in REFUSALS
            if r.setting.startswith("env:") and r.setting[4:] in environ}


def settings_from_argv(argv: Sequence[str]) -> dict[str, Any]:
    """The table's settings that appear in SGLang command-line arguments, as typed."""
    settings: dict[str, Any] = {}
    for refusal in REFUSALS:
        flag = refusal.flag
        if flag is None:
            continue
        for index, arg in enumerate(argv):
            if arg == flag:
                if refusal.switch:
                    settings[refusal.setting] = True
                elif index + 1 < len(argv):
                    settings[refusal.setting] = argv[index + 1]
            elif arg.startswith(flag + "="):
                settings[refusal.setting] = arg.split("=", 1)[1]
    return settings


def settings_from_keywords(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The table's settings among Engine keywords (ServerArgs field names)."""
    return {r.setting: kwargs[r.setting] for r in REFUSALS if r.setting in kwargs}


_MODEL_FACTS = {
    "hybrid_swa": "model:hybrid sliding-window attention",
    "hybrid_ssm": "model:hybrid SSM / Mamba layers",
    "dsa": "model:DSA / NSA sparse attention",
    "mla": "model:MLA attention",
    "sliding_window": "model:sliding-window layers",
}


def settings_from_scheduler(ctx) -> dict[str, Any]:
    """Every setting of the table as SGLang's scheduler resolved it, plus the model's facts.

    Args:
        ctx: the radix-cache factory's TreeCacheBuildContext.
    """
    from . import upstream

    settings: dict[str, Any] = environment_settings()
    for refusal in REFUSALS:
        if ":" not in refusal.setting:
            settings[refusal.setting] = upstream.resolved_setting(ctx.server_args, refusal.setting)
    facts = upstream.build_context_facts(ctx)
    # The context's own view of the tree wins over the raw flags it was derived from.
    settings["disable_radix_cache"] = facts.pop("disable_radix_cache") or settings.get("disable_radix_cache")
    settings["enable_hierarchical_cache"] = (facts.pop("enable_hierarchical_cache")
                                             or settings.get("enable_hierarchical_cache"))
    settings["radix_cache_backend"] = "flashcache"  # this factory was chosen by that name
    for fact, value in facts.items():
        settings[_MODEL_FACTS[fact]] = value
    return settings
