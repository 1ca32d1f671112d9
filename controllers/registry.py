"""Controllers by name, and the factory that builds one from the engine's / CLI's arguments."""

from __future__ import annotations

from typing import Any

from controllers.base import FeedbackController, Schedule
from controllers.pid import PIDController
from controllers.schedules import (
    ConstantNoise,
    CyclicDecay,
    ExponentialDecay,
    LinearDecay,
    StaircaseDecay,
    default_sigma_end,
)
from controllers.threshold import ThresholdController

__all__ = ["CONTROLLERS", "FEEDBACK", "SCHEDULES", "build_controller"]

CONTROLLERS: dict[str, type] = {
    "pid": PIDController,
    "threshold": ThresholdController,
    "linear": LinearDecay,
    "staircase": StaircaseDecay,
    "exponential": ExponentialDecay,
    "cyclic": CyclicDecay,
    "constant": ConstantNoise,
}
"""Every controller by the name used by ``--controller NAME`` and ``make_private(controller=NAME)``."""

FEEDBACK = tuple(name for name, cls in CONTROLLERS.items() if issubclass(cls, FeedbackController))
SCHEDULES = tuple(name for name, cls in CONTROLLERS.items() if issubclass(cls, Schedule))


def build_controller(
    name: str,
    *,
    target_mi: float | None,
    sigma_min: float,
    sigma_max: float,
    initial: float,
    total_steps: int | None = None,
    sigma_end: float | None = None,
    **options: Any,
) -> FeedbackController | Schedule:
    """Build the controller called ``name`` from the engine's arguments.

    Feedback controllers (``"pid"``, ``"threshold"``) get ``target_mi`` as their ceiling and ignore
    ``total_steps``/``sigma_end``. Schedules go from ``initial`` to ``sigma_end`` (default: ``initial``/3,
    not under ``sigma_min``) over ``total_steps``, bounded by [sigma_min, sigma_max], and ignore
    ``target_mi`` (the monitor may still read leakage); ``"constant"`` holds ``initial`` and needs no
    ``total_steps``.

    Args:
        name: one of :data:`CONTROLLERS` (case-insensitive).
        target_mi: leakage ceiling, nats; required by the feedback controllers.
        sigma_min, sigma_max: bounds of the controller's σ.
        initial: σ of the first step (σ₀ of a schedule).
        total_steps: T of a schedule (the planned optimizer steps).
        sigma_end: σ_T of a schedule.
        **options: extra keyword arguments of the class (e.g. ``kp=``, ``hysteresis=``, ``step_size=``).

    Returns:
        A new controller following :class:`controllers.base.Controller`.

    Raises:
        ValueError: for an unknown name (the message lists the known ones), a feedback controller without
            ``target_mi``, a schedule (other than ``"constant"``) without ``total_steps``, or any invalid
            argument (named in the message).
        TypeError: for an option the class does not take.

    Example:
        >>> c = build_controller("pid", target_mi=0.5, sigma_min=0.3, sigma_max=10.0, initial=1.0)
        >>> type(c).__name__, c.update(None, 0)
        ('PIDController', 1.0)
        >>> build_controller("linear", target_mi=None, sigma_min=0.1, sigma_max=5.0, initial=2.0,
        ...                  total_steps=100, sigma_end=0.5).update(None, 100)
        0.5
    """
    key = name.strip().lower() if isinstance(name, str) else name
    if key not in CONTROLLERS:
        raise ValueError(f"unknown controller {name!r}; choose one of {', '.join(sorted(CONTROLLERS))}")
    cls = CONTROLLERS[key]
    if key in FEEDBACK:
        if target_mi is None:
            raise ValueError(
                f"controller {key!r} needs target_mi (the leakage ceiling in nats); "
                "pass target_mi=... or use an "
                f"open-loop schedule ({', '.join(SCHEDULES)})"
            )
        return cls(target_mi, sigma_min=sigma_min, sigma_max=sigma_max, initial=initial, **options)
    if key == "constant":
        steps = 1 if total_steps is None else total_steps
        return ConstantNoise(initial, total_steps=steps, sigma_min=sigma_min, sigma_max=sigma_max, **options)
    if total_steps is None:
        raise ValueError(
            f"schedule {key!r} needs total_steps (the number of planned optimizer steps, e.g. epochs × steps "
            "per epoch)"
        )
    end = default_sigma_end(initial, sigma_min) if sigma_end is None else sigma_end
    return cls(
        sigma_start=initial,
        sigma_end=end,
        total_steps=total_steps,
        sigma_min=sigma_min,
        sigma_max=sigma_max,
        **options,
    )
