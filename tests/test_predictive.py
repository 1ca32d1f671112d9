"""The predictive controller: exact solutions on analytic MI curves, the protocol's rules (hold, fail closed, the
floor wins, bounded moves), the PID fallback without a curve, state, and the closed loop on the reference plants
against the PID and the threshold controller."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from controllers import PIDController, PredictiveController, ThresholdController, build_controller
from controllers.simulation import REFERENCE_SCENARIOS, STRESS_SCENARIOS, LeakagePlant, closed_loop_summary

TARGET, LOW, HIGH = 0.5, 0.05, 20.0


def _predictive(**options) -> PredictiveController:
    settings = dict(sigma_min=LOW, sigma_max=HIGH, noise_multiplier=1.0) | options
    return PredictiveController(TARGET, **settings)


def _capacity(scale: float = 1.0, stderr: float = 0.0):
    """MI(σ) = scale/(2σ²) nats: the Gaussian mechanism's capacity bound (scale 1), constant stderr."""
    return lambda sigma: (scale / (2.0 * sigma**2), stderr)


# ---- solving the curve ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("target", [0.05, 0.5, 3.0])
@pytest.mark.parametrize("margin", [0.0, 0.2])
def test_solve_capacity_curve_exactly(target, margin):
    controller = PredictiveController(
        target, sigma_min=0.01, sigma_max=100.0, noise_multiplier=1.0, k=0.0, margin=margin, tolerance=1e-9
    )
    setpoint = (1 - margin) * target
    solution = controller.solve(_capacity())
    assert solution == pytest.approx(math.sqrt(1.0 / (2.0 * setpoint)), rel=1e-8)
    assert (
        _capacity()(solution)[0] <= setpoint
    )  # the returned σ meets the setpoint (upper end of the bracket)


def test_solve_keeps_k_standard_errors_under_the_setpoint():
    # MI + k·stderr = 1/(2σ²) + 2·0.05 ≤ 0.5  ⇔  σ ≥ 1/√(2·0.4)
    controller = _predictive(k=2.0, tolerance=1e-9)
    assert controller.solve(_capacity(stderr=0.05)) == pytest.approx(1 / math.sqrt(0.8), rel=1e-8)
    assert controller.solve(_capacity(stderr=0.05), k=0.0) == pytest.approx(1.0, rel=1e-8)
    # default tolerance: within ×(1 + 1e-4), never under the exact solution
    coarse = _predictive(k=0.0).solve(_capacity())
    assert 1.0 <= coarse <= 1.0 + 1e-4


def test_solve_at_the_bounds_and_on_unusable_curves():
    controller = _predictive(k=0.0)
    assert controller.solve(_capacity(scale=1e-6)) == LOW  # sigma_min already meets the setpoint
    assert controller.solve(_capacity(scale=1e6)) == HIGH  # not even sigma_max does: sigma_max
    assert controller.solve(lambda sigma: (float("nan"), 0.0)) == HIGH  # no usable prediction: fail closed
    assert controller.solve(lambda sigma: (0.0, -1.0)) == HIGH  # a negative stderr is no prediction either
    with pytest.raises(ValueError, match="pair"):
        controller.solve(lambda sigma: 0.3)


# ---- the protocol's rules ------------------------------------------------------------------------------------
def test_moves_toward_the_solution_at_a_bounded_rate():
    # exact curve whose solution is σ* = 5 (MI = 25/(2σ²) ≤ 0.5): from σ = 1 at most ×1.5 per reading
    controller = _predictive(k=0.0)
    curve = _capacity(scale=25.0)
    sigmas = [controller.update(curve(controller.sigma)[0], t, mi_curve=curve) for t in range(1, 7)]
    np.testing.assert_allclose(sigmas[:3], [1.5, 2.25, 3.375])
    assert sigmas[-1] == pytest.approx(5.0, rel=1e-4) and sigmas[-1] >= 5.0
    # and down again, ÷1.5 per reading, when the leakage falls 100×
    quiet = _capacity(scale=0.25)  # σ* = 0.5
    down = [controller.update(quiet(controller.sigma)[0], t, mi_curve=quiet) for t in range(7, 14)]
    np.testing.assert_allclose(down[:2], [sigmas[-1] / 1.5, sigmas[-1] / 1.5**2])
    assert down[-1] == pytest.approx(0.5, rel=1e-4)


