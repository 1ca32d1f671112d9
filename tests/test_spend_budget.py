"""``spend_budget``: spend what a binding leakage ceiling leaves of an ε budget (issue 15).

Truths used: opacus' ``compute_rdp`` / ``RDPAccountant`` fed the (σ, q) history the engine really used (never the
filter's own bookkeeping), the Poisson batches the loader really drew, and the filter's budget B(α).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis.rdp import compute_rdp
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from train_helpers import run_cli

from adaptive_dp.accountants.filter import RATE_GRID_RATIO, PrivacyBudgetExhausted, RenyiFilter
from adaptive_dp.control.spend import SpendLimitReached
from adaptive_dp.privacy_engine import AdaptivePrivacyEngine
from adaptive_dp.training.config import TrainConfig
from adaptive_dp.training.tracking import read_history

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

DELTA = 1e-5
N, BATCH, EPOCHS, TARGET = 400, 20, 3, 4.0  # q_base = 0.05, 60 planned steps


def _opacus_rdp(history, orders) -> np.ndarray:
    """Σ_t ρ(σ_t, q_t) at every order, by opacus' own routine."""
    return sum(compute_rdp(q=q, noise_multiplier=s, steps=n, orders=list(orders)) for s, q, n in history)


# ------------------------------------------------------------------------------------- the filter with per-step q


def _filter(**kw) -> RenyiFilter:
    return RenyiFilter(target_epsilon=2.0, target_delta=DELTA, sample_rate=0.02, planned_steps=20, **kw)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    steps=st.lists(
        st.tuples(st.floats(0.3, 5.0), st.sampled_from([0.02, 0.1, 1.0]), st.booleans()),
        min_size=1,
        max_size=25,
    )
)
def test_filter_never_exceeds_the_budget_under_adversarial_sigma_and_q(steps):
    f = _filter()
    booked = []
    for sigma, q, use_floor in steps:
        if use_floor:  # the engine's path: σ raised to the floor at the step's own q never fails
            floor = f.floor(sigma_max=5.0, sample_rate=q)
            if not math.isfinite(floor):  # no σ ≤ 5 pays the rest of the plan at q: the engine stops here
                continue
            sigma = max(sigma, floor)
            f.charge(sigma, sample_rate=q)
            booked.append((sigma, q, 1))
            continue
        try:  # an adversary charging whatever it likes: refused or within budget
            f.charge(sigma, sample_rate=q)
            booked.append((sigma, q, 1))
        except PrivacyBudgetExhausted:
            pass
    spent = _opacus_rdp(booked, f.orders) if booked else np.zeros(f.orders.size)
    assert np.all(spent <= f.budget * (1 + 1e-9))
    assert f.steps == len(booked)
    assert [(s, q) for s, q, c in f.history for _ in range(c)] == [(s, q) for s, q, _ in booked]


def test_solved_rate_is_the_largest_grid_rate_that_pays():
    f = _filter()
    for _ in range(5):
        f.charge(2.0, sample_rate=0.02)
    n = f.remaining_steps
    q = f.max_sample_rate(2.0, max_rate=0.5)
    k = round(math.log(q / 0.02) / math.log(RATE_GRID_RATIO))
    assert q == pytest.approx(0.02 * RATE_GRID_RATIO**k) and q > 0.02
    spent = _opacus_rdp([(s, r, c) for s, r, c in f.history], f.orders)
    pays = spent + n * compute_rdp(q=q, noise_multiplier=2.0, steps=1, orders=list(f.orders))
    assert np.all(pays <= f.budget)
    up = f.rate_at(k + 1)
    over = spent + n * compute_rdp(q=up, noise_multiplier=2.0, steps=1, orders=list(f.orders))
    assert np.any(over > f.budget)  # the next grid rate up does not pay
    # the cap wins, and more noise buys a higher rate
    assert f.max_sample_rate(2.0, max_rate=0.03) <= 0.03
    assert f.max_sample_rate(3.0, max_rate=0.5) > q


def test_solved_rate_is_the_plan_rate_at_the_uniform_sigma():
    f = _filter()
    assert f.max_sample_rate(f.sigma_uniform, max_rate=1.0) == 0.02
    for _ in range(7):
        f.charge(f.floor(sigma_max=10.0))
        assert f.max_sample_rate(f.floor(sigma_max=10.0), max_rate=1.0) == 0.02
    assert f.max_sample_rate(0.5 * f.sigma_uniform, max_rate=1.0) == 0.02  # never below the base rate


def test_filter_state_round_trips_per_step_rates_and_reads_old_states():
    f = _filter()
    f.charge(2.0, sample_rate=0.05)
    f.charge(2.0)
    g = _filter()
    g.load_state_dict(f.state_dict())
    assert g.history == [(2.0, 0.05, 1), (2.0, 0.02, 1)] and np.array_equal(g.spent, f.spent)
    old = {**f.state_dict(), "history": [(2.0, 2)]}  # a state saved before per-step rates
    g.load_state_dict(old)
    assert g.history == [(2.0, 0.02, 2)]


