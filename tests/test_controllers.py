"""Feedback controllers: protocol, safety properties (hypothesis), fail-closed, floor, state, registry, renames."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controllers import (
    CONTROLLERS,
    FEEDBACK,
    SCHEDULES,
    ConstantNoise,
    Controller,
    CyclicDecay,
    ExponentialDecay,
    FeedbackController,
    LinearDecay,
    PIDController,
    PredictiveController,
    StaircaseDecay,
    ThresholdController,
    build_controller,
    register_controller,
)

TARGET, LOW, HIGH = 0.5, 0.05, 8.0


def _pid(**options):
    return PIDController(TARGET, sigma_min=LOW, sigma_max=HIGH, noise_multiplier=1.0, **options)


def _threshold(**options):
    return ThresholdController(TARGET, sigma_min=LOW, sigma_max=HIGH, noise_multiplier=1.0, **options)


def _predictive(**options):
    return PredictiveController(TARGET, sigma_min=LOW, sigma_max=HIGH, noise_multiplier=1.0, **options)


MAKERS = {"pid": _pid, "threshold": _threshold, "predictive": _predictive}


def _capacity_curve(scale: float, stderr: float):
    """MI(σ) = scale/(2σ²) nats (the capacity bound's shape), constant stderr."""
    return lambda sigma: (scale / (2.0 * sigma**2), stderr)


measurements = st.one_of(
    st.none(),
    st.just(float("nan")),
    st.sampled_from([float("inf"), float("-inf"), 1e308, -1e308, 0.0, TARGET]),
    st.floats(min_value=-10.0, max_value=50.0, allow_nan=False),
)
floors = st.one_of(st.none(), st.floats(min_value=0.0, max_value=3 * HIGH, allow_nan=False))
curves = st.one_of(
    st.none(),
    st.builds(
        _capacity_curve, st.floats(min_value=0.0, max_value=50.0), st.floats(min_value=0.0, max_value=1.0)
    ),
    st.just(lambda sigma: (float("nan"), 0.1)),
)


@settings(max_examples=40, deadline=None)
@given(
    kind=st.sampled_from(sorted(MAKERS)),
    sequence=st.lists(st.tuples(measurements, floors, curves), max_size=60),
)
def test_sigma_always_finite_bounded_and_not_under_the_floor(kind, sequence):
    controller = MAKERS[kind]()
    for step, (measurement, floor, curve) in enumerate(sequence, start=1):
        before = controller.state_dict()
        sigma = controller.update(measurement, step, sigma_floor=floor, mi_curve=curve)
        assert math.isfinite(sigma)
        assert LOW <= sigma <= max(HIGH, floor or 0.0)
        assert floor is None or sigma >= floor
        assert LOW <= controller.sigma <= HIGH
        if measurement is None:
            assert controller.state_dict() == before  # None = hold
            assert sigma == max(controller.sigma, floor or 0.0)
        elif not math.isfinite(measurement):
            assert controller.sigma == HIGH  # fail closed
        json.dumps(controller.state_dict(), allow_nan=False)  # plain JSON, no NaN sneaking in


@settings(max_examples=40, deadline=None)
@given(sequence=st.lists(st.tuples(measurements, floors), max_size=60), cooldown=st.integers(0, 5))
def test_threshold_never_lowers_sigma_over_the_ceiling(sequence, cooldown):
    controller = _threshold(cooldown=cooldown)
    for step, (measurement, floor) in enumerate(sequence, start=1):
        before = controller.sigma
        controller.update(measurement, step, sigma_floor=floor)
        if measurement is not None and math.isfinite(measurement) and measurement > TARGET:
            assert controller.sigma >= before
            assert controller.sigma >= min(HIGH, before * 1.5) * (1 - 1e-12)  # at least one raise


def test_fail_closed_until_next_valid_reading_and_counts_faults():
    for make in MAKERS.values():
        controller = make()
        controller.update(0.1, 10)
        own = controller.sigma
        assert controller.update(float("nan"), 20) == HIGH
        assert controller.update(None, 21) == HIGH  # held until a valid reading
        assert controller.update(float("inf"), 30) == HIGH
        assert controller.faults == 2 and controller.failed and controller.last_error is None
        # a valid (low) reading taken while failed closed: resume from the own σ, never lower it
        sigma = controller.update(0.0, 40)
        assert not controller.failed and controller.faults == 2
        assert sigma == pytest.approx(own)
        assert controller.last_error == pytest.approx(0.0 - controller.setpoint)


def test_floor_wins_over_sigma_max_and_none_keeps_the_floor():
    for make in MAKERS.values():
        controller = make()
        assert controller.update(None, 1, sigma_floor=2 * HIGH) == 2 * HIGH
        assert controller.update(100.0, 2, sigma_floor=2 * HIGH) == 2 * HIGH
        assert controller.sigma <= HIGH


def test_pid_moves_sigma_the_right_way_and_respects_the_move_limit():
    controller = _pid()
    up = controller.update(5.0, 10)  # far over the ceiling
    assert up == pytest.approx(1.5)  # the move limit (max_step_factor = 1.5)
    controller = _pid()
    down = controller.update(0.0, 10)  # no leakage at all: less noise, by kp + ki times the error
    expected = math.exp((0.05 + 0.2) * (0.0 - 0.8 * TARGET) / TARGET)
    assert down == pytest.approx(expected)
    assert controller.last_error == pytest.approx(-0.8 * TARGET)
    # at the setpoint nothing moves
    assert _pid().update(0.8 * TARGET, 10) == pytest.approx(1.0)


def test_pid_never_lowers_sigma_on_a_reading_over_the_setpoint():
    controller = _pid(kp=2.0, ki=0.0, kd=0.0)
    controller.update(3.0, 10)  # strong P kick up
    high = controller.sigma
    # still over the setpoint but much lower than before: P wants to go down, the safety rule holds
    assert controller.update(0.45, 20) >= high


def test_pid_integral_does_not_wind_up_at_the_bounds():
    controller = _pid()
    for step in range(1, 60):
        controller.update(50.0, step)  # far over the ceiling: saturates at sigma_max
    assert controller.sigma == HIGH
    assert controller.integral <= math.log(HIGH / 1.0) + 1e-9  # back-calculation keeps u at the bound
    controller.update(0.0, 60)  # leakage vanishes: σ leaves the bound at once
    assert controller.sigma < HIGH


def test_threshold_hysteresis_and_cooldown():
    controller = _threshold(cooldown=5)
    assert controller.update(0.6, 1) == pytest.approx(1.5)  # over the ceiling: raise
    assert controller.update(0.1, 3) == pytest.approx(1.5)  # under the band but cooling down
    assert controller.update(0.1, 6) == pytest.approx(1.5 / 1.1)  # cool-down over: lower
    assert controller.update(0.45, 7) == pytest.approx(1.5 / 1.1)  # inside the band: hold
    assert controller.lower_threshold == pytest.approx(0.375)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        (dict(target=0.0), "target"),
        (dict(target=-1.0), "target"),
        (dict(target=float("nan")), "target"),
        (dict(sigma_min=0.0), "sigma_min"),
        (dict(sigma_min=-0.1), "sigma_min"),
        (dict(sigma_min=5.0, sigma_max=1.0, noise_multiplier=1.0), "sigma_min"),
        (dict(noise_multiplier=20.0), "noise_multiplier"),
        (dict(noise_multiplier=0.01), "noise_multiplier"),
        (dict(sigma_max=float("inf")), "sigma_max"),
    ],
)
@pytest.mark.parametrize("cls", [PIDController, ThresholdController, PredictiveController])
def test_invalid_construction_names_the_argument(cls, kwargs, name):
    args = dict(target=TARGET, sigma_min=LOW, sigma_max=HIGH, noise_multiplier=1.0) | kwargs
    target = args.pop("target")
    with pytest.raises(ValueError, match=name):
        cls(target, **args)