def test_hold_between_readings_and_fail_closed():
    controller = _predictive()
    controller.update(0.2, 1, mi_curve=_capacity(0.4, 0.02))
    before = controller.state_dict()
    assert controller.update(None, 2, mi_curve=_capacity(100.0)) == controller.sigma  # no reading: hold
    assert controller.state_dict() == before
    own = controller.sigma
    assert controller.update(float("nan"), 3, mi_curve=_capacity()) == HIGH  # failed reading: sigma_max
    assert controller.failed and controller.faults == 1
    assert controller.update(None, 4) == HIGH  # held closed until a valid reading
    sigma = controller.update(0.3, 5, mi_curve=_capacity(0.4, 0.02))
    assert not controller.failed and sigma < HIGH and sigma >= own / 1.5


def test_floor_wins_and_the_own_sigma_keeps_following_the_curve():
    controller = _predictive(k=0.0)
    curve = _capacity(scale=25.0)  # σ* = 5
    for t in range(1, 8):
        # the floor (8) decides σ at every step; readings are taken at σ = 8 (under the ceiling)
        assert controller.update(curve(8.0)[0], t, sigma_floor=8.0, mi_curve=curve) == 8.0
    # no anti-windup hold: the curve says what σ = 5 would leak, so the own σ went there under the floor
    assert controller.sigma == pytest.approx(5.0, rel=1e-4)
    assert controller.update(None, 8, sigma_floor=None) == pytest.approx(5.0, rel=1e-4)
    assert controller.update(None, 9, sigma_floor=2 * HIGH) == 2 * HIGH  # the floor wins over sigma_max


def test_a_reading_over_the_setpoint_never_lowers_sigma_below_where_it_was_taken():
    # a curve that disagrees with the reading (it predicts almost no leakage) cannot lower σ on a high reading
    controller = _predictive(k=0.0)
    assert controller.update(0.9, 1, sigma_floor=3.0, mi_curve=_capacity(scale=1e-6)) == 3.0
    assert controller.sigma >= 3.0
    assert controller.update(0.1, 2, mi_curve=_capacity(scale=1e-6)) == pytest.approx(controller.sigma)
    assert controller.sigma == pytest.approx(3.0 / 1.5)  # a low reading may lower it, at the bounded rate


# ---- without a curve: the PID ----------------------------------------------------------------------------------
def test_falls_back_to_the_pid_with_the_same_settings_without_a_curve():
    rng = np.random.default_rng(0)
    predictive, pid = (
        _predictive(),
        PIDController(TARGET, sigma_min=LOW, sigma_max=HIGH, noise_multiplier=1.0),
    )
    for step in range(1, 200):
        kind = rng.integers(0, 5)
        reading = None if kind < 2 else (float("nan") if kind == 2 else float(rng.uniform(0.0, 1.5)))
        floor = None if rng.random() < 0.8 else float(rng.uniform(0.0, 4.0))
        assert predictive.update(reading, step, sigma_floor=floor) == pid.update(
            reading, step, sigma_floor=floor
        )
    assert predictive.solution is None
    assert predictive.fallback.config()["margin"] == 0.2  # the PID's own margin, not the predictive's
    tuned = _predictive(fallback={"ki": 0.4, "margin": 0.1})
    assert tuned.fallback.config()["ki"] == 0.4 and tuned.config()["fallback"]["margin"] == 0.1


def test_switching_between_curve_and_pid_does_not_jump():
    controller = _predictive(k=0.0, fallback={"kp": 0.0, "kd": 0.0})  # (an integral-only PID holds exactly)
    curve = _capacity(scale=25.0)  # σ* = 5
    for t in range(1, 8):
        controller.update(curve(controller.sigma)[0], t, mi_curve=curve)
    at = controller.sigma
    # the token-MINE estimator takes over; a reading at the PID's setpoint (0.8 × target) leaves σ where it was
    assert controller.update(0.8 * TARGET, 8) == pytest.approx(at, rel=1e-12)
    assert controller.update(0.9 * TARGET, 9) > at  # and the PID acts from there


