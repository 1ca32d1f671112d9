"""Open-loop noise schedules: σ as a function of the step alone (Wei & Liu 2021), plus a constant.

All go from ``sigma_start`` σ₀ at t = 0 to ``sigma_end`` σ_T at t = ``total_steps`` T (exactly; both endpoints
are returned verbatim) and hold σ_T after T. Each is monotone between its endpoints. They ignore the
measurement and honour the budget floor (see :class:`controllers.base.Schedule` for the step convention).

Source: Wei & Liu, "Dynamic Differential-Privacy Preserving SGD" (2021), the decay schedules for σ_t.
"""

from __future__ import annotations

import math
import operator
from typing import Any

from controllers.base import Schedule, check_positive

__all__ = [
    "ConstantNoise",
    "CyclicDecay",
    "ExponentialDecay",
    "LinearDecay",
    "StaircaseDecay",
    "default_sigma_end",
]

END_RATIO = 1.0 / 3.0
"""Default σ_T/σ₀ of the factory's decays (the DESIGN.md example decays 2.0 → 0.65)."""


def default_sigma_end(sigma_start: float, sigma_min: float | None = None) -> float:
    """The factory's default σ_T: σ₀/3, but not under ``sigma_min``.

    Raises:
        ValueError: if ``sigma_start`` is not finite and > 0.
    """
    start = check_positive("sigma_start", sigma_start)
    end = start * END_RATIO
    return end if sigma_min is None else min(start, max(end, float(sigma_min)))


class LinearDecay(Schedule):
    """σ_t = σ₀ + (σ_T − σ₀)·t/T.

    Args/Raises: see :class:`controllers.base.Schedule` (keyword-only ``sigma_start``, ``sigma_end``,
    ``total_steps``, optional ``sigma_min``/``sigma_max``).

    Example:
        >>> s = LinearDecay(sigma_start=2.0, sigma_end=0.5, total_steps=3)
        >>> [s.update(None, t) for t in range(5)]   # σ of steps 1..5: σ_T from step T + 1 on
        [2.0, 1.5, 1.0, 0.5, 0.5]
    """

    registry_name = "linear"

    def _formula(self, t: int) -> float:
        return self._sigma_start + (self._sigma_end - self._sigma_start) * (t / self._total_steps)


class ExponentialDecay(Schedule):
    """σ_t = σ₀·(σ_T/σ₀)^(t/T) (a straight line in log σ).

    Args/Raises: see :class:`controllers.base.Schedule`.
    """

    registry_name = "exponential"

    def _formula(self, t: int) -> float:
        return self._sigma_start * math.exp(
            math.log(self._sigma_end / self._sigma_start) * (t / self._total_steps)
        )


class CyclicDecay(Schedule):
    """Cosine decay σ_t = σ₀·cos(arccos(σ_T/σ₀)·t/T); needs σ_T ≤ σ₀ (arccos of a ratio ≤ 1).

    Args/Raises: see :class:`controllers.base.Schedule`; also ValueError if ``sigma_end`` > ``sigma_start``.
    """

    registry_name = "cyclic"

    def __init__(self, *, sigma_start: float, sigma_end: float, total_steps: int, **bounds: Any) -> None:
        super().__init__(sigma_start=sigma_start, sigma_end=sigma_end, total_steps=total_steps, **bounds)
        if self._sigma_end > self._sigma_start:
            raise ValueError(
                f"sigma_end ({self._sigma_end}) must not exceed sigma_start ({self._sigma_start}) "
                "for the cyclic "
                "(cosine) decay; use 'linear' or 'exponential' for a rising schedule"
            )
        self._angle = math.acos(self._sigma_end / self._sigma_start)

    def _formula(self, t: int) -> float:
        return self._sigma_start * math.cos(self._angle * (t / self._total_steps))


class StaircaseDecay(Schedule):
    """Step decay σ_t = σ₀ − (σ₀ − σ_T)·⌊t/s⌋/⌊T/s⌋ with ``step_size`` s (σ_T from t = T on).

    Args:
        step_size: s, steps per stair, 1 ≤ s ≤ T; default max(1, T // 10) (ten stairs).
        others: see :class:`controllers.base.Schedule`.

    Raises:
        ValueError: naming the argument (``step_size`` outside [1, total_steps], and the base class's checks).
    """

    registry_name = "staircase"

    def __init__(
        self,
        *,
        sigma_start: float,
        sigma_end: float,
        total_steps: int,
        step_size: int | None = None,
        **bounds: Any,
    ) -> None:
        super().__init__(sigma_start=sigma_start, sigma_end=sigma_end, total_steps=total_steps, **bounds)
        if step_size is None:
            step_size = max(1, self._total_steps // 10)
        try:
            size = operator.index(step_size)
        except TypeError:
            size = 0
        if not 1 <= size <= self._total_steps:
            raise ValueError(
                f"step_size must be an integer in [1, total_steps={self._total_steps}], got {step_size!r}"
            )
        self._step_size = size

    @property
    def step_size(self) -> int:
        """s, steps per stair."""
        return self._step_size

    def config(self) -> dict[str, Any]:
        """The construction arguments as a plain dict."""
        return {**super().config(), "step_size": self._step_size}

    def _formula(self, t: int) -> float:
        stairs = self._total_steps // self._step_size
        return self._sigma_start - (self._sigma_start - self._sigma_end) * ((t // self._step_size) / stairs)


class ConstantNoise(Schedule):
    """σ_t = σ for every step (the plain DP-SGD baseline); honours the budget floor like the others.

    Args:
        sigma: the noise multiplier (> 0).
        total_steps: optional, only recorded (default 1).
        sigma_min, sigma_max: optional bounds containing ``sigma``.

    Raises:
        ValueError: naming the argument.
    """

    registry_name = "constant"

    def __init__(
        self,
        sigma: float,
        *,
        total_steps: int = 1,
        sigma_min: float | None = None,
        sigma_max: float | None = None,
    ) -> None:
        value = check_positive("sigma", sigma)
        super().__init__(
            sigma_start=value,
            sigma_end=value,
            total_steps=total_steps,
            sigma_min=sigma_min,
            sigma_max=sigma_max,
        )

    def _formula(self, t: int) -> float:
        return self._sigma_start
