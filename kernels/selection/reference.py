"""Float32 torch reference for budgeted selection: protected first, then highest score, ties by position."""

from __future__ import annotations

import torch


def select_kept_reference(
    scores: torch.Tensor, budgets: torch.Tensor, protected_mask: torch.Tensor, max_budget: int
) -> torch.Tensor:
    """Positions kept per row, ascending, padded with -1.

    Args:
        scores: ``[num_rows, num_tokens]`` float (compared in float32).
        budgets: ``[num_rows]`` int, each in [0, num_tokens].
        protected_mask: ``[num_rows, num_tokens]`` bool; protected tokens outrank any score.
        max_budget: columns of the result (>= every budget).
    Returns:
        ``[num_rows, max_budget]`` torch.int64.
    """
    num_rows, num_tokens = scores.shape
    kept = torch.full((num_rows, max_budget), -1, dtype=torch.int64, device=scores.device)
    # -0.0 and 0.0 are one value: normalising makes the tie-break by position apply to both.
    values = torch.where(scores == 0, torch.zeros_like(scores), scores).float()
    for row in range(num_rows):
        budget = int(budgets[row])
        # Two stable sorts give the order (protected desc, score desc, position asc).
        by_score = torch.sort(values[row], descending=True, stable=True).indices
        by_protection = torch.sort(
            protected_mask[row, by_score].to(torch.int8), descending=True, stable=True
        ).indices
        order = by_score[by_protection]
        kept[row, :budget] = torch.sort(order[:budget]).values
    return kept
