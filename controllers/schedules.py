"""Open-loop noise schedules: σ as a function of the step alone (Wei & Liu 2021), plus a constant.

All go from ``noise_multiplier`` σ₀ at t = 0 to ``sigma_end`` σ_T at t = ``total_steps`` T (exactly; both
endpoints are returned verbatim) and hold σ_T after T. Each is monotone between its endpoints. They ignore the
measurement (and the MI curve) and honour the budget floor (see :class:`Schedule` for the step convention).

Source: Wei & Liu, "Dynamic Differential-Privacy Preserving SGD" (2021), the decay schedules for σ_t.
"""

from __future__ import annotations

import math
import operator
from typing import Any, ClassVar

from controllers.base import (
    MICurve,
    apply_floor,
    check_bounds,
    check_floor,
    check_in_bounds,
    check_positive,
    check_state_kind,
    check_step,
    deprecated_attribute,
    renamed_keyword,
)
from controllers.registry import register_controller

__all__ = [
    "ConstantNoise",
    "CyclicDecay",
    "ExponentialDecay",
    "LinearDecay",
    "Schedule",
    "StaircaseDecay",
    "default_sigma_end",
]

END_RATIO = 1.0 / 3.0
"""Default σ_T/σ₀ of the factory's decays (e.g. 2.0 → 0.67)."""


def default_sigma_end(noise_multiplier: float, sigma_min: float | None = None) -> float:
    """The factory's default σ_T: σ₀/3 (σ₀ = ``noise_multiplier``), but not under ``sigma_min``.

    Raises:
        ValueError: if ``noise_multiplier`` is not finite and > 0.
    """
    start = check_positive("noise_multiplier", noise_multiplier)
    end = start * END_RATIO
    return end if sigma_min is None else min(start, max(end, float(sigma_min)))


