"""Every touch point of SGLang 0.5.23 internals, in one module.

Everything else in flashcache_sglang talks to SGLang through the names defined here. What we
rely on, and why:

- ``RadixCache`` (mem_cache/radix_cache.py): the tree we subclass. We override ``checkpoint``,
  ``match_prefix``, ``evict``, ``inc_lock_ref`` / ``dec_lock_ref``, ``_insert_helper``,
  ``_split_node``, ``_delete_leaf`` and the size getters, and read ``evictable_leaves``,
  ``eviction_strategy``, ``evictable_size_`` / ``protected_size_``, ``root_node``.
- ``register_radix_cache_backend`` (mem_cache/registry.py) + ``--radix-cache-backend``.
- ``ATTENTION_BACKENDS`` (layers/attention/attention_registry.py): re-registered with wrapping
  factories, so ``--attention-backend torch_native|triton|flashinfer|fa3`` keep their names.
- The decode CUDA-graph contract (base_attn_backend.py, runner/decode_cuda_graph_runner.py):
  ``init_forward_metadata_out_graph(fb, in_capture)`` runs before capture and before every
  replay, the replay view (``build_replay_fb_view``) carries the batch's own ``out_cache_loc``
  and ``num_padding``; ``ForwardBatch.init_new(batch, model_runner)`` is where a batch's host
  rows (``ScheduleBatch.req_pool_indices_cpu``) are still at hand (:func:`install_forward_batch_hook`).
- ``TreeCacheBuildContext.server_args`` (mem_cache/registry.py): the scheduler's resolved
  settings, checked against flashcache_sglang.support before the server reports healthy.
- The allocator's ``free`` (mem_cache/allocator): wrapped per instance to skip the sentinel.
- ``Req`` fields: ``rid``, ``extra_key``, ``origin_input_ids``, ``kv.req_pool_idx``,
  ``kv.cache_protected_len``, ``multimodal_inputs.mm_items[*].offsets`` (inclusive ends),
  ``sampling_params.custom_params``, ``customized_info``.

:func:`check_upstream` verifies all of this against the installed SGLang and is run by the
plugin at start-up and by tests/sglang/test_upstream_contract.py, so an upstream change fails
loudly instead of corrupting memory.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from sglang.srt.layers.attention import attention_registry
from sglang.srt.layers.attention.base_attn_backend import AttentionBackend
from sglang.srt.mem_cache import registry as radix_registry
from sglang.srt.mem_cache.base_prefix_cache import EvictParams, EvictResult, InsertParams, MatchPrefixParams
from sglang.srt.mem_cache.radix_cache import RadixCache, RadixKey, TreeNode

SGLANG_VERSION = "0.5.23"
NAMESPACE_MARK = "flashcache/"
DUMP_DIR_ENV = "FLASHCACHE_DUMP_DIR"

__all__ = [
    "AttentionBackend", "EvictParams", "EvictResult", "MatchPrefixParams", "RadixCache", "RadixKey", "TreeNode",
    "check_upstream", "filter_sentinel_frees", "install_forward_batch_hook", "register_radix_backend",
    "request_pool_row", "rotary_spec_of", "wrap_attention_backends",
]


# ------------------------------------------------------------------ contract check
_RADIX_METHODS = {
    "checkpoint": ["self", "req", "up_to"],
    "match_prefix": ["self", "params"],
    "evict": ["self", "params"],
    "inc_lock_ref": ["self", "node"],
    "dec_lock_ref": ["self", "node", "params"],
    "_insert_helper": ["self", "node", "key", "value", "priority", "inserted_len"],
    "_split_node": ["self", "key", "child", "split_len"],
    "_delete_leaf": ["self", "node"],
    "_insert_cache": ["self", "req", "token_ids", "key_limit", "split_prompt"],
    "on_release": ["self", "req", "checkpointed"],
    "free_kv_row": ["self", "kv", "ranges"],
}


def check_upstream() -> list[str]:
    """Problems found in the installed SGLang's shape (empty list: all we rely on is there)."""
    problems: list[str] = []
    import sglang

    if getattr(sglang, "__version__", None) != SGLANG_VERSION:
        problems.append(f"sglang {getattr(sglang, '__version__', '?')} installed, {SGLANG_VERSION} expected")
    for name, expected in _RADIX_METHODS.items():
        method = getattr(RadixCache, name, None)
        if method is None:
            problems.append(f"RadixCache.{name} is gone")
            continue
        params = list(inspect.signature(method).parameters)
        if params[: len(expected)] != expected:
            problems.append(f"RadixCache.{name}{tuple(params)} no longer starts with {tuple(expected)}")
    for field_name in ("token_ids", "extra_key", "is_bigram", "limit", "cache_salt"):
        if field_name not in RadixKey.__slots__:
            problems.append(f"RadixKey has no field {field_name!r}")
    node = TreeNode()
    for attr in ("children", "parent", "key", "value", "lock_ref"):
        if not hasattr(node, attr):
            problems.append(f"TreeNode has no attribute {attr!r}")
    if "req" not in {f.name for f in dataclasses.fields(MatchPrefixParams)}:
        problems.append("MatchPrefixParams has no field 'req'")
    if not callable(getattr(radix_registry, "register_radix_cache_backend", None)):
        problems.append("mem_cache.registry.register_radix_cache_backend is gone")
    if not isinstance(getattr(attention_registry, "ATTENTION_BACKENDS", None), dict):
        problems.append("attention_registry.ATTENTION_BACKENDS is no longer a dict")
    elif "torch_native" not in attention_registry.ATTENTION_BACKENDS:
        problems.append("attention backend 'torch_native' is not registered")
    from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator

    for method in ("free", "free_segment", "alloc", "available_size"):
        if not hasattr(TokenToKVPoolAllocator, method):
            problems.append(f"TokenToKVPoolAllocator.{method} is gone")
    import sglang.srt.mem_cache.allocator.base as allocator_base

    source = inspect.getsource(allocator_base.BaseTokenToKVPoolAllocator.free_segment)
    if "self.free(" not in source:
        problems.append("allocator free_segment no longer routes through self.free (sentinel filter bypassed)")
    from sglang.srt.managers.schedule_batch import MultimodalDataItem, ScheduleBatch
    from sglang.srt.managers.scheduler import Scheduler

    if not callable(getattr(Scheduler, "process_batch_result", None)):
        problems.append("Scheduler.process_batch_result is gone (admission hook)")
    if "batch_is_full" not in inspect.signature(ScheduleBatch).parameters:
        problems.append("ScheduleBatch has no batch_is_full (admission hook)")

    if "offsets" not in getattr(MultimodalDataItem, "__struct_fields__", ()):
        problems.append("MultimodalDataItem has no 'offsets'")
    problems += _check_graph_contract()
    problems += _check_rotary_classes()
    problems += _check_stream_hooks()
    return problems


