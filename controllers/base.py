"""The controller protocol and the logic every noise-multiplier controller shares.

The engine calls ``update(measurement, step, sigma_floor=...)`` once per optimizer step and uses the
returned value as the noise multiplier σ of the next step. Two families implement it:

* feedback controllers (:class:`FeedbackController`: PID, threshold) turn a leakage reading (nats) into σ;
* open-loop schedules (:class:`Schedule`: Wei & Liu 2021 decays, constant) ignore the reading.

Shared rules, enforced here so the concrete controllers only write their control law:

* the controller's own σ always lies in ``[sigma_min, sigma_max]``;
* ``sigma_floor`` (the privacy budget's floor, from the engine) wins over everything, ``sigma_max`` included:
  the returned σ is ``max(own σ, sigma_floor)``; the engine decides whether to stop;
* ``measurement=None`` means no reading at this step: hold (the state is not touched);
* a non-finite reading (NaN, ±inf) is a failed reading: fail closed, i.e. return ``sigma_max`` until the next
  valid reading, and count the fault;
* anti-windup against overrides: when σ was decided by the floor or by fail-closed rather than by the control
  law, a low reading taken at that (higher) σ says little about the σ the law would need, so the law never
  lowers its own σ (nor winds its integral down) because of it; a reading over the ceiling taken there,
  though, raises the own σ from that higher σ (it leaked too much even there).

Everything is pure Python (numpy at most): no torch, no opacus.
"""

from __future__ import annotations

import math
import operator
from typing import Any, ClassVar, Protocol, runtime_checkable

__all__ = ["Controller", "FeedbackController", "Schedule", "check_bounds", "check_positive"]


@runtime_checkable
class Controller(Protocol):
    """What the engine calls once per optimizer step to get the next step's noise multiplier σ.

    Attributes:
        sigma_min: lowest σ the controller itself will choose (> 0).
        sigma_max: highest σ the controller itself will choose; only ``sigma_floor`` may exceed it.
    """

    sigma_min: float
    sigma_max: float

    def update(self, measurement: float | None, step: int, *, sigma_floor: float | None = None) -> float:
        """σ for the next step, given the reading (nats) taken at ``step`` (None: no reading, NaN: failed)."""
        ...

    def reset(self) -> None:
        """Back to the state right after construction."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """The full state as a plain JSON-able dict."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state produced by :meth:`state_dict` of the same kind of controller."""
        ...


def check_positive(name: str, value: Any) -> float:
    """``value`` as a float if it is finite and > 0.

    Raises:
        ValueError: naming ``name`` otherwise.
    """
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}") from None
    if not math.isfinite(number) or number <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return number


def check_bounds(sigma_min: Any, sigma_max: Any) -> tuple[float, float]:
    """Validated ``(sigma_min, sigma_max)``: both finite, 0 < sigma_min ≤ sigma_max.

    Raises:
        ValueError: naming the offending argument.
    """
    low = check_positive("sigma_min", sigma_min)
    high = check_positive("sigma_max", sigma_max)
    if low > high:
        raise ValueError(
            f"sigma_min ({low}) must not exceed sigma_max ({high}); swap them or widen the range"
        )
    return low, high


def check_in_bounds(name: str, value: Any, low: float, high: float) -> float:
    """``value`` as a float if it lies in ``[low, high]`` (the controller's σ bounds).

    Raises:
        ValueError: naming ``name`` otherwise.
    """
    number = check_positive(name, value)
    if not low <= number <= high:
        raise ValueError(f"{name} ({number}) must lie within [sigma_min, sigma_max] = [{low}, {high}]")
    return number


def check_step(step: Any) -> int:
    """The optimizer step as an int ≥ 0.

    Raises:
        ValueError: if ``step`` is not a non-negative integer.
    """
    try:
        index = operator.index(step)
    except TypeError:
        raise ValueError(f"step must be a non-negative integer, got {step!r}") from None
    if index < 0:
        raise ValueError(f"step must be a non-negative integer, got {step!r}")
    return index


def check_floor(sigma_floor: Any) -> float | None:
    """The budget floor as a float ≥ 0, or None.

    Raises:
        ValueError: if the floor is negative or not finite (a budget that cannot pay for a step is the
            engine's to handle: it stops with ``PrivacyBudgetExhausted`` before asking the controller).
    """
    if sigma_floor is None:
        return None
    try:
        floor = float(sigma_floor)
    except (TypeError, ValueError):
        raise ValueError(f"sigma_floor must be None or a finite number >= 0, got {sigma_floor!r}") from None
    if not math.isfinite(floor) or floor < 0:
        raise ValueError(f"sigma_floor must be None or a finite number >= 0, got {sigma_floor!r}")
    return floor


def check_measurement(measurement: Any) -> float | None:
    """The reading as a float (possibly NaN/inf), or None.

    Raises:
        ValueError: if it is neither None nor a real number.
    """
    if measurement is None:
        return None
    try:
        return float(measurement)
    except (TypeError, ValueError):
        raise ValueError(f"measurement must be a number (nats) or None, got {measurement!r}") from None


