"""The likelihood-ratio reading's fast path (Gram matrix + exact draw of the noise's projections) against the
explicit computation: the same scores up to a per-row constant for a given noise draw, the analytic Gaussian
law of the projections, and the same distribution of monitor readings as explicit noisy gradients."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from adaptive_dp.data.datasets import audit_split, load_dataset
from adaptive_dp.leakage.gradients import clip_factors, per_sample_norms
from adaptive_dp.leakage.likelihood_ratio import (
    LikelihoodRatioEstimator,
    centred_gram,
    gaussian_cross_products,
    likelihood_ratio_scores_from_gram,
)
from adaptive_dp.leakage.mine import likelihood_ratio_mi, likelihood_ratio_scores
from adaptive_dp.leakage.monitor import LeakageMonitor, MonitorError
from adaptive_dp.models.cnn import build_model


def _layers(n: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(4, 3, 3, 3), (4,), (10, 16)]
    # a shared component plus per-example parts of very different sizes, as real gradients have
    return [
        torch.randn(1, *s, generator=g) + torch.randn(n, *s, generator=g) * (0.05 if k else 0.3)
        for k, s in enumerate(shapes)
    ]


def _flat(layers):
    return torch.cat([t.reshape(t.shape[0], -1) for t in layers], dim=1)


@pytest.mark.parametrize("std", [0.05, 0.5, 3.0])
def test_gram_scores_equal_explicit_scores_up_to_row_constants(std):
    layers = _layers(24, seed=1)
    clean = _flat(layers).double()
    noise = std * torch.randn(clean.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    explicit = likelihood_ratio_scores(clean + noise, clean, noise_std=std)
    cross = noise @ (clean - clean.mean(0)).T
    fast = likelihood_ratio_scores_from_gram(centred_gram([t.double() for t in layers]), cross, noise_std=std)
    shift = explicit - fast
    assert torch.allclose(shift, shift[:, :1].expand_as(shift), rtol=0, atol=1e-9 * float(shift.abs().max()))
    assert torch.equal(fast.diagonal(), torch.zeros(24, dtype=fast.dtype))
    # hence the same InfoNCE estimate and MI gap as mine.likelihood_ratio_mi on that noise draw
    ref = likelihood_ratio_mi(clean + noise, clean, noise_std=std)
    terms = fast.diagonal() - torch.logsumexp(fast, dim=1) + math.log(24)
    off = (fast.sum() - fast.diagonal().sum()) / (24 * 23)
    assert float(terms.mean()) == pytest.approx(ref.mi, abs=1e-9)
    assert float(fast.diagonal().mean() - off) == pytest.approx(ref.critic_gap, rel=1e-9, abs=1e-9)


def test_float32_gram_is_close_to_float64():
    layers = _layers(32, seed=3)
    k32 = centred_gram(layers)
    k64 = centred_gram([t.double() for t in layers])
    assert torch.allclose(k32.double(), k64, atol=1e-5 * float(k64.diagonal().max()))
    assert torch.allclose(k64, k64.T) and float(torch.linalg.eigvalsh(k64).min()) > -1e-9


def test_cross_products_follow_their_gaussian_law():
    # rows of M are N(0, s² K) exactly: compare the empirical covariance over many draws with s² K
    layers = _layers(6, seed=4)
    gram = centred_gram([t.double() for t in layers])
    generator = torch.Generator().manual_seed(5)
    s = 0.7
    draws = torch.cat([gaussian_cross_products(gram, noise_std=s, generator=generator) for _ in range(4000)])
    empirical = draws.T @ draws / draws.shape[0]
    scale = float((s * s * gram).diagonal().max())
    assert torch.allclose(empirical, s * s * gram, atol=0.08 * scale), (empirical, s * s * gram)
    assert float(draws.mean(0).abs().max()) < 5 * math.sqrt(scale / draws.shape[0])


def test_clip_factors_flat_and_per_layer():
    layers = _layers(5, seed=6)
    norms = per_sample_norms(layers)
    assert torch.allclose(norms[:, 0], layers[0].reshape(5, -1).norm(dim=1))
    flat = clip_factors(norms, 1.0)
    expected = (1.0 / (_flat(layers).norm(dim=1) + 1e-6)).clamp(max=1.0)
    assert torch.allclose(flat, expected.unsqueeze(1).expand(5, 3), rtol=1e-5)
    per_layer = clip_factors(norms, [0.1, 1.0, 10.0], per_layer=True)
    assert torch.allclose(per_layer, (torch.tensor([0.1, 1.0, 10.0]) / (norms + 1e-6)).clamp(max=1.0))


@pytest.fixture(scope="module")
def audit():
    _, held_out = audit_split(load_dataset("digits"), size=48, seed=0)
    xs, ys = zip(*[held_out[i] for i in range(48)])
    return torch.stack(xs), torch.tensor(ys)


def test_monitor_readings_match_explicit_noise_in_distribution(audit):
    model = build_model("small-cnn", in_channels=1, num_classes=10, image_size=8, seed=0)
    monitor = LeakageMonitor(model, audit, max_grad_norm=1.0, seed=3)
    clean = _flat(monitor.clean_gradients())
    sigma, draws = 0.6, 150
    fast = [monitor.read(noise_multiplier=sigma).mi for _ in range(draws)]
    g = torch.Generator().manual_seed(7)
    slow = [
        likelihood_ratio_mi(clean + sigma * torch.randn(clean.shape, generator=g), clean, noise_std=sigma).mi
        for _ in range(draws)
    ]
    se = math.hypot(statistics.stdev(fast), statistics.stdev(slow)) / math.sqrt(draws)
    assert abs(statistics.mean(fast) - statistics.mean(slow)) < 4 * se, (
        statistics.mean(fast),
        statistics.mean(slow),
    )
    assert 0.05 < statistics.mean(fast) < math.log(48) - 0.05  # between floor and cap: a real comparison
    # averaging ⌈4096 / 48⌉ = 86 noise draws per reading: the reading's spread and its stderr shrink by ~√86
    assert statistics.stdev(fast) < 0.25 * statistics.stdev(slow)
    stderr = statistics.mean(monitor.read(noise_multiplier=sigma).stderr for _ in range(20))
    assert 0.5 < stderr / statistics.stdev(fast) < 2.0


def test_estimator_and_monitor_errors(audit):
    gram = centred_gram(_layers(4, seed=8))
    with pytest.raises(ValueError, match="noise_multiplier > 0"):
        LikelihoodRatioEstimator().estimate_from_gram(
            gram, noise_multiplier=0.0, max_grad_norm=1.0, generator=torch.Generator()
        )
    with pytest.raises(ValueError, match="at least 2"):
        LikelihoodRatioEstimator().estimate_from_gram(
            gram[:1, :1], noise_multiplier=1.0, max_grad_norm=1.0, generator=torch.Generator()
        )
    with pytest.raises(ValueError, match="noise_draws"):
        LeakageMonitor(
            build_model("small-cnn", in_channels=1, num_classes=10, image_size=8, seed=0),
            audit,
            max_grad_norm=1.0,
            noise_draws=0,
        )
    broken = build_model("small-cnn", in_channels=1, num_classes=10, image_size=8, seed=0)
    with torch.no_grad():
        broken.classifier[-1].bias[0] = float("inf")
    with pytest.raises(MonitorError, match="non-finite per-sample gradient for parameter '"):
        LeakageMonitor(broken, audit, max_grad_norm=1.0).read(noise_multiplier=1.0)
