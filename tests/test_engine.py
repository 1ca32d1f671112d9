"""AdaptivePrivacyEngine as a drop-in for opacus' PrivacyEngine, and its per-step machinery.

Truths used: opacus' own PrivacyEngine / RDPAccountant on the same σ history, opacus' pinned RDP value,
the empirical standard deviation of the noise opacus adds, and the indices of the audit split.
"""

from __future__ import annotations

import logging
import math
import warnings

import pytest
import torch
from opacus import PrivacyEngine
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.utils.batch_memory_manager import BatchMemoryManager
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset

from adaptive_dp.accountants.rdp import IncrementalRDPAccountant
from adaptive_dp.leakage.audit import audit_indices
from adaptive_dp.privacy_engine import AdaptivePrivacyEngine
from controllers import LinearDecay, PIDController

pytestmark = pytest.mark.filterwarnings("ignore:target_mi without a privacy budget:UserWarning")


def _setup(*, n: int = 64, batch: int = 16, d: int = 8, classes: int = 3, seed: int = 0, index_feature=False):
    torch.manual_seed(seed)
    x = torch.randn(n, d)
    if index_feature:
        x[:, 0] = torch.arange(n, dtype=torch.float32)  # lets a test recover which example a row is
    y = torch.randint(0, classes, (n,))
    model = nn.Sequential(nn.Linear(d, 16), nn.Tanh(), nn.Linear(16, classes))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    return model, optimizer, DataLoader(TensorDataset(x, y), batch_size=batch)


def _train(model, optimizer, loader, steps: int, criterion=None) -> None:
    criterion = criterion or nn.CrossEntropyLoss()
    done = 0
    while done < steps:
        for xb, yb in loader:
            optimizer.zero_grad()
            criterion(model(xb), yb).backward()
            optimizer.step()
            done += 1
            if done == steps:
                return