class Schedule:
    """Base class of the open-loop schedules: σ is a function of the step alone.

    ``update(measurement, step)`` ignores the measurement and returns :meth:`sigma_at` ``(step)`` raised to
    ``sigma_floor``. With the engine's convention (``update`` after optimizer step t, 1-based, gives σ of step
    t + 1) step t + 1 runs at ``sigma_at(t)``: its 0-based index. Subclasses implement :meth:`_formula` and
    register with ``@controllers.registry.register_controller(name, feedback=False)``.

    Args:
        noise_multiplier: σ₀, the value at t = 0 (> 0).
        sigma_end: σ_T, the value at t = total_steps and after (> 0).
        total_steps: T (≥ 1).
        sigma_min, sigma_max: optional outer bounds (defaults: the smaller / larger endpoint); both endpoints
            must lie inside them.
        sigma_start: deprecated name of ``noise_multiplier`` (DeprecationWarning; removed in the next release).

    Raises:
        ValueError: naming the argument, if an endpoint is ≤ 0 or outside the bounds, total_steps < 1, or
            sigma_min > sigma_max.
        TypeError: if ``noise_multiplier`` is missing, or given under both names.
    """

    registry_name: ClassVar[str] = ""
    uses_mi_curve: ClassVar[bool] = False

    def __init__(
        self,
        *,
        noise_multiplier: float | None = None,
        sigma_end: float,
        total_steps: int,
        sigma_min: float | None = None,
        sigma_max: float | None = None,
        sigma_start: float | None = None,
    ) -> None:
        start = renamed_keyword(
            type(self).__name__,
            new="noise_multiplier",
            value=noise_multiplier,
            old="sigma_start",
            old_value=sigma_start,
        )
        self._noise_multiplier = check_positive("noise_multiplier", start)
        self._sigma_end = check_positive("sigma_end", sigma_end)
        self._total_steps = _check_total_steps(total_steps)
        low = min(self._noise_multiplier, self._sigma_end) if sigma_min is None else sigma_min
        high = max(self._noise_multiplier, self._sigma_end) if sigma_max is None else sigma_max
        self._sigma_min, self._sigma_max = check_bounds(low, high)
        check_in_bounds("noise_multiplier", self._noise_multiplier, self._sigma_min, self._sigma_max)
        check_in_bounds("sigma_end", self._sigma_end, self._sigma_min, self._sigma_max)
        self._last_step: int | None = None

    @classmethod
    def from_settings(
        cls,
        *,
        target_mi: float | None = None,
        sigma_min: float,
        sigma_max: float,
        noise_multiplier: float,
        total_steps: int | None = None,
        sigma_end: float | None = None,
        **options: Any,
    ) -> Schedule:
        """Build from :func:`controllers.registry.build_controller`'s settings (``target_mi`` is ignored; σ_T
        defaults to :func:`default_sigma_end`).

        Raises:
            ValueError: if ``total_steps`` is None, or as the constructor.
        """
        if total_steps is None:
            raise ValueError(
                f"schedule {cls.registry_name!r} needs total_steps (the number of planned optimizer steps, e.g. "
                "epochs × steps per epoch)"
            )
        end = default_sigma_end(noise_multiplier, sigma_min) if sigma_end is None else sigma_end
        return cls(
            noise_multiplier=noise_multiplier,
            sigma_end=end,
            total_steps=total_steps,
            sigma_min=sigma_min,
            sigma_max=sigma_max,
            **options,
        )

    @property
    def noise_multiplier(self) -> float:
        """σ₀, the value at t = 0."""
        return self._noise_multiplier

    @property
    def sigma_start(self) -> float:
        """Deprecated name of :attr:`noise_multiplier` (DeprecationWarning)."""
        return deprecated_attribute(self, "sigma_start", "noise_multiplier")

    @property
    def sigma_end(self) -> float:
        """σ_T."""
        return self._sigma_end

    @property
    def total_steps(self) -> int:
        """T."""
        return self._total_steps

    @property
    def sigma_min(self) -> float:
        """Lowest σ the schedule returns (before the floor)."""
        return self._sigma_min

    @property
    def sigma_max(self) -> float:
        """Highest σ the schedule returns (the floor may exceed it)."""
        return self._sigma_max

    @property
    def sigma(self) -> float:
        """σ at the last step passed to :meth:`update` (σ₀ before any)."""
        return self.sigma_at(0 if self._last_step is None else self._last_step)

    @property
    def last_error(self) -> None:
        """Always None: a schedule has no setpoint."""
        return None

    def sigma_at(self, step: int) -> float:
        """σ_t for t = ``step``: σ₀ at 0, σ_T exactly at T and beyond, the schedule's formula in between.

        Raises:
            ValueError: if ``step`` is not an int ≥ 0.
        """
        t = check_step(step)
        if t == 0:
            return self._noise_multiplier
        if t >= self._total_steps:
            return self._sigma_end
        value = self._formula(t)
        return min(max(value, self._sigma_min), self._sigma_max)

    def update(
        self,
        measurement: float | None,
        step: int,
        *,
        sigma_floor: float | None = None,
        mi_curve: MICurve | None = None,
    ) -> float:
        """``sigma_at(step)`` raised to ``sigma_floor``; the measurement and ``mi_curve`` are ignored (open loop).

        Raises:
            ValueError: if ``step`` is not an int ≥ 0 or ``sigma_floor`` is negative / not finite.
        """
        t = check_step(step)
        floor = check_floor(sigma_floor)
        self._last_step = t
        return apply_floor(self.sigma_at(t), floor)

    def reset(self) -> None:
        """Forget the last step."""
        self._last_step = None

    def state_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict: ``type``, ``config`` and ``state`` (the last step seen)."""
        return {"type": self.registry_name, "config": self.config(), "state": {"last_step": self._last_step}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the last step seen.

        Raises:
            ValueError: if ``state`` comes from another kind of controller or lacks fields.
        """
        check_state_kind(self, state)
        try:
            last = state["state"]["last_step"]
        except (KeyError, TypeError) as error:
            raise ValueError(f"incomplete {self.registry_name!r} state_dict: {error!r}") from None
        self._last_step = None if last is None else check_step(last)

    def config(self) -> dict[str, Any]:
        """The construction arguments as a plain dict."""
        return {
            "noise_multiplier": self._noise_multiplier,
            "sigma_end": self._sigma_end,
            "total_steps": self._total_steps,
            "sigma_min": self._sigma_min,
            "sigma_max": self._sigma_max,
        }

    def __repr__(self) -> str:
        args = ", ".join(f"{key}={value!r}" for key, value in self.config().items())
        return f"{type(self).__name__}({args})"

    def _formula(self, t: int) -> float:
        """σ_t for 0 < t < T."""
        raise NotImplementedError


def _check_total_steps(total_steps: Any) -> int:
    try:
        steps = operator.index(total_steps)
    except TypeError:
        raise ValueError(f"total_steps must be an integer >= 1, got {total_steps!r}") from None
    if steps < 1:
        raise ValueError(f"total_steps must be an integer >= 1, got {total_steps!r}")
    return steps


@register_controller("linear", feedback=False)
class LinearDecay(Schedule):
    """σ_t = σ₀ + (σ_T − σ₀)·t/T.

    Args/Raises: see :class:`Schedule` (keyword-only ``noise_multiplier`` σ₀, ``sigma_end``, ``total_steps``,
    optional ``sigma_min``/``sigma_max``).

    Example:
        >>> s = LinearDecay(noise_multiplier=2.0, sigma_end=0.5, total_steps=3)
        >>> [s.update(None, t) for t in range(5)]   # σ of steps 1..5: σ_T from step T + 1 on
        [2.0, 1.5, 1.0, 0.5, 0.5]
    """

    def _formula(self, t: int) -> float:
        return self._noise_multiplier + (self._sigma_end - self._noise_multiplier) * (t / self._total_steps)


