"""PID control of the noise multiplier on log σ, steering measured leakage to a setpoint under the ceiling."""

from __future__ import annotations

import math
from typing import Any

from controllers.base import MICurve, check_nonnegative, check_positive, check_unit_interval
from controllers.feedback import FeedbackController
from controllers.registry import register_controller

__all__ = ["PIDController"]


@register_controller("pid", feedback=True)
class PIDController(FeedbackController):
    """PID controller on log σ: more measured leakage than the setpoint → more noise.

    Per valid reading m (nats), with setpoint r = (1 − margin)·target and the relative error
    e = clip((m − r)/target, −1, error_clip):

        I  ← I + ki·e                                          (integral, per reading)
        D  ← α·D + (1 − α)·clip((m − m_prev)/target, ±error_clip)  (derivative on the measurement, low-pass α)
        u  = log(σ₀) + kp·e + I + kd·D                          (the law, in log σ)
        log σ ← clip(u, log σ_prev ± log(max_step_factor), [log sigma_min, log sigma_max])

    Design choices:
      * log σ because leakage changes over decades of σ (the capacity bound of the clipped Gaussian mechanism
        is MI ≤ 1/(2σ²) nats): equal relative steps give a loop gain that hardly depends on where σ is.
      * the error is divided by ``target`` so the same gains work for any ceiling (0.05 or 3 nats): near the
        setpoint, relative error ≈ change of log MI, and log MI falls with slope b ≈ 1.5–3 in log σ.
      * the error is clipped (−1 … ``error_clip``) so one wild reading (a huge or negative MI estimate)
        moves σ by at most the move limit and the integral by a bounded amount.
      * safety rule: a reading over the setpoint never lowers σ below the σ it was taken at (a fast-falling
        measurement may make the P/D terms want that; and after fail-closed or under the budget floor the
        reading was taken at a higher σ than the law's own): the move starts from that σ.
      * anti-windup: back-calculation (tracking gain 1) against the bounds, the move limit and the safety rule
        (the integral is reset so that u equals the σ actually chosen); against the budget floor and
        fail-closed by clamping: while σ was set by them and the law would lower its own σ, the own σ and the
        integral are held, so when the floor drops the controller resumes from where its law left off.
      * the derivative acts on the measurement (no setpoint kick) through a first-order low-pass filter,
        since MI estimates are noisy.

    Default gains (chosen with ``controllers.simulation``, the closed-loop simulation that
    ``tests/test_controller_closed_loop.py`` also runs; ``REFERENCE_SCENARIOS`` and ``STRESS_SCENARIOS``):
    plants MI(σ, t) = cap·sigmoid(b·(log s(t) − log σ)), cap = log 512, slopes b ∈ {1, 1.5, 2, 3, 4}, a
    scale s(t) that falls 2–5× over training (leakage falls as the model fits, as measured on MNIST) or
    rises 1.5–2×, targets 0.2–1 nats, 10–25 % reading noise, 5 % failed readings, a reading every 5–20
    steps, σ starting at 1; 3 seeds × 3 000 steps each. A grid kp ∈ {0, .05, .1, .15, .2, .3},
    ki ∈ {.1, .15, .2, .25, .3, .4}, kd ∈ {0, .02, .05, .1, .3} showed:
      * the integral does the work: near the setpoint the plant's gain is ≈ −b·(r/target) per unit log σ, so
        the integral's discrete pole is 1 − ki·b·0.8; ki = 0.2 keeps it ≥ 0.36 for b ≤ 4 (no ringing) and
        still halves the error every ≈ 2.5 readings for b = 1.5 (pole 0.76);
      * kp and kd mainly pass the estimator's noise to σ: with kp = 0.15, ki = 0.25, kd = 0.1 (the first
        guess) the worst plant (b = 4, 25 % noise) spent 29 % of steps over 1.1 × target, with kp = 0.05,
        ki = 0.2, kd = 0.05 3.1 % (kp = kd = 0: 3.8 % at ki = 0.25); every other plant had 0 % at these
        defaults, median σ/σ* 1.07–1.18 (1.30 for b = 1, where the 20 % margin costs more σ), 95th
        percentile ≤ 1.52 (σ* = the smallest σ meeting the ceiling). So the defaults keep small P and D
        terms (a quick reaction to a jump and to rising leakage) and rely on ki = 0.2;
      * margin = 0.2 is what keeps the noisy steep plants under 1.1 × target; max_step_factor = 1.5 bounds a
        single move, so coming from σ = 1 to σ* ≈ 4.7 takes 5 readings.

    Args:
        target: leakage ceiling, nats (> 0).
        sigma_min, sigma_max: bounds of the controller's own σ (0 < sigma_min ≤ sigma_max).
        noise_multiplier: σ₀, the σ before the first reading, in the bounds; also the reference point of the law.
        initial: deprecated name of ``noise_multiplier`` (DeprecationWarning).
        margin: setpoint = (1 − margin)·target; 0 ≤ margin < 1.
        kp, ki, kd: proportional, integral and derivative gains (per reading, on log σ per unit relative
            error); ≥ 0.
        derivative_filter: α ∈ [0, 1) of the derivative's low-pass filter (0 = no filtering).
        max_step_factor: σ moves at most ×/÷ this factor per reading; > 1.
        error_clip: upper clip of the relative error (lower clip is −1); > 0.

    Raises:
        ValueError: naming the argument, for any value outside the ranges above.
        TypeError: if ``noise_multiplier`` is missing, or given under both names.

    Example:
        >>> c = PIDController(0.5, sigma_min=0.3, sigma_max=10.0, noise_multiplier=1.0)
        >>> [round(c.update(mi, t), 3) for t, mi in enumerate([0.9, 0.7, 0.5, 0.4, 0.3])]
        [1.284, 1.405, 1.426, 1.416, 1.348]
        >>> c.update(1.0, 5, sigma_floor=2.0)   # a budget floor above the law's σ wins
        2.0

    Source: textbook PID with back-calculation anti-windup and filtered derivative on the measurement
    (Åström & Hägglund, "Advanced PID Control", 2006, §3.5 and §3.3).
    """

    def __init__(
        self,
        target: float,
        *,
        sigma_min: float,
        sigma_max: float,
        noise_multiplier: float | None = None,
        margin: float = 0.2,
        kp: float = 0.05,
        ki: float = 0.2,
        kd: float = 0.05,
        derivative_filter: float = 0.5,
        max_step_factor: float = 1.5,
        error_clip: float = 3.0,
        initial: float | None = None,
    ) -> None:
        self._margin = check_unit_interval("margin", margin)
        self._kp = check_nonnegative("kp", kp)
        self._ki = check_nonnegative("ki", ki)
        self._kd = check_nonnegative("kd", kd)
        self._alpha = check_unit_interval("derivative_filter", derivative_filter)
        self._max_step_factor = check_positive("max_step_factor", max_step_factor)
        if self._max_step_factor <= 1:
            raise ValueError(f"max_step_factor must be > 1, got {max_step_factor!r}")
        self._error_clip = check_positive("error_clip", error_clip)
        super().__init__(
            target,
            sigma_min=sigma_min,
            sigma_max=sigma_max,
            noise_multiplier=noise_multiplier,
            initial=initial,
        )

    @property
    def setpoint(self) -> float:
        """(1 − margin)·target, nats."""
        return (1.0 - self._margin) * self._target

    @property
    def integral(self) -> float:
        """The integral term I (log σ units)."""
        return self._integral

    def config(self) -> dict[str, Any]:
        """The construction arguments as a plain dict."""
        return {
            **super().config(),
            "margin": self._margin,
            "kp": self._kp,
            "ki": self._ki,
            "kd": self._kd,
            "derivative_filter": self._alpha,
            "max_step_factor": self._max_step_factor,
            "error_clip": self._error_clip,
        }

    def _reset_law(self) -> None:
        self._integral = 0.0
        self._derivative = 0.0
        self._previous: float | None = None

    def _law_state(self) -> dict[str, Any]:
        return {"integral": self._integral, "derivative": self._derivative, "previous": self._previous}

    def _load_law_state(self, state: dict[str, Any]) -> None:
        self._integral = float(state["integral"])
        self._derivative = float(state["derivative"])
        self._previous = None if state["previous"] is None else float(state["previous"])

    def track(self, sigma: float, *, measurement: float) -> None:
        """Continue from a σ that another law chose at a reading (bumpless transfer).

        Takes the reading into the derivative filter as :meth:`update` would, sets the own σ to ``sigma`` and
        the integral so that the law's output u equals log σ (back-calculation), so a later reading handled by
        this PID moves σ from there instead of jumping back to where the integral had been.

        Args:
            sigma: the σ chosen (clamped to the bounds).
            measurement: the finite reading (nats) at which it was chosen.

        Raises:
            ValueError: if ``sigma`` is not finite and > 0 or ``measurement`` is not finite.
        """
        value = min(max(check_positive("sigma", sigma), self._sigma_min), self._sigma_max)
        if not math.isfinite(measurement):
            raise ValueError(f"measurement must be a finite reading (nats), got {measurement!r}")
        error = self._observe(measurement)
        self._failed = False
        self._last_error = measurement - self.setpoint
        self._integral = math.log(value) - math.log(self._noise_multiplier) - self._kp * error
        self._integral -= self._kd * self._derivative
        self._sigma = value

    def _observe(self, measurement: float) -> float:
        """The clipped relative error of a reading; updates the derivative filter with it."""
        clip = self._error_clip
        error = min(max((measurement - self.setpoint) / self._target, -1.0), clip)
        if self._previous is not None:
            slope = min(max((measurement - self._previous) / self._target, -clip), clip)
            self._derivative = self._alpha * self._derivative + (1.0 - self._alpha) * slope
        self._previous = measurement
        return error

    def _law(
        self, measurement: float, step: int, *, applied: float, overridden: bool, mi_curve: MICurve | None
    ) -> float:
        error = self._observe(measurement)
        integral = self._integral + self._ki * error
        wanted = math.log(self._noise_multiplier) + self._kp * error + integral + self._kd * self._derivative
        current = math.log(self._sigma)
        if overridden and wanted < current:
            # The floor or fail-closed set σ, not the law: hold σ and the integral (clamping anti-windup).
            return self._sigma
        reach = math.log(self._max_step_factor)
        if error > 0:
            # never less noise than the σ at which leakage was measured over the setpoint
            current = max(current, math.log(applied))
            low = current
        else:
            low = max(math.log(self._sigma_min), current - reach)
        high = max(min(math.log(self._sigma_max), current + reach), low)
        chosen = min(max(wanted, low), high)
        self._integral = integral + (chosen - wanted)  # back-calculation: u now equals the chosen log σ
        for exact in (self._sigma_min, self._sigma_max, self._sigma, applied):
            if chosen == math.log(exact):
                return exact  # no exp/log round-off at the bounds or when holding
        return math.exp(chosen)
