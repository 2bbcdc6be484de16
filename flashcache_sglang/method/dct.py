"""Orthonormal DCT-II / DCT-III along one axis in O(N log N) through torch.fft.

FlashCache views a layer's keys (or values) as a signal along the token axis. The orthonormal
DCT-II keeps Parseval's identity (energy in = energy out), which is what makes the
high-frequency energy ratio of Dynamic Budget Allocation meaningful.

Makhoul's algorithm: reorder the signal (even samples, then odd samples reversed), take one
complex FFT of length N, twiddle by exp(-i pi k / 2N). No dense N x N matrix is built, so this
is usable at 32K tokens.
"""

from __future__ import annotations

import math

import torch

__all__ = ["dct2", "idct2", "lowpass", "cutoff_index"]


def _check_float(x: torch.Tensor, name: str) -> None:
    if not torch.is_floating_point(x):
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")


def _twiddle(num_tokens: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    k = torch.arange(num_tokens, device=device, dtype=dtype)
    return torch.exp(torch.complex(torch.zeros_like(k), -math.pi * k / (2 * num_tokens)))


def _orthonormal_scale(num_tokens: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    scale = torch.full((num_tokens,), math.sqrt(2.0 / num_tokens), device=device, dtype=dtype)
    scale[0] = math.sqrt(1.0 / num_tokens)
    return scale


def dct2(x: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Orthonormal DCT-II of ``x`` along ``dim`` (scipy.fft.dct(x, type=2, norm="ortho")).

    Args:
        x: floating tensor of any shape; float16/bfloat16 are computed in float32.
        dim: the token axis.
    Returns:
        coefficients, same shape as ``x``, float32 (float64 if ``x`` is float64).
    """
    _check_float(x, "x")
    work_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    x = x.to(work_dtype).movedim(dim, -1)
    num_tokens = x.shape[-1]
    if num_tokens == 0:
        return x.movedim(-1, dim)
    reordered = torch.cat([x[..., ::2], x[..., 1::2].flip(-1)], dim=-1)
    spectrum = torch.fft.fft(reordered, dim=-1)
    coefficients = (spectrum * _twiddle(num_tokens, x.device, work_dtype)).real
    coefficients = coefficients * _orthonormal_scale(num_tokens, x.device, work_dtype)
    return coefficients.movedim(-1, dim)


def idct2(coefficients: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Inverse of :func:`dct2` (orthonormal DCT-III) along ``dim``; same shape, float32/64."""
    _check_float(coefficients, "coefficients")
    work_dtype = torch.float64 if coefficients.dtype == torch.float64 else torch.float32
    c = coefficients.to(work_dtype).movedim(dim, -1)
    num_tokens = c.shape[-1]
    if num_tokens == 0:
        return c.movedim(-1, dim)
    c = c / _orthonormal_scale(num_tokens, c.device, work_dtype)
    # Undo the twiddle: V[k] = (c[k] - i c[N-k]) * exp(i pi k / 2N), with c[N] = 0.
    shifted = torch.cat([torch.zeros_like(c[..., :1]), c[..., 1:].flip(-1)], dim=-1)
    spectrum = torch.complex(c, -shifted) * _twiddle(num_tokens, c.device, work_dtype).conj()
    reordered = torch.fft.ifft(spectrum, dim=-1).real
    x = torch.empty_like(reordered)
    num_even = (num_tokens + 1) // 2
    x[..., ::2] = reordered[..., :num_even]
    x[..., 1::2] = reordered[..., num_even:].flip(-1)
    return x.movedim(-1, dim)


def cutoff_index(num_tokens: int, gamma: float) -> int:
    """Highest kept frequency w = floor(gamma * N) of the low-pass (frequencies m <= w are kept)."""
    if not 0.0 < gamma < 1.0:
        raise ValueError(f"gamma must be in (0, 1), got {gamma}")
    return int(math.floor(gamma * num_tokens))


def lowpass(x: torch.Tensor, gamma: float, dim: int = 0) -> torch.Tensor:
    """The "base" signal: IDCT of the DCT with frequencies above floor(gamma * N) zeroed."""
    coefficients = dct2(x, dim=dim).movedim(dim, -1)
    coefficients[..., cutoff_index(coefficients.shape[-1], gamma) + 1 :] = 0
    return idct2(coefficients, dim=-1).movedim(-1, dim)