def _check_stream_hooks() -> list[str]:
    """What the stream memories rely on (install_request_hooks and its helpers)."""
    problems: list[str] = []
    from sglang.srt.managers.schedule_batch import MultimodalInputs, Req
    from sglang.srt.managers.scheduler import Scheduler
    from sglang.srt.mem_cache.base_prefix_cache import BasePrefixCache

    for name, expected in (("_create_generation_req", ["self", "recv_req"]),
                           ("_add_request_to_queue", ["self", "req"]),
                           ("close_session", ["self", "recv_req"])):
        method = getattr(Scheduler, name, None)
        method = getattr(method, "__wrapped__", method)
        if method is None:
            problems.append(f"Scheduler.{name} is gone (stream memories)")
        elif list(inspect.signature(method).parameters)[:2] != expected:
            problems.append(f"Scheduler.{name} no longer starts with {tuple(expected)} (stream memories)")
    handle = inspect.getsource(Scheduler._handle_generate_request)
    order = [handle.find(needle) for needle in ("self._create_generation_req(", "adjust_mm_offsets(",
                                                "_try_apply_padded_mm_input_ids(", "_maybe_compute_mrope_positions(",
                                                "validate_input_length(")]
    if -1 in order or order != sorted(order):
        problems.append("Scheduler._handle_generate_request no longer creates the Req before it shifts media "
                        "offsets, pads, computes M-RoPE positions and checks the length (stream memories prepend there)")
    abort = inspect.signature(Req.set_finish_with_abort).parameters
    if not {"error_msg", "status_code", "err_type"} <= set(abort):
        problems.append("Req.set_finish_with_abort(error_msg, status_code, err_type) changed (request errors)")
    fields = {f.name for f in dataclasses.fields(MultimodalInputs)}
    for field_name in ("mm_items", "mrope_positions", "mrope_position_delta", "mrope_position_delta_repeated_cache"):
        if field_name not in fields:
            problems.append(f"MultimodalInputs has no {field_name!r} (stream positions)")
    if not callable(getattr(BasePrefixCache, "release_aborted_request", None)):
        problems.append("BasePrefixCache.release_aborted_request is gone (requests aborted while waiting)")
    return problems