def _audit(n: int = 24, d: int = 8, classes: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randint(0, classes, (n,), generator=g)


# ---------------------------------------------------------------------------------------------- drop-in
def test_drop_in_same_types_and_same_epsilon_as_opacus_rdp():
    results = []
    for cls in (PrivacyEngine, AdaptivePrivacyEngine):
        model, optimizer, loader = _setup()
        engine = cls(accountant="rdp")
        out = engine.make_private(
            module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=1.1, max_grad_norm=1.0
        )
        torch.manual_seed(5)
        _train(out[0], out[1], out[2], steps=20)
        results.append((engine, out))
    (opacus_engine, opacus_out), (ours, our_out) = results
    assert len(our_out) == len(opacus_out) == 3
    # the same types, the optimizer being the adaptive subclass of opacus' own choice (dispatch)
    assert all(isinstance(o, type(r)) for o, r in zip(our_out, opacus_out))
    assert type(our_out[1]).__mro__[1:].count(type(opacus_out[1])) == 1
    assert isinstance(ours.accountant, IncrementalRDPAccountant)
    for delta in (1e-5, 1e-3):
        expected = opacus_engine.get_epsilon(delta)
        assert ours.get_epsilon(delta) == pytest.approx(expected, rel=1e-9)
    assert [r["noise_multiplier"] for r in ours.history] == [1.1] * 20
    assert [r["step"] for r in ours.history] == list(range(1, 21))
    assert ours.history[-1]["epsilon"] == pytest.approx(opacus_engine.get_epsilon(1e-5), rel=1e-9)
    # σ fixed in advance: the composition is the guarantee
    assert ours.guarantee_kind == "composition"
    assert ours.guarantee_epsilon == pytest.approx(opacus_engine.get_epsilon(1e-5), rel=1e-9)
    # same model updates: the drop-in changes nothing in the training step itself
    for p, q in zip(opacus_out[0].parameters(), our_out[0].parameters()):
        torch.testing.assert_close(p, q)


def test_pinned_opacus_rdp_value_through_engine_accountant():
    engine = AdaptivePrivacyEngine()  # default accountant "rdp" -> the incremental RDP sum
    hook = engine.accountant.get_optimizer_hook_fn(sample_rate=0.04)

    class _Opt:
        noise_multiplier = 1.5
        accumulated_iterations = 1

    for _ in range(2250):
        hook(_Opt)
    assert engine.get_epsilon(1e-5) == pytest.approx(7.32911, abs=5e-6)


def test_accountant_names():
    assert AdaptivePrivacyEngine(accountant="rdp").accountant.mechanism() == "rdp_incremental"
    assert isinstance(AdaptivePrivacyEngine(accountant="prv").accountant, PRVAccountant)
    assert AdaptivePrivacyEngine(accountant="rdp_incremental").accountant.mechanism() == "rdp_incremental"


def test_user_sigma_untouched_without_controller_and_user_changes_respected():
    model, optimizer, loader = _setup()
    engine = AdaptivePrivacyEngine()
    model, optimizer, loader = engine.make_private(
        module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=0.9, max_grad_norm=1.0
    )
    _train(model, optimizer, loader, steps=3)
    optimizer.noise_multiplier = 1.7  # e.g. opacus' noise scheduler
    _train(model, optimizer, loader, steps=2)
    assert [r["noise_multiplier"] for r in engine.history] == [0.9] * 3 + [1.7] * 2
    assert engine.accountant.history == [(0.9, 0.25, 3), (1.7, 0.25, 2)]


# ---------------------------------------------------------------------------------------------- per-step σ
def test_per_step_sigma_reaches_noise_and_accountant():
    """σ set by a schedule is what the noise uses (empirical std) and what both accountants book."""
    d = 2000
    torch.manual_seed(0)
    model = linear = nn.Linear(d, 4, bias=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    loader = DataLoader(TensorDataset(torch.randn(40, d), torch.zeros(40, dtype=torch.long)), batch_size=10)
    engine = AdaptivePrivacyEngine()
    model, optimizer, loader = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=4.0,
        max_grad_norm=1.0,
        controller="linear",
        sigma_end=0.5,
        total_steps=8,
        loss_reduction="sum",
    )
    stds = []
    for xb, _ in (b for _ in range(4) for b in loader):
        optimizer.zero_grad()
        (0.0 * model(xb).sum()).backward()  # per-sample gradients are 0: p.grad is the noise alone
        optimizer.step()
        stds.append(float(linear.weight.grad.std()))
        if len(stds) == 10:
            break
    sigmas = [r["noise_multiplier"] for r in engine.history]
    assert len(set(sigmas)) > 5 and sigmas[0] == pytest.approx(4.0) and sigmas[-1] == pytest.approx(0.5)
    for sigma, std in zip(sigmas, stds):
        assert std == pytest.approx(sigma * 1.0, rel=0.05)  # 8000 noise draws: ~1 % std error
    reference = RDPAccountant()
    for sigma in sigmas:
        reference.step(noise_multiplier=sigma, sample_rate=0.25)
    for delta in (1e-5, 1e-2):
        assert engine.get_epsilon(delta) == pytest.approx(reference.get_epsilon(delta), rel=1e-9)
    assert [r["epsilon"] for r in engine.history][-1] == pytest.approx(reference.get_epsilon(1e-5), rel=1e-9)


def test_gdp_refuses_a_changing_sigma():
    model, optimizer, loader = _setup()
    engine = AdaptivePrivacyEngine(accountant="gdp")
    with pytest.raises(ValueError, match="accountant='rdp'"):
        engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            controller="linear",
            sigma_end=0.5,
            total_steps=10,
        )


def test_controller_instance_conflicts_are_refused():
    pid = PIDController(0.5, sigma_min=0.5, sigma_max=5.0, noise_multiplier=1.0)
    for kwargs in ({"target_mi": 0.3}, {"sigma_min": 0.2}, {"sigma_max": 8.0}):
        model, optimizer, loader = _setup()
        with pytest.raises(ValueError, match="conflicting settings"):
            AdaptivePrivacyEngine().make_private(
                module=model,
                optimizer=optimizer,
                data_loader=loader,
                noise_multiplier=1.0,
                max_grad_norm=1.0,
                controller=pid,
                audit_data=_audit(),
                **kwargs,
            )
    # the same values are not a conflict; the instance's settings are the engine's
    model, optimizer, loader = _setup()
    engine = AdaptivePrivacyEngine()
    engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        controller=pid,
        audit_data=_audit(),
        target_mi=0.5,
        sigma_max=5.0,
    )
    assert (engine.target_mi, engine.sigma_min, engine.sigma_max) == (0.5, 0.5, 5.0)


