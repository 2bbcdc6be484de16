"""Input validation, backend choice and KV-pool pointer tables shared by every kernel.

SGLang's MHATokenToKVPool keeps one tensor per layer (``k_buffer[layer]`` / ``v_buffer[layer]``
of ``[num_slots, num_kv_heads, head_dim]``). The kernels never stack them (that would copy the
whole pool); they receive a table of the buffers' addresses, the same trick SGLang's own
``copy_all_layer_kv_cache`` kernel uses (``MHATokenToKVPool.data_ptrs``).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Sequence

import torch

BACKENDS = ("auto", "triton", "reference")
INDEX_DTYPES = (torch.int32, torch.int64)
KV_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# SGLang's --kv-cache-dtype fp8_e4m3 / fp8_e5m2 pools (uint8 storage; get_key_buffer returns the
# float8 view). Only kernels that dequantise (span scoring) accept them.
FP8_KV_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)

# Costly invariant checks (they synchronise with the device) run only when this is "1".
DEBUG_CHECKS_ENV = "FLASHCACHE_DEBUG_CHECKS"
# Tests set this to "1": kernel outputs start as NaN / a negative sentinel instead of
# uninitialised memory, so an element a kernel forgot to write cannot pass by luck.
POISON_OUTPUTS_ENV = "FLASHCACHE_POISON_OUTPUTS"
POISON_INDEX = -7


# triton.jit picks the interpreter when it decorates a kernel, i.e. when this package is
# imported; what the environment says later does not change the kernels, so neither may it
# change the launchers' choices.
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


def interpreter_enabled() -> bool:
    """True when the kernels were built for Triton's CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return _INTERPRETED


def debug_checks_enabled() -> bool:
    return os.environ.get(DEBUG_CHECKS_ENV, "0") == "1"


def new_output(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.empty`` for kernel outputs, poisoned when FLASHCACHE_POISON_OUTPUTS=1."""
    if os.environ.get(POISON_OUTPUTS_ENV, "0") != "1":
        return torch.empty(shape, dtype=dtype, device=device)
    poison = float("nan") if dtype.is_floating_point else POISON_INDEX
    return torch.full(shape, poison, dtype=dtype, device=device)


def resolve_backend(backend: str, device: torch.device) -> str:
    """Pick "triton" or "reference": auto means Triton on CUDA, the torch reference elsewhere."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" else "reference"
    if backend == "triton" and device.type != "cuda" and not interpreter_enabled():
        raise ValueError(
            f"backend='triton' needs CUDA tensors or TRITON_INTERPRET=1 when "
            f"flashcache_sglang.kernels is first imported; tensors are on {device}"
        )
    return backend


def check_index_tensor(
    tensor: torch.Tensor, name: str, device: torch.device, dims: int = 1
) -> None:
    """An int32/int64 index tensor with ``dims`` dimensions on ``device``."""
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in INDEX_DTYPES:
        raise ValueError(f"{name} must be torch.int32 or torch.int64, got {tensor.dtype}")
    if tensor.dim() != dims:
        raise ValueError(f"{name} must have {dims} dimension(s), got shape {tuple(tensor.shape)}")
    if tensor.device != device:
        raise ValueError(f"{name} is on {tensor.device}, expected {device} (the KV pool's device)")


def check_page_size(page_size: int) -> None:
    if not isinstance(page_size, int) or isinstance(page_size, bool) or page_size < 1:
        raise ValueError(f"page_size must be an int >= 1, got {page_size!r}")


@dataclass(frozen=True)
class KVPoolLayout:
    """What the kernels need to know about a pool's per-layer buffers (all layers identical)."""

    num_layers: int
    num_slots: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device
    slot_stride: int  # elements between consecutive slots of one buffer


def check_kv_buffers(
    k_buffers: Sequence[torch.Tensor],
    v_buffers: Sequence[torch.Tensor],
    dtypes: tuple[torch.dtype, ...] = KV_DTYPES,
) -> KVPoolLayout:
    """Validate SGLang-style per-layer buffers; every buffer ``[num_slots, num_kv_heads, head_dim]``
    of one of ``dtypes``.

    Raises ValueError naming the first offending buffer (``k_buffers[3]``, ``v_buffers[0]`` ...).
    """
    for name, buffers in (("k_buffers", k_buffers), ("v_buffers", v_buffers)):
        if isinstance(buffers, torch.Tensor) or not isinstance(buffers, (list, tuple)):
            raise ValueError(
                f"{name} must be a list of per-layer tensors [num_slots, num_kv_heads, head_dim], "
                f"got {type(buffers).__name__}"
            )
        if len(buffers) == 0:
            raise ValueError(f"{name} is empty: need at least one layer")
    if len(k_buffers) != len(v_buffers):
        raise ValueError(
            f"k_buffers has {len(k_buffers)} layers but v_buffers has {len(v_buffers)}"
        )
    first = k_buffers[0]
    if not isinstance(first, torch.Tensor) or first.dim() != 3:
        shape = tuple(first.shape) if isinstance(first, torch.Tensor) else type(first).__name__
        raise ValueError(
            f"k_buffers[0] must be [num_slots, num_kv_heads, head_dim], got {shape}"
        )
    if first.dtype not in dtypes:
        raise ValueError(f"k_buffers[0] dtype must be one of {dtypes}, got {first.dtype}")
    num_slots, num_kv_heads, head_dim = first.shape
    for name, buffers in (("k_buffers", k_buffers), ("v_buffers", v_buffers)):
        for layer, buffer in enumerate(buffers):
            label = f"{name}[{layer}]"
            if not isinstance(buffer, torch.Tensor):
                raise ValueError(f"{label} must be a torch.Tensor, got {type(buffer).__name__}")
            if buffer.shape != first.shape:
                raise ValueError(
                    f"{label} has shape {tuple(buffer.shape)}, expected {tuple(first.shape)} "
                    "like k_buffers[0]"
                )
            if buffer.dtype != first.dtype:
                raise ValueError(f"{label} has dtype {buffer.dtype}, expected {first.dtype}")
            if buffer.device != first.device:
                raise ValueError(f"{label} is on {buffer.device}, expected {first.device}")
            if buffer.stride(2) != 1 or buffer.stride(1) != head_dim:
                raise ValueError(
                    f"{label} must be contiguous within a slot (strides [*, {head_dim}, 1]), "
                    f"got strides {buffer.stride()}"
                )
            if buffer.stride(0) != first.stride(0):
                raise ValueError(
                    f"{label} has slot stride {buffer.stride(0)}, expected {first.stride(0)}"
                )
    return KVPoolLayout(
        num_layers=len(k_buffers),
        num_slots=num_slots,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        dtype=first.dtype,
        device=first.device,
        slot_stride=first.stride(0),
    )


def pointer_table(
    k_buffers: Sequence[torch.Tensor], v_buffers: Sequence[torch.Tensor], device: torch.device
) -> torch.Tensor:
    """``[2 * num_layers]`` torch.uint64 addresses: keys of layers 0..L-1, then values.

    Cached by the addresses themselves (the table's content), so a pool's table is uploaded
    once, not on every call; a reallocated pool simply gets a new entry.
    """
    addresses = tuple(buffer.data_ptr() for buffer in list(k_buffers) + list(v_buffers))
    return _pointer_table(addresses, device)


@functools.lru_cache(maxsize=16)
def _pointer_table(addresses: tuple[int, ...], device: torch.device) -> torch.Tensor:
    return torch.tensor(addresses, dtype=torch.uint64).to(device)