@register_controller("staircase", feedback=False)
class StaircaseDecay(Schedule):
    """Step decay σ_t = σ₀ − (σ₀ − σ_T)·⌊t/s⌋/⌊T/s⌋ with ``step_size`` s (σ_T from t = T on).

    Args:
        step_size: s, steps per stair, 1 ≤ s ≤ T; default max(1, T // 10) (ten stairs).
        **settings: see :class:`Schedule`.

    Raises:
        ValueError: naming the argument (``step_size`` outside [1, total_steps], and the base class's checks).
    """

    def __init__(self, *, step_size: int | None = None, **settings: Any) -> None:
        super().__init__(**settings)
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
        drop = self._noise_multiplier - self._sigma_end
        return self._noise_multiplier - drop * ((t // self._step_size) / stairs)


@register_controller("exponential", feedback=False)
class ExponentialDecay(Schedule):
    """σ_t = σ₀·(σ_T/σ₀)^(t/T) (a straight line in log σ).

    Args/Raises: see :class:`Schedule`.
    """

    def _formula(self, t: int) -> float:
        ratio = self._sigma_end / self._noise_multiplier
        return self._noise_multiplier * math.exp(math.log(ratio) * (t / self._total_steps))


@register_controller("cyclic", feedback=False)
class CyclicDecay(Schedule):
    """Cosine decay σ_t = σ₀·cos(arccos(σ_T/σ₀)·t/T); needs σ_T ≤ σ₀ (arccos of a ratio ≤ 1).

    Args/Raises: see :class:`Schedule`; also ValueError if ``sigma_end`` > σ₀.
    """

    def __init__(self, **settings: Any) -> None:
        super().__init__(**settings)
        if self._sigma_end > self._noise_multiplier:
            raise ValueError(
                f"sigma_end ({self._sigma_end}) must not exceed noise_multiplier σ₀ ({self._noise_multiplier}) "
                "for the cyclic (cosine) decay; use 'linear' or 'exponential' for a rising schedule"
            )
        self._angle = math.acos(self._sigma_end / self._noise_multiplier)

    def _formula(self, t: int) -> float:
        return self._noise_multiplier * math.cos(self._angle * (t / self._total_steps))


@register_controller("constant", feedback=False)
class ConstantNoise(Schedule):
    """σ_t = σ₀ for every step (the plain DP-SGD baseline); honours the budget floor like the others.

    Args:
        noise_multiplier: σ₀, the noise multiplier (> 0); may be given positionally.
        total_steps: optional, only recorded (default 1).
        sigma_min, sigma_max: optional bounds containing σ₀.
        sigma: deprecated name of ``noise_multiplier`` (DeprecationWarning; removed in the next release).

    Raises:
        ValueError: naming the argument.
        TypeError: if ``noise_multiplier`` is missing, or given under both names.
    """

    def __init__(
        self,
        noise_multiplier: float | None = None,
        *,
        total_steps: int = 1,
        sigma_min: float | None = None,
        sigma_max: float | None = None,
        sigma: float | None = None,
    ) -> None:
        value = renamed_keyword(
            "ConstantNoise", new="noise_multiplier", value=noise_multiplier, old="sigma", old_value=sigma
        )
        value = check_positive("noise_multiplier", value)
        super().__init__(
            noise_multiplier=value,
            sigma_end=value,
            total_steps=total_steps,
            sigma_min=sigma_min,
            sigma_max=sigma_max,
        )

    @classmethod
    def from_settings(
        cls,
        *,
        target_mi: float | None = None,
        sigma_min: float,
        sigma_max: float,
        noise_multiplier: float,
        total_steps: int | None = None,
        sigma_end: float | None = None,
        **options: Any,
    ) -> ConstantNoise:
        """Build from :func:`controllers.registry.build_controller`'s settings: holds ``noise_multiplier``;
        ``target_mi`` and ``sigma_end`` are ignored, ``total_steps`` is optional."""
        steps = 1 if total_steps is None else total_steps
        return cls(noise_multiplier, total_steps=steps, sigma_min=sigma_min, sigma_max=sigma_max, **options)

    def config(self) -> dict[str, Any]:
        """The construction arguments as a plain dict."""
        return {
            "noise_multiplier": self._noise_multiplier,
            "total_steps": self._total_steps,
            "sigma_min": self._sigma_min,
            "sigma_max": self._sigma_max,
        }

    def _formula(self, t: int) -> float:
        return self._noise_multiplier