# ---- state and construction ------------------------------------------------------------------------------------
def _noisy_run(controller, steps: int, seed: int, start: int = 1) -> list[float]:
    rng = np.random.default_rng(seed)
    plant = LeakagePlant(s_0=0.3, s_end=0.1, tau=300.0)
    out = []
    for step in range(start, start + steps):
        reading, curve = None, None
        if step % 5 == 0:
            error = float(0.1 * rng.standard_normal())
            model = plant.curve(step, log_error=error, abs_error=0.0, noise=0.1, abs_noise=0.01)
            reading = float("nan") if rng.random() < 0.05 else model(controller.sigma)[0]
            curve = None if rng.random() < 0.2 else model  # some readings without a curve: the PID decides
        floor = None if rng.random() < 0.9 else float(rng.uniform(0.0, 2.0))
        out.append(controller.update(reading, step, sigma_floor=floor, mi_curve=curve))
    return out


def test_state_dict_round_trip_mid_run():
    reference = _predictive()
    full = _noisy_run(reference, 300, seed=1) + _noisy_run(reference, 300, seed=2, start=301)
    first = _predictive()
    head = _noisy_run(first, 300, seed=1)
    saved = json.loads(json.dumps(first.state_dict(), allow_nan=False))
    assert saved["type"] == "predictive" and saved["state"]["fallback"]["type"] == "pid"
    resumed = _predictive()
    resumed.load_state_dict(saved)
    assert head + _noisy_run(resumed, 300, seed=2, start=301) == full
    assert len(set(full)) > 20  # it moved
    resumed.reset()
    assert resumed.state_dict() == _predictive().state_dict()
    with pytest.raises(ValueError, match="predictive"):
        resumed.load_state_dict(
            PIDController(TARGET, sigma_min=LOW, sigma_max=HIGH, noise_multiplier=1.0).state_dict()
        )


def test_registry_flag_and_deprecated_initial():
    built = build_controller(
        "predictive", target_mi=TARGET, sigma_min=LOW, sigma_max=HIGH, noise_multiplier=1.0, k=1.0
    )
    assert isinstance(built, PredictiveController) and built.k == 1.0 and built.registry_name == "predictive"
    assert PredictiveController.uses_mi_curve and not PIDController.uses_mi_curve
    assert not ThresholdController.uses_mi_curve
    with pytest.warns(DeprecationWarning, match="initial"):
        old = build_controller("predictive", target_mi=TARGET, sigma_min=LOW, sigma_max=HIGH, initial=1.0)
    assert old.config() == _predictive().config()
    tuned = _predictive(k=1.5, drift=None, margin=0.1, fallback={"ki": 0.3})
    assert PredictiveController(**tuned.config()).config() == tuned.config()  # config() rebuilds it


# ---- fusion and the closed loop ----------------------------------------------------------------------------------
def test_fusion_averages_the_readings_errors():
    # stationary capacity plant, 10 % log-normal estimation error per reading (stderr reported as 10 % of MI):
    # the fused target scatters far less than one reading's solution, and sits k·√P above σ* = 1.
    rng = np.random.default_rng(4)
    fused, single = _predictive(max_step_factor=100.0), _predictive(max_step_factor=100.0, drift=None)
    f_sigmas, s_sigmas = [], []
    for step in range(10, 2010, 10):
        scale = math.exp(0.1 * rng.standard_normal())

        def curve(sigma, scale=scale):
            value = scale / (2.0 * sigma**2)
            return value, 0.1 * value

        f_sigmas.append(fused.update(curve(fused.sigma)[0], step, mi_curve=curve))
        s_sigmas.append(single.update(curve(single.sigma)[0], step, mi_curve=curve))
    f_log, s_log = np.log(f_sigmas[20:]), np.log(s_sigmas[20:])
    # measured: std of log σ 0.021 fused vs 0.049 for one reading; median σ/σ* 1.060 vs 1.095 (one reading keeps
    # MI·1.2 under the setpoint: σ ≈ √1.2 ≈ 1.095; the fused estimate's 2 standard errors cost ≈ e^{2·0.027})
    assert np.std(f_log) < 0.5 * np.std(s_log)
    assert np.median(np.exp(s_log)) == pytest.approx(math.sqrt(1.2), rel=0.02)
    assert 1.0 < np.median(np.exp(f_log)) < 1.08


