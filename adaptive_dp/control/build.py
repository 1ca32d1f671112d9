"""Build the controller the options name (or check the instance they carry) and settle the σ bounds."""

from __future__ import annotations

import math
from typing import Any

from adaptive_dp.control.options import AdaptiveOptions

__all__ = ["resolve_controller"]


def resolve_controller(
    options: AdaptiveOptions,
    *,
    initial: float,
    total_steps: int | None,
    needs_bounds: bool,
    default_bounds: tuple[float, float],
) -> tuple[Any, float | None, float | None, float | None]:
    """The controller and its σ range for these options.

    Args:
        options: the engine's adaptive options (``controller``, ``target_mi``, σ bounds, ``sigma_end``,
            ``controller_options``).
        initial: the initial noise multiplier σ₀.
        total_steps: planned optimizer steps (schedules span them exactly), or None.
        needs_bounds: whether σ bounds are used without a controller (a budget's ``sigma_max`` is its stop).
        default_bounds: ``(sigma_min, sigma_max)`` when not given (widened to include ``initial`` and
            ``sigma_end``).

    Returns:
        ``(controller or None, sigma_min, sigma_max, target_mi)``; the bounds are None when nothing uses them
        (plain opacus mode, where σ = 0 is allowed).

    Raises:
        ValueError: a controller instance whose settings conflict with the keywords; invalid σ bounds.
    """
    controller, target_mi = options.controller, options.target_mi
    if controller is not None and not isinstance(controller, str):
        return _check_instance(controller, options)
    if controller is None and target_mi is not None:
        controller = "pid"
    if controller is None and not needs_bounds:
        return None, None, None, target_mi
    lo, hi = _bounds(options, initial=initial, default_bounds=default_bounds)
    if controller is None:
        return None, lo, hi, target_mi
    from controllers import build_controller

    # The controller is asked for step t + 1's σ after t steps, so a schedule spanning total_steps - 1 updates
    # runs σ₀ at the first planned step and exactly sigma_end at the last one.
    schedule_span = None if total_steps is None else max(1, int(total_steps) - 1)
    built = build_controller(
        controller,
        target_mi=target_mi,
        sigma_min=lo,
        sigma_max=hi,
        noise_multiplier=initial,
        total_steps=schedule_span,
        sigma_end=options.sigma_end,
        **dict(options.controller_options),
    )
    return built, float(built.sigma_min), float(built.sigma_max), target_mi


def _bounds(
    options: AdaptiveOptions, *, initial: float, default_bounds: tuple[float, float]
) -> tuple[float, float]:
    lo = default_bounds[0] if options.sigma_min is None else float(options.sigma_min)
    hi = default_bounds[1] if options.sigma_max is None else float(options.sigma_max)
    if options.sigma_min is None:
        lo = min(lo, initial, float(options.sigma_end) if options.sigma_end is not None else math.inf)
    if options.sigma_max is None:
        hi = max(hi, initial)
    if not (0 < lo <= hi and math.isfinite(hi)):
        raise ValueError(
            f"need 0 < sigma_min <= sigma_max < inf for an adaptive noise multiplier, got sigma_min={lo}, "
            f"sigma_max={hi}; set sigma_min/sigma_max (a noise_multiplier of 0 only works without a controller)"
        )
    return lo, hi


def _check_instance(controller: Any, options: AdaptiveOptions) -> tuple[Any, float, float, float | None]:
    own_target = getattr(controller, "target", None)
    conflicts = [
        (name, given, own)
        for name, given, own in (
            ("target_mi", options.target_mi, own_target),
            ("sigma_min", options.sigma_min, getattr(controller, "sigma_min", None)),
            ("sigma_max", options.sigma_max, getattr(controller, "sigma_max", None)),
        )
        if given is not None and own is not None and not math.isclose(float(given), float(own))
    ]
    if conflicts:
        detail = ", ".join(f"{n}={g} but the controller has {o}" for n, g, o in conflicts)
        raise ValueError(
            f"conflicting settings: {detail}; a controller instance's own settings win, so drop these keywords "
            "or pass a controller name instead of an instance"
        )
    target = float(own_target) if own_target is not None else options.target_mi
    return controller, float(controller.sigma_min), float(controller.sigma_max), target
