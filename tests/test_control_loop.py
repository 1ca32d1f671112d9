"""The noise-control loop's parts beyond the controller: the blind-meter guard and the MI curve.

Truths used: the capacity bound I ≤ 1/(2σ²) nats (so σ = 1/√(2·ceiling) holds any ceiling), the
likelihood-ratio reading itself (the curve at the reading's σ must reproduce it exactly), and the closed-form
solution of the predictive controller on that curve.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from adaptive_dp import AdaptivePrivacyEngine

pytestmark = pytest.mark.filterwarnings("ignore:target_mi without a privacy budget:UserWarning")


def _setup(seed: int = 0, n: int = 96, d: int = 10, classes: int = 3):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, d, generator=g), torch.randint(0, classes, (n,), generator=g)
    audit = (torch.randn(32, d, generator=g), torch.randint(0, classes, (32,), generator=g))
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(d, 16), nn.Tanh(), nn.Linear(16, classes))
    return (
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        DataLoader(TensorDataset(x, y), batch_size=16),
        audit,
    )


def _train(engine_kwargs, steps: int):
    model, optimizer, loader, audit = _setup()
    engine = AdaptivePrivacyEngine()
    model, optimizer, loader = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        max_grad_norm=1.0,
        audit_data=audit,
        monitor_every=2,
        **engine_kwargs,
    )
    done = 0
    while done < steps:
        for x, y in loader:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
            done += 1
            if done == steps:
                break
    return engine


def test_a_blind_estimator_never_lowers_sigma_below_the_capacity_sigma():
    target = 0.3
    capacity_sigma = 1 / math.sqrt(2 * target)  # I ≤ 1/(2σ²) ≤ target for any clipped gradient
    with pytest.warns(UserWarning, match="cannot see the leakage"):
        engine = _train(
            {
                "noise_multiplier": 0.5,
                "target_mi": target,
                "controller": "pid",
                "estimator": "token-mine",
                "token_encoder": "projection",
                "sigma_min": 0.05,
                "monitor_options": {"token_dim": 8},
            },
            steps=12,
        )
    sigmas = [r["noise_multiplier"] for r in engine.history]
    assert engine.history[0]["meter_blind"]
    assert min(sigmas) >= capacity_sigma - 1e-12
    assert engine.control_loop.guard.events >= 1


def test_the_likelihood_ratio_estimator_is_not_guarded():
    engine = _train({"noise_multiplier": 1.0, "target_mi": 0.3, "controller": "pid"}, steps=4)
    assert engine.control_loop.guard is None
    assert not any(r["meter_blind"] for r in engine.history)


def test_the_mi_curve_reproduces_the_reading_and_drives_the_predictive_controller():
    engine = _train({"noise_multiplier": 1.0, "target_mi": 0.2, "controller": "predictive"}, steps=4)
    monitor = engine.monitor
    reading = monitor.read(noise_multiplier=1.3, max_grad_norm=1.0)
    curve = monitor.mi_curve()
    mi, stderr = curve(1.3)
    assert mi == pytest.approx(reading.mi, rel=1e-12) and stderr == pytest.approx(reading.stderr, rel=1e-12)
    values = [curve(s)[0] for s in (0.3, 0.6, 1.2, 2.4, 4.8)]
    assert all(a > b for a, b in zip(values, values[1:]))  # decreasing in σ (common random numbers)
    controller = engine.controller
    assert (
        controller.solution is not None
    )  # the controller solved on a curve instead of falling back to its PID
    solved = controller.solve(curve, k=0.0)
    assert curve(solved)[0] == pytest.approx(controller.setpoint, abs=2e-3)