@pytest.mark.parametrize(
    ("cls", "option", "value"),
    [
        (PIDController, "margin", 1.0),
        (PIDController, "ki", -0.1),
        (PIDController, "max_step_factor", 1.0),
        (PIDController, "derivative_filter", 1.5),
        (ThresholdController, "raise_factor", 1.0),
        (ThresholdController, "lower_factor", 0.5),
        (ThresholdController, "hysteresis", 1.0),
        (ThresholdController, "cooldown", -1),
        (PredictiveController, "k", -1.0),
        (PredictiveController, "margin", 1.0),
        (PredictiveController, "max_step_factor", 1.0),
        (PredictiveController, "tolerance", 1.0),
        (PredictiveController, "drift", 0.0),
        (PredictiveController, "fallback", {"sigma_max": 3.0}),
    ],
)
def test_invalid_options_name_the_option(cls, option, value):
    with pytest.raises(ValueError, match=option):
        cls(TARGET, sigma_min=LOW, sigma_max=HIGH, noise_multiplier=1.0, **{option: value})


def test_invalid_update_arguments():
    controller = _pid()
    with pytest.raises(ValueError, match="step"):
        controller.update(0.1, -1)
    with pytest.raises(ValueError, match="sigma_floor"):
        controller.update(0.1, 1, sigma_floor=float("nan"))
    with pytest.raises(ValueError, match="measurement"):
        controller.update("high", 1)
    with pytest.raises(ValueError, match="mi_curve"):
        controller.update(0.1, 1, mi_curve=0.3)


