"""FlashCache's two signals per layer: outlier deviation per token and high-frequency energy.

Shapes follow the project vocabulary: keys / values are
``[num_layers, num_tokens, num_kv_heads, head_dim]`` (post-RoPE keys, as SGLang's pool stores
them). Everything is computed in float32 (float64 stays float64).

Keys can be scored in their pre-RoPE form: given the tokens' positions and the model's
:class:`~flashcache_sglang.kernels.rotary.RotarySpec`, the rotation is undone first. Why: RoPE
turns each channel pair by ``position * inv_freq``, which is itself a high-frequency signal
along the token axis for the fast pairs; a low-pass of post-RoPE keys partly measures rotation
phase, not content.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from .dct import cutoff_index, dct2, idct2

__all__ = ["KEY_SPACES", "FrequencyScores", "SpanEnergies", "frequency_energies", "frequency_scores",
           "low_frequency_share", "unrotate_span_keys"]

KEY_SPACES = ("post_rope", "pre_rope")


@dataclass(frozen=True)
class FrequencyScores:
    """Per-token outlier deviation and per-layer high-frequency energy of a KV span.

    Attributes:
        key_deviation: ``[num_layers, num_kv_heads, num_tokens]`` float32. MSE over head_dim
            between each token's key and the low-pass base key.
        value_deviation: the same for values.
        high_freq_ratio: ``[num_layers]`` float32. R_k + R_v, each the share of spectral energy
            above the cutoff, over all channels of the layer. In [0, 2].
        high_freq_ratio_per_head: ``[num_layers, num_kv_heads]`` float32, the same per KV head.
        key_space: "post_rope" (keys as cached) or "pre_rope" (rotation undone before scoring).
    """

    key_deviation: torch.Tensor
    value_deviation: torch.Tensor
    high_freq_ratio: torch.Tensor
    high_freq_ratio_per_head: torch.Tensor
    key_space: str = "post_rope"

    def __post_init__(self) -> None:
        if self.key_space not in KEY_SPACES:
            raise ValueError(f"key_space must be one of {KEY_SPACES}, got {self.key_space!r}")
        if self.key_deviation.shape != self.value_deviation.shape or self.key_deviation.dim() != 3:
            raise ValueError(
                "key_deviation and value_deviation must both be [num_layers, num_kv_heads, num_tokens], "
                f"got {tuple(self.key_deviation.shape)} and {tuple(self.value_deviation.shape)}"
            )

    @property
    def deviation(self) -> torch.Tensor:
        """``[num_layers, num_kv_heads, num_tokens]``: the paper's Dev = MSE_K + MSE_V."""
        return self.key_deviation + self.value_deviation

    @property
    def num_tokens(self) -> int:
        return int(self.key_deviation.shape[-1])

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