def _apply_floor(sigma: float, floor: float | None) -> float:
    return sigma if floor is None or floor <= sigma else floor


def _check_kind(owner: object, state: dict[str, Any]) -> None:
    if not isinstance(state, dict):
        raise ValueError(f"state must be a dict from state_dict(), got {type(state).__name__}")
    kind = state.get("type")
    expected = type(owner).registry_name  # type: ignore[attr-defined]
    if kind != expected:
        raise ValueError(
            f"state_dict of type {kind!r} cannot be loaded into {type(owner).__name__} "
            f"(expects {expected!r}); "
            "build the controller that saved it"
        )


class FeedbackController:
    """Base class of the feedback controllers: validation, bounds, hold, fail-closed, floor, state.

    Subclasses implement the control law in :meth:`_law` (new own σ from a valid reading) and keep their extra
    state in ``_law_state`` / ``_load_law_state``.

    Args:
        target: the leakage ceiling, nats (> 0).
        sigma_min: lowest σ the controller chooses (> 0).
        sigma_max: highest σ it chooses (≥ sigma_min); only the budget floor may exceed it.
        initial: σ before the first reading, in ``[sigma_min, sigma_max]``.

    Raises:
        ValueError: naming the argument, if target ≤ 0, sigma_min ≤ 0, sigma_min > sigma_max, or ``initial``
            lies outside the bounds (or any of them is not a finite number).
    """

    registry_name: ClassVar[str] = ""

    def __init__(self, target: float, *, sigma_min: float, sigma_max: float, initial: float) -> None:
        self._target = check_positive("target", target)
        self._sigma_min, self._sigma_max = check_bounds(sigma_min, sigma_max)
        self._initial = check_in_bounds("initial", initial, self._sigma_min, self._sigma_max)
        self.reset()

    # ---- read-only attributes -------------------------------------------------------------------------
    @property
    def target(self) -> float:
        """The leakage ceiling, nats."""
        return self._target

    @property
    def setpoint(self) -> float:
        """The reading the law steers towards, nats (the ceiling unless a subclass keeps a margin)."""
        return self._target

    @property
    def sigma_min(self) -> float:
        """Lowest σ the controller chooses."""
        return self._sigma_min

    @property
    def sigma_max(self) -> float:
        """Highest σ the controller chooses (the budget floor may exceed it)."""
        return self._sigma_max

    @property
    def initial(self) -> float:
        """σ before the first reading."""
        return self._initial

    @property
    def sigma(self) -> float:
        """The controller's current σ before the budget floor: ``sigma_max`` while failed closed."""
        return self._sigma_max if self._failed else self._sigma

    @property
    def last_error(self) -> float | None:
        """measurement − setpoint of the last valid reading (nats); None before one or after a failed one."""
        return self._last_error

    @property
    def faults(self) -> int:
        """How many failed (non-finite) readings the controller has seen."""
        return self._faults

    @property
    def failed(self) -> bool:
        """True while failed closed (the last reading was not finite)."""
        return self._failed

    # ---- protocol -------------------------------------------------------------------------------------
    def reset(self) -> None:
        """Back to the state right after construction (σ = initial, no faults, law state cleared)."""
        self._sigma = self._initial
        self._failed = False
        self._faults = 0
        self._readings = 0
        self._last_error: float | None = None
        self._reset_law()

    def update(self, measurement: float | None, step: int, *, sigma_floor: float | None = None) -> float:
        """σ for the next step.

        Args:
            measurement: the leakage reading taken at ``step`` (nats); None when no reading was taken (hold:
                state unchanged); NaN/±inf when the reading failed (fail closed: ``sigma_max`` until the
                next valid reading; the fault is counted).
            step: the optimizer step just taken (int ≥ 0).
            sigma_floor: the privacy budget's floor for the next step, or None; wins over ``sigma_max``.

        Returns:
            The controller's σ in ``[sigma_min, sigma_max]``, raised to ``sigma_floor`` where that is higher.

        Raises:
            ValueError: if ``step`` is not an int ≥ 0, ``sigma_floor`` is negative or not finite, or
                ``measurement`` is not a number.
        """
        step = check_step(step)
        floor = check_floor(sigma_floor)
        value = check_measurement(measurement)
        if value is None:
            return _apply_floor(self.sigma, floor)
        if not math.isfinite(value):
            self._failed = True
            self._faults += 1
            self._last_error = None
            return _apply_floor(self.sigma, floor)
        # σ in force when the reading was taken: sigma_max while failed closed, else own σ raised to the floor
        # (the budget floor moves slowly: this step's floor stands for the one the reading was taken under).
        applied = self._sigma_max if self._failed else _apply_floor(self._sigma, floor)
        overridden = self._failed or (floor is not None and floor >= self._sigma)
        self._failed = False
        self._last_error = value - self.setpoint
        own = self._law(value, step, applied=applied, overridden=overridden)
        self._sigma = min(max(own, self._sigma_min), self._sigma_max)
        self._readings += 1
        return _apply_floor(self._sigma, floor)

    def state_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict: ``type``, ``config`` (for reference) and ``state``."""
        state = {
            "sigma": self._sigma,
            "failed": self._failed,
            "faults": self._faults,
            "readings": self._readings,
            "last_error": self._last_error,
            **self._law_state(),
        }
        return {"type": self.registry_name, "config": self.config(), "state": state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the dynamic state saved by :meth:`state_dict` (the configuration stays this object's).

        Raises:
            ValueError: if ``state`` comes from another kind of controller or lacks fields.
        """
        _check_kind(self, state)
        try:
            inner = state["state"]
            self._sigma = min(max(float(inner["sigma"]), self._sigma_min), self._sigma_max)
            self._failed = bool(inner["failed"])
            self._faults = int(inner["faults"])
            self._readings = int(inner["readings"])
            self._last_error = None if inner["last_error"] is None else float(inner["last_error"])
            self._load_law_state(inner)
        except (KeyError, TypeError) as error:
            raise ValueError(f"incomplete {self.registry_name!r} state_dict: {error!r}") from None

    def config(self) -> dict[str, Any]:
        """The construction arguments as a plain dict."""
        return {
            "target": self._target,
            "sigma_min": self._sigma_min,
            "sigma_max": self._sigma_max,
            "initial": self._initial,
        }

    def __repr__(self) -> str:
        args = ", ".join(f"{key}={value!r}" for key, value in self.config().items())
        return f"{type(self).__name__}({args})"

    # ---- to implement ---------------------------------------------------------------------------------
    def _reset_law(self) -> None:
        """Clear the law's own state."""

    def _law(self, measurement: float, step: int, *, applied: float, overridden: bool) -> float:
        """New own σ from a finite reading.

        ``applied``: the σ in force when the reading was taken (≥ own σ); ``overridden``: the floor or
        fail-closed, not the law, set σ then or sets it next. A reading over the ceiling taken at ``applied``
        calls for at least ``applied``; a low one taken there must not lower the own σ (anti-windup).
        """
        raise NotImplementedError

    def _law_state(self) -> dict[str, Any]:
        return {}

    def _load_law_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`_law_state` saved."""


class Schedule:
    """Base class of the open-loop schedules: σ is a function of the step alone.

    ``update(measurement, step)`` ignores the measurement and returns :meth:`sigma_at` ``(step)`` raised to
    ``sigma_floor``. With the engine's convention (``update`` after optimizer step t, 1-based, gives σ of step
    t + 1) step t + 1 runs at ``sigma_at(t)``: its 0-based index.

    Args:
        sigma_start: σ₀, the value at t = 0 (> 0).
        sigma_end: σ_T, the value at t = total_steps and after (> 0).
        total_steps: T (≥ 1).
        sigma_min, sigma_max: optional outer bounds (defaults: the smaller / larger endpoint); both endpoints
            must lie inside them.

    Raises:
        ValueError: naming the argument, if an endpoint is ≤ 0 or outside the bounds, total_steps < 1, or
            sigma_min > sigma_max.
    """

    registry_name: ClassVar[str] = ""

    def __init__(
        self,
        *,
        sigma_start: float,
        sigma_end: float,
        total_steps: int,
        sigma_min: float | None = None,
        sigma_max: float | None = None,
    ) -> None:
        self._sigma_start = check_positive("sigma_start", sigma_start)
        self._sigma_end = check_positive("sigma_end", sigma_end)
        self._total_steps = _check_total_steps(total_steps)
        low = min(self._sigma_start, self._sigma_end) if sigma_min is None else sigma_min
        high = max(self._sigma_start, self._sigma_end) if sigma_max is None else sigma_max
        self._sigma_min, self._sigma_max = check_bounds(low, high)
        check_in_bounds("sigma_start", self._sigma_start, self._sigma_min, self._sigma_max)
        check_in_bounds("sigma_end", self._sigma_end, self._sigma_min, self._sigma_max)
        self._last_step: int | None = None

    @property
    def sigma_start(self) -> float:
        """σ₀."""
        return self._sigma_start

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
            return self._sigma_start
        if t >= self._total_steps:
            return self._sigma_end
        value = self._formula(t)
        return min(max(value, self._sigma_min), self._sigma_max)

    def update(self, measurement: float | None, step: int, *, sigma_floor: float | None = None) -> float:
        """``sigma_at(step)`` raised to ``sigma_floor``; the measurement is ignored (open loop).

        Raises:
            ValueError: if ``step`` is not an int ≥ 0 or ``sigma_floor`` is negative / not finite.
        """
        t = check_step(step)
        floor = check_floor(sigma_floor)
        self._last_step = t
        return _apply_floor(self.sigma_at(t), floor)

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
        _check_kind(self, state)
        try:
            last = state["state"]["last_step"]
        except (KeyError, TypeError) as error:
            raise ValueError(f"incomplete {self.registry_name!r} state_dict: {error!r}") from None
        self._last_step = None if last is None else check_step(last)

    def config(self) -> dict[str, Any]:
        """The construction arguments as a plain dict."""
        return {
            "sigma_start": self._sigma_start,
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
