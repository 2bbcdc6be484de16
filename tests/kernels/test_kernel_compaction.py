"""copy_slots: K and V of every layer from slots to slots in one launch (a stream memory's
copy-on-write), Triton against the reference; every element of every buffer checked."""

from __future__ import annotations

import pytest
import torch

from flashcache_sglang.kernels import copy_slots
from flashcache_sglang.kernels.testing import DEVICE, make_pool

DTYPE_IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@pytest.mark.parametrize("dtype", list(DTYPE_IDS), ids=DTYPE_IDS.get)
@pytest.mark.parametrize("head_dim", [64, 128], ids=lambda d: f"d{d}")
@pytest.mark.parametrize("num_moves", [1, 63, 97, 500], ids=lambda n: f"n{n}")
def test_copy_slots_matches_reference(num_moves, head_dim, dtype):
    num_layers, num_kv_heads, num_slots = 3, 2, 2 * num_moves + 9
    k_buffers, v_buffers = make_pool(num_layers, num_slots, num_kv_heads, head_dim, dtype, seed=num_moves)
    generator = torch.Generator().manual_seed(head_dim)
    order = torch.randperm(num_slots - 1, generator=generator) + 1
    source, destination = order[:num_moves].to(DEVICE), order[num_moves:2 * num_moves].to(DEVICE)
    for buffer in k_buffers + v_buffers:  # poisoned destinations: an unwritten element shows as NaN
        buffer[destination] = float("nan")
    expected_k = [b.clone() for b in k_buffers]
    expected_v = [b.clone() for b in v_buffers]
    copy_slots(expected_k, expected_v, source, destination, backend="reference")
    copy_slots(k_buffers, v_buffers, source, destination.to(torch.int32), backend="triton")
    for got, want in zip(k_buffers + v_buffers, expected_k + expected_v):
        assert torch.isfinite(got[destination]).all(), "a destination element was not written"
        assert torch.equal(got, want), "copy differs from the reference (or touched other slots)"
    # The copies are bitwise the sources.
    for buffer in k_buffers + v_buffers:
        assert torch.equal(buffer[destination], buffer[source])


@pytest.mark.parametrize("arguments, message", [
    (dict(source_slots=torch.tensor([1, 2]), destination_slots=torch.tensor([3])), "2 entries, destination_slots 1"),
    (dict(source_slots=torch.tensor([1.0]), destination_slots=torch.tensor([3])), "source_slots must be torch.int32"),
    (dict(source_slots=torch.tensor([[1]]), destination_slots=torch.tensor([3])), "source_slots must have 1"),
])
def test_copy_slots_names_bad_arguments(arguments, message):
    k_buffers, v_buffers = make_pool(2, 8, 2, 64, torch.float32, seed=0)
    arguments = {name: value.to(DEVICE) for name, value in arguments.items()}
    with pytest.raises(ValueError, match=message):
        copy_slots(k_buffers, v_buffers, backend="triton", **arguments)
