"""Threshold (bang-bang with hysteresis) control of the noise multiplier."""

from __future__ import annotations

from typing import Any

from controllers.base import MICurve, check_positive, check_step
from controllers.feedback import FeedbackController
from controllers.registry import register_controller

__all__ = ["ThresholdController"]


@register_controller("threshold", feedback=True)
class ThresholdController(FeedbackController):
    """Raise σ when a reading is over the ceiling, lower it when the reading is well under it.

    Per valid reading m (nats) at step t:

      * m > target: σ ← σ'·raise_factor, σ' the σ the reading was taken at (own σ, or the budget floor /
        sigma_max where those were in force), and the cool-down starts;
      * m < (1 − hysteresis)·target and at least ``cooldown`` steps since the last raise:
        σ ← σ / lower_factor;
      * otherwise (inside the band): σ unchanged;

    then σ is clamped to [sigma_min, sigma_max]. Raising fast and lowering slowly is the safe asymmetry:
    with leakage ∝ σ^−b (b ≈ 2), one lowering multiplies MI by lower_factor^b ≈ 1.2, so from inside the
    band it cannot jump over the ceiling, while one raise divides MI by ≈ 2.3. It never lowers σ on a
    reading over the ceiling, and (anti-windup) never lowers it on a reading taken while the budget floor or
    fail-closed set σ.

    Closed loop on ``controllers.simulation.REFERENCE_SCENARIOS`` (3 seeds × 3 000 steps, σ from 1; checked by
    ``tests/test_controller_closed_loop.py``): at most 1.0 % of steps after warm-up with true MI over
    1.1 × target, median σ/σ* 1.09–1.19 (σ* = the smallest σ meeting the ceiling). It oscillates inside its
    band where the PID settles, so the noisy steep stress plant (b = 4, 25 % noise) costs it 9.5 % of steps
    over 1.1 × target against the PID's 3.1 %.

    Args:
        target: leakage ceiling, nats (> 0).
        sigma_min, sigma_max: bounds (0 < sigma_min ≤ sigma_max).
        noise_multiplier: σ₀, the σ before the first reading, in the bounds.
        raise_factor: multiplicative raise over the ceiling; > 1.
        lower_factor: divisor when under the band; > 1.
        hysteresis: relative width of the band under the ceiling in which σ is held; 0 ≤ hysteresis < 1.
        cooldown: steps after a raise during which σ is not lowered; int ≥ 0.
        initial: deprecated name of ``noise_multiplier`` (DeprecationWarning).

    Raises:
        ValueError: naming the argument, for any value outside the ranges above.
        TypeError: if ``noise_multiplier`` is missing, or given under both names.

    Example:
        >>> c = ThresholdController(0.5, sigma_min=0.3, sigma_max=10.0, noise_multiplier=1.0)
        >>> c.update(None, 0)            # no reading yet: hold
        1.0
        >>> c.update(0.8, 1)             # over the 0.5-nat ceiling: raise ×1.5
        1.5
        >>> round(c.update(0.2, 2), 4)   # under the band (0.375 nats): lower ÷1.1
        1.3636
        >>> c.update(float("nan"), 3)    # failed reading: fail closed
        10.0
    """

    def __init__(
        self,
        target: float,
        *,
        sigma_min: float,
        sigma_max: float,
        noise_multiplier: float | None = None,
        raise_factor: float = 1.5,
        lower_factor: float = 1.1,
        hysteresis: float = 0.25,
        cooldown: int = 0,
        initial: float | None = None,
    ) -> None:
        self._raise_factor = _check_factor("raise_factor", raise_factor)
        self._lower_factor = _check_factor("lower_factor", lower_factor)
        try:
            band = float(hysteresis)
        except (TypeError, ValueError):
            band = float("nan")
        if not 0 <= band < 1:
            raise ValueError(f"hysteresis must lie in [0, 1), got {hysteresis!r}")
        self._hysteresis = band
        try:
            self._cooldown = check_step(cooldown)
        except ValueError:
            raise ValueError(f"cooldown must be an integer >= 0 (steps), got {cooldown!r}") from None
        super().__init__(
            target,
            sigma_min=sigma_min,
            sigma_max=sigma_max,
            noise_multiplier=noise_multiplier,
            initial=initial,
        )

    @property
    def lower_threshold(self) -> float:
        """(1 − hysteresis)·target: readings under it lower σ, nats."""
        return (1.0 - self._hysteresis) * self._target

    def config(self) -> dict[str, Any]:
        """The construction arguments as a plain dict."""
        return {
            **super().config(),
            "raise_factor": self._raise_factor,
            "lower_factor": self._lower_factor,
            "hysteresis": self._hysteresis,
            "cooldown": self._cooldown,
        }

    def _reset_law(self) -> None:
        self._last_raise: int | None = None

    def _law_state(self) -> dict[str, Any]:
        return {"last_raise": self._last_raise}

    def _load_law_state(self, state: dict[str, Any]) -> None:
        self._last_raise = None if state["last_raise"] is None else int(state["last_raise"])

    def _law(
        self, measurement: float, step: int, *, applied: float, overridden: bool, mi_curve: MICurve | None
    ) -> float:
        if measurement > self._target:
            self._last_raise = step
            return max(self._sigma, applied) * self._raise_factor
        cooled = self._last_raise is None or step - self._last_raise >= self._cooldown
        if measurement < self.lower_threshold and cooled and not overridden:
            return self._sigma / self._lower_factor
        return self._sigma


def _check_factor(name: str, value: Any) -> float:
    number = check_positive(name, value)
    if number <= 1:
        raise ValueError(f"{name} must be > 1, got {value!r}")
    return number