def _check_graph_contract() -> list[str]:
    """What the kept-KV table and the CUDA-graph path rely on (see the module docstring)."""
    problems: list[str] = []
    from sglang.srt.managers.schedule_batch import ScheduleBatch
    from sglang.srt.mem_cache.registry import TreeCacheBuildContext
    from sglang.srt.model_executor.forward_batch_info import ForwardBatch
    from sglang.srt.model_executor.runner import decode_cuda_graph_runner

    params = list(inspect.signature(ForwardBatch.init_new).parameters)
    if params[:2] != ["batch", "model_runner"]:
        problems.append(f"ForwardBatch.init_new{tuple(params)} no longer starts with (batch, model_runner)")
    if "req_pool_indices_cpu" not in {f.name for f in dataclasses.fields(ScheduleBatch)}:
        problems.append("ScheduleBatch has no req_pool_indices_cpu (host rows of a decode batch)")
    if "server_args" not in {f.name for f in dataclasses.fields(TreeCacheBuildContext)}:
        problems.append("TreeCacheBuildContext has no server_args (start-up refusals)")
    out_graph = getattr(AttentionBackend, "init_forward_metadata_out_graph", None)
    if out_graph is None or "in_capture" not in inspect.signature(out_graph).parameters:
        problems.append("AttentionBackend.init_forward_metadata_out_graph(fb, in_capture) is gone")
    if not callable(getattr(AttentionBackend, "init_forward_metadata_in_graph", None)):
        problems.append("AttentionBackend.init_forward_metadata_in_graph is gone")
    source = inspect.getsource(decode_cuda_graph_runner.build_replay_fb_view)
    for needle in ('out_cache_loc=getattr(forward_batch, "out_cache_loc"', "num_padding=bs - raw_bs"):
        if needle not in source:
            problems.append(f"build_replay_fb_view no longer sets {needle.split('=')[0]} as flashcache expects")
    try:
        from sglang.srt.arg_groups.overrides import resolution_result  # noqa: F401
    except ImportError:
        problems.append("sglang.srt.arg_groups.overrides.resolution_result is gone (resolved settings)")
    registered = getattr(attention_registry, "ATTENTION_BACKENDS", {})
    for name in ("triton", "flashinfer", "fa3"):
        if name not in registered:
            problems.append(f"attention backend {name!r} is not registered")
    return problems


def _check_rotary_classes() -> list[str]:
    import importlib

    problems = []
    for dotted in _TABLE_ROTARY_CLASSES:
        module_name, class_name = dotted.rsplit(".", 1)
        cls = getattr(importlib.import_module(module_name), class_name, None)
        if cls is None:
            problems.append(f"{dotted} is gone (rotary spec)")
            continue
        source = inspect.getsource(cls.forward_native) if hasattr(cls, "forward_native") else ""
        if "cos_sin_cache" not in source:
            problems.append(f"{dotted}.forward_native no longer reads cos_sin_cache (rotary spec)")
    from sglang.srt.layers.rotary_embedding.mrope import MRotaryEmbedding

    if not callable(getattr(MRotaryEmbedding, "_build_axis_map", None)):
        problems.append("MRotaryEmbedding._build_axis_map is gone (M-RoPE axis of each channel pair)")
    return problems


def require_upstream() -> None:
    problems = check_upstream()
    if problems:
        raise RuntimeError(
            "flashcache_sglang does not support the installed SGLang: " + "; ".join(problems)
        )


# ------------------------------------------------------------------ registration
def register_radix_backend(name: str, factory: Callable[[Any], Any]) -> None:
    if name not in radix_registry.registered_radix_cache_backends():
        radix_registry.register_radix_cache_backend(name, factory)


