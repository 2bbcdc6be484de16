"""Triton budgeted selection vs the stable-sort reference: exact equality expected."""

from __future__ import annotations

import pytest
import torch

from flashcache_sglang.kernels import select_kept
from flashcache_sglang.kernels.selection.reference import select_kept_reference
from flashcache_sglang.kernels.selection.triton import select_kept_triton
from flashcache_sglang.kernels.testing import DEVICE


def _mismatch_report(actual: torch.Tensor, expected: torch.Tensor) -> str:
    wrong = (actual.cpu() != expected.cpu()).sum().item()
    max_abs = (actual.cpu() - expected.cpu()).abs().max().item() if actual.numel() else 0
    return f"{wrong} of {expected.numel()} positions differ, max_abs={max_abs}"


def _scores(num_rows: int, num_tokens: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    scores = torch.rand(num_rows, num_tokens, generator=generator)
    scores[:, ::5] = 0.25  # many exact ties: the position tie-break must match
    scores[:, 1::13] = -0.0  # -0.0 must tie with 0.0
    scores[:, 2::13] = 0.0
    scores[:, 3::17] = -1.5
    return scores.to(dtype).to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("budget_fraction", [0.0, 0.2, 1.0], ids=lambda f: f"keep{f}")
@pytest.mark.parametrize("num_rows", [1, 3], ids=lambda r: f"rows{r}")
@pytest.mark.parametrize("num_tokens", [1, 63, 97, 500], ids=lambda n: f"n{n}")
def test_selection_matches_reference(num_tokens, num_rows, budget_fraction, dtype):
    scores = _scores(num_rows, num_tokens, dtype, seed=num_tokens + num_rows)
    generator = torch.Generator().manual_seed(7)
    protected = (torch.rand(num_rows, num_tokens, generator=generator) < 0.3).to(DEVICE)
    budget = int(budget_fraction * num_tokens)
    # Per-row budgets around the shared one, so rows differ and padding is exercised.
    budgets = torch.clamp(
        torch.tensor([budget - row for row in range(num_rows)]), 0, num_tokens
    ).to(DEVICE)
    max_budget = int(budgets.max())

    actual = select_kept_triton(scores, budgets, protected, max_budget)
    expected = select_kept_reference(scores, budgets, protected, max_budget)
    assert torch.equal(actual.cpu(), expected.cpu()), _mismatch_report(actual, expected)


@pytest.mark.parametrize("num_tokens", [1, 97, 500], ids=lambda n: f"n{n}")
def test_protected_tokens_are_always_kept(num_tokens):
    scores = _scores(1, num_tokens, torch.float32, seed=1)[0]
    protected = torch.zeros(num_tokens, dtype=torch.bool, device=DEVICE)
    protected[-(num_tokens // 10 + 1) :] = True  # e.g. the question after the video
    scores[protected] = -100.0  # worst scores, still forced in
    budget = int(protected.sum()) + num_tokens // 5
    kept = select_kept(scores, budget, protected, backend="triton")
    assert kept.shape == (budget,)
    assert bool(protected[kept].sum() == protected.sum())
    assert bool((kept[1:] > kept[:-1]).all()), "kept positions must be ascending"


def test_more_protected_than_budget_keeps_best_protected():
    scores = torch.tensor([0.1, 0.9, 0.5, 0.7, 0.3], device=DEVICE)
    protected = torch.tensor([True, True, False, True, True], device=DEVICE)
    kept = select_kept(scores, 2, protected, backend="triton")
    assert kept.tolist() == [1, 3]


def test_auto_backend_on_cpu_matches_triton():
    scores = _scores(2, 97, torch.float32, seed=3)
    assert torch.equal(
        select_kept(scores, 20), select_kept(scores, 20, backend="triton")
    )


@pytest.mark.parametrize(
    "call, argument",
    [
        (lambda s, p: select_kept(s.long(), 3), "scores"),
        (lambda s, p: select_kept(s[None, None], 3), "scores"),
        (lambda s, p: select_kept(s, 98), "budget"),
        (lambda s, p: select_kept(s, -1), "budget"),
        (lambda s, p: select_kept(s, 2.5), "budget"),
        (lambda s, p: select_kept(s, torch.tensor([3], device=DEVICE)), "budget"),
        (lambda s, p: select_kept(s[None], torch.tensor([3.0], device=DEVICE)), "budget"),
        (lambda s, p: select_kept(s[None].expand(2, -1), torch.tensor([3], device=DEVICE)), "budget"),
        (lambda s, p: select_kept(s[None], torch.tensor([3], device=DEVICE), max_budget=200), "max_budget"),
        (lambda s, p: select_kept(s, 3, p[:5]), "protected_mask"),
        (lambda s, p: select_kept(s, 3, p.int()), "protected_mask"),
        (lambda s, p: select_kept(s, 3, p.to("meta")), "protected_mask"),
        (lambda s, p: select_kept(s, 3, backend="cuda"), "backend"),
    ],
    ids=[
        "int-scores", "3d-scores", "budget-too-big", "budget-negative", "budget-float",
        "tensor-budget-1d", "float-budget-tensor", "budget-count", "max-budget", "mask-shape",
        "mask-dtype", "mask-device", "unknown-backend",
    ],
)
def test_selection_rejects_bad_arguments(call, argument):
    scores = torch.rand(97, device=DEVICE)
    protected = torch.zeros(97, dtype=torch.bool, device=DEVICE)
    with pytest.raises(ValueError, match=argument):
        call(scores, protected)
