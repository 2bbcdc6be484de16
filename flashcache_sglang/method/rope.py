"""A transformers model's rotary embedding as a :class:`RotarySpec`, and the positions it used.

SGLang and transformers cache keys *after* RoPE. Scoring pre-RoPE keys (FlashCache's default)
needs the exact inverse of the model's own rotation, so the spec is built from the model's own
rotary module: its ``inv_freq`` (already scaled for Llama-3 / linear / YaRN variants) and its
``attention_scaling`` (YaRN's magnitude factor), plus Qwen2.5-VL's ``mrope_section`` (which
channel pairs follow the time, height and width position axes). The engine builds the same
record from SGLang's module (:func:`flashcache_sglang.upstream.rotary_spec_of`).

The positions a prefill rotated its keys with are read off the same module with
:func:`recorded_positions` (a forward hook): ``[num_tokens]`` for one position per token,
``[3, num_tokens]`` for M-RoPE. Nothing here re-derives a model's position rule.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from ..kernels.rotary import RotarySpec

__all__ = ["RecordedPositions", "UnsupportedRopeError", "find_rotary_module", "recorded_positions",
           "rotary_spec_from_hf"]

# inv_freq of these rope types changes with the sequence length at run time
# (transformers' dynamic_rope_update), so no fixed table reproduces the cached keys.
_DYNAMIC_ROPE_TYPES = ("dynamic", "longrope")


class UnsupportedRopeError(ValueError):
    """The model's rotary embedding is not a fixed per-position rotation."""


def _text_config(model):
    return model.config.get_text_config(decoder=True)


def find_rotary_module(model) -> torch.nn.Module:
    """The decoder's rotary embedding module (``...model.rotary_emb`` or
    ``...model.language_model.rotary_emb``).

    Raises:
        UnsupportedRopeError: no module with ``inv_freq`` is found there.
    """
    candidates = []
    inner = getattr(model, "model", model)
    for owner in (inner, getattr(inner, "language_model", None), model):
        module = getattr(owner, "rotary_emb", None) if owner is not None else None
        if module is not None:
            candidates.append(module)
    for module in candidates:
        if isinstance(getattr(module, "inv_freq", None), torch.Tensor):
            return module
    raise UnsupportedRopeError(
        f"{type(model).__name__} has no decoder rotary embedding with inv_freq "
        "(looked at model.rotary_emb and model.language_model.rotary_emb)"
    )


def rotary_spec_from_hf(model, max_positions: int | None = None) -> RotarySpec:
    """The spec of a transformers decoder's RoPE (Llama, Qwen2, Qwen2.5-VL's language model ...).

    Args:
        model: a transformers causal LM.
        max_positions: rows of the cos/sin table; default the config's
            ``max_position_embeddings``.
    Returns:
        :class:`RotarySpec` on the CPU: neox-style pairs (transformers' ``rotate_half``),
        ``rotary_dim = 2 * inv_freq.numel()`` (partial rotary keeps the other channels),
        ``axis_of_pair`` from ``mrope_section`` when the model has one.
    Raises:
        UnsupportedRopeError: a dynamic RoPE type, or no rotary module.
    """
    config = _text_config(model)
    module = find_rotary_module(model)
    rope_type = getattr(module, "rope_type", "default")
    if rope_type in _DYNAMIC_ROPE_TYPES:
        raise UnsupportedRopeError(
            f"rope_type {rope_type!r} changes its frequencies with the sequence length; a fixed "
            f"table cannot invert it (supported: fixed-frequency types, not {_DYNAMIC_ROPE_TYPES})"
        )
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if max_positions is None:
        max_positions = int(config.max_position_embeddings)
    mrope_section = getattr(module, "mrope_section", None)
    if mrope_section is None:
        parameters = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
        mrope_section = parameters.get("mrope_section")
    return RotarySpec.from_inv_freq(
        module.inv_freq.detach().float().cpu(),
        max_positions,
        int(head_dim),
        attention_scaling=float(getattr(module, "attention_scaling", 1.0)),
        mrope_section=mrope_section,
    )


@dataclass
class RecordedPositions:
    """Position ids seen by the rotary module during a block (batch row 0).

    Attributes:
        calls: one tensor per forward call: ``[num_tokens]`` or ``[3, num_tokens]`` int64.
    """

    calls: list[torch.Tensor] = field(default_factory=list)

    @property
    def last(self) -> torch.Tensor:
        if not self.calls:
            raise RuntimeError("the rotary module was not called inside the recording block")
        return self.calls[-1]


@contextmanager
def recorded_positions(model, required: bool = True):
    """Record the position ids the model's rotary embedding receives (forward pre-hook); the
    hook is always removed. Yields :class:`RecordedPositions`.

    Args:
        required: raise :class:`UnsupportedRopeError` when the model has no rotary module;
            with False, yield an empty record instead (models without RoPE).
    """
    record = RecordedPositions()
    try:
        module = find_rotary_module(model)
    except UnsupportedRopeError:
        if required:
            raise
        yield record
        return

    def hook(_module, args, kwargs):
        positions = kwargs.get("position_ids", args[1] if len(args) > 1 else None)
        if positions is None:
            raise RuntimeError(f"{type(_module).__name__} was called without position_ids")
        positions = positions.detach().to(torch.int64)
        # [batch, N] -> [N]; M-RoPE [3, batch, N] -> [3, N] (a 2-D call of an M-RoPE module is
        # broadcast to the three axes by the module itself).
        if positions.dim() == 3:
            positions = positions[:, 0]
        elif positions.dim() == 2:
            positions = positions[0]
        record.calls.append(positions.cpu())

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield record
    finally:
        handle.remove()