def test_target_mi_without_audit_data_names_the_fix():
    model, optimizer, loader = _setup()
    with pytest.raises(ValueError, match="audit_data=.*audit_fraction"):
        AdaptivePrivacyEngine().make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            target_mi=0.5,
        )


def test_feedback_controller_instance_without_audit_data_is_refused():
    model, optimizer, loader = _setup()
    pid = PIDController(0.5, sigma_min=0.5, sigma_max=5.0, noise_multiplier=1.0)
    with pytest.raises(ValueError, match="audit_fraction"):
        AdaptivePrivacyEngine().make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            controller=pid,
        )


def test_prv_accountant_stays_opacus_prv():
    model, optimizer, loader = _setup()
    engine = AdaptivePrivacyEngine(accountant="prv")
    model, optimizer, loader = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=2.0,
        max_grad_norm=1.0,
        controller="linear",
        sigma_end=1.0,
        total_steps=4,
    )
    _train(model, optimizer, loader, steps=6)
    reference = PRVAccountant()
    for record in engine.history:
        reference.step(noise_multiplier=record["noise_multiplier"], sample_rate=0.25)
    sigmas = [r["noise_multiplier"] for r in engine.history]
    # a schedule over 4 planned steps: sigma_start at step 1, exactly sigma_end at step 4, then held
    assert (
        sigmas[0] == pytest.approx(2.0)
        and sigmas[3] == pytest.approx(1.0)
        and sigmas[5] == pytest.approx(1.0)
    )
    assert len(set(sigmas)) == 4
    assert engine.get_epsilon(1e-5) == pytest.approx(reference.get_epsilon(1e-5), rel=1e-9)
    assert all(r["epsilon"] is None for r in engine.history)  # PRV is too slow to ask after every step


@pytest.mark.parametrize("kwargs", [{"grad_sample_mode": "ghost"}, {"wrap_model": False}])
def test_monitor_and_controller_work_with_ghost_clipping_and_unwrapped_models(kwargs):
    model, optimizer, loader = _setup()
    engine = AdaptivePrivacyEngine()
    out = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        audit_data=_audit(),
        target_mi=0.05,
        monitor_every=2,
        criterion=nn.CrossEntropyLoss(),
        **kwargs,
    )
    criterion = out[2] if len(out) == 4 else None
    _train(
        model if not kwargs.get("grad_sample_mode") else out[0], out[1], out[-1], steps=6, criterion=criterion
    )
    readings = [r["mi"] for r in engine.history if r["mi"] is not None]
    assert len(readings) == 3 and all(math.isfinite(m) and m > 0 for m in readings)
    assert engine.history[-1]["noise_multiplier"] > 1.0  # over the ceiling: the PID raised σ


def test_ghost_clipping_without_monitor_still_works():
    model, optimizer, loader = _setup()
    engine = AdaptivePrivacyEngine()
    model, optimizer, criterion, loader = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        grad_sample_mode="ghost",
        criterion=nn.CrossEntropyLoss(),
    )
    _train(model, optimizer, loader, steps=3, criterion=criterion)
    assert len(engine.history) == 3 and len(engine.accountant) == 1


def test_ceiling_without_budget_gets_the_odometer_guarantee_and_no_warning():
    model, optimizer, loader = _setup()
    engine = AdaptivePrivacyEngine()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, optimizer, loader = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            target_mi=0.5,
            audit_data=_audit(),
        )
    assert not [w for w in caught if "formal" in str(w.message)]
    assert engine.guarantee_kind == "renyi-odometer" and engine.guarantee_epsilon is None  # nothing spent yet
    _train(model, optimizer, loader, steps=8)
    summary = engine.privacy_summary()
    composition = engine.get_epsilon(engine.target_delta)
    assert summary["guarantee_epsilon"] == engine.guarantee_epsilon >= composition  # the odometer's overhead
    assert engine.guarantee_epsilon <= 1.6 * composition
    # σ fixed in advance (a schedule, or none): the composition itself is the guarantee
    model, optimizer, loader = _setup()
    plain = AdaptivePrivacyEngine()
    model, optimizer, loader = plain.make_private(
        module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0
    )
    _train(model, optimizer, loader, steps=3)
    assert plain.guarantee_kind == "composition"
    assert plain.guarantee_epsilon == pytest.approx(plain.get_epsilon(1e-5))


