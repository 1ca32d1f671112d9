"""Closed loop on real data: the PID holds measured leakage under a reachable ceiling (scikit-learn digits).

The start is leaky on purpose (σ = 0.5: the first likelihood-ratio reading is far over the 0.5-nat ceiling),
so the test fails if the loop does not act; it also fails if the controller simply sits at σ_max (that
would meet any ceiling and train nothing).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from adaptive_dp.data.datasets import load_dataset
from adaptive_dp.models.cnn import build_model
from adaptive_dp.privacy_engine import AdaptivePrivacyEngine

pytestmark = pytest.mark.filterwarnings("ignore:target_mi without a privacy budget:UserWarning")

TARGET = 0.5  # nats
STEPS = 200
EVERY = 5
WARM_UP = 8  # readings


def test_pid_holds_leakage_under_the_ceiling_on_digits():
    torch.manual_seed(0)
    dataset = load_dataset("digits")
    model = build_model("small-cnn", in_channels=1, num_classes=10, image_size=8, seed=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    engine = AdaptivePrivacyEngine()
    model, optimizer, loader = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=DataLoader(dataset, batch_size=64),
        noise_multiplier=0.5,
        max_grad_norm=1.0,
        target_mi=TARGET,
        controller="pid",
        estimator="likelihood-ratio",
        audit_fraction=0.1,
        monitor_every=EVERY,
        sigma_min=0.3,
        sigma_max=20.0,
    )
    criterion = nn.CrossEntropyLoss()
    done = 0
    while done < STEPS:
        for xb, yb in loader:
            optimizer.zero_grad()
            criterion(model(xb), yb).backward()
            optimizer.step()
            done += 1
            if done == STEPS:
                break
    readings = [r for r in engine.history if r["mi"] is not None]
    assert len(readings) == STEPS // EVERY
    assert all(math.isfinite(r["mi"]) for r in readings)
    assert readings[0]["mi"] > 1.5 * TARGET, "the start should be leaky, or the test proves nothing"
    after = [r["mi"] for r in readings[WARM_UP:]]
    share = sum(mi <= 1.1 * TARGET for mi in after) / len(after)
    assert share >= 0.9, f"only {share:.0%} of readings after warm-up under 1.1 × target"
    sigmas = [r["noise_multiplier"] for r in engine.history]
    assert max(sigmas) < 5.0, "the controller should not need to sit near sigma_max for a reachable ceiling"
    assert sigmas[-1] < max(sigmas), "σ should come down again as leakage falls during training"
