"""Validation of span scoring's optional inputs: positions + RoPE spec, FP8 dequantisation scales.

Shared by the torch reference and the Triton launcher, so both refuse the same arguments with
the same messages (each names the argument).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence, Union

import torch

from ..rotary import RotarySpec

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)

# What a scale argument may be: one float for every layer, a float per layer, or a
# [num_layers] float tensor on the pool's device (e.g. stacked RadixAttention.k_scale).
Scale = Union[None, float, Sequence[float], torch.Tensor]


@dataclass(frozen=True)
class RotaryInputs:
    """Positions and the RoPE table, on the pool's device.

    Attributes:
        positions: ``[num_tokens]`` or ``[3, num_tokens]`` int32/int64, contiguous.
        cos_sin: ``[max_positions, rotary_dim]`` float32, contiguous (RotarySpec layout).
        axis_of_pair: ``[rotary_dim // 2]`` int32 (M-RoPE) or None.
        spec: the caller's spec.
    """

    positions: torch.Tensor
    cos_sin: torch.Tensor
    axis_of_pair: torch.Tensor | None
    spec: RotarySpec

    @property
    def is_multimodal(self) -> bool:
        return self.positions.dim() == 2


_TABLES: "OrderedDict[tuple[int, str], tuple[RotarySpec, torch.Tensor, torch.Tensor | None]]" = OrderedDict()


def _device_tables(spec: RotarySpec, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The spec's table (and axis map) on ``device`` as float32 / int32, copied once per spec."""
    table, axes = spec.cos_sin_cache, spec.axis_of_pair
    ready = table.device == device and table.dtype == torch.float32 and table.is_contiguous()
    axes_ready = axes is None or (axes.device == device and axes.dtype == torch.int32)
    if ready and axes_ready:
        return table, axes
    key = (id(spec), str(device))
    cached = _TABLES.get(key)
    if cached is not None and cached[0] is spec:
        _TABLES.move_to_end(key)
        return cached[1], cached[2]
    converted = (
        table.to(device=device, dtype=torch.float32).contiguous(),
        None if axes is None else axes.to(device=device, dtype=torch.int32).contiguous(),
    )
    _TABLES[key] = (spec, *converted)  # holding the spec keeps its id from being reused
    while len(_TABLES) > 4:
        _TABLES.popitem(last=False)
    return converted


def check_rotary(
    positions: torch.Tensor | None,
    rotary: RotarySpec | None,
    num_tokens: int,
    head_dim: int,
    device: torch.device,
) -> RotaryInputs | None:
    """None when neither is given (post-RoPE scoring); ValueError naming the argument otherwise.

    Positions outside the table are only checked by the reference (which syncs) and by the
    Triton path under FLASHCACHE_DEBUG_CHECKS=1.
    """
    if positions is None and rotary is None:
        return None
    if positions is None or rotary is None:
        raise ValueError("positions and rotary go together: pass both (pre-RoPE keys) or neither")
    if not isinstance(rotary, RotarySpec):
        raise ValueError(f"rotary must be a RotarySpec, got {type(rotary).__name__}")
    if rotary.head_dim != head_dim:
        raise ValueError(f"rotary.head_dim={rotary.head_dim} does not match the pool's head_dim={head_dim}")
    if not isinstance(positions, torch.Tensor) or positions.dtype not in (torch.int32, torch.int64):
        kind = positions.dtype if isinstance(positions, torch.Tensor) else type(positions).__name__
        raise ValueError(f"positions must be a torch.int32 or torch.int64 tensor, got {kind}")
    if positions.device != device:
        raise ValueError(f"positions is on {positions.device}, expected {device} (the KV pool's device)")
    if positions.dim() == 2:
        if positions.shape[0] != 3 or not rotary.is_multimodal:
            raise ValueError(
                f"positions of shape {tuple(positions.shape)}: [3, num_tokens] positions need an M-RoPE "
                "rotary spec (axis_of_pair set); use [num_tokens] otherwise"
            )
    elif positions.dim() != 1:
        raise ValueError(f"positions must be [num_tokens] or [3, num_tokens], got {tuple(positions.shape)}")
    if positions.shape[-1] != num_tokens:
        raise ValueError(f"positions covers {positions.shape[-1]} tokens, expected num_tokens={num_tokens}")
    cos_sin, axes = _device_tables(rotary, device)
    return RotaryInputs(positions.contiguous(), cos_sin, axes, rotary)


_SCALES: "OrderedDict[tuple, torch.Tensor]" = OrderedDict()


def _one_scale(scale: Scale, num_layers: int, device: torch.device, name: str) -> torch.Tensor | tuple:
    if scale is None:
        return (1.0,) * num_layers
    if isinstance(scale, torch.Tensor):
        if not scale.is_floating_point() or scale.numel() not in (1, num_layers) or scale.dim() > 1:
            raise ValueError(f"{name} must be a float tensor of [num_layers={num_layers}] (or one element), "
                             f"got {scale.dtype} {tuple(scale.shape)}")
        if scale.device != device:
            raise ValueError(f"{name} is on {scale.device}, expected {device} (the KV pool's device)")
        return scale.reshape(-1).to(torch.float32).expand(num_layers)
    values = (scale,) * num_layers if isinstance(scale, (int, float)) else tuple(scale)
    if len(values) != num_layers:
        raise ValueError(f"{name} has {len(values)} entries, expected num_layers={num_layers}")
    for value in values:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"{name} entries must be finite floats > 0, got {value!r}")
    return tuple(float(v) for v in values)


def check_scales(
    k_scale: Scale, v_scale: Scale, num_layers: int, device: torch.device
) -> torch.Tensor | None:
    """``[2 * num_layers]`` float32 dequantisation factors (keys, then values), or None when
    both are absent. Python floats are uploaded once per distinct tuple (cached)."""
    if k_scale is None and v_scale is None:
        return None
    keys = _one_scale(k_scale, num_layers, device, "k_scale")
    values = _one_scale(v_scale, num_layers, device, "v_scale")
    if isinstance(keys, tuple) and isinstance(values, tuple):
        cache_key = (keys, values, str(device))
        cached = _SCALES.get(cache_key)
        if cached is None:
            cached = torch.tensor(keys + values, dtype=torch.float32).to(device)
            _SCALES[cache_key] = cached
            while len(_SCALES) > 16:
                _SCALES.popitem(last=False)
        return cached
    as_tensor = [part if isinstance(part, torch.Tensor) else torch.tensor(part, dtype=torch.float32).to(device)
                 for part in (keys, values)]
    return torch.cat(as_tensor).contiguous()