# ------------------------------------------------------------------------------------------------- the engine


class FixedSigma:
    """A controller (the engine's protocol) holding one σ, raised to the budget's floor: a binding ceiling."""

    def __init__(self, sigma: float):
        self.sigma, self.sigma_min, self.sigma_max = sigma, 0.3, 10.0

    def update(self, measurement, step, *, sigma_floor=None):
        return self.sigma if sigma_floor is None else max(self.sigma, sigma_floor)

    def reset(self):
        pass

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def _private(mode, *, sigma=1.5, seed=0, **kw):
    torch.manual_seed(seed)
    model = nn.Linear(4, 2)
    data = TensorDataset(torch.randn(N, 4), torch.randint(0, 2, (N,)))
    loader = DataLoader(data, batch_size=BATCH)
    engine = AdaptivePrivacyEngine()
    model, optimizer, loader = engine.make_private_with_epsilon(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=loader,
        target_epsilon=TARGET,
        target_delta=DELTA,
        epochs=EPOCHS,
        max_grad_norm=1.0,
        controller=FixedSigma(sigma),
        spend_budget=mode,
        **kw,
    )
    return engine, model, optimizer, loader


def _train(model, optimizer, loader, *, epochs: int, on_step=None):
    """Train until the epochs end or the engine stops; returns (batch sizes drawn, the exception that stopped)."""
    sizes = []
    try:
        for _ in range(epochs):
            for x, y in loader:
                sizes.append(len(y))
                optimizer.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
                optimizer.step()
                if on_step is not None:
                    on_step()
    except PrivacyBudgetExhausted as exc:
        return sizes, exc
    return sizes, None


@pytest.fixture(scope="module")
def sample_rate_run():
    engine, model, optimizer, loader = _private("sample-rate")
    divisors = []
    sizes, stop = _train(
        model,
        optimizer,
        loader,
        epochs=EPOCHS,
        on_step=lambda: divisors.append(optimizer.expected_batch_size),
    )
    return engine, sizes, stop, divisors


def test_sample_rate_mode_raises_q_and_the_batches_follow(sample_rate_run):
    engine, sizes, stop, divisors = sample_rate_run
    rates = [r["sample_rate"] for r in engine.history]
    assert stop is None and len(rates) == len(sizes) == 60  # the plan's steps, no more
    assert rates[0] == 0.05 and min(rates) >= 0.05 and max(rates) <= 4 * 0.05
    assert np.mean(rates) > 1.3 * 0.05  # σ = 1.5 is far above the floor: q rises
    # each step's q was the sampler's when its batch was drawn: Σ|B_t| ~ Poisson-binomial with mean Σ N q_t
    expected, std = sum(N * q for q in rates), math.sqrt(sum(N * q * (1 - q) for q in rates))
    assert abs(sum(sizes) - expected) < 4 * std
    assert abs(sum(sizes) - N * 0.05 * len(sizes)) > 8 * std  # not the base rate's batches
    # opacus divides the noisy sum by int(N · q) of the next batch, set with the sampler's q
    assert divisors[:-1] == [int(N * q) for q in rates[1:]]


def test_sample_rate_mode_books_each_steps_sigma_and_q(sample_rate_run):
    engine, *_ = sample_rate_run
    booked = [(r["noise_multiplier"], r["sample_rate"]) for r in engine.history]
    assert all(s >= 1.5 for s, _ in booked)  # the controller's σ, never lowered
    opacus = RDPAccountant()
    for sigma, q in booked:
        opacus.step(noise_multiplier=sigma, sample_rate=q)
    assert engine.accountant.history == opacus.history  # (σ, q, steps) merged the same way
    assert engine.get_epsilon(DELTA) == pytest.approx(opacus.get_epsilon(DELTA), rel=1e-9)
    f = engine.budget_filter
    spent = _opacus_rdp([(s, q, 1) for s, q in booked], f.orders)
    assert np.all(spent <= f.budget * (1 + 1e-9))
    assert np.max(spent / f.budget) >= 0.99  # the budget is spent by the end of the plan
    assert engine.guarantee_epsilon <= TARGET and engine.get_epsilon(DELTA) <= TARGET
    assert [r["guarantee_epsilon"] for r in engine.history] == [engine.guarantee_epsilon] * 60
    summary = engine.privacy_summary()
    assert summary["spend_budget"] == "sample-rate" and summary["steps_past_plan"] == 0
    assert summary["compute_vs_plan"] == pytest.approx(np.mean([q for _, q in booked]) / 0.05)