# ---------------------------------------------------------------------------------------------- audit split
def test_audit_examples_never_trained_on_and_q_from_carved_set():
    n, batch = 100, 10
    model, optimizer, loader = _setup(n=n, batch=batch, index_feature=True)
    engine = AdaptivePrivacyEngine()
    model, optimizer, dp_loader = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        audit_fraction=0.2,
        monitor_every=1000,
    )
    audit = engine.audit_dataset
    assert isinstance(audit, Subset) and len(audit) == 20
    held_out = set(audit_indices(audit))
    train_subset = dp_loader.dataset
    trained_on = set(audit_indices(train_subset))
    assert held_out.isdisjoint(trained_on) and len(held_out | trained_on) == n
    seen = set()
    for _ in range(30):
        for xb, _ in dp_loader:
            seen.update(int(v) for v in xb[:, 0])
    assert seen and seen.isdisjoint(held_out)
    assert seen <= trained_on
    assert engine.sample_rate == pytest.approx(batch / 80)  # q on the 80 trained examples, not on 100
    assert optimizer.expected_batch_size == batch
    _train(model, optimizer, dp_loader, steps=2)
    assert engine.accountant.history[0][1] == pytest.approx(batch / 80)


def test_schedule_epochs_count_steps_of_the_carved_loader():
    model, optimizer, loader = _setup(n=100, batch=10)
    engine = AdaptivePrivacyEngine()
    engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=2.0,
        max_grad_norm=1.0,
        controller="linear",
        sigma_end=1.0,
        epochs=3,
        audit_fraction=0.2,
    )
    # 80 trained examples in batches of 10: 24 planned steps, so the schedule spans 23 updates (step 1 → 24)
    assert engine.controller.total_steps == 3 * 8 - 1


def test_audit_data_and_fraction_are_exclusive():
    model, optimizer, loader = _setup()
    with pytest.raises(ValueError, match="either audit_data or audit_fraction"):
        AdaptivePrivacyEngine().make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            audit_data=_audit(),
            audit_fraction=0.1,
        )


# ---------------------------------------------------------------------------------------------- monitor loop
def test_readings_every_k_steps_first_before_step_one():
    model, optimizer, loader = _setup()
    engine = AdaptivePrivacyEngine()
    model, optimizer, loader = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        audit_data=_audit(),
        monitor_every=3,
    )
    _train(model, optimizer, loader, steps=7)
    read_at = [r["step"] for r in engine.history if r["mi"] is not None]
    assert read_at == [1, 4, 7]
    assert all(math.isfinite(r["mi"]) and r["mi"] >= 0 for r in engine.history if r["mi"] is not None)
    assert all(r["noise_multiplier"] == 1.0 for r in engine.history)  # monitor only: σ untouched


def test_first_reading_answers_step_one():
    """A leaky start (tiny σ, high MI) is answered already at step 1 by the PID."""
    model, optimizer, loader = _setup()
    engine = AdaptivePrivacyEngine()
    model, optimizer, loader = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=0.05,
        max_grad_norm=1.0,
        audit_data=_audit(),
        target_mi=0.05,
        controller="pid",
        sigma_min=0.05,
        sigma_max=10.0,
    )
    _train(model, optimizer, loader, steps=1)
    first = engine.history[0]
    assert first["mi"] is not None and first["mi"] > 0.05
    assert first["noise_multiplier"] > 0.05
    assert first["controller_error"] == pytest.approx(first["mi"] - engine.controller.setpoint)