def wrap_attention_backends(wrap: Callable[[Any], Any], names: tuple[str, ...]) -> list[str]:
    """Re-register ``names`` so each creates the original backend, then ``wrap(backend)``."""
    wrapped = []
    for name in names:
        original = attention_registry.ATTENTION_BACKENDS.get(name)
        if original is None or getattr(original, "_flashcache_wrapped", False):
            continue

        def factory(runner, _original=original):
            return wrap(_original(runner))

        factory._flashcache_wrapped = True
        attention_registry.ATTENTION_BACKENDS[name] = factory
        wrapped.append(name)
    return wrapped


# ------------------------------------------------------------------ forward batches
def install_forward_batch_hook(callback: Callable[[Any, Any, Any], None]) -> bool:
    """Call ``callback(forward_batch, schedule_batch, model_runner)`` after every
    ``ForwardBatch.init_new``: the last point where a batch's host-side rows are at hand (a
    decode ForwardBatch drops ``req_pool_indices_cpu``). Returns False if already installed.
    """
    from sglang.srt.model_executor.forward_batch_info import ForwardBatch

    original = ForwardBatch.__dict__["init_new"].__func__
    if getattr(original, "_flashcache_hook", False):
        return False

    def init_new(cls, batch, model_runner, *args, **kwargs):
        forward_batch = original(cls, batch, model_runner, *args, **kwargs)
        callback(forward_batch, batch, model_runner)
        return forward_batch

    init_new._flashcache_hook = True
    init_new.__wrapped__ = original
    ForwardBatch.init_new = classmethod(init_new)
    return True


def batch_rows_cpu(schedule_batch) -> Optional[Any]:
    """``[batch_size]`` int64 host tensor of a ScheduleBatch's request rows (None if absent)."""
    return getattr(schedule_batch, "req_pool_indices_cpu", None)


def batch_out_cache_loc(forward_batch):
    return getattr(forward_batch, "out_cache_loc", None)


def is_decode_batch(forward_batch) -> bool:
    return bool(forward_batch.forward_mode.is_decode())


def model_runner_req_to_token_pool(model_runner):
    return model_runner.req_to_token_pool


# ------------------------------------------------------------------ start-up settings
def resolved_setting(server_args, name: str) -> Any:
    """A ServerArgs field as the scheduler resolved it (SGLang declares resolved values apart
    from the raw fields: an attention backend left to SGLang reads None raw, ``fa3`` resolved)."""
    from sglang.srt.arg_groups.overrides import resolution_result

    if name == "cuda_graph_backend_prefill":
        config = resolution_result(server_args, "cuda_graph_config")
        return None if config is None else config.prefill.backend
    return resolution_result(server_args, name)


def build_context_facts(ctx) -> dict[str, bool]:
    """What the radix-cache factory's context says about the loaded model and its tree."""
    runner = ctx.tp_worker.model_runner if ctx.tp_worker is not None else None
    window = getattr(runner, "sliding_window_size", None)
    arch = getattr(ctx.model_config, "attention_arch", None)
    return {
        "disable_radix_cache": bool(ctx.disable_radix_cache),
        "enable_hierarchical_cache": bool(ctx.enable_hierarchical_cache),
        "hybrid_swa": bool(ctx.is_hybrid_swa),
        "hybrid_ssm": bool(ctx.is_hybrid_ssm),
        "dsa": bool(ctx.is_dsa),
        "mla": arch is not None and "MLA" in str(arch),
        "sliding_window": window is not None and window > 0,
    }


def tensor_parallel_sum(ctx):
    """A callable summing a tensor over the scheduler's TP group (SGLang's GroupCoordinator
    ``all_reduce``), or None with a single rank."""
    if int(getattr(ctx, "tp_size", 1) or 1) <= 1 or getattr(ctx, "tp_group", None) is None:
        return None
    group = ctx.tp_group
    return lambda tensor: group.all_reduce(tensor.contiguous())


def fp8_kv_scales(ctx, kv_pool):
    """For an FP8 KV pool (``--kv-cache-dtype fp8_e4m3 / fp8_e5m2``): a callable returning the
    per-layer (k_scales, v_scales) SGLang divides K/V by before storing them (its attention
    layers' ``k_scale_float`` / ``v_scale_float``, 1.0 when the checkpoint has none). None for
    other pools."""
    if getattr(kv_pool, "dtype", None) not in (torch.float8_e4m3fn, torch.float8_e5m2):
        return None
    from sglang.srt.layers.radix_attention import RadixAttention

    model = context_model(ctx)
    layers = sorted((m for m in model.modules() if isinstance(m, RadixAttention)), key=lambda m: m.layer_id) \
        if model is not None else []

    def scales():
        k = [float(getattr(m, "k_scale_float", None) or 1.0) for m in layers]
        v = [float(getattr(m, "v_scale_float", None) or 1.0) for m in layers]
        return (k or None), (v or None)

    return scales


