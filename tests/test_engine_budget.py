"""The hard ε budget of AdaptivePrivacyEngine.make_private_with_epsilon (a Rényi filter).

Truths used: opacus' ``compute_rdp`` recomputed on the σ history the engine really used (never the filter's
own bookkeeping), opacus' ``get_noise_multiplier`` for the starting σ, and the model's parameters before and
after a refused step.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opacus.accountants.analysis.rdp import compute_rdp
from opacus.accountants.utils import get_noise_multiplier
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from adaptive_dp.accountants.filter import PrivacyBudgetExhausted
from adaptive_dp.privacy_engine import AdaptivePrivacyEngine

pytestmark = pytest.mark.filterwarnings("ignore:target_mi without a privacy budget:UserWarning")

DELTA = 1e-5


class ScriptedController:
    """A controller (the engine's protocol) that asks for a scripted σ sequence, raised to the budget floor."""

    def __init__(self, sigmas, *, sigma_min: float, sigma_max: float):
        self.sigmas = list(sigmas)
        self.sigma_min, self.sigma_max = sigma_min, sigma_max
        self.floors: list[float | None] = []

    def update(self, measurement, step, *, sigma_floor=None):
        self.floors.append(sigma_floor)
        wanted = min(max(self.sigmas[step % len(self.sigmas)], self.sigma_min), self.sigma_max)
        return wanted if sigma_floor is None else max(wanted, sigma_floor)

    def reset(self):
        pass

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def _setup(*, n: int = 32, batch: int = 8, seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Linear(4, 2)
    loader = DataLoader(TensorDataset(torch.randn(n, 4), torch.randint(0, 2, (n,))), batch_size=batch)
    return model, torch.optim.SGD(model.parameters(), lr=0.1), loader


def _one_step(model, optimizer, loader):
    xb, yb = next(iter(loader))
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(xb), yb).backward()
    optimizer.step()


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    sigmas=st.lists(st.floats(min_value=0.1, max_value=12.0), min_size=1, max_size=8),
    target_epsilon=st.floats(min_value=0.5, max_value=8.0),
    epochs=st.integers(min_value=1, max_value=3),
    extra_steps=st.integers(min_value=0, max_value=8),
)
def test_random_controller_never_overspends_any_order(sigmas, target_epsilon, epochs, extra_steps):
    model, optimizer, loader = _setup()
    controller = ScriptedController(sigmas, sigma_min=0.1, sigma_max=12.0)
    engine = AdaptivePrivacyEngine()
    model, optimizer, loader = engine.make_private_with_epsilon(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        target_epsilon=target_epsilon,
        target_delta=DELTA,
        epochs=epochs,
        max_grad_norm=1.0,
        controller=controller,
    )
    planned = epochs * 4
    exhausted = False
    for _ in range(planned + extra_steps):
        try:
            _one_step(model, optimizer, loader)
        except PrivacyBudgetExhausted:
            exhausted = True
            break
    history = engine.history
    assert len(history) >= planned  # the planned steps are always affordable (σ_max is above the plan's σ)
    assert exhausted or len(history) == planned + extra_steps
    assert all(r["noise_multiplier"] >= r["sigma_floor"] for r in history)
    # what the accountant booked through opacus' hook (the σ's the noise used), against the fixed budget
    spent = engine.accountant.rdp
    budget = engine.budget_filter.budget
    assert np.all(spent <= budget * (1 + 1e-9)), "an order exceeded its budget"
    assert engine.get_epsilon(DELTA) <= target_epsilon * (1 + 1e-9)
    assert engine.guarantee_epsilon == pytest.approx(target_epsilon)


def test_starting_sigma_is_opacus_and_planned_run_stays_in_budget():
    model, optimizer, loader = _setup()
    engine = AdaptivePrivacyEngine()
    model, optimizer, loader = engine.make_private_with_epsilon(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        target_epsilon=2.0,
        target_delta=DELTA,
        epochs=3,
        max_grad_norm=1.0,
    )
    expected = get_noise_multiplier(
        target_epsilon=2.0, target_delta=DELTA, sample_rate=0.25, epochs=3, accountant="rdp"
    )
    for _ in range(12):
        _one_step(model, optimizer, loader)
    # no controller: opacus' σ, raised to the filter's floor where that is (marginally) higher
    for r in engine.history:
        assert r["noise_multiplier"] == max(expected, r["sigma_floor"])
        assert expected <= r["noise_multiplier"] <= expected * 1.002
    assert engine.get_epsilon(DELTA) <= 2.0
    orders = list(engine.budget_filter.orders)
    spent = sum(
        compute_rdp(q=0.25, noise_multiplier=r["noise_multiplier"], steps=1, orders=orders)
        for r in engine.history
    )  # opacus, independently of the engine's accountant
    assert np.all(spent <= engine.budget_filter.budget * (1 + 1e-9))
    summary = engine.privacy_summary()
    assert summary["guarantee_epsilon"] == pytest.approx(2.0) and summary[
        "odometer_epsilon"
    ] == engine.get_epsilon(DELTA)


