"""FlashInfer paged indices for rows whose dropped tokens hold the sentinel slot 0."""

from __future__ import annotations

import pytest
import torch

from flashcache_sglang.kernels import build_flashinfer_indices
from flashcache_sglang.kernels.flashinfer_index.reference import build_flashinfer_indices_reference
from flashcache_sglang.kernels.testing import DEVICE


def _compressed_batch(lengths: list[int], page_size: int, seed: int):
    """req_to_token rows in SGLang's layout after compression: physical tokens dense in pages,
    dropped logical positions holding slot 0; returns the table, rows, logical and physical lengths."""
    generator = torch.Generator().manual_seed(seed)
    max_context = max(lengths) * 2 + 1
    num_rows = len(lengths) + 2
    req_to_token = torch.full((num_rows, max_context), -3, dtype=torch.int32)  # junk past seq_len
    rows = torch.randperm(num_rows, generator=generator)[: len(lengths)]
    total_pages = sum(-(-n // page_size) for n in lengths)
    pages = torch.randperm(total_pages + 10, generator=generator)[:total_pages] + 1  # never page 0
    logical_lengths, next_page = [], 0
    for row, physical_len in zip(rows.tolist(), lengths):
        num_pages = -(-physical_len // page_size)
        offsets = torch.arange(physical_len)
        physical = pages[next_page : next_page + num_pages][offsets // page_size] * page_size + offsets % page_size
        next_page += num_pages
        dropped = torch.randint(0, physical_len + 1, (physical_len // 2,), generator=generator)
        logical = []
        for position, slot in enumerate(physical.tolist()):
            logical += [0] * int((dropped == position).sum()) + [slot]
        req_to_token[row, : len(logical)] = torch.tensor(logical, dtype=torch.int32)
        logical_lengths.append(len(logical))
    return (
        req_to_token.to(DEVICE),
        rows.to(DEVICE),
        torch.tensor(logical_lengths, dtype=torch.int32, device=DEVICE),
        torch.tensor(lengths, dtype=torch.int32, device=DEVICE),
    )


@pytest.mark.parametrize("give_lengths", [True, False], ids=["physical-given", "physical-counted"])
@pytest.mark.parametrize("page_size", [1, 16], ids=lambda p: f"page{p}")
@pytest.mark.parametrize(
    "lengths", [[1], [63, 97], [500, 1, 97, 63]], ids=["n1", "n63-97", "n500-1-97-63"]
)
def test_flashinfer_indices_match_reference(lengths, page_size, give_lengths):
    req_to_token, rows, seq_lens, physical = _compressed_batch(lengths, page_size, seed=len(lengths))
    total_pages = sum(-(-n // page_size) for n in lengths)
    actual = build_flashinfer_indices(
        req_to_token, rows, seq_lens, page_size,
        physical_seq_lens=physical if give_lengths else None,
        num_pages_total=total_pages if give_lengths else None,
        backend="triton",
    )
    kv_indptr, kv_indices, kv_last_page_len = build_flashinfer_indices_reference(
        req_to_token, rows, seq_lens, page_size, sentinel=0
    )
    for name, got, want in (
        ("kv_indptr", actual.kv_indptr, kv_indptr),
        ("kv_indices", actual.kv_indices, kv_indices),
        ("kv_last_page_len", actual.kv_last_page_len, kv_last_page_len),
    ):
        assert got.dtype == torch.int32, f"{name} dtype {got.dtype}"
        wrong = (got.cpu() != want.cpu()).sum().item() if got.shape == want.shape else "shape"
        assert torch.equal(got.cpu(), want.cpu()), f"{name}: {wrong} entries differ"
    assert int(kv_indptr[-1]) == total_pages
    assert bool(((kv_last_page_len >= 1) & (kv_last_page_len <= page_size)).all())


def test_uncompressed_rows_match_sglang_layout():
    req_to_token = torch.arange(1, 301, dtype=torch.int32).view(3, 100).to(DEVICE)
    rows = torch.tensor([2, 0], device=DEVICE)
    seq_lens = torch.tensor([40, 7], device=DEVICE)
    result = build_flashinfer_indices(req_to_token, rows, seq_lens, 1, backend="triton")
    assert result.kv_indptr.tolist() == [0, 40, 47]
    assert result.kv_indices.tolist() == list(range(201, 241)) + list(range(1, 8))
    assert result.kv_last_page_len.tolist() == [1, 1]


@pytest.mark.parametrize(
    "change, argument",
    [
        (dict(req_to_token=torch.zeros(4, 8)), "req_to_token"),
        (dict(req_to_token=torch.zeros(4, 8, dtype=torch.int32).t()), "req_to_token"),
        (dict(req_pool_indices=torch.tensor([0.0])), "req_pool_indices"),
        (dict(seq_lens=torch.tensor([3, 4])), "seq_lens"),
        (dict(seq_lens=torch.tensor([30])), "seq_lens"),
        (dict(page_size=-1), "page_size"),
        (dict(physical_seq_lens=torch.tensor([1, 2])), "physical_seq_lens"),
    ],
    ids=["float-table", "strided-table", "float-rows", "lens-count", "lens-too-long", "page-size", "physical-count"],
)
def test_flashinfer_indices_reject_bad_arguments(change, argument):
    arguments = dict(
        req_to_token=torch.ones(4, 8, dtype=torch.int32),
        req_pool_indices=torch.tensor([1]),
        seq_lens=torch.tensor([3]),
        page_size=1,
    )
    arguments.update(change)
    arguments = {
        name: value.to(DEVICE) if isinstance(value, torch.Tensor) else value
        for name, value in arguments.items()
    }
    with pytest.raises(ValueError, match=argument):
        build_flashinfer_indices(backend="triton", **arguments)
