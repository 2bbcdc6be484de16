"""Helpers for testing and benchmarking the kernels: synthetic pools, error reports.

Shipped in the package (tests run with --import-mode=importlib, so a helper module beside the
tests would not be importable).
"""

from __future__ import annotations

import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def error_report(actual: torch.Tensor, expected: torch.Tensor) -> str:
    """Max abs error and relative RMSE, the numbers every assertion message carries."""
    actual, expected = actual.double().cpu(), expected.double().cpu()
    difference = actual - expected
    max_abs = difference.abs().max().item() if difference.numel() else 0.0
    scale = expected.square().mean().sqrt().item() if expected.numel() else 0.0
    rmse = difference.square().mean().sqrt().item() if difference.numel() else 0.0
    relative = rmse / scale if scale > 0 else rmse
    return f"max_abs={max_abs:.3e} rel_rmse={relative:.3e} (shape {tuple(expected.shape)})"


def assert_close(
    actual: torch.Tensor, expected: torch.Tensor, what: str, rel_rmse: float, max_abs: float
) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    report = error_report(actual, expected)
    assert torch.isfinite(actual).all(), f"{what}: non-finite output (unwritten?) {report}"
    difference = (actual.double().cpu() - expected.double().cpu())
    scale = expected.double().cpu().square().mean().sqrt().item()
    assert difference.abs().max().item() <= max_abs, f"{what}: {report}"
    assert difference.square().mean().sqrt().item() <= rel_rmse * max(scale, 1e-30), f"{what}: {report}"


def make_pool(
    num_layers: int,
    num_slots: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    seed: int,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Random per-layer K/V buffers ``[num_slots, num_kv_heads, head_dim]`` (SGLang layout)."""
    generator = torch.Generator().manual_seed(seed)
    def buffer() -> torch.Tensor:
        return torch.randn(num_slots, num_kv_heads, head_dim, generator=generator).to(dtype).to(DEVICE)
    return [buffer() for _ in range(num_layers)], [buffer() for _ in range(num_layers)]


def write_smooth_span(
    k_buffers: list[torch.Tensor], v_buffers: list[torch.Tensor], slots: torch.Tensor, seed: int
) -> None:
    """Write span data shaped like real visual KV: mostly low-frequency along the token axis,
    plus noise and a few outlier tokens, at ``slots`` (in position order)."""
    generator = torch.Generator().manual_seed(seed)
    num_tokens = slots.numel()
    num_kv_heads, head_dim = k_buffers[0].shape[1:]
    for buffer in k_buffers + v_buffers:
        walk = torch.randn(num_tokens, num_kv_heads, head_dim, generator=generator).cumsum(0)
        walk = walk / max(num_tokens, 1) ** 0.5
        noise = 0.3 * torch.randn(num_tokens, num_kv_heads, head_dim, generator=generator)
        outliers = (torch.rand(num_tokens, 1, 1, generator=generator) < 0.05) * 3.0
        span = walk + noise + outliers * torch.randn(num_tokens, num_kv_heads, head_dim, generator=generator)
        buffer[slots.to(buffer.device).long()] = span.to(buffer.dtype).to(buffer.device)
