"""Dynamic Budget Allocation: split an exact integer total across layers by weight.

FlashCache gives each layer a budget proportional to its high-frequency energy ratio R^l
(layers whose KV is less compressible keep more). The paper leaves the normalisation open; here:

1. continuous budgets ``x_l = clip(t * w_l, floor, cap)`` with the scale ``t`` found by bisection
   so that ``sum_l x_l = total`` (water-filling: overflow above ``cap`` and the shortfall below
   ``floor`` are redistributed to the other layers in proportion to their weights);
2. integer budgets by largest remainder, which keeps the total exact and every budget in
   ``[floor, cap]``.
"""

from __future__ import annotations

import math

import torch

__all__ = ["allocate_budgets"]


def allocate_budgets(weights: torch.Tensor, total: int, floor: int, cap: int) -> torch.Tensor:
    """Integer budgets proportional to ``weights`` with an exact sum and per-unit bounds.

    Args:
        weights: ``[num_units]`` non-negative floats (e.g. per-layer high-frequency ratio).
        total: the exact sum of the result.
        floor: minimum budget of every unit.
        cap: maximum budget of every unit.
    Returns:
        ``[num_units]`` torch.int64 on the CPU, each in ``[floor, cap]``, summing to ``total``.
    Raises:
        ValueError: negative or non-finite weights, or bounds that cannot hold the total
            (``floor * num_units <= total <= cap * num_units`` is required).
    """
    weights = weights.detach().to(torch.float64).cpu().reshape(-1)
    num_units = weights.numel()
    if num_units == 0:
        raise ValueError("weights is empty: need at least one unit")
    if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()):
        raise ValueError(f"weights must be finite and >= 0, got {weights.tolist()}")
    if not 0 <= floor <= cap:
        raise ValueError(f"need 0 <= floor <= cap, got floor={floor}, cap={cap}")
    if not floor * num_units <= total <= cap * num_units:
        raise ValueError(
            f"total={total} must lie in [floor * num_units, cap * num_units] = "
            f"[{floor * num_units}, {cap * num_units}]"
        )
    # All-zero weights mean "no preference": the even split.
    weights = weights + max(float(weights.mean()), 1.0) * 1e-9

    def filled(scale: float) -> torch.Tensor:
        return (scale * weights).clamp(floor, cap)

    low, high = 0.0, 1.0
    while float(filled(high).sum()) < total:
        high *= 2.0
        if math.isinf(high):  # pragma: no cover - bounds checked above
            break
    for _ in range(200):
        middle = 0.5 * (low + high)
        if float(filled(middle).sum()) < total:
            low = middle
        else:
            high = middle
    continuous = filled(high)
    budgets = continuous.floor().to(torch.int64).clamp(floor, cap)
    remainder = total - int(budgets.sum())
    # Largest remainder first; only units still below their cap may take one more.
    fraction = continuous - budgets.to(torch.float64)
    order = torch.argsort(fraction, descending=True, stable=True)
    step = 1 if remainder > 0 else -1
    while remainder != 0:
        moved = False
        for unit in order.tolist() if step > 0 else reversed(order.tolist()):
            if remainder == 0:
                break
            if floor <= int(budgets[unit]) + step <= cap:
                budgets[unit] += step
                remainder -= step
                moved = True
        if not moved:  # pragma: no cover - impossible given the bounds check
            raise RuntimeError("budget allocation could not meet the total")
    return budgets