def context_model(ctx):
    """The scheduler's model (``tp_worker.model_runner.model``), or None in simulations."""
    runner = ctx.tp_worker.model_runner if ctx.tp_worker is not None else None
    return getattr(runner, "model", None)


def model_uses_mrope(ctx) -> bool:
    return bool(getattr(ctx.model_config, "is_mrope_enabled", False) or getattr(ctx.model_config, "model_is_mrope", False))


_AUTO_BOS: dict[int, Optional[int]] = {}


def auto_bos_token_id(tokenizer) -> Optional[int]:
    """The BOS id the tokenizer adds to every encoded text by itself (Llama-3 style), else None.

    A stream request's own prompt is tokenized alone, so such a BOS would land in the middle of
    the memory; it is stripped (a BOS the client wrote into its text is indistinguishable and is
    stripped too, as SGLang's session turns do)."""
    if tokenizer is None:
        return None
    key = id(tokenizer)
    if key not in _AUTO_BOS:
        bos = getattr(tokenizer, "bos_token_id", None)
        try:
            ids = tokenizer.encode("a")
        except Exception:  # a tokenizer that cannot encode plain text adds nothing we can see
            ids = []
        _AUTO_BOS[key] = bos if bos is not None and ids and ids[0] == bos else None
    return _AUTO_BOS[key]


def context_attention_backends(ctx) -> list:
    """The attention backend objects the scheduler's model runner uses (a hybrid's children too)."""
    runner = ctx.tp_worker.model_runner if ctx.tp_worker is not None else None
    backend = getattr(runner, "attn_backend", None)
    if backend is None:
        return []
    children = [getattr(backend, name, None) for name in ("prefill_backend", "decode_backend")]
    children = [child for child in children if child is not None]
    return children or [backend]


# ------------------------------------------------------------------ scheduler admission
def install_admission_hook() -> bool:
    """Let the scheduler admit more prefills right after compression frees slots.

    Once a prefill does not fit, SGLang sets ``running_batch.batch_is_full`` and clears it only
    when a running request leaves; slots compression returns just after a prefill would go
    unused until then. After each batch result, if the cache freed slots, the flag is cleared
    (the scheduler then re-checks memory with its own prefill budget, as it does after any
    request finishes). Returns False if already installed.
    """
    from sglang.srt.managers.scheduler import Scheduler

    original = Scheduler.process_batch_result
    if getattr(original, "_flashcache_admission", False):
        return False

    def process_batch_result(self, batch, result):
        output = original(self, batch, result)
        take = getattr(self.tree_cache, "take_freed_slots", None)
        running = getattr(self, "running_batch", None)
        if take is not None and take() > 0 and running is not None:
            running.batch_is_full = False
        return output

    process_batch_result._flashcache_admission = True
    process_batch_result.__wrapped__ = original
    Scheduler.process_batch_result = process_batch_result
    return True


# ------------------------------------------------------------------ allocator
def filter_sentinel_frees(allocator) -> None:
    """Make ``allocator.free`` skip the sentinel slot 0 (SGLang's own free does not).

    Every other free path (free_segment, free_segments, free_group_end) calls ``self.free``, so
    wrapping the instance attribute covers them all. With FLASHCACHE_DEBUG=1 a double free raises.
    """
    if getattr(allocator.free, "_flashcache_filtered", False):
        return
    inner = allocator.free
    debug = os.environ.get("FLASHCACHE_DEBUG") == "1"

    def unfiltered(free_index):
        """Free slots known not to hold the sentinel (no filtering pass: no device sync)."""
        if debug and free_index.numel():
            free_now = set(allocator.free_pages.tolist()) | set(getattr(allocator, "release_pages", free_index[:0]).tolist())
            doubled = sorted(set(free_index.tolist()) & free_now)
            if 0 in free_index.tolist():
                raise RuntimeError("the sentinel slot 0 was passed to an unfiltered free")
            if doubled or len(set(free_index.tolist())) != free_index.numel():
                raise RuntimeError(f"double free of KV slots {doubled[:10]}")
        return inner(free_index)

    def free(free_index):
        if free_index.numel():
            free_index = free_index[free_index != 0]
        return unfiltered(free_index)

    free._flashcache_filtered = True
    free.unfiltered = unfiltered
    allocator.free = free