def test_without_spend_budget_q_and_the_divisor_stay_the_plans():
    engine, model, optimizer, loader = _private(None)
    _train(model, optimizer, loader, epochs=1)
    assert {r["sample_rate"] for r in engine.history} == {0.05}
    assert optimizer.expected_batch_size == int(N * 0.05) and engine.privacy_summary()["spend_budget"] is None
    assert engine.budget_filter.spent_fraction() < 0.5  # what the ceiling leaves unspent


def test_steps_mode_trains_past_the_plan_until_the_budget_is_spent():
    engine, model, optimizer, loader = _private("steps")
    guarantee = engine.budget_filter.guarantee_epsilon
    _, stop = _train(model, optimizer, loader, epochs=20)
    steps = len(engine.history)
    assert 60 < steps <= 4 * 60 and isinstance(stop, PrivacyBudgetExhausted)
    assert all(r["noise_multiplier"] >= 1.5 for r in engine.history)  # never below the controller's σ
    assert all(r["sample_rate"] == 0.05 for r in engine.history)
    assert engine.guarantee_epsilon == guarantee <= TARGET and engine.get_epsilon(DELTA) <= TARGET
    spent = _opacus_rdp(
        [(r["noise_multiplier"], 0.05, 1) for r in engine.history], engine.budget_filter.orders
    )
    assert np.all(spent <= engine.budget_filter.budget * (1 + 1e-9))
    assert engine.privacy_summary()["steps_past_plan"] == steps - 60


def test_steps_mode_stops_at_its_compute_cap():
    engine, model, optimizer, loader = _private("steps", spend_limit=1.5)
    _, stop = _train(model, optimizer, loader, epochs=20)
    assert isinstance(stop, SpendLimitReached) and len(engine.history) == 90


def test_sample_rate_state_survives_a_checkpoint(tmp_path):
    engine, model, optimizer, loader = _private("sample-rate")
    _train(model, optimizer, loader, epochs=1)
    rate = engine.history[-1]["sample_rate"]
    next_rate = loader.batch_sampler.sample_rate
    assert next_rate > 0.05 and optimizer.step_sample_rate == next_rate
    engine.save_checkpoint(path=tmp_path / "c.pt", module=model, optimizer=optimizer)
    fresh, model2, optimizer2, loader2 = _private("sample-rate", seed=1)
    assert loader2.batch_sampler.sample_rate == 0.05
    fresh.load_checkpoint(path=tmp_path / "c.pt", module=model2, optimizer=optimizer2)
    assert loader2.batch_sampler.sample_rate == next_rate == optimizer2.step_sample_rate
    assert optimizer2.expected_batch_size == int(N * next_rate) and rate >= 0.05
    assert fresh.budget_filter.history == engine.budget_filter.history
    assert np.array_equal(fresh.budget_filter.spent, engine.budget_filter.spent)


# ------------------------------------------------------------------------------------------------------ errors


def test_spend_budget_needs_a_budget_and_a_known_mode():
    model = nn.Linear(4, 2)
    loader = DataLoader(TensorDataset(torch.randn(N, 4), torch.randint(0, 2, (N,))), batch_size=BATCH)
    with pytest.raises(ValueError, match="make_private_with_epsilon"):
        AdaptivePrivacyEngine().make_private(
            module=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=loader,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            spend_budget="steps",
        )
    with pytest.raises(ValueError, match="spend_budget must be"):
        _private("more")
    with pytest.raises(ValueError, match="spend_limit must be"):
        _private("steps", spend_limit=1.0)
    with pytest.raises(ValueError, match="spend_limit caps"):
        _private(None, spend_limit=2.0)


def test_sample_rate_mode_refuses_workers_other_accountants_and_ddp(monkeypatch):
    model = nn.Linear(4, 2)
    data = TensorDataset(torch.randn(N, 4), torch.randint(0, 2, (N,)))

    def make(engine, loader):
        return engine.make_private_with_epsilon(
            module=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=loader,
            target_epsilon=TARGET,
            target_delta=DELTA,
            epochs=EPOCHS,
            max_grad_norm=1.0,
            spend_budget="sample-rate",
        )

    with pytest.raises(ValueError, match="num_workers=0"):
        make(AdaptivePrivacyEngine(), DataLoader(data, batch_size=BATCH, num_workers=2))
    with pytest.raises(ValueError, match="accountant='rdp'"):
        make(AdaptivePrivacyEngine(accountant="prv"), DataLoader(data, batch_size=BATCH))
    import adaptive_dp.distributed as ddp

    monkeypatch.setattr(ddp, "is_distributed", lambda: True)
    with pytest.raises(NotImplementedError, match="one process"):
        make(AdaptivePrivacyEngine(), DataLoader(data, batch_size=BATCH))


