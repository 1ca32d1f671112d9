"""Predictive control of the noise multiplier: solve the estimator's MI curve for σ instead of searching for it."""

from __future__ import annotations

import math
from typing import Any

from controllers.base import MICurve, check_nonnegative, check_positive, check_unit_interval, renamed_keyword
from controllers.feedback import FeedbackController
from controllers.pid import PIDController
from controllers.registry import register_controller

__all__ = ["PredictiveController"]

_SHARED = ("target", "sigma_min", "sigma_max", "noise_multiplier", "max_step_factor")
_RESTART = 3.0
"""A reading whose solution lies this many standard deviations above the estimate restarts the estimate."""


@register_controller("predictive", feedback=True)
class PredictiveController(FeedbackController):
    """Set σ to the smallest value whose predicted leakage, plus k standard errors, stays under the setpoint.

    At a reading the engine passes, besides the reading m (nats), the estimator's curve
    σ' ↦ (MI(σ'), stderr(σ')) on the same audit gradients (:data:`controllers.base.MICurve`). The law:

    1. solve: σ̂_k = min{σ' ∈ [sigma_min, sigma_max] : MI(σ') + k·stderr(σ') ≤ r}, r = (1 − margin)·target, by
       bisection in log σ' (:meth:`solve`; MI is non-increasing in σ'): sigma_min if sigma_min already meets
       it, sigma_max if even sigma_max does not; a point where the curve is not finite (or its stderr
       negative) counts as not meeting it (fail closed);
    2. fuse (``drift`` not None): each curve's estimation error is new at every reading while σ* (the σ that
       meets r) drifts slowly, so the solutions of successive readings are averaged by a scalar Kalman filter
       on log σ* with random-walk process noise ``drift``² per optimizer step. Its measurement is
       x = log σ̂_0 with variance (log σ̂_1 − log σ̂_0)², one stderr of MI carried into log σ by the curve
       itself; the target is exp(x̄ + k·√P) (x̄, P the filtered mean and variance), i.e. the smallest σ
       whose fused prediction plus k standard errors meets r. With a single reading (or ``drift=None``: no
       fusion, target σ̂_k) this is step 1's rule. A solution more than 3 standard deviations above the
       estimate (leakage jumped) restarts the filter from it; σ̂_0 = sigma_max sends σ there and restarts it;
    3. move: the own σ goes toward the target by at most ×/÷ ``max_step_factor`` per reading; a reading over
       the setpoint never lowers σ below the σ it was taken at (the PID's safety rule).

    Between readings (measurement None) it holds; a NaN/inf reading fails closed (``sigma_max`` until the next
    valid one); the budget floor wins over everything (:class:`controllers.feedback.FeedbackController`). When
    the floor (or fail-closed) decided σ, the curve still tells what any σ' would leak, so no anti-windup is
    needed: the own σ keeps moving toward the target under the floor, and when the floor drops the controller
    is already where the curve puts it.

    Without a curve (``mi_curve=None``, e.g. the token-MINE estimator) the reading goes to an internal
    :class:`controllers.pid.PIDController` with the same target, bounds, σ₀ and move limit (its own margin and
    gains: the PID's defaults unless ``fallback`` sets them). After every curve-based move the PID takes over
    that σ (:meth:`controllers.pid.PIDController.track`, bumpless transfer), so mixing the modes does not jump.

    Defaults measured with ``controllers.simulation`` (``REFERENCE_SCENARIOS``, the plant's curve carrying the
    reading's own estimation error, 3 seeds × 3 000 steps, σ from 1, after warm-up; checked by
    ``tests/test_predictive.py``): true MI over 1.1 × target in 0 % of steps (over the target: ≤ 4.7 %), median
    σ/σ* 1.05–1.08, against the PID's 0 % (0.3 %) and 1.10–1.17. Without fusion (``drift=None``) 2.0 % (6.8 %)
    and 1.07–1.21: one reading's error is too large to trust alone. ``drift`` trades the two: 0.004 gives
    1.04–1.08 but 0.8 % over 1.1 × target on the fast-rising plant; k = 2.5 keeps ≤ 1.9 % over the target at
    1.07–1.10.

    Args:
        target: leakage ceiling, nats (> 0).
        sigma_min, sigma_max: bounds of the controller's own σ (0 < sigma_min ≤ sigma_max).
        noise_multiplier: σ₀, the σ before the first reading, in the bounds.
        k: standard errors of the prediction kept under the setpoint (≥ 0).
        margin: setpoint r = (1 − margin)·target; 0 ≤ margin < 1 (k standard errors are the safety margin here).
        max_step_factor: σ moves at most ×/÷ this factor per reading; > 1.
        tolerance: relative precision of the bisection (it stops when the bracket is narrower than
            ×(1 + tolerance)); in (0, 1).
        drift: std of the change of log σ* per optimizer step assumed by the fusion (> 0), or None for no
            fusion.
        fallback: options of the fallback PID (``margin``, ``kp``, ``ki``, ``kd``, ``derivative_filter``,
            ``error_clip``); default: the PID's defaults.
        initial: deprecated name of ``noise_multiplier`` (DeprecationWarning).

    Raises:
        ValueError: naming the argument, for any value outside the ranges above, or a ``fallback`` option the
            two share (target, bounds, σ₀, max_step_factor).
        TypeError: if ``noise_multiplier`` is missing or given under both names, or ``fallback`` holds an option
            the PID does not take.

    Example:
        The Gaussian-mechanism capacity bound MI(σ) = 1/(2σ²) nats as the curve, without estimation error: the
        solution is σ* = 1/√(2r), reached in steps of at most ×1.5.

        >>> capacity = lambda sigma: (1.0 / (2.0 * sigma**2), 0.0)
        >>> c = PredictiveController(0.5, sigma_min=0.1, sigma_max=10.0, noise_multiplier=0.5)
        >>> round(c.solve(capacity), 3)
        1.0
        >>> [round(c.update(capacity(s)[0], t, mi_curve=capacity), 3) for t, s in enumerate([0.5, 0.75, 1.0])]
        [0.75, 1.0, 1.0]
        >>> round(c.update(None, 3), 3)         # no reading: hold
        1.0
        >>> c.update(float("nan"), 4)           # a failed reading: fail closed
        10.0
        >>> fresh = PredictiveController(0.5, sigma_min=0.1, sigma_max=10.0, noise_multiplier=1.0)
        >>> round(fresh.update(0.9, 0), 3)      # no curve (token-MINE): the fallback PID's move
        1.284

    Source: the curve is the likelihood-ratio estimator's InfoNCE bound re-scored at σ' (van den Oord et al.
    2018; Poole et al. 2019); solving a model of the plant for the input that meets the setpoint, with a
    bounded move, is the one-step form of model predictive control (Camacho & Bordons, "Model Predictive
    Control", 2007, ch. 1); the fusion is the scalar Kalman filter of the local-level model (Durbin & Koopman,
    "Time Series Analysis by State Space Methods", 2012, §2.1).
    """

    uses_mi_curve = True

    def __init__(
        self,
        target: float,
        *,
        sigma_min: float,
        sigma_max: float,
        noise_multiplier: float | None = None,
        k: float = 2.0,
        margin: float = 0.0,
        max_step_factor: float = 1.5,
        tolerance: float = 1e-4,
        drift: float | None = 0.006,
        fallback: dict[str, Any] | None = None,
        initial: float | None = None,
    ) -> None:
        start = renamed_keyword(
            "PredictiveController",
            new="noise_multiplier",
            value=noise_multiplier,
            old="initial",
            old_value=initial,
        )
        self._k = check_nonnegative("k", k)
        self._margin = check_unit_interval("margin", margin)
        self._max_step_factor = check_positive("max_step_factor", max_step_factor)
        if self._max_step_factor <= 1:
            raise ValueError(f"max_step_factor must be > 1, got {max_step_factor!r}")
        self._tolerance = check_positive("tolerance", tolerance)
        if self._tolerance >= 1:
            raise ValueError(f"tolerance must lie in (0, 1), got {tolerance!r}")
        self._drift = None if drift is None else check_positive("drift", drift)
        options = dict(fallback or {})
        shared = sorted(set(options) & set(_SHARED))
        if shared:
            raise ValueError(
                f"fallback must not set {shared}: the PID shares them with the predictive controller"
            )
        self._fallback = PIDController(
            target,
            sigma_min=sigma_min,
            sigma_max=sigma_max,
            noise_multiplier=start,
            max_step_factor=self._max_step_factor,
            **options,
        )
        super().__init__(target, sigma_min=sigma_min, sigma_max=sigma_max, noise_multiplier=start)

    @property
    def setpoint(self) -> float:
        """r = (1 − margin)·target, nats: the bound on MI(σ) + k·stderr(σ)."""
        return (1.0 - self._margin) * self._target

    @property
    def k(self) -> float:
        """Standard errors of the prediction kept under the setpoint."""
        return self._k

    @property
    def solution(self) -> float | None:
        """The σ the law moved toward at the last reading (the fused target; :meth:`solve`'s σ̂_k with
        ``drift=None``), before the move limit; None before a reading with a curve, or when the last had none."""
        return self._solution

    @property
    def fallback(self) -> PIDController:
        """The PID that handles readings without a curve (read it, do not drive it)."""
        return self._fallback

    def solve(self, mi_curve: MICurve, *, k: float | None = None) -> float:
        """σ̂: the smallest σ in [sigma_min, sigma_max] with MI(σ) + k·stderr(σ) ≤ setpoint.

        Bisection in log σ to relative precision ``tolerance``; the value returned meets the condition
        (it is the upper end of the final bracket), except ``sigma_max`` when nothing in the bounds does.
        Assumes MI non-increasing in σ; on a non-monotone curve it returns a crossing point.

        Args:
            mi_curve: σ ↦ (MI nats, stderr nats), :data:`controllers.base.MICurve`.
            k: standard errors to keep under the setpoint (≥ 0); default: the controller's ``k``.

        Raises:
            ValueError: if ``mi_curve`` does not return a pair of numbers, or ``k`` is negative.
        """
        k = self._k if k is None else check_nonnegative("k", k)
        if self._meets(mi_curve, self._sigma_min, k):
            return self._sigma_min
        if not self._meets(mi_curve, self._sigma_max, k):
            return self._sigma_max
        low, high = math.log(self._sigma_min), math.log(self._sigma_max)  # low fails, high meets
        width = math.log1p(self._tolerance)
        while high - low > width:
            middle = 0.5 * (low + high)
            if self._meets(mi_curve, math.exp(middle), k):
                high = middle
            else:
                low = middle
        return math.exp(high)

    def config(self) -> dict[str, Any]:
        """The construction arguments as a plain dict."""
        pid = self._fallback.config()
        return {
            **super().config(),
            "k": self._k,
            "margin": self._margin,
            "max_step_factor": self._max_step_factor,
            "tolerance": self._tolerance,
            "drift": self._drift,
            "fallback": {key: value for key, value in pid.items() if key not in _SHARED},
        }

    def _meets(self, mi_curve: MICurve, sigma: float, k: float) -> bool:
        prediction = mi_curve(sigma)
        try:
            mi, stderr = (float(value) for value in prediction)
        except (TypeError, ValueError):
            raise ValueError("mi_curve(σ) must return a pair (MI nats, stderr nats) of numbers") from None
        if not (math.isfinite(mi) and math.isfinite(stderr)) or stderr < 0:
            return False  # an unusable prediction never justifies less noise
        return mi + k * stderr <= self.setpoint

    def _reset_law(self) -> None:
        self._solution: float | None = None
        self._estimate: float | None = None
        self._variance = 0.0
        self._estimate_step = 0
        self._fallback.reset()

    def _law_state(self) -> dict[str, Any]:
        return {
            "solution": self._solution,
            "estimate": self._estimate,
            "variance": self._variance,
            "estimate_step": self._estimate_step,
            "fallback": self._fallback.state_dict(),
        }

    def _load_law_state(self, state: dict[str, Any]) -> None:
        self._solution = None if state["solution"] is None else float(state["solution"])
        self._estimate = None if state["estimate"] is None else float(state["estimate"])
        self._variance = float(state["variance"])
        self._estimate_step = int(state["estimate_step"])
        self._fallback.load_state_dict(state["fallback"])

    def _fuse(self, measured: float, noise: float, step: int) -> None:
        """Kalman update of the estimate of log σ* with a measurement ``measured`` of variance ``noise``."""
        elapsed, self._estimate_step = max(step - self._estimate_step, 1), step
        if self._estimate is not None:
            prior = self._variance + self._drift**2 * elapsed  # type: ignore[operator]
            if measured <= self._estimate + _RESTART * math.sqrt(prior + noise):
                gain = prior / (prior + noise) if prior + noise > 0 else 1.0
                self._estimate += gain * (measured - self._estimate)
                self._variance = (1.0 - gain) * prior
                return
        # first estimate, or leakage jumped up beyond the filter's belief: start again from this reading
        self._estimate, self._variance = measured, noise

    def _target_sigma(self, mi_curve: MICurve, step: int) -> float:
        """The σ the law moves toward: the solution for this reading's curve, fused with earlier ones."""
        if self._drift is None:
            return self.solve(mi_curve)
        point = self.solve(mi_curve, k=0.0)
        if point >= self._sigma_max:
            # not even sigma_max meets the setpoint: go there, and estimate afresh at the next reading
            self._estimate = None
            return self._sigma_max
        spread = math.log(self.solve(mi_curve, k=1.0) / point)  # one stderr of MI, in log σ
        self._fuse(math.log(point), spread**2, step)
        return min(math.exp(self._estimate + self._k * math.sqrt(self._variance)), self._sigma_max)

    def _law(
        self, measurement: float, step: int, *, applied: float, overridden: bool, mi_curve: MICurve | None
    ) -> float:
        if mi_curve is None:
            # The PID's σ equals ours (it tracks every curve-based move); pass on what set σ at the reading.
            self._fallback.update(measurement, step, sigma_floor=applied if overridden else None)
            self._solution = None
            return self._fallback.sigma
        self._solution = self._target_sigma(mi_curve, step)
        current = self._sigma
        if measurement > self.setpoint:
            current = max(current, applied)  # never less noise than where it leaked over the setpoint
            low = current
        else:
            low = current / self._max_step_factor
        high = max(current * self._max_step_factor, low)
        chosen = min(max(self._solution, low, self._sigma_min), high, self._sigma_max)
        self._fallback.track(chosen, measurement=measurement)
        return chosen