# ------------------------------------------------------------------ request fields
def request_id(req) -> str:
    return req.rid


def prompt_len(req) -> int:
    return len(req.origin_input_ids)


def request_pool_row(req) -> int:
    """The request's row in SGLang's ReqToTokenPool."""
    return int(req.kv.req_pool_idx)


def cache_protected_len(req) -> int:
    return int(req.kv.cache_protected_len)


def request_row(req_to_token_pool, req):
    """The request's row of ``req_to_token`` (a view: edits land in the pool)."""
    return req_to_token_pool.req_to_token[req.kv.req_pool_idx]


def multimodal_spans(req) -> list[tuple[int, int]]:
    """Half-open (begin, end) prompt ranges of image/video/audio tokens, ascending."""
    inputs = getattr(req, "multimodal_inputs", None)
    if inputs is None:
        return []
    spans = []
    for item in getattr(inputs, "mm_items", None) or []:
        for begin, end_inclusive in item.offsets or []:
            spans.append((int(begin), int(end_inclusive) + 1))
    return sorted(spans)


def request_overrides(req) -> Optional[dict]:
    params = getattr(req, "sampling_params", None)
    custom = getattr(params, "custom_params", None) if params is not None else None
    if isinstance(custom, dict):
        return custom.get("flashcache")
    return None


def set_namespace(req, namespace: str) -> None:
    """Prefix ``req.extra_key`` with the compression namespace (idempotent)."""
    current = req.extra_key or ""
    if not namespace or current.startswith(NAMESPACE_MARK):
        return
    req.extra_key = f"{namespace}|{current}"


def with_extra_key(params: MatchPrefixParams, extra_key: Optional[str]) -> MatchPrefixParams:
    key = params.key
    if key.extra_key == extra_key:
        return params
    new_key = RadixKey(key.token_ids, extra_key, is_bigram=key.is_bigram, limit=key.limit,
                       cache_salt=key.cache_salt)
    return dataclasses.replace(params, key=new_key)


def report_to_request(req, **numbers: Any) -> None:
    """Per-request numbers, returned to the client in ``meta_info["flashcache"][0]``.

    Called more than once per request (settings at creation, compression numbers after the
    prefill); each call adds to the same entry. Keys used by the cache: ``settings`` (what the
    request ran with), ``prompt_tokens`` (logical), ``prompt_kv_slots`` (KV slots the prompt
    really holds after compression, a reused compressed prefix included), ``media_kv_slots``
    (those of them that are image/video tokens), ``candidate_tokens`` / ``kept_tokens`` (what
    this request compressed itself), ``stream`` (a stream memory's state after the request).
    """
    info = req.customized_info if req.customized_info is not None else {}
    entries = info.get("flashcache")
    entry = entries[0] if isinstance(entries, list) and entries and isinstance(entries[0], dict) else {}
    renamed = {"candidates": "candidate_tokens", "kept": "kept_tokens"}
    for key, value in numbers.items():
        if value is not None:
            entry[renamed.get(key, key)] = value
    info["flashcache"] = [entry]
    req.customized_info = info


def dump_kept_positions(req, positions, dropped) -> None:
    """Debug aid for tests: the exact dropped positions of each request, as JSON files."""
    directory = os.environ.get(DUMP_DIR_ENV)
    if not directory:
        return
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    (path / f"{req.rid}.json").write_text(json.dumps({
        "rid": req.rid,
        "candidate_positions": positions.tolist(),
        "dropped_positions": dropped.tolist(),
        "prompt_len": len(req.origin_input_ids),
    }))


