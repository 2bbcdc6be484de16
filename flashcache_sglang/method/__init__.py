"""The FlashCache method: DCT, scoring, budgets."""