def _random_run(controller, steps: int, seed: int, *, start: int = 1):
    rng, curve_rng = np.random.default_rng(seed), np.random.default_rng(seed + 100)
    out = []
    for step in range(start, start + steps):
        kind = rng.integers(0, 6)
        measurement = None if kind < 3 else (float("nan") if kind == 3 else float(rng.uniform(-0.2, 2.0)))
        scale = float(curve_rng.uniform(0.1, 2.0))  # half the valid readings come with a curve
        curve = _capacity_curve(scale, 0.05) if kind == 5 else None
        floor = None if rng.random() < 0.7 else float(rng.uniform(0.0, 3.0))
        out.append(controller.update(measurement, step, sigma_floor=floor, mi_curve=curve))
    return out


@pytest.mark.parametrize("name", sorted(CONTROLLERS))
def test_state_dict_round_trip_mid_run_gives_the_same_sequence(name):
    def make():
        return build_controller(
            name, target_mi=TARGET, sigma_min=LOW, sigma_max=HIGH, noise_multiplier=1.0, total_steps=300
        )

    reference = make()
    full = _random_run(reference, 200, seed=1)
    full += _random_run(reference, 200, seed=2, start=201)

    first = make()
    head = _random_run(first, 200, seed=1)
    saved = json.loads(json.dumps(first.state_dict(), allow_nan=False))
    resumed = make()
    resumed.load_state_dict(saved)
    tail = _random_run(resumed, 200, seed=2, start=201)
    assert head + tail == full
    assert len(set(full)) > 3 or name == "constant"  # the sequence actually moves


def test_reset_restores_the_initial_state():
    controller = _pid()
    fresh = controller.state_dict()
    _random_run(controller, 50, seed=3)
    assert controller.state_dict() != fresh
    controller.reset()
    assert controller.state_dict() == fresh


def test_load_state_dict_rejects_another_kind():
    with pytest.raises(ValueError, match="pid"):
        _threshold().load_state_dict(_pid().state_dict())
    with pytest.raises(ValueError, match="incomplete"):
        _pid().load_state_dict({"type": "pid", "state": {"sigma": 1.0}})


def test_registry_and_factory():
    assert set(FEEDBACK) == {"pid", "threshold", "predictive"}
    assert set(SCHEDULES) == {"linear", "staircase", "exponential", "cyclic", "constant"}
    assert set(CONTROLLERS) == set(FEEDBACK) | set(SCHEDULES)
    assert len(CONTROLLERS) == len(FEEDBACK) + len(SCHEDULES)
    for name, cls in CONTROLLERS.items():
        assert cls.registry_name == name  # the decorator names the class: one source
        assert issubclass(cls, FeedbackController) == (name in FEEDBACK)
    expected = {
        "pid": PIDController,
        "threshold": ThresholdController,
        "predictive": PredictiveController,
        "linear": LinearDecay,
        "staircase": StaircaseDecay,
        "exponential": ExponentialDecay,
        "cyclic": CyclicDecay,
        "constant": ConstantNoise,
    }
    for name, cls in expected.items():
        controller = build_controller(
            name, target_mi=TARGET, sigma_min=LOW, sigma_max=HIGH, noise_multiplier=1.0, total_steps=100
        )
        assert type(controller) is cls
        assert isinstance(controller, Controller)
        assert (controller.sigma_min, controller.sigma_max) == (LOW, HIGH)
        assert controller.sigma == 1.0
    pid = build_controller("PID", target_mi=0.3, sigma_min=LOW, sigma_max=HIGH, noise_multiplier=2.0, kp=0.4)
    assert pid.target == 0.3 and pid.noise_multiplier == 2.0 and pid.config()["kp"] == 0.4
    with pytest.raises(
        ValueError, match="constant, cyclic, exponential, linear, pid, predictive, staircase, threshold"
    ):
        build_controller("bang-bang", target_mi=TARGET, sigma_min=LOW, sigma_max=HIGH, noise_multiplier=1.0)
    for name in FEEDBACK:
        with pytest.raises(ValueError, match="target_mi"):
            build_controller(name, target_mi=None, sigma_min=LOW, sigma_max=HIGH, noise_multiplier=1.0)
    with pytest.raises(ValueError, match="noise_multiplier"):
        build_controller("pid", target_mi=TARGET, sigma_min=LOW, sigma_max=HIGH, noise_multiplier=100.0)
    assert (
        build_controller(
            "constant", target_mi=None, sigma_min=LOW, sigma_max=HIGH, noise_multiplier=1.2
        ).update(None, 5)
        == 1.2
    )