# ------------------------------------------------------------------ rotary embedding
# SGLang rotary classes whose rotation is exactly ``cos_sin_cache[position]`` applied to channel
# pairs (forward_native indexes the table; scaling variants only change how it was filled). Others
# (Phi-3 LongRoPE, dual-chunk, Fourier, Bailing's 2-D variant, ...) rotate differently: scoring and
# re-basing refuse them instead of mis-rotating keys.
_TABLE_ROTARY_CLASSES = (
    "sglang.srt.layers.rotary_embedding.base.RotaryEmbedding",
    "sglang.srt.layers.rotary_embedding.base.LinearScalingRotaryEmbedding",
    "sglang.srt.layers.rotary_embedding.rope_variant.Llama3RotaryEmbedding",
    "sglang.srt.layers.rotary_embedding.rope_variant.DynamicNTKScalingRotaryEmbedding",
    "sglang.srt.layers.rotary_embedding.rope_variant.DynamicNTKAlphaRotaryEmbedding",
    "sglang.srt.layers.rotary_embedding.yarn.YaRNScalingRotaryEmbedding",
    "sglang.srt.layers.rotary_embedding.mrope.MRotaryEmbedding",
    "sglang.srt.layers.rotary_embedding.mrope.YaRNScalingMRotaryEmbedding",
)


class UnsupportedRotaryError(ValueError):
    """The model's rotary embedding is not a per-position rotation by a cos/sin table."""


def rotary_spec_of(rotary_emb):
    """The :class:`~flashcache_sglang.kernels.rotary.RotarySpec` of an SGLang rotary module.

    Reads ``cos_sin_cache`` (``[max_positions, rotary_dim]``, cos | sin), ``head_size``,
    ``is_neox_style`` and, for M-RoPE, ``axis_map`` (the axis of each channel pair). The table
    is referenced, not copied, so build the spec again after SGLang grows it.
    """
    from .kernels.rotary import RotarySpec

    name = f"{type(rotary_emb).__module__}.{type(rotary_emb).__qualname__}"
    if name not in _TABLE_ROTARY_CLASSES:
        raise UnsupportedRotaryError(
            f"rotary embedding {name} is not supported (supported: "
            + ", ".join(c.rsplit(".", 1)[1] for c in _TABLE_ROTARY_CLASSES) + ")")
    cache = rotary_emb.cos_sin_cache
    if cache.dtype != torch.float32:
        cache = cache.float()
    axes = getattr(rotary_emb, "axis_map", None)
    return RotarySpec(cache, int(rotary_emb.head_size), bool(rotary_emb.is_neox_style),
                      None if axes is None else axes.to(torch.int64))


def find_rotary_embedding(model):
    if model is None:
        return None
    return _find_rotary_embedding(model)


def _find_rotary_embedding(model):
    """The first rotary embedding module of ``model`` (all layers share one table in SGLang's
    dense models), or None."""
    from sglang.srt.layers.rotary_embedding.base import RotaryEmbedding

    for module in model.modules():
        if isinstance(module, RotaryEmbedding) or type(module).__name__.endswith("RotaryEmbedding"):
            return module
    return None


# ------------------------------------------------------------------ requests (stream memories)
def request_input_ids(req):
    """The request's prompt token ids (SGLang's ``origin_input_ids``, an ``array('q')``)."""
    return req.origin_input_ids


def set_request_input_ids(req, token_ids) -> None:
    """Replace a just-created request's prompt (before padding, positions and length checks run:
    SGLang's session turns prepend their history the same way)."""
    from array import array

    ids = token_ids if isinstance(token_ids, array) else array("q", token_ids)
    req.origin_input_ids = ids
    req.origin_input_ids_unpadded = array("q", ids)


def request_finished(req) -> bool:
    return bool(req.finished()) or req.to_finish is not None


def abort_request(req, message: str, status: int = 400) -> None:
    """Finish a just-created request with an error; the client gets ``status`` and ``message``."""
    from http import HTTPStatus

    names = {400: "BadRequestError", 404: "NotFoundError", 409: "ConflictError", 503: "ServiceUnavailableError"}
    req.set_finish_with_abort(message, status_code=HTTPStatus(status), err_type=names.get(status, "BadRequestError"))


def set_stream_namespace(req, namespace: str) -> None:
    """A stream request matches exactly its memory version's path: its radix namespace is the
    version's (a client extra_key or cache_salt would keep it off that path)."""
    req.extra_key = namespace
    req.cache_salt = None


def set_cache_protected_len(req, length: int) -> None:
    """Mark ``[0, length)`` of the request's row as not the request's to free (the cache took
    or freed those slots itself)."""
    req.kv.cache_protected_len = int(length)


def radix_key(token_ids, extra_key: str) -> RadixKey:
    return RadixKey(token_ids, extra_key)


def attach_weakref_release(req, callback: Callable[[str], None]) -> None:
    """Call ``callback(rid)`` when the request object is garbage collected: the safety net for a
    request that leaves the scheduler by a path that releases nothing in the cache."""
    import weakref

    weakref.finalize(req, callback, req.rid)


