"""Controllers by name: the class decorator that registers them, and the factory that builds one.

Every list of controller names (the CLI's ``--controller`` choices, the engine's ``controller=NAME``) comes from
here, and is filled by :func:`register_controller` when the class is defined: the class is the one source.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from controllers.base import Controller, renamed_keyword

__all__ = ["CONTROLLERS", "FEEDBACK", "SCHEDULES", "build_controller", "register_controller"]

CONTROLLERS: dict[str, type] = {}
"""Every controller class by the name used by ``--controller NAME`` and ``make_private(controller=NAME)``, in the
order of registration. Filled by :func:`register_controller`; do not edit."""

FEEDBACK: list[str] = []
"""Names of the feedback controllers (they need ``target_mi``). Filled by :func:`register_controller`."""

SCHEDULES: list[str] = []
"""Names of the open-loop schedules (they ignore the reading). Filled by :func:`register_controller`."""

_Class = TypeVar("_Class", bound=type)


def register_controller(name: str, *, feedback: bool) -> Callable[[_Class], _Class]:
    """Class decorator: register a controller under ``name`` (sets ``cls.registry_name``).

    The class must follow :class:`controllers.base.Controller` and have a classmethod ``from_settings(*,
    target_mi, sigma_min, sigma_max, noise_multiplier, total_steps, sigma_end, **options)`` (the base classes
    :class:`controllers.feedback.FeedbackController` and :class:`controllers.schedules.Schedule` provide one).

    Args:
        name: the registry name (case-insensitive, stored lower-case), e.g. ``"pid"``.
        feedback: True for a feedback controller (listed in :data:`FEEDBACK`, needs ``target_mi``), False for
            an open-loop schedule (listed in :data:`SCHEDULES`).

    Raises:
        ValueError: if ``name`` is empty or already taken by another class.
        TypeError: if the class has no ``from_settings``.
    """
    key = name.strip().lower() if isinstance(name, str) else ""
    if not key:
        raise ValueError(f"controller name must be a non-empty string, got {name!r}")

    def register(cls: _Class) -> _Class:
        known = CONTROLLERS.get(key)
        if known is not None and known is not cls:
            raise ValueError(f"controller name {key!r} is already taken by {known.__name__}; choose another")
        if not callable(getattr(cls, "from_settings", None)):
            raise TypeError(f"{cls.__name__} needs a from_settings classmethod to be built by name")
        cls.registry_name = key
        if known is None:
            CONTROLLERS[key] = cls
            (FEEDBACK if feedback else SCHEDULES).append(key)
        return cls

    return register


def build_controller(
    name: str,
    *,
    target_mi: float | None = None,
    sigma_min: float,
    sigma_max: float,
    noise_multiplier: float | None = None,
    total_steps: int | None = None,
    sigma_end: float | None = None,
    **options: Any,
) -> Controller:
    """Build the controller called ``name`` from the engine's arguments.

    Feedback controllers (:data:`FEEDBACK`) get ``target_mi`` as their ceiling and ignore
    ``total_steps``/``sigma_end``. Schedules go from ``noise_multiplier`` σ₀ to ``sigma_end`` (default: σ₀/3, not
    under ``sigma_min``) over ``total_steps``, bounded by [sigma_min, sigma_max], and ignore ``target_mi`` (the
    monitor may still read leakage); ``"constant"`` holds σ₀ and needs no ``total_steps``.

    Args:
        name: one of :data:`CONTROLLERS` (case-insensitive).
        target_mi: leakage ceiling, nats; required by the feedback controllers.
        sigma_min, sigma_max: bounds of the controller's σ.
        noise_multiplier: σ₀, the σ of the first step (the start of a schedule); required.
        total_steps: T of a schedule (the planned optimizer steps).
        sigma_end: σ_T of a schedule.
        **options: extra keyword arguments of the class (e.g. ``kp=``, ``hysteresis=``, ``step_size=``, ``k=``);
            ``initial=`` is the deprecated name of ``noise_multiplier`` (DeprecationWarning).

    Returns:
        A new controller following :class:`controllers.base.Controller`.

    Raises:
        ValueError: for an unknown name (the message lists the known ones), a feedback controller without
            ``target_mi``, a schedule (other than ``"constant"``) without ``total_steps``, or any invalid
            argument (named in the message).
        TypeError: for an option the class does not take, or a missing ``noise_multiplier``.

    Example:
        >>> c = build_controller("pid", target_mi=0.5, sigma_min=0.3, sigma_max=10.0, noise_multiplier=1.0)
        >>> type(c).__name__, c.update(None, 0)
        ('PIDController', 1.0)
        >>> build_controller("linear", sigma_min=0.1, sigma_max=5.0, noise_multiplier=2.0,
        ...                  total_steps=100, sigma_end=0.5).update(None, 100)
        0.5
    """
    start = renamed_keyword(
        "build_controller",
        new="noise_multiplier",
        value=noise_multiplier,
        old="initial",
        old_value=options.pop("initial", None),
    )
    key = name.strip().lower() if isinstance(name, str) else name
    if key not in CONTROLLERS:
        raise ValueError(f"unknown controller {name!r}; choose one of {', '.join(sorted(CONTROLLERS))}")
    if key in FEEDBACK and target_mi is None:
        raise ValueError(
            f"controller {key!r} needs target_mi (the leakage ceiling in nats); pass target_mi=... or use an "
            f"open-loop schedule ({', '.join(SCHEDULES)})"
        )
    return CONTROLLERS[key].from_settings(
        target_mi=target_mi,
        sigma_min=sigma_min,
        sigma_max=sigma_max,
        noise_multiplier=start,
        total_steps=total_steps,
        sigma_end=sigma_end,
        **options,
    )