def test_a_jump_in_leakage_restarts_the_fusion():
    controller = _predictive(k=0.0)
    calm = _capacity(scale=1.0, stderr=0.0)  # σ* = 1
    for step in range(10, 400, 10):
        controller.update(calm(controller.sigma)[0], step, mi_curve=calm)
    assert controller.sigma == pytest.approx(1.0, rel=1e-3)
    jumped = _capacity(scale=16.0, stderr=0.0)  # σ* = 4: the filter restarts instead of creeping up
    controller.update(jumped(controller.sigma)[0], 400, mi_curve=jumped)
    assert controller.solution == pytest.approx(4.0, rel=1e-3)
    assert controller.sigma == pytest.approx(1.5, rel=1e-3)  # still a bounded move


REFERENCE_SEEDS, REFERENCE_STEPS = (0, 1, 2), 3000


def _make(cls):
    return lambda target: cls(target, sigma_min=0.01, sigma_max=50.0, noise_multiplier=1.0)


def test_reference_plants_predictive_beats_pid_and_threshold():
    """3 seeds × 3 000 steps on each reference plant, σ from 1, the plant's curve carrying the reading's error.

    Measured (worst over seeds / median): predictive 0 % of steps over 1.1 × target, ≤ 4.7 % over the target,
    median σ/σ* 1.052–1.077; PID 0 %, ≤ 0.3 %, 1.098–1.171; threshold ≤ 1.0 %, ≤ 7.2 %, 1.087–1.187. The issue's
    aim σ/σ* ≤ 1.05 is not met (k = 2 standard errors of the fused estimate cost ≈ 5 %); the thresholds below
    leave room for numerical noise only."""
    predictive = closed_loop_summary(
        _make(PredictiveController), seeds=REFERENCE_SEEDS, steps=REFERENCE_STEPS
    )
    pid = closed_loop_summary(_make(PIDController), seeds=REFERENCE_SEEDS, steps=REFERENCE_STEPS)
    threshold = closed_loop_summary(_make(ThresholdController), seeds=REFERENCE_SEEDS, steps=REFERENCE_STEPS)
    for name in REFERENCE_SCENARIOS:
        ours = predictive[name]
        assert ours["over"] <= 0.01, (name, ours)  # the aim: ≤ 1 % over the ceiling (1.1 × target)
        assert ours["over_target"] <= 0.06, (name, ours)
        assert ours["median_ratio"] <= 1.09, (name, ours)
        assert ours["median_ratio"] < pid[name]["median_ratio"] - 0.02, (name, ours, pid[name])
        assert ours["median_ratio"] < threshold[name]["median_ratio"], (name, ours, threshold[name])


def test_stress_plants_predictive_is_safer_than_pid():
    # b = 4 with 25 % reading noise: the PID spends 3.1 % of steps over 1.1 × target, the predictive none
    predictive = closed_loop_summary(_make(PredictiveController), STRESS_SCENARIOS)
    pid = closed_loop_summary(_make(PIDController), STRESS_SCENARIOS)
    assert predictive["b4_noise25"]["over"] == 0.0 < pid["b4_noise25"]["over"]
    # b = 1 with 25 % noise: both safe, the predictive with less noise (σ/σ* 1.16 against 1.30)
    assert predictive["b1_noise25"]["over"] == pid["b1_noise25"]["over"] == 0.0
    assert predictive["b1_noise25"]["median_ratio"] < pid["b1_noise25"]["median_ratio"] - 0.1