def request_mrope_positions(req) -> torch.Tensor:
    """``[3, num_tokens]`` M-RoPE positions of the request's prompt."""
    inputs = req.multimodal_inputs
    if inputs is None or inputs.mrope_positions is None:
        raise RuntimeError(f"request {req.rid} has no M-RoPE positions")
    return inputs.mrope_positions


def continue_mrope_positions(req, memory_len: int, memory_positions: torch.Tensor, next_position: int) -> None:
    """Give a stream request M-RoPE positions that continue its memory.

    The tokenizer computed the positions of the request's own prompt (a chunk, or a question)
    from 0; the memory's tokens are already cached, so only their count matters to SGLang's
    slicing (``mrope_positions[:, prefix : prefix + extend]``). The request's own positions move
    to start at the memory's next position, and ``mrope_position_delta`` makes decode continue
    from there. A text-only request gets an item-less MultimodalInputs carrying the positions.
    Idempotent (a retracted request is queued again).
    """
    from sglang.srt.managers.schedule_batch import MultimodalInputs

    if getattr(req, "_flashcache_positions", False):
        return
    total = len(req.origin_input_ids)
    own = total - memory_len
    inputs = req.multimodal_inputs
    local = None if inputs is None else inputs.mrope_positions
    if local is None:
        local = torch.arange(own, dtype=torch.int64).expand(3, -1)
    elif local.shape[1] != own:
        raise RuntimeError(f"request {req.rid}: {local.shape[1]} M-RoPE positions for {own} own tokens")
    full = torch.cat([memory_positions.to(local.device, torch.int64), local.to(torch.int64) + next_position], dim=1)
    if inputs is None:
        inputs = MultimodalInputs(mm_items=[])
        req.multimodal_inputs = inputs
    inputs.mrope_positions = full
    inputs.mrope_position_delta = (full.max() + 1 - total).reshape(1, 1)
    inputs.mrope_position_delta_repeated_cache = None
    req._flashcache_positions = True


def install_request_hooks(session_prefix: str) -> bool:
    """Let the tree cache see every request the scheduler creates and queues, and close stream
    memories through SGLang's own /close_session.

    - ``Scheduler._create_generation_req`` (SGLang's extension point for request-local state):
      after the Req exists, ``tree_cache.on_request_created(req)`` validates its flashcache
      settings and may prepend a stream memory (before padding, offsets, M-RoPE and length
      checks, which then see the whole prompt, as for SGLang's own session turns);
    - ``Scheduler._add_request_to_queue``: ``tree_cache.on_request_queued(req)`` once its
      multimodal inputs are merged (stream positions);
    - ``Scheduler.close_session``: a session id starting with ``session_prefix`` closes that
      stream memory instead of an SGLang session.
    Returns False if already installed.
    """
    from sglang.srt.managers.scheduler import Scheduler

    if getattr(Scheduler._create_generation_req, "_flashcache_hook", False):
        return False
    create, queue, close = Scheduler._create_generation_req, Scheduler._add_request_to_queue, Scheduler.close_session

    def _create_generation_req(self, recv_req, *args, **kwargs):
        req = create(self, recv_req, *args, **kwargs)
        hook = getattr(self.tree_cache, "on_request_created", None)
        if hook is not None and req.to_finish is None:
            hook(req, auto_bos_token_id(getattr(self, "tokenizer", None)))
        return req

    def _add_request_to_queue(self, req, *args, **kwargs):
        hook = getattr(self.tree_cache, "on_request_queued", None)
        if hook is not None:
            hook(req)
        return queue(self, req, *args, **kwargs)

    def close_session(self, recv_req):
        session_id = recv_req.session_id or ""
        closer = getattr(self.tree_cache, "close_stream", None)
        if closer is not None and session_id.startswith(session_prefix):
            closer(session_id[len(session_prefix):])
            return None
        return close(self, recv_req)

    for wrapper, original in ((_create_generation_req, create), (_add_request_to_queue, queue), (close_session, close)):
        wrapper._flashcache_hook = True
        wrapper.__wrapped__ = original
    Scheduler._create_generation_req = _create_generation_req
    Scheduler._add_request_to_queue = _add_request_to_queue
    Scheduler.close_session = close_session
    return True
