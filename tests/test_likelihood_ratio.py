"""The likelihood-ratio critic and the Gaussian capacity bound, checked against independent truths.

Truths used: a brute-force [N, N] distance computation; the Gaussian-channel capacity bound
½ Σ log(1 + λᵢ/(σC)²) ≤ 1/(2σ²) for rows of norm ≤ C (Cover & Thomas, Sec. 9.4); the InfoNCE cap log N.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from adaptive_dp.leakage.mine import (
    MIEstimate,
    gaussian_capacity_bound,
    likelihood_ratio_mi,
    likelihood_ratio_scores,
)

N, P, C = 128, 48, 1.0
DRAWS = 8


def clipped_gradients(n: int = N, p: int = P, *, clip: float = C, seed: int = 0) -> torch.Tensor:
    """Synthetic per-example gradients: anisotropic Gaussian rows, clipped to norm <= clip (many below it)."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(0, -1.5, p)  # decaying spectrum, like real gradients; about a third get clipped
    rows = torch.randn(n, p, generator=g) * scales * 0.3
    norms = rows.norm(dim=1, keepdim=True)
    return rows * torch.clamp(clip / norms, max=1.0)


def noise_draws(*, draws: int = DRAWS, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(N, P, generator=g) for _ in range(draws)]


def lr_mi_over_draws(clean: torch.Tensor, sigma: float, draws: list[torch.Tensor]) -> tuple[float, float]:
    """Mean LR-MI over noise draws and its standard error across draws."""
    std = sigma * C
    values = [likelihood_ratio_mi(clean + std * e, clean, noise_std=std).mi for e in draws]
    return float(np.mean(values)), float(np.std(values, ddof=1) / math.sqrt(len(values)))


def test_gram_trick_equals_brute_force():
    clean = clipped_gradients(seed=3)
    noisy = clean + 0.3 * torch.randn(N, P, generator=torch.Generator().manual_seed(4))
    scores = likelihood_ratio_scores(noisy, clean, noise_std=0.3)
    brute = -((noisy[:, None, :] - clean[None, :, :]) ** 2).sum(dim=2) / (2 * 0.3**2)
    assert scores.shape == (N, N)
    torch.testing.assert_close(scores, brute, rtol=1e-4, atol=1e-3)


def test_likelihood_ratio_mi_is_infonce_over_the_scores():
    clean = clipped_gradients(n=16, seed=5)
    noisy = clean + 0.1 * torch.randn(16, P, generator=torch.Generator().manual_seed(6))
    est = likelihood_ratio_mi(noisy, clean, noise_std=0.1)
    s = likelihood_ratio_scores(noisy, clean, noise_std=0.1).double().numpy()
    rows = [s[i, i] - np.log(np.exp(s[i] - s[i].max()).sum()) - s[i].max() + math.log(16) for i in range(16)]
    off = s[~np.eye(16, dtype=bool)].mean()
    assert isinstance(est, MIEstimate) and est.method == "likelihood-ratio" and est.n == 16
    assert est.mi == pytest.approx(np.mean(rows), abs=1e-6)
    assert est.stderr == pytest.approx(np.std(rows, ddof=1) / 4, rel=1e-6)
    assert est.critic_gap == pytest.approx(np.diag(s).mean() - off, rel=1e-6)
    assert est.cap == pytest.approx(math.log(16))


def test_capacity_bound_matches_covariance_spectrum_and_clipping_limit():
    # P > N takes the Gram path, P < N the covariance path: both must equal the numpy spectrum.
    for n, p in [(20, 50), (50, 20)]:
        clean = clipped_gradients(n=n, p=p, clip=2.0, seed=7)
        x = clean.double().numpy()
        cov = np.cov(x, rowvar=False, bias=True)
        lam = np.clip(np.linalg.eigvalsh(np.atleast_2d(cov)), 0, None)
        for sigma in [0.05, 0.5, 3.0]:
            std = sigma * 2.0
            bound = gaussian_capacity_bound(clean, noise_std=std)
            assert bound == pytest.approx(0.5 * np.log1p(lam / std**2).sum(), rel=1e-9)
            assert bound <= 1.0 / (2.0 * sigma**2)  # rows of norm <= C, noise std = σC


@pytest.mark.parametrize("sigma", [0.2, 0.5, 1.0, 2.0, 4.0])
def test_mean_over_draws_stays_under_capacity_bound_and_log_n(sigma):
    clean = clipped_gradients()
    mean, stderr = lr_mi_over_draws(clean, sigma, noise_draws())
    bound = gaussian_capacity_bound(clean, noise_std=sigma * C)
    assert mean <= bound + 3 * stderr
    assert mean <= math.log(N)


def test_close_to_capacity_bound_at_large_sigma():
    clean = clipped_gradients()
    sigma = 2.0
    mean, stderr = lr_mi_over_draws(clean, sigma, noise_draws(draws=32, seed=11))
    bound = gaussian_capacity_bound(clean, noise_std=sigma * C)
    assert bound > 5 * stderr  # the comparison is informative
    assert mean == pytest.approx(bound, rel=0.2)


def test_near_log_n_at_tiny_sigma():
    clean = clipped_gradients()
    mean, _ = lr_mi_over_draws(clean, 1e-3, noise_draws(draws=2))
    assert mean == pytest.approx(math.log(N), abs=1e-3)


def test_monotone_non_increasing_in_sigma():
    clean = clipped_gradients()
    draws = noise_draws()
    curve = [lr_mi_over_draws(clean, s, draws) for s in np.logspace(-2, 1, 10)]
    for (mi_a, se_a), (mi_b, se_b) in zip(curve, curve[1:]):
        assert mi_b <= mi_a + max(se_a, se_b)
    assert curve[0][0] > 0.9 * math.log(N) and curve[-1][0] < 0.05


@pytest.mark.parametrize(
    "noisy, clean, std, match",
    [
        (torch.zeros(0, 4), torch.zeros(0, 4), 1.0, "non-empty"),
        (torch.zeros(4, 3), torch.zeros(4, 5), 1.0, "same shape"),
        (torch.zeros(4, 3), torch.zeros(5, 3), 1.0, "same shape"),
        (torch.zeros(4), torch.zeros(4), 1.0, "2-D"),
        (torch.tensor([[0.0, math.nan], [1.0, 1.0]]), torch.zeros(2, 2), 1.0, "NaN or inf"),
        (torch.zeros(2, 2), torch.tensor([[0.0, math.inf], [1.0, 1.0]]), 1.0, "NaN or inf"),
        (torch.zeros(4, 3), torch.zeros(4, 3), 0.0, "positive"),
        (torch.zeros(4, 3), torch.zeros(4, 3), -1.0, "positive"),
        (torch.zeros(4, 3), torch.zeros(4, 3), math.nan, "positive"),
    ],
)
def test_bad_input_raises_value_error(noisy, clean, std, match):
    with pytest.raises(ValueError, match=match):
        likelihood_ratio_mi(noisy, clean, noise_std=std)
    with pytest.raises(ValueError, match=match):
        likelihood_ratio_scores(noisy, clean, noise_std=std)


def test_capacity_bound_bad_input():
    with pytest.raises(ValueError, match="positive"):
        gaussian_capacity_bound(torch.zeros(3, 2), noise_std=0.0)
    with pytest.raises(ValueError, match="NaN or inf"):
        gaussian_capacity_bound(torch.tensor([[math.nan, 0.0]]), noise_std=1.0)
    with pytest.raises(ValueError, match="non-empty"):
        gaussian_capacity_bound(torch.zeros(0, 2), noise_std=1.0)
