"""FlashCache's two signals per layer: outlier deviation per token and high-frequency energy.

Shapes follow the project vocabulary: keys / values are
``[num_layers, num_tokens, num_kv_heads, head_dim]`` (post-RoPE keys, as SGLang's pool stores
them). Everything is computed in float32 (float64 stays float64).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from .dct import cutoff_index, dct2, idct2

__all__ = ["FrequencyScores", "frequency_scores", "low_frequency_share"]


@dataclass(frozen=True)
class FrequencyScores:
    """Per-token outlier deviation and per-layer high-frequency energy of a KV span.

    Attributes:
        deviation: ``[num_layers, num_kv_heads, num_tokens]`` float32. MSE over head_dim between
            each token's key and the low-pass base key, plus the same for values.
        high_freq_ratio: ``[num_layers]`` float32. R_k + R_v, each the share of spectral energy
            above the cutoff, over all channels of the layer. In [0, 2].
        high_freq_ratio_per_head: ``[num_layers, num_kv_heads]`` float32, the same per KV head.
    """

    deviation: torch.Tensor
    high_freq_ratio: torch.Tensor
    high_freq_ratio_per_head: torch.Tensor

    @property
    def layer_deviation(self) -> torch.Tensor:
        """``[num_layers, num_tokens]``: MSE over all channels (mean of the per-head MSEs)."""
        return self.deviation.mean(dim=1)


def _check_kv(keys: torch.Tensor, values: torch.Tensor) -> None:
    if keys.dim() != 4:
        raise ValueError(
            "keys must be [num_layers, num_tokens, num_kv_heads, head_dim], "
            f"got shape {tuple(keys.shape)}"
        )
    if values.shape != keys.shape:
        raise ValueError(
            f"values shape {tuple(values.shape)} must equal keys shape {tuple(keys.shape)}"
        )
    if keys.shape[1] == 0:
        raise ValueError("the span is empty: num_tokens must be >= 1")


# Below this many tokens the low-pass is computed as two matmuls with the kept DCT rows
# (2 (w+1) N channels multiply-adds, BLAS-fast); above it, the O(N log N) FFT path. On the
# project's 2-core CPU (30 layers x 3 KV heads x 64, gamma 0.2) the matmul path took about half
# the FFT path's time from 97 to 2048 tokens and was still ahead at 4096; both agree to ~2e-7.
MATMUL_MAX_TOKENS = 2048


@functools.lru_cache(maxsize=8)
def _lowpass_basis(num_tokens: int, cutoff: int, device: str, dtype: torch.dtype) -> torch.Tensor:
    """Orthonormal DCT-II rows m = 0..cutoff: ``[cutoff + 1, num_tokens]``."""
    m = torch.arange(cutoff + 1, dtype=torch.float64)[:, None]
    n = torch.arange(num_tokens, dtype=torch.float64)[None, :]
    basis = torch.cos(math.pi * (2 * n + 1) * m / (2 * num_tokens)) * math.sqrt(2.0 / num_tokens)
    basis[0] /= math.sqrt(2.0)
    return basis.to(device=device, dtype=dtype)


def _one_tensor(x: torch.Tensor, gamma: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Deviation [L, H, N] and (high, total) energy [L, H] of one of K or V."""
    num_tokens = x.shape[1]
    cutoff = cutoff_index(num_tokens, gamma)
    if num_tokens <= MATMUL_MAX_TOKENS:
        work = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
        basis = _lowpass_basis(num_tokens, cutoff, str(work.device), work.dtype)
        low = torch.einsum("mn,lnhd->lmhd", basis, work)  # kept coefficients
        base = torch.einsum("mn,lmhd->lnhd", basis, low)
        total = work.square().sum(dim=(1, 3))  # Parseval: the orthonormal DCT keeps energy
        high = (total - low.square().sum(dim=(1, 3))).clamp_min(0)
        deviation = (work - base).square().mean(dim=-1).transpose(1, 2)
        return deviation, high, total
    coefficients = dct2(x, dim=1)  # [L, N, H, D]
    power = coefficients.square()
    total = power.sum(dim=(1, 3))
    high = power[:, cutoff + 1 :].sum(dim=(1, 3))
    coefficients[:, cutoff + 1 :] = 0
    base = idct2(coefficients, dim=1)
    deviation = (x.to(base.dtype) - base).square().mean(dim=-1).transpose(1, 2)
    return deviation, high, total


def _ratio(high: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    return high / total.clamp_min(torch.finfo(total.dtype).tiny)


def frequency_scores(keys: torch.Tensor, values: torch.Tensor, gamma: float = 0.2) -> FrequencyScores:
    """Score a KV span the FlashCache way: no attention scores, only the token-axis spectrum.

    Args:
        keys: ``[num_layers, num_tokens, num_kv_heads, head_dim]``, any float dtype.
        values: same shape as ``keys``.
        gamma: low-pass cutoff as a fraction of num_tokens, in (0, 1).
    """
    _check_kv(keys, values)
    dev_k, high_k, total_k = _one_tensor(keys, gamma)
    dev_v, high_v, total_v = _one_tensor(values, gamma)
    per_head = _ratio(high_k, total_k) + _ratio(high_v, total_v)
    per_layer = _ratio(high_k.sum(1), total_k.sum(1)) + _ratio(high_v.sum(1), total_v.sum(1))
    return FrequencyScores(
        deviation=dev_k + dev_v,
        high_freq_ratio=per_layer,
        high_freq_ratio_per_head=per_head,
    )


def low_frequency_share(x: torch.Tensor, gamma: float = 0.2) -> torch.Tensor:
    """Share of spectral energy in the frequencies ``m <= floor(gamma * num_tokens)``.

    Args:
        x: ``[num_layers, num_tokens, num_kv_heads, head_dim]`` keys or values.
        gamma: cutoff fraction in (0, 1).
    Returns:
        ``[num_layers]`` float32 in [0, 1]; FlashCache's premise is that this is high (> 0.9 in
        the paper's visual tokens).
    """
    if x.dim() != 4:
        raise ValueError(f"x must be [num_layers, num_tokens, num_kv_heads, head_dim], got {tuple(x.shape)}")
    power = dct2(x, dim=1).square()
    cutoff = cutoff_index(x.shape[1], gamma)
    return (power[:, : cutoff + 1].sum(dim=(1, 2, 3)) / power.sum(dim=(1, 2, 3)).clamp_min(1e-30)).float()
