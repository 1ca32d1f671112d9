"""Identification (linkage) attack: nearest clipped gradient among N candidates."""

from __future__ import annotations

import pytest
import torch

from adaptive_dp.attacks.identification import identification_attack, identification_curve, identify
from adaptive_dp.attacks.inversion import with_normalization
from adaptive_dp.data.datasets import load_dataset
from adaptive_dp.models.cnn import build_model

N = 64
SIGMAS = [0.0, 3e-3, 0.01, 0.1, 0.3, 1.0, 2.0, 4.0]


@pytest.fixture(scope="module")
def candidates():
    ds = load_dataset("digits", split="test")
    images, labels = ds.images[:N].to(torch.float32) / 255.0, ds.targets[:N]
    model = with_normalization(
        build_model("lenet", in_channels=1, num_classes=10, image_size=8, seed=0), ds.info.mean, ds.info.std
    )
    return model, images, labels


def test_identify_picks_nearest():
    cands = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    released = torch.tensor([[0.9, 0.2], [0.1, -0.1], [-0.2, 0.7]])
    assert identify(released, cands).tolist() == [1, 0, 2]
    assert identify(released[0], cands).tolist() == [1]


def test_identification_rate_vs_noise(candidates):
    """100 % at σ = 0 among 64; non-increasing in σ; near chance 1/64 at σ = 4."""
    model, images, labels = candidates
    curve = identification_curve(
        model, images, labels, noise_multipliers=SIGMAS, max_grad_norm=1.0, trials_per_candidate=10, seed=0
    )
    rates = [r.rate for r in curve]
    assert curve[0].rate == 1.0
    assert all(r.candidates == N and r.trials == 10 * N for r in curve)
    for before, after in zip(curve, curve[1:]):
        # common random numbers: monotone up to Monte-Carlo error
        assert after.rate <= before.rate + 2 * max(before.stderr, after.stderr, 1 / after.trials), rates
    top = curve[-1]
    chance_se = (top.chance * (1 - top.chance) / top.trials) ** 0.5
    assert top.rate <= top.chance + 4 * chance_se, rates  # ≤ 1/64 + 4 s.e. ≈ 3.6 %
    # identification survives σ = 3e-3, where DLG's PSNR has already dropped by > 10 dB (test_attacks.py)
    assert curve[1].rate >= 0.99
    single = identification_attack(model, images, labels, noise_multiplier=0.0, max_grad_norm=1.0)
    assert single.rate == 1.0 and single.trials == N


def test_bad_inputs(candidates):
    model, images, labels = candidates
    with pytest.raises(ValueError, match="same model"):
        identify(torch.zeros(3), torch.zeros(4, 5))
    with pytest.raises(ValueError, match="N >= 2"):
        identification_attack(model, images[:1], labels[:1], noise_multiplier=0.0, max_grad_norm=1.0)
    with pytest.raises(ValueError, match="noise_multiplier"):
        identification_attack(model, images, labels, noise_multiplier=-0.1, max_grad_norm=1.0)
    with pytest.raises(ValueError, match="trials_per_candidate"):
        identification_attack(
            model, images, labels, noise_multiplier=0.1, max_grad_norm=1.0, trials_per_candidate=0
        )
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        identification_attack(model, images * 255, labels, noise_multiplier=0.1, max_grad_norm=1.0)
