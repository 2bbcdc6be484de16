"""KV compaction: page_size 1 frees dropped slots; page_size > 1 moves kept K/V to new pages."""

from __future__ import annotations

import pytest
import torch

from flashcache_sglang.kernels import compact_kept
from flashcache_sglang.kernels.testing import DEVICE, make_pool

DTYPE_IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _paged_region(num_tokens: int, page_size: int, num_pages_in_pool: int, seed: int):
    """A request region on random whole pages (page 0 is SGLang's dummy page, never used)."""
    generator = torch.Generator().manual_seed(seed)
    num_pages = -(-num_tokens // page_size)
    pages = torch.randperm(num_pages_in_pool - 1, generator=generator)[: 2 * num_pages + 1] + 1
    region_pages, free_pages = pages[:num_pages], pages[num_pages:]
    offsets = torch.arange(num_tokens)
    region = region_pages[offsets // page_size] * page_size + offsets % page_size
    return region, free_pages


def _kept_positions(num_tokens: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    keep = torch.rand(num_tokens, generator=generator) < 0.3
    keep[0] = True  # never empty
    return keep.nonzero().flatten()


@pytest.mark.parametrize("dtype", list(DTYPE_IDS), ids=DTYPE_IDS.get)
@pytest.mark.parametrize("head_dim", [64, 128], ids=lambda d: f"d{d}")
@pytest.mark.parametrize("page_size", [1, 16], ids=lambda p: f"page{p}")
@pytest.mark.parametrize("num_tokens", [1, 63, 97, 500], ids=lambda n: f"n{n}")
def test_compaction_matches_reference(num_tokens, page_size, head_dim, dtype):
    num_layers, num_kv_heads = 3, 2
    num_pages_in_pool = 2 * (-(-num_tokens // page_size)) + 4
    k_buffers, v_buffers = make_pool(
        num_layers, num_pages_in_pool * page_size, num_kv_heads, head_dim, dtype, seed=num_tokens
    )
    region, free_pages = _paged_region(num_tokens, page_size, num_pages_in_pool, seed=num_tokens)
    kept = _kept_positions(num_tokens, seed=head_dim)
    new_pages = free_pages[: -(-kept.numel() // page_size)]
    if page_size > 1:
        # Poison the destination pages so an unwritten element shows as NaN.
        destination = (new_pages[:, None] * page_size + torch.arange(page_size)).flatten()
        for buffer in k_buffers + v_buffers:
            buffer[destination.to(DEVICE)] = float("nan")
    before_k = [buffer.clone() for buffer in k_buffers]
    before_v = [buffer.clone() for buffer in v_buffers]
    reference_k = [buffer.clone() for buffer in k_buffers]
    reference_v = [buffer.clone() for buffer in v_buffers]

    result = compact_kept(
        k_buffers, v_buffers, region.to(DEVICE), kept.to(DEVICE), page_size,
        new_pages.to(DEVICE) if page_size > 1 else None, backend="triton",
    )
    expected = compact_kept(
        reference_k, reference_v, region.to(DEVICE), kept.to(DEVICE), page_size,
        new_pages.to(DEVICE) if page_size > 1 else None, backend="reference",
    )

    assert torch.equal(result.kept_slots, expected.kept_slots)
    assert torch.equal(result.slots_to_free, expected.slots_to_free)
    for layer in range(num_layers):
        for name, actual, reference, before in (
            ("k", k_buffers, reference_k, before_k),
            ("v", v_buffers, reference_v, before_v),
        ):
            moved = actual[layer][result.kept_slots]
            original = before[layer][region[kept].to(DEVICE)]
            assert torch.equal(moved, original), f"{name}[{layer}]: kept K/V differ after the move"
            assert torch.equal(actual[layer], reference[layer]) or torch.equal(
                actual[layer].nan_to_num(7.0), reference[layer].nan_to_num(7.0)
            ), f"{name}[{layer}]: pool differs from the reference beyond the moved slots"

    if page_size == 1:
        dropped = torch.ones(num_tokens, dtype=torch.bool)
        dropped[kept] = False
        assert torch.equal(result.slots_to_free.cpu(), region[dropped])
        assert torch.equal(result.kept_slots.cpu(), region[kept])
    else:
        assert torch.equal(torch.unique(result.slots_to_free.cpu() // page_size), torch.unique(region // page_size))
        physical = torch.arange(kept.numel())
        assert torch.equal(
            result.kept_slots.cpu(), new_pages[physical // page_size] * page_size + physical % page_size
        ), "kept tokens must fill the new pages densely, in position order"


@pytest.mark.parametrize(
    "change, argument",
    [
        (dict(page_size=0), "page_size"),
        (dict(new_pages=None), "new_pages"),
        (dict(new_pages=torch.tensor([5, 6])), "new_pages"),
        (dict(new_pages=torch.tensor([2])), "new_pages overlap"),
        (dict(kept_positions=torch.tensor([3, 1])), "kept_positions"),
        (dict(kept_positions=torch.tensor([0, 40])), "kept_positions"),
        (dict(kept_positions=torch.tensor([0.0])), "kept_positions"),
        (dict(region_slots=torch.arange(33, 65)), "region_slots"),
        (dict(region_slots=torch.arange(32, 64).to("meta")), "region_slots"),
    ],
    ids=[
        "page-size", "missing-pages", "page-count", "page-overlap", "unsorted-kept",
        "kept-out-of-range", "float-kept", "unaligned-region", "region-device",
    ],
)
def test_compaction_rejects_bad_arguments(change, argument):
    k_buffers, v_buffers = make_pool(2, 128, 2, 64, torch.float32, seed=0)
    arguments = dict(
        region_slots=torch.arange(32, 64),  # pages 2 and 3 of page_size 16
        kept_positions=torch.tensor([0, 5, 17]),
        page_size=16,
        new_pages=torch.tensor([6]),
    )
    arguments.update(change)
    arguments = {
        name: value.to(DEVICE) if isinstance(value, torch.Tensor) and value.device.type != "meta" else value
        for name, value in arguments.items()
    }
    with pytest.raises(ValueError, match=argument):
        compact_kept(k_buffers, v_buffers, backend="triton", **arguments)