def test_register_controller_decorator_adds_a_buildable_name():
    @register_controller("Always-Max", feedback=True)
    class AlwaysMax(FeedbackController):
        def _law(self, measurement, step, *, applied, overridden, mi_curve):
            return self.sigma_max

    try:
        assert CONTROLLERS["always-max"] is AlwaysMax and "always-max" in FEEDBACK
        assert AlwaysMax.registry_name == "always-max"
        built = build_controller(
            "always-max", target_mi=TARGET, sigma_min=LOW, sigma_max=HIGH, noise_multiplier=1.0
        )
        assert built.update(0.0, 1) == HIGH
        assert register_controller("always-max", feedback=True)(AlwaysMax) is AlwaysMax  # idempotent
        assert FEEDBACK.count("always-max") == 1
        with pytest.raises(ValueError, match="already taken"):
            register_controller("pid", feedback=True)(AlwaysMax)
        with pytest.raises(TypeError, match="from_settings"):
            register_controller("plain", feedback=True)(type("Plain", (), {}))
        with pytest.raises(ValueError, match="non-empty"):
            register_controller(" ", feedback=False)
    finally:
        CONTROLLERS.pop("always-max", None)
        if "always-max" in FEEDBACK:
            FEEDBACK.remove("always-max")
    assert "plain" not in CONTROLLERS


@pytest.mark.parametrize("cls", [PIDController, ThresholdController, PredictiveController])
def test_initial_is_a_deprecated_name_of_noise_multiplier(cls):
    with pytest.warns(DeprecationWarning, match="initial= is deprecated, use noise_multiplier=") as record:
        old = cls(TARGET, sigma_min=LOW, sigma_max=HIGH, initial=1.7)
    assert record[0].filename == __file__  # the warning points at the caller, not at controllers/
    new = cls(TARGET, sigma_min=LOW, sigma_max=HIGH, noise_multiplier=1.7)
    assert old.config() == new.config() and old.sigma == new.sigma == 1.7
    with pytest.warns(DeprecationWarning, match="initial"):
        assert old.initial == 1.7
    with pytest.raises(TypeError, match="both"):
        cls(TARGET, sigma_min=LOW, sigma_max=HIGH, noise_multiplier=1.0, initial=1.0)
    with pytest.raises(TypeError, match="noise_multiplier"):
        cls(TARGET, sigma_min=LOW, sigma_max=HIGH)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new name warns about nothing
        cls(TARGET, sigma_min=LOW, sigma_max=HIGH, noise_multiplier=1.0)


def test_design_contract_pid_and_build_controller_initial_still_work():
    # DESIGN.md's contract line, kept for one release
    with pytest.warns(DeprecationWarning, match="initial"):
        c = PIDController(target=0.5, sigma_min=0.01, sigma_max=10.0, initial=1.0)
    assert c.update(None, 0) == 1.0 and c.noise_multiplier == 1.0
    with pytest.warns(DeprecationWarning, match="build_controller\\(\\): the keyword initial=") as record:
        built = build_controller("threshold", target_mi=TARGET, sigma_min=LOW, sigma_max=HIGH, initial=2.0)
    assert record[0].filename == __file__
    assert built.noise_multiplier == 2.0
    with pytest.raises(TypeError, match="both"):
        build_controller(
            "pid", target_mi=TARGET, sigma_min=LOW, sigma_max=HIGH, noise_multiplier=1.0, initial=1.0
        )


def test_controllers_without_a_model_ignore_the_curve():
    # a curve that would call for σ = 10 changes nothing for the PID, the threshold and the schedules
    curve = _capacity_curve(100.0, 0.0)
    for make in (_pid, _threshold, lambda: LinearDecay(noise_multiplier=2.0, sigma_end=0.5, total_steps=10)):
        plain, given = make(), make()
        for step, reading in enumerate([0.9, None, 0.2, float("nan"), 0.6, 0.3], start=1):
            assert plain.update(reading, step) == given.update(reading, step, mi_curve=curve)
        assert plain.state_dict() == given.state_dict()


def test_pid_track_takes_over_a_sigma_without_a_bump():
    # after track(σ, m) the PID continues exactly as if its own law had chosen σ at that reading
    reference = _pid()
    reference.update(0.9, 1)
    chosen = reference.sigma
    tracked = _pid()
    tracked.track(chosen, measurement=0.9)
    assert tracked.sigma == chosen
    for step, reading in enumerate([0.7, 0.3, None, 0.45], start=2):
        assert tracked.update(reading, step) == pytest.approx(reference.update(reading, step), rel=1e-12)
    # taking over a σ far from where the integral was: the next reading at the setpoint holds σ
    jumped = _pid(kd=0.0)  # (no derivative kick from the jump of the reading)
    jumped.update(0.0, 1)
    jumped.track(4.0, measurement=0.8 * TARGET)
    assert jumped.update(0.8 * TARGET, 2) == pytest.approx(4.0)
    with pytest.raises(ValueError, match="measurement"):
        jumped.track(2.0, measurement=float("nan"))


def test_package_is_free_of_torch_and_opacus():
    import subprocess
    import sys

    code = (
        "import sys, controllers, controllers.simulation; "
        "bad = [m for m in ('torch', 'opacus') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
