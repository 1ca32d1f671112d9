"""I²F (Zhang et al. 2023) against exact dense linear algebra on a model small enough to form J."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from adaptive_dp.attacks.i2f import (
    GradientJacobian,
    I2FReading,
    expected_i2f_lower_bound,
    i2f,
    i2f_lower_bound,
    lambda_max,
)
from adaptive_dp.attacks.inversion import with_normalization
from adaptive_dp.data.datasets import load_dataset
from adaptive_dp.models.cnn import build_model

CLIP = 1.0


@pytest.fixture(scope="module")
def setting():
    """The digits LeNet in float64 (D = 64 pixels, P ≈ 8 000 parameters: J is 64 × 8 026)."""
    ds = load_dataset("digits", split="test")
    model = with_normalization(
        build_model("lenet", in_channels=1, num_classes=10, image_size=8, seed=0), ds.info.mean, ds.info.std
    ).double()
    x, y = ds.images[:1].double() / 255.0, ds.targets[:1]
    jac = GradientJacobian(model, x, y, max_grad_norm=CLIP)
    dense = jac.dense()  # [D, P]
    return model, x, y, jac, dense


def test_products_match_dense_and_finite_differences(setting):
    model, x, y, jac, dense = setting
    assert dense.shape == (64, jac.num_params)
    gen = torch.Generator().manual_seed(0)
    delta = torch.randn(jac.num_params, generator=gen, dtype=torch.float64)
    v = torch.randn(64, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(jac.j(delta), dense @ delta, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(jac.jt(v), dense.T @ v, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(jac.jjt(v), dense @ (dense.T @ v), rtol=1e-8, atol=1e-12)
    # independent truth: Jᵀe_i = ∂g/∂x_i by central differences of the released (clipped) gradient map
    from adaptive_dp.attacks.inversion import clipped_per_sample_gradients

    h = 1e-5
    interior = ((x.view(-1) > 0.05) & (x.view(-1) < 0.95)).nonzero().view(-1)  # x ± h stays in [0, 1]
    for i in interior[:3].tolist():
        e = torch.zeros(64, dtype=torch.float64)
        e[i] = h
        plus = clipped_per_sample_gradients(model, x + e.view(1, 1, 8, 8), y, max_grad_norm=CLIP)[0]
        minus = clipped_per_sample_gradients(model, x - e.view(1, 1, 8, 8), y, max_grad_norm=CLIP)[0]
        torch.testing.assert_close((plus - minus) / (2 * h), dense[i], rtol=1e-4, atol=1e-7)


def test_lanczos_lambda_max_matches_dense(setting):
    _, _, _, jac, dense = setting
    exact = float(torch.linalg.eigvalsh(dense @ dense.T)[-1])
    assert lambda_max(jac, tol=1e-10) == pytest.approx(exact, rel=1e-4)


def test_lower_bound_below_exact_i2f(setting):
    model, x, y, jac, dense = setting
    jjt = dense @ dense.T
    for seed, sigma in ((0, 1e-3), (1, 1e-2)):
        delta = (
            sigma
            * CLIP
            * torch.randn(jac.num_params, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        )
        exact = float(torch.linalg.solve(jjt, dense @ delta).norm())
        lb = i2f_lower_bound(model, x, y, delta, max_grad_norm=CLIP, tol=1e-8)
        assert isinstance(lb, I2FReading) and lb.estimator == "i2f-lb" and lb.n == 1 and lb.seconds > 0
        expected_lb = float((dense @ delta).norm()) / float(torch.linalg.eigvalsh(jjt)[-1])
        assert lb.value == pytest.approx(expected_lb, rel=1e-4)
        assert lb.value <= exact
        # conjugate gradients on (JJᵀ + ελ_max I) match the dense damped solve
        damping = 1e-6
        full = i2f(model, x, y, delta, max_grad_norm=CLIP, damping=damping, rtol=1e-10)
        lam = full.lambda_max
        damped = float(
            torch.linalg.solve(jjt + damping * lam * torch.eye(64, dtype=torch.float64), dense @ delta).norm()
        )
        assert full.value == pytest.approx(damped, rel=1e-3)
        assert lb.value <= full.value


def test_expected_lower_bound_hutchinson(setting):
    model, x, y, _, dense = setting
    sigma = 1e-3
    reading = expected_i2f_lower_bound(
        model, x, y, noise_multiplier=sigma, max_grad_norm=CLIP, probes=32, tol=1e-8, seed=0
    )
    lam = float(torch.linalg.eigvalsh(dense @ dense.T)[-1])
    exact = sigma * CLIP * float(torch.linalg.norm(dense)) / lam  # σC‖J‖_F / λ_max
    assert reading.estimator == "i2f-lb-expected" and reading.n == 32
    assert abs(reading.value - exact) <= 4 * reading.stderr + 1e-12
    assert reading.stderr < 0.2 * exact
    # and it agrees with the mean of single-draw lower bounds (Monte Carlo over Gaussian δ)
    draws = [
        float(
            (
                dense
                @ (
                    sigma
                    * CLIP
                    * torch.randn(
                        dense.shape[1], generator=torch.Generator().manual_seed(s), dtype=torch.float64
                    )
                )
            ).norm()
        )
        / lam
        for s in range(20)
    ]
    assert np.mean(draws) == pytest.approx(exact, rel=0.1)


def test_bad_inputs(setting):
    model, x, y, jac, _ = setting
    with pytest.raises(ValueError, match="delta"):
        i2f_lower_bound(model, x, y, torch.zeros(3, dtype=torch.float64), max_grad_norm=CLIP)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        i2f_lower_bound(
            model, x * 300, y, torch.zeros(jac.num_params, dtype=torch.float64), max_grad_norm=CLIP
        )
    with pytest.raises(ValueError, match="noise_multiplier"):
        expected_i2f_lower_bound(model, x, y, noise_multiplier=-1.0, max_grad_norm=CLIP)
    with pytest.raises(ValueError, match="probes"):
        expected_i2f_lower_bound(model, x, y, noise_multiplier=1.0, max_grad_norm=CLIP, probes=1)
    with pytest.raises(ValueError, match="damping"):
        i2f(model, x, y, torch.zeros(jac.num_params, dtype=torch.float64), max_grad_norm=CLIP, damping=-1.0)
    with pytest.raises(ValueError, match="flat"):
        jac.jt(torch.zeros(3, dtype=torch.float64))
