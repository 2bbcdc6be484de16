"""compaction: reference.py (torch, float32) and triton.py (kernel + launcher)."""