@pytest.mark.parametrize("fault", ["raise", "nan"])
def test_monitor_fault_gives_sigma_max_on_that_step(fault, caplog):
    model, optimizer, loader = _setup()
    engine = AdaptivePrivacyEngine()
    model, optimizer, loader = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        audit_data=_audit(),
        target_mi=2.0,
        sigma_min=0.5,
        sigma_max=6.0,
        monitor_every=2,
    )
    real_read = engine.monitor.read
    calls = {"n": 0}

    def faulty_read(**kwargs):
        calls["n"] += 1
        reading = real_read(**kwargs)
        if calls["n"] == 2:  # the reading for step 5 (the first, for step 1, was taken in make_private)
            if fault == "raise":
                raise RuntimeError("injected monitor fault")
            return type(reading)(**{**reading.__dict__, "mi": float("nan")})
        return reading

    engine.monitor.read = faulty_read
    with caplog.at_level(logging.WARNING, logger="adaptive_dp.privacy_engine"):
        _train(model, optimizer, loader, steps=8)
    sigmas = [r["noise_multiplier"] for r in engine.history]
    assert sigmas[4] == 6.0  # step 5: failed closed
    assert all(s < 6.0 for s in sigmas[:4])
    assert math.isnan(engine.history[4]["mi"]) and engine.history[4]["monitor_error"]
    assert any("leakage monitor failed before step 5" in rec.getMessage() for rec in caplog.records)
    assert len(engine.history) == 8  # training went on
    assert math.isfinite(engine.history[6]["mi"])  # next reading valid again


# ---------------------------------------------------------------------------------------------- opacus modes
def test_virtual_steps_are_booked_once():
    model, optimizer, loader = _setup(n=96, batch=32)
    engine = AdaptivePrivacyEngine()
    model, optimizer, loader = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        controller="linear",
        sigma_end=0.5,
        total_steps=6,
    )
    criterion = nn.CrossEntropyLoss()
    physical = 0
    for _ in range(2):
        with BatchMemoryManager(data_loader=loader, max_physical_batch_size=5, optimizer=optimizer) as bmm:
            for xb, yb in bmm:
                optimizer.zero_grad()
                criterion(model(xb), yb).backward()
                optimizer.step()
                physical += 1
    assert physical > 6
    assert len(engine.history) == 6 == sum(n for _, _, n in engine.accountant.history)
    assert [r["step"] for r in engine.history] == list(range(1, 7))
    expected = LinearDecay(noise_multiplier=1.0, sigma_end=0.5, total_steps=5)  # 6 planned steps, 5 updates
    sigmas = [r["noise_multiplier"] for r in engine.history]
    assert sigmas == pytest.approx([expected.sigma_at(t) for t in range(6)])
    assert sigmas[0] == 1.0 and sigmas[-1] == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("grad_sample_mode", "clipping"),
    [("hooks", "flat"), ("functorch", "flat"), ("ew", "flat"), ("hooks", "per_layer"), ("hooks", "adaptive")],
)
def test_modes_and_clipping_with_monitor_and_pid(grad_sample_mode, clipping):
    model, optimizer, loader = _setup()
    n_params = len(list(model.parameters()))
    extra = {}
    max_grad_norm = 1.0
    if clipping == "per_layer":
        max_grad_norm = [0.5] * n_params
    if clipping == "adaptive":
        extra = dict(
            target_unclipped_quantile=0.5,
            clipbound_learning_rate=0.2,
            max_clipbound=4.0,
            min_clipbound=0.1,
            unclipped_num_std=20.0,
        )
    engine = AdaptivePrivacyEngine()
    model, optimizer, loader = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=1.0,
        max_grad_norm=max_grad_norm,
        grad_sample_mode=grad_sample_mode,
        clipping=clipping,
        audit_data=_audit(),
        target_mi=0.5,
        sigma_min=0.5,
        sigma_max=8.0,
        monitor_every=2,
        **extra,
    )
    _train(model, optimizer, loader, steps=5)
    assert len(engine.history) == 5
    readings = [r["mi"] for r in engine.history if r["mi"] is not None]
    assert len(readings) == 3 and all(math.isfinite(m) for m in readings)
    reference = RDPAccountant()
    for r in engine.history:
        reference.step(noise_multiplier=r["noise_multiplier"], sample_rate=0.25)
    assert engine.get_epsilon(1e-5) == pytest.approx(reference.get_epsilon(1e-5), rel=1e-9)


def test_adaptive_clipping_refuses_sigma_max_above_its_limit():
    model, optimizer, loader = _setup()
    with pytest.raises(ValueError, match="unclipped_num_std"):
        AdaptivePrivacyEngine().make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            clipping="adaptive",
            audit_data=_audit(),
            target_mi=0.5,
            sigma_max=8.0,
            target_unclipped_quantile=0.5,
            clipbound_learning_rate=0.2,
            max_clipbound=4.0,
            min_clipbound=0.1,
            unclipped_num_std=2.0,
        )
