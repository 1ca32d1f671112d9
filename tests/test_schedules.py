"""Open-loop σ schedules (Wei & Liu 2021) and their opacus noise-scheduler adapters."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from controllers import (
    ConstantNoise,
    CyclicDecay,
    ExponentialDecay,
    LinearDecay,
    StaircaseDecay,
    build_controller,
)

DECAYS = [LinearDecay, StaircaseDecay, ExponentialDecay, CyclicDecay]
sigmas = st.floats(min_value=1e-3, max_value=1e3, allow_nan=False, allow_infinity=False)


def _values(schedule, extra: int = 3) -> np.ndarray:
    return np.array([schedule.sigma_at(t) for t in range(schedule.total_steps + 1 + extra)])


@settings(max_examples=60, deadline=None)
@given(cls=st.sampled_from(DECAYS), start=sigmas, end=sigmas, total=st.integers(1, 300))
def test_endpoints_exact_and_monotone(cls, start, end, total):
    if cls is CyclicDecay and end > start:
        start, end = end, start
    schedule = cls(noise_multiplier=start, sigma_end=end, total_steps=total)
    values = _values(schedule)
    assert values[0] == start
    assert np.all(values[total:] == end)  # exactly σ_T at T, held afterwards
    steps = np.diff(values)
    assert np.all(steps <= 0) if end <= start else np.all(steps >= 0)
    assert np.all((values >= min(start, end)) & (values <= max(start, end)))


def test_formulas_against_numpy():
    total = 50
    start, end = 2.0, 0.65
    np.testing.assert_allclose(
        _values(LinearDecay(noise_multiplier=start, sigma_end=end, total_steps=total), 0),
        np.linspace(start, end, total + 1),
        rtol=1e-12,
    )
    np.testing.assert_allclose(
        _values(ExponentialDecay(noise_multiplier=start, sigma_end=end, total_steps=total), 0),
        np.geomspace(start, end, total + 1),
        rtol=1e-12,
    )
    t = np.arange(total + 1)
    np.testing.assert_allclose(
        _values(CyclicDecay(noise_multiplier=start, sigma_end=end, total_steps=total), 0),
        start * np.cos(np.arccos(end / start) * t / total),
        rtol=1e-12,
    )


def test_staircase_holds_each_stair_and_has_the_right_number_of_levels():
    schedule = StaircaseDecay(noise_multiplier=3.0, sigma_end=1.0, total_steps=100, step_size=25)
    values = _values(schedule, 0)
    # four stairs of 25 steps then σ_T at t = 100: levels 3, 2.5, 2, 1.5, 1
    np.testing.assert_allclose(np.unique(values)[::-1], [3.0, 2.5, 2.0, 1.5, 1.0])
    for stair in range(4):
        assert np.all(values[stair * 25 : (stair + 1) * 25] == values[stair * 25])
    assert StaircaseDecay(noise_multiplier=3.0, sigma_end=1.0, total_steps=100).step_size == 10


def test_update_ignores_measurement_and_honours_floor():
    schedule = LinearDecay(noise_multiplier=2.0, sigma_end=0.5, total_steps=10)
    for measurement in (None, float("nan"), float("inf"), -5.0, 1e9):
        assert schedule.update(measurement, 4) == schedule.sigma_at(4)
    assert schedule.update(0.3, 8, sigma_floor=1.7) == 1.7
    assert schedule.update(0.3, 8, sigma_floor=0.1) == schedule.sigma_at(8)
    assert schedule.update(None, 10, sigma_floor=5.0) == 5.0  # the floor wins over sigma_max
    assert schedule.sigma == 0.5


def test_constant_noise():
    constant = ConstantNoise(1.3)
    assert [constant.update(m, t) for t, m in enumerate([None, 0.1, float("nan"), 9.0])] == [1.3] * 4
    assert constant.update(None, 7, sigma_floor=2.0) == 2.0


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        (dict(noise_multiplier=0.0, sigma_end=1.0, total_steps=10), "noise_multiplier"),
        (dict(noise_multiplier=1.0, sigma_end=0.0, total_steps=10), "sigma_end"),
        (dict(noise_multiplier=1.0, sigma_end=-1.0, total_steps=10), "sigma_end"),
        (dict(noise_multiplier=1.0, sigma_end=0.5, total_steps=0), "total_steps"),
        (dict(noise_multiplier=1.0, sigma_end=0.5, total_steps=10, sigma_min=0.6), "sigma_end"),
        (
            dict(noise_multiplier=1.0, sigma_end=0.5, total_steps=10, sigma_min=2.0, sigma_max=1.0),
            "sigma_min",
        ),
    ],
)
def test_invalid_construction_names_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        LinearDecay(**kwargs)


def test_invalid_schedule_specific_arguments():
    with pytest.raises(ValueError, match="sigma_end"):
        CyclicDecay(noise_multiplier=1.0, sigma_end=2.0, total_steps=10)
    with pytest.raises(ValueError, match="step_size"):
        StaircaseDecay(noise_multiplier=2.0, sigma_end=1.0, total_steps=10, step_size=11)
    with pytest.raises(ValueError, match="noise_multiplier"):
        ConstantNoise(float("nan"))


@pytest.mark.parametrize("name", ["linear", "staircase", "exponential", "cyclic"])
def test_factory_builds_schedules(name):
    schedule = build_controller(
        name, target_mi=None, sigma_min=0.1, sigma_max=10.0, noise_multiplier=2.0, total_steps=40
    )
    assert schedule.sigma_at(0) == 2.0
    assert schedule.sigma_at(40) == pytest.approx(2.0 / 3.0)  # default σ_T = σ₀/3
    explicit = build_controller(
        name,
        target_mi=0.5,
        sigma_min=0.1,
        sigma_max=10.0,
        noise_multiplier=2.0,
        total_steps=40,
        sigma_end=0.8,
    )
    assert explicit.sigma_at(40) == 0.8 and explicit.sigma_min == 0.1 and explicit.sigma_max == 10.0
    # the default σ_T is not under sigma_min
    assert build_controller(
        name, target_mi=None, sigma_min=1.5, sigma_max=10.0, noise_multiplier=2.0, total_steps=40
    ).sigma_at(40) == pytest.approx(1.5)
    with pytest.raises(ValueError, match="total_steps"):
        build_controller(name, target_mi=None, sigma_min=0.1, sigma_max=10.0, noise_multiplier=2.0)


def test_state_dict_round_trip():
    schedule = StaircaseDecay(noise_multiplier=2.0, sigma_end=1.0, total_steps=20, step_size=4)
    schedule.update(None, 9)
    restored = StaircaseDecay(noise_multiplier=2.0, sigma_end=1.0, total_steps=20, step_size=4)
    restored.load_state_dict(json.loads(json.dumps(schedule.state_dict())))
    assert restored.sigma == schedule.sigma == schedule.sigma_at(9)
    with pytest.raises(ValueError, match="linear"):
        LinearDecay(noise_multiplier=2.0, sigma_end=1.0, total_steps=20).load_state_dict(
            schedule.state_dict()
        )


# ---- opacus adapters -------------------------------------------------------------------------------------
def _dp_optimizer(noise_multiplier: float = 2.0):
    from opacus.optimizers import DPOptimizer

    model = torch.nn.Linear(3, 2)
    return DPOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1),
        noise_multiplier=noise_multiplier,
        max_grad_norm=1.0,
        expected_batch_size=4,
    )


@pytest.mark.parametrize(
    "cls_name", ["LinearDecayNoise", "ExponentialDecayNoise", "CyclicDecayNoise", "StaircaseDecayNoise"]
)
def test_opacus_adapter_sets_noise_multiplier_each_step(cls_name):
    from opacus.schedulers.noise_scheduler import _NoiseScheduler

    from adaptive_dp import schedulers

    optimizer = _dp_optimizer(2.0)
    scheduler = getattr(schedulers, cls_name)(optimizer, sigma_end=0.5, total_steps=8)
    assert isinstance(scheduler, _NoiseScheduler)
    seen = [optimizer.noise_multiplier]
    for _ in range(10):
        scheduler.step()
        seen.append(optimizer.noise_multiplier)
    expected = [scheduler.schedule.sigma_at(t) for t in range(11)]
    assert seen == expected
    assert seen[0] == 2.0 and seen[8] == 0.5 and seen[10] == 0.5
    assert all(b <= a for a, b in zip(seen, seen[1:]))

    # resume: a fresh scheduler loaded from the state continues identically
    state = json.loads(json.dumps(scheduler.state_dict()))
    other = getattr(schedulers, cls_name)(_dp_optimizer(2.0), sigma_end=0.5, total_steps=8)
    other.load_state_dict(state)
    other.step()
    scheduler.step()
    assert other.optimizer.noise_multiplier == optimizer.noise_multiplier


def test_opacus_adapter_rejects_a_non_schedule_and_plain_optimizer():
    from adaptive_dp.schedulers import LinearDecayNoise, ScheduleNoise
    from controllers import PIDController

    with pytest.raises(ValueError, match="schedule"):
        ScheduleNoise(_dp_optimizer(), PIDController(0.5, sigma_min=0.1, sigma_max=2.0, noise_multiplier=1.0))
    plain = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)
    with pytest.raises(ValueError, match="noise_multiplier"):
        LinearDecayNoise(plain, sigma_end=0.5, total_steps=3)


# ---- renamed keywords (engine v2: σ₀ is noise_multiplier everywhere) -----------------------------------
@pytest.mark.parametrize("cls", DECAYS)
def test_sigma_start_is_a_deprecated_name_of_noise_multiplier(cls):
    with pytest.warns(
        DeprecationWarning, match="sigma_start= is deprecated, use noise_multiplier="
    ) as record:
        old = cls(sigma_start=2.0, sigma_end=0.65, total_steps=1000)  # DESIGN.md's contract line
    assert record[0].filename == __file__  # points at the caller
    new = cls(noise_multiplier=2.0, sigma_end=0.65, total_steps=1000)
    assert old.config() == new.config() and old.config()["noise_multiplier"] == 2.0
    assert [old.sigma_at(t) for t in range(0, 1001, 50)] == [new.sigma_at(t) for t in range(0, 1001, 50)]
    with pytest.warns(DeprecationWarning, match="sigma_start"):
        assert old.sigma_start == 2.0
    with pytest.raises(TypeError, match="both"):
        cls(noise_multiplier=2.0, sigma_start=2.0, sigma_end=0.65, total_steps=10)
    with pytest.raises(TypeError, match="noise_multiplier"):
        cls(sigma_end=0.65, total_steps=10)


def test_constant_noise_names_and_config_rebuilds_it():
    with pytest.warns(DeprecationWarning, match="sigma= is deprecated"):
        assert ConstantNoise(sigma=1.3).sigma == 1.3
    constant = ConstantNoise(noise_multiplier=1.3, total_steps=7, sigma_min=1.0, sigma_max=2.0)
    assert ConstantNoise(**constant.config()).config() == constant.config()
    staircase = StaircaseDecay(noise_multiplier=3.0, sigma_end=1.0, total_steps=100, step_size=25)
    assert StaircaseDecay(**staircase.config()).config() == staircase.config()


def test_opacus_adapter_noise_multiplier_and_deprecated_sigma_start():
    from adaptive_dp.schedulers import LinearDecayNoise

    explicit = LinearDecayNoise(_dp_optimizer(2.0), noise_multiplier=3.0, sigma_end=1.0, total_steps=4)
    assert explicit.optimizer.noise_multiplier == 3.0 and explicit.schedule.noise_multiplier == 3.0
    with pytest.warns(DeprecationWarning, match="sigma_start= is deprecated") as record:
        old = LinearDecayNoise(_dp_optimizer(2.0), sigma_start=3.0, sigma_end=1.0, total_steps=4)
    assert record[0].filename == __file__  # points at the caller, not at adaptive_dp/schedulers.py
    assert old.schedule.config() == explicit.schedule.config()
