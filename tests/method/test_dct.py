"""DCT-II / inverse against scipy.fft on awkward sizes, and the frequency scores."""

import pytest
import scipy.fft
import torch

from flashcache_sglang.method.dct import cutoff_index, dct2, idct2, lowpass
from flashcache_sglang.method.scoring import frequency_scores, low_frequency_share

SIZES = [1, 2, 63, 97, 500]


def _report(name, got, want):
    error = (got - want).abs().max().item()
    rmse = ((got - want).square().mean().sqrt() / want.square().mean().sqrt().clamp_min(1e-30)).item()
    return f"{name}: max abs error {error:.3e}, relative RMSE {rmse:.3e}"


@pytest.mark.parametrize("num_tokens", SIZES, ids=[f"n{n}" for n in SIZES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_dct2_matches_scipy(num_tokens, dtype):
    generator = torch.Generator().manual_seed(num_tokens)
    x = torch.randn(3, num_tokens, 60, generator=generator, dtype=torch.float64)
    want = torch.from_numpy(scipy.fft.dct(x.numpy(), type=2, norm="ortho", axis=1))
    got = dct2(x.to(dtype), dim=1).double()
    tolerance = 1e-5 if dtype == torch.float32 else 1e-12
    assert torch.allclose(got, want, atol=tolerance, rtol=0), _report("dct2", got, want)
    inverse = torch.from_numpy(scipy.fft.idct(want.numpy(), type=2, norm="ortho", axis=1))
    got_inverse = idct2(want.to(dtype), dim=1).double()
    assert torch.allclose(got_inverse, inverse, atol=tolerance, rtol=0), _report("idct2", got_inverse, inverse)
    assert torch.allclose(got_inverse, x, atol=tolerance, rtol=0), _report("round trip", got_inverse, x)


def test_dct2_parseval_and_half_precision():
    x = torch.randn(97, 8, dtype=torch.float64)
    assert torch.allclose(dct2(x).square().sum(), x.square().sum())
    assert dct2(x.to(torch.bfloat16)).dtype == torch.float32


def test_lowpass_keeps_low_frequencies_exactly():
    n = 97
    t = torch.arange(n, dtype=torch.float64)
    smooth = torch.cos(torch.pi * (t + 0.5) * 3 / n)  # DCT basis 3
    assert torch.allclose(lowpass(smooth[:, None], 0.2), smooth[:, None], atol=1e-12)
    assert cutoff_index(n, 0.2) == 19


@pytest.mark.parametrize("gamma", [0.0, 1.0, -0.1, 1.5])
def test_bad_gamma(gamma):
    with pytest.raises(ValueError, match=str(gamma)):
        cutoff_index(10, gamma)


def test_frequency_scores_shapes_and_ratios():
    keys = torch.randn(2, 63, 3, 16)
    values = torch.randn(2, 63, 3, 16)
    scores = frequency_scores(keys, values, 0.2)
    assert scores.deviation.shape == (2, 3, 63)
    assert scores.high_freq_ratio.shape == (2,)
    assert scores.high_freq_ratio_per_head.shape == (2, 3)
    # White noise: the energy share above the cutoff is about the share of frequencies there.
    expected = 2 * (63 - cutoff_index(63, 0.2) - 1) / 63
    assert abs(scores.high_freq_ratio.mean().item() - expected) < 0.1
    share = low_frequency_share(keys, 0.2)
    assert share.shape == (2,) and bool(((share > 0) & (share < 1)).all())
    with pytest.raises(ValueError, match="values shape"):
        frequency_scores(keys, values[:, :10])


def test_matmul_and_fft_lowpass_paths_agree(monkeypatch):
    import flashcache_sglang.method.scoring as scoring

    keys, values = torch.randn(2, 97, 2, 16, dtype=torch.float64), torch.randn(2, 97, 2, 16, dtype=torch.float64)
    monkeypatch.setattr(scoring, "MATMUL_MAX_TOKENS", 10**9)
    matmul = scoring.frequency_scores(keys, values, 0.2)
    monkeypatch.setattr(scoring, "MATMUL_MAX_TOKENS", 0)
    fft = scoring.frequency_scores(keys, values, 0.2)
    torch.testing.assert_close(matmul.deviation, fft.deviation, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(matmul.high_freq_ratio, fft.high_freq_ratio, rtol=1e-9, atol=1e-12)
