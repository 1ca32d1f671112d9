"""The controller protocol, the MI-curve type, and the argument checks every controller shares.

The engine calls ``update(measurement, step, sigma_floor=..., mi_curve=...)`` once per optimizer step and uses
the returned value as the noise multiplier σ of the next step. Two families implement it:

* feedback controllers (:class:`controllers.feedback.FeedbackController`: PID, threshold, predictive) turn a
  leakage reading (nats) into σ;
* open-loop schedules (:class:`controllers.schedules.Schedule`: Wei & Liu 2021 decays, constant) ignore it.

Shared rules (enforced by those two base classes, so the concrete controllers only write their law):

* the controller's own σ always lies in ``[sigma_min, sigma_max]``;
* ``sigma_floor`` (the privacy budget's floor, from the engine) wins over everything, ``sigma_max`` included:
  the returned σ is ``max(own σ, sigma_floor)``; the engine decides whether to stop;
* ``measurement=None`` means no reading at this step: hold (the state is not touched);
* a non-finite reading (NaN, ±inf) is a failed reading: fail closed, i.e. return ``sigma_max`` until the next
  valid reading, and count the fault;
* ``mi_curve`` (optional, :data:`MICurve`) is the estimator's prediction of the reading at any other σ, on the
  same audit gradients; controllers that cannot use it ignore it.

Everything is pure Python (numpy at most): no torch, no opacus.
"""

from __future__ import annotations

import inspect
import math
import operator
import os
import warnings
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

__all__ = [
    "Controller",
    "MICurve",
    "apply_floor",
    "check_bounds",
    "check_curve",
    "check_floor",
    "check_in_bounds",
    "check_measurement",
    "check_nonnegative",
    "check_positive",
    "check_state_kind",
    "check_step",
    "check_unit_interval",
    "deprecated_attribute",
    "renamed_keyword",
]

MICurve = Callable[[float], tuple[float, float]]
"""σ ↦ (MI(σ), stderr(σ)), both in nats: the leakage the estimator would read at noise multiplier σ (> 0), on the
audit gradients of the current reading, and the standard error of that estimate. Expected to be
non-increasing in σ (more noise, less leakage). The likelihood-ratio estimator can give one (it re-scores its
audit pairs at any σ); the token-MINE estimator cannot (the engine then passes None)."""


@runtime_checkable
class Controller(Protocol):
    """What the engine calls once per optimizer step to get the next step's noise multiplier σ.

    Attributes:
        sigma_min: lowest σ the controller itself will choose (> 0).
        sigma_max: highest σ the controller itself will choose; only ``sigma_floor`` may exceed it.

    A controller that uses the MI curve sets the class attribute ``uses_mi_curve = True`` (the engine computes a
    curve only for those); it is optional (default False) and not part of the runtime check.
    """

    sigma_min: float
    sigma_max: float

    def update(
        self,
        measurement: float | None,
        step: int,
        *,
        sigma_floor: float | None = None,
        mi_curve: MICurve | None = None,
    ) -> float:
        """σ for the next step, given the reading (nats) taken at ``step`` (None: no reading, NaN: failed) and,
        optionally, the estimator's curve σ ↦ (MI, stderr) at that reading."""
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


def check_nonnegative(name: str, value: Any) -> float:
    """``value`` as a float if it is finite and ≥ 0.

    Raises:
        ValueError: naming ``name`` otherwise.
    """
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}") from None
    if not math.isfinite(number) or number < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return number


def check_unit_interval(name: str, value: Any) -> float:
    """``value`` as a float if it lies in [0, 1).

    Raises:
        ValueError: naming ``name`` otherwise.
    """
    number = check_nonnegative(name, value)
    if number >= 1:
        raise ValueError(f"{name} must lie in [0, 1), got {value!r}")
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


def check_curve(mi_curve: Any) -> MICurve | None:
    """``mi_curve`` if it is None or callable.

    Raises:
        ValueError: otherwise.
    """
    if mi_curve is not None and not callable(mi_curve):
        raise ValueError(
            f"mi_curve must be None or a callable σ -> (MI nats, stderr nats), got {type(mi_curve).__name__}"
        )
    return mi_curve


def apply_floor(sigma: float, floor: float | None) -> float:
    """``max(sigma, floor)``, ``sigma`` itself when there is no floor."""
    return sigma if floor is None or floor <= sigma else floor


def check_state_kind(owner: object, state: Any) -> None:
    """Check that ``state`` is a ``state_dict()`` of ``owner``'s registered kind.

    Raises:
        ValueError: if ``state`` is not a dict or its ``type`` differs from ``type(owner).registry_name``.
    """
    if not isinstance(state, dict):
        raise ValueError(f"state must be a dict from state_dict(), got {type(state).__name__}")
    kind = state.get("type")
    expected = type(owner).registry_name  # type: ignore[attr-defined]
    if kind != expected:
        raise ValueError(
            f"state_dict of type {kind!r} cannot be loaded into {type(owner).__name__} "
            f"(expects {expected!r}); build the controller that saved it"
        )


_PACKAGE = os.path.dirname(os.path.abspath(__file__))


def _caller_stacklevel(internal: tuple[str, ...]) -> int:
    """``stacklevel`` for :func:`warnings.warn` called from :func:`renamed_keyword` that points at the first frame
    outside this package and outside the files in ``internal``."""
    frame, level = inspect.currentframe(), 0
    while frame is not None:
        path = os.path.abspath(frame.f_code.co_filename)
        if os.path.dirname(path) != _PACKAGE and path not in internal:
            break
        frame, level = frame.f_back, level + 1
    return max(level, 1)


def renamed_keyword(
    owner: str,
    *,
    new: str,
    value: Any,
    old: str,
    old_value: Any,
    required: bool = True,
    internal: tuple[str, ...] = (),
) -> Any:
    """The value of keyword ``new``, or of its deprecated former name ``old`` (with a DeprecationWarning).

    Engine v2 gave one name to each concept (``noise_multiplier`` for the initial σ₀, formerly ``initial`` and
    ``sigma_start``); the old names keep working for one release.

    Args:
        owner: the callable's name, for the messages.
        new, value: the canonical keyword and the value passed for it (None: not passed).
        old, old_value: the deprecated keyword and the value passed for it (None: not passed).
        required: raise when neither is passed.
        internal: extra source files whose frames the warning skips (it points at the first caller outside
            ``controllers/`` and these files).

    Returns:
        ``value``, or ``old_value`` when only the old keyword was passed (None when neither and not required).

    Raises:
        TypeError: if both names are passed, or neither while ``required`` (as Python does for a missing
            keyword argument).
    """
    if old_value is None:
        if value is None and required:
            raise TypeError(f"{owner}() missing required keyword argument: {new!r}")
        return value
    if value is not None:
        raise TypeError(f"{owner}() got both {new}= and its deprecated name {old}=; pass only {new}=")
    warnings.warn(
        f"{owner}(): the keyword {old}= is deprecated, use {new}= (same meaning); {old}= will be removed in the "
        "next release",
        DeprecationWarning,
        stacklevel=_caller_stacklevel(tuple(os.path.abspath(path) for path in internal)),
    )
    return old_value


def deprecated_attribute(owner: object, old: str, new: str) -> Any:
    """``getattr(owner, new)`` with a DeprecationWarning that ``old`` was renamed to ``new``."""
    warnings.warn(
        f"{type(owner).__name__}.{old} is deprecated, use .{new} (same value); .{old} will be removed in the next "
        "release",
        DeprecationWarning,
        stacklevel=_caller_stacklevel(()),
    )
    return getattr(owner, new)