def token_axis_energies(x: torch.Tensor, gamma: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Of ``x`` (``[num_layers, num_tokens, num_kv_heads, channels]``): the per-token squared
    deviation from the low-pass base, averaged over channels ``[L, H, N]``, and the spectral
    energy above the cutoff and in total ``[L, H]``. Every part is a sum over channels (the
    deviation once multiplied back by ``channels``), so a head may be scored a few channels at a
    time and the parts added."""
    return _one_tensor(x, gamma)


def _ratio(high: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    return high / total.clamp_min(torch.finfo(total.dtype).tiny)


def unrotate_span_keys(keys: torch.Tensor, positions: torch.Tensor, rotary) -> torch.Tensor:
    """Pre-RoPE keys of a span: ``[num_layers, num_tokens, num_kv_heads, head_dim]`` float32.

    Args:
        keys: ``[num_layers, num_tokens, num_kv_heads, head_dim]`` post-RoPE keys.
        positions: ``[num_tokens]`` or ``[3, num_tokens]`` (M-RoPE) int, the positions the keys
            were rotated with.
        rotary: the model's :class:`~flashcache_sglang.kernels.rotary.RotarySpec`.
    """
    from ..kernels.rotary import apply_rotary_reference

    num_layers, num_tokens, num_kv_heads, head_dim = keys.shape
    flat = keys.transpose(0, 1).reshape(num_tokens, num_layers * num_kv_heads, head_dim)
    pre_rope = apply_rotary_reference(flat, positions.to(keys.device), rotary, inverse=True)
    return pre_rope.reshape(num_tokens, num_layers, num_kv_heads, head_dim).transpose(0, 1)


@dataclass(frozen=True)
class SpanEnergies:
    """The raw parts of :class:`FrequencyScores` for a block of (layer, KV head) rows, so a span
    can be scored a few heads at a time (bounded memory) and assembled exactly afterwards.

    Attributes:
        key_deviation / value_deviation: ``[num_layers, num_kv_heads, num_tokens]`` float32.
        key_high / key_total / value_high / value_total: ``[num_layers, num_kv_heads]`` spectral
            energy above the cutoff and in total.
    """

    key_deviation: torch.Tensor
    value_deviation: torch.Tensor
    key_high: torch.Tensor
    key_total: torch.Tensor
    value_high: torch.Tensor
    value_total: torch.Tensor

    @staticmethod
    def cat(parts: "list[SpanEnergies]", dim: int) -> "SpanEnergies":
        """Join blocks along layers (``dim=0``) or KV heads (``dim=1``)."""
        fields = ("key_deviation", "value_deviation", "key_high", "key_total", "value_high", "value_total")
        return SpanEnergies(*(torch.cat([getattr(p, name) for p in parts], dim=dim) for name in fields))

    def scores(self, key_space: str) -> FrequencyScores:
        per_head = _ratio(self.key_high, self.key_total) + _ratio(self.value_high, self.value_total)
        per_layer = (_ratio(self.key_high.sum(1), self.key_total.sum(1))
                     + _ratio(self.value_high.sum(1), self.value_total.sum(1)))
        return FrequencyScores(self.key_deviation, self.value_deviation, per_layer.float(), per_head.float(),
                               key_space=key_space)


def frequency_energies(keys: torch.Tensor, values: torch.Tensor, gamma: float = 0.2, *,
                       positions: torch.Tensor | None = None, rotary=None) -> SpanEnergies:
    """The raw parts of :func:`frequency_scores` (same arguments)."""
    _check_kv(keys, values)
    if (positions is None) != (rotary is None):
        raise ValueError("positions and rotary go together: pass both (pre-RoPE keys) or neither")
    if rotary is not None:
        keys = unrotate_span_keys(keys, positions, rotary)
    dev_k, high_k, total_k = _one_tensor(keys, gamma)
    dev_v, high_v, total_v = _one_tensor(values, gamma)
    return SpanEnergies(dev_k, dev_v, high_k, total_k, high_v, total_v)


def frequency_scores(
    keys: torch.Tensor,
    values: torch.Tensor,
    gamma: float = 0.2,
    *,
    positions: torch.Tensor | None = None,
    rotary=None,
) -> FrequencyScores:
    """Score a KV span the FlashCache way: no attention scores, only the token-axis spectrum.

    Args:
        keys: ``[num_layers, num_tokens, num_kv_heads, head_dim]``, any float dtype, post-RoPE.
        values: same shape as ``keys``.
        gamma: low-pass cutoff as a fraction of num_tokens, in (0, 1).
        positions: ``[num_tokens]`` or ``[3, num_tokens]`` int positions of the keys; with
            ``rotary`` the keys are un-rotated before scoring (``key_space="pre_rope"``).
        rotary: :class:`~flashcache_sglang.kernels.rotary.RotarySpec` of the model, or None.
    """
    energies = frequency_energies(keys, values, gamma, positions=positions, rotary=rotary)
    return energies.scores("post_rope" if rotary is None else "pre_rope")


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