def test_controller_below_the_floor_gets_the_floor():
    model, optimizer, loader = _setup()
    controller = ScriptedController([0.3], sigma_min=0.3, sigma_max=10.0)
    engine = AdaptivePrivacyEngine()
    model, optimizer, loader = engine.make_private_with_epsilon(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        target_epsilon=1.0,
        target_delta=DELTA,
        epochs=2,
        max_grad_norm=1.0,
        controller=controller,
    )
    for _ in range(8):
        _one_step(model, optimizer, loader)
    for record, floor in zip(engine.history, controller.floors):
        assert record["sigma_floor"] == floor and floor > 0.3
        assert record["noise_multiplier"] == pytest.approx(floor)
    assert engine.get_epsilon(DELTA) <= 1.0 * (1 + 1e-9)


def test_exhaustion_stops_before_the_step_and_saves_state(tmp_path):
    model, optimizer, loader = _setup()
    path = tmp_path / "exhausted.pt"
    engine = AdaptivePrivacyEngine()
    model, optimizer, loader = engine.make_private_with_epsilon(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        target_epsilon=1.0,
        target_delta=DELTA,
        epochs=1,
        max_grad_norm=1.0,
        sigma_max=12.0,
        checkpoint_path=path,
    )
    with pytest.raises(PrivacyBudgetExhausted):
        for _ in range(200):
            before = [p.detach().clone() for p in model.parameters()]
            _one_step(model, optimizer, loader)
    after = [p.detach() for p in model.parameters()]
    assert all(torch.equal(b, a) for b, a in zip(before, after)), "the refused step changed the model"
    steps = len(engine.history)
    assert steps >= 4  # the planned epoch was paid for
    assert sum(n for _, _, n in engine.accountant.history) == steps  # nothing booked for the refused step
    assert engine.get_epsilon(DELTA) <= 1.0 * (1 + 1e-9)
    assert engine.history[-1]["noise_multiplier"] <= 12.0
    saved = torch.load(path, weights_only=False)
    assert len(saved["adaptive_dp_state_dict"]["history"]) == steps
    fresh_model, fresh_optimizer, fresh_loader = _setup()
    fresh = AdaptivePrivacyEngine()
    fresh_model, fresh_optimizer, _ = fresh.make_private_with_epsilon(
        module=fresh_model,
        optimizer=fresh_optimizer,
        data_loader=fresh_loader,
        target_epsilon=1.0,
        target_delta=DELTA,
        epochs=1,
        max_grad_norm=1.0,
        sigma_max=12.0,
    )
    fresh.load_checkpoint(path=path, module=fresh_model, optimizer=fresh_optimizer)
    assert fresh.get_epsilon(DELTA) == engine.get_epsilon(DELTA)
    with pytest.raises(PrivacyBudgetExhausted):
        _one_step(fresh_model, fresh_optimizer, loader)


def test_budget_and_ceiling_together_warn_nothing_and_report_both():
    model, optimizer, loader = _setup()
    g = torch.Generator().manual_seed(3)
    audit = (torch.randn(16, 4, generator=g), torch.randint(0, 2, (16,), generator=g))
    engine = AdaptivePrivacyEngine()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, optimizer, loader = engine.make_private_with_epsilon(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            target_epsilon=3.0,
            target_delta=DELTA,
            epochs=2,
            max_grad_norm=1.0,
            target_mi=0.2,
            audit_data=audit,
            monitor_every=2,
        )
    assert not [w for w in caught if "formal" in str(w.message)]  # a budget is a formal guarantee
    for _ in range(8):
        _one_step(model, optimizer, loader)
    assert engine.guarantee_epsilon == pytest.approx(3.0)
    assert engine.get_epsilon(DELTA) <= 3.0 * (1 + 1e-9)
    assert all(r["noise_multiplier"] >= r["sigma_floor"] for r in engine.history)
    assert all(math.isfinite(r["mi"]) for r in engine.history if r["mi"] is not None)