def test_train_config_refuses_spend_budget_without_a_budget():
    with pytest.raises(ValueError, match="--target-epsilon"):
        TrainConfig(spend_budget="steps").validate()
    with pytest.raises(ValueError, match="unknown spend_budget"):
        TrainConfig(spend_budget="epochs", target_epsilon=4.0).validate()
    with pytest.raises(ValueError, match="--num-workers 0"):
        TrainConfig(spend_budget="sample-rate", target_epsilon=4.0, num_workers=1).validate()
    TrainConfig(spend_budget="sample-rate", target_epsilon=4.0, spend_limit=2.0).validate()


# --------------------------------------------------------------------------------------------------------- CLI


def test_cli_spend_budget_steps_round_trip(tmp_path, capsys):
    """A schedule above the floor leaves budget at the end of the plan: --spend-budget steps trains past it."""
    argv = ["--dataset", "digits", "--epochs", "1", "--batch-size", "256", "--no-progress"]
    argv += ["--target-epsilon", "4", "--controller", "linear", "--sigma-end", "3", "--audit-fraction", "0"]
    argv += [
        "--spend-budget",
        "steps",
        "--spend-limit",
        "2",
        "--out",
        str(tmp_path),
        "--wandb-mode",
        "disabled",
    ]
    argv += ["--device", "cpu"]
    assert run_cli(argv) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    history = read_history(tmp_path)
    planned = summary["planned_steps"]
    assert summary["spend_budget"] == "steps" and summary["config"]["spend_budget"] == "steps"
    assert summary["steps"] == len(history) == planned + summary["steps_past_plan"] > planned
    assert summary["steps"] <= 2 * planned and summary["guarantee_epsilon"] <= 4.0
    assert {r["epoch"] for r in history} == {1, 2}  # the extra epoch ran
    assert all(r["guarantee_epsilon"] == summary["guarantee_epsilon"] for r in history)
    assert [r["steps_past_plan"] for r in history] == [max(r["step"] - planned, 0) for r in history]
    assert "steps past the plan" in capsys.readouterr().out


def test_cli_sample_rate_run_resumes_exactly(tmp_path, monkeypatch):
    """Crash after the first epoch's checkpoint, resume: same q, batches, σ and weights as the run without a crash."""
    from train_helpers import tiny_config

    from adaptive_dp.training import loop as training
    from adaptive_dp.training.checkpoint import load_checkpoint

    options = dict(
        epochs=2,
        target_epsilon=4.0,
        controller="linear",
        sigma_end=3.0,
        audit_fraction=0.0,
        spend_budget="sample-rate",
        log_private_metrics=True,
    )
    whole = training.train(tiny_config(tmp_path / "whole", **options), progress=False)
    real = training.save_run_checkpoint

    def save_then_crash(run, extra):
        written = real(run, extra)
        if run.progress.epochs and not extra.get("complete", False):
            raise KeyboardInterrupt
        return written

    with monkeypatch.context() as m:
        m.setattr(training, "save_run_checkpoint", save_then_crash)
        with pytest.raises(KeyboardInterrupt):
            training.train(tiny_config(tmp_path / "cut", **options), progress=False)
    resumed = training.resume(tmp_path / "cut", progress=False)
    names = ("step", "noise_multiplier", "sample_rate", "batch_size", "epsilon", "guarantee_epsilon")
    expected = [tuple(r[n] for n in names) for r in read_history(tmp_path / "whole")]
    assert [tuple(r[n] for n in names) for r in read_history(tmp_path / "cut")] == expected
    assert max(r[2] for r in expected) > min(r[2] for r in expected)  # q did change
    assert resumed["mean_sample_rate"] == whole["mean_sample_rate"] > whole["base_sample_rate"]
    final, cut = load_checkpoint(tmp_path / "whole"), load_checkpoint(tmp_path / "cut")
    for name, tensor in final["model_state_dict"].items():
        assert torch.equal(cut["model_state_dict"][name], tensor), name


def test_step_records_carry_the_guarantee_to_wandb():
    from adaptive_dp.training.records import make_step_record
    from adaptive_dp.training.tracking import _wandb_payload

    record = make_step_record(
        step=3, epoch=1, noise_multiplier=1.2, epsilon=0.5, sample_rate=0.05, lr=0.1, guarantee_epsilon=4.0
    )
    payload = _wandb_payload(record)
    assert payload["privacy/guarantee_epsilon"] == 4.0 and payload["privacy/epsilon"] == 0.5


def test_a_sample_rate_changed_from_outside_is_refused_before_the_step():
    engine, model, optimizer, loader = _private("sample-rate")
    loader.batch_sampler.sample_rate = 0.5  # someone else's change: the filter would book a q the batch lacks
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="only the engine sets it"):
        _train(model, optimizer, loader, epochs=1)
    assert engine.history == [] and engine.budget_filter.steps == 0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
