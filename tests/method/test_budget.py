"""Dynamic Budget Allocation: exact totals, floor and cap, redistribution."""

import pytest
import torch

from flashcache_sglang.method.budget import allocate_budgets

CASES = [
    ("uniform", [1.0] * 5, 50, 0, 100),
    ("skewed", [0.1, 0.2, 5.0, 0.3], 40, 2, 20),
    ("cap_binds", [100.0, 1.0, 1.0, 1.0], 60, 0, 25),
    ("floor_binds", [1e-6, 1e-6, 1.0], 30, 8, 30),
    ("zeros", [0.0, 0.0, 0.0], 7, 0, 7),
    ("tight", [3.0, 1.0], 20, 10, 10),
    ("many_layers", list(torch.rand(30, generator=torch.Generator().manual_seed(0)).tolist()), 30 * 191, 47, 764),
]


@pytest.mark.parametrize("name,weights,total,floor,cap", CASES, ids=[c[0] for c in CASES])
def test_budgets_exact_and_bounded(name, weights, total, floor, cap):
    budgets = allocate_budgets(torch.tensor(weights), total, floor, cap)
    assert budgets.dtype == torch.int64
    assert int(budgets.sum()) == total
    assert int(budgets.min()) >= floor and int(budgets.max()) <= cap


def test_budgets_follow_weights_and_redistribute():
    budgets = allocate_budgets(torch.tensor([100.0, 1.0, 1.0, 1.0]), 60, 0, 25)
    assert budgets[0] == 25  # capped; the overflow went to the others
    assert budgets[1:].sum() == 35
    ordered = allocate_budgets(torch.tensor([1.0, 2.0, 3.0]), 60, 0, 60)
    assert ordered.tolist() == [10, 20, 30]


@pytest.mark.parametrize("total,floor,cap", [(130, 30, 40), (10, 5, 40), (10, 6, 5)])
def test_impossible_bounds_raise(total, floor, cap):
    with pytest.raises(ValueError, match=str(total) if floor <= cap else "floor"):
        allocate_budgets(torch.ones(3), total, floor, cap)


def test_negative_weights_raise():
    with pytest.raises(ValueError, match="weights"):
        allocate_budgets(torch.tensor([1.0, -1.0]), 2, 0, 2)
