"""The base class of the feedback controllers: a leakage reading (nats) in, the noise multiplier σ out.

It enforces the rules of :mod:`controllers.base` (bounds, hold on None, fail closed on NaN, the budget floor
wins, state round trip) so that a concrete controller only writes its control law, plus anti-windup against
overrides: when σ was decided by the floor or by fail-closed rather than by the law, a low reading taken at
that (higher) σ says little about the σ the law would need, so a law without a model of MI(σ) never lowers its
own σ (nor winds its integral down) because of it; a reading over the ceiling taken there, though, raises the
own σ from that higher σ (it leaked too much even there).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

from controllers.base import (
    MICurve,
    apply_floor,
    check_bounds,
    check_curve,
    check_floor,
    check_in_bounds,
    check_measurement,
    check_positive,
    check_state_kind,
    check_step,
    deprecated_attribute,
    renamed_keyword,
)

__all__ = ["FeedbackController"]


class FeedbackController:
    """Base class of the feedback controllers: validation, bounds, hold, fail-closed, floor, state.

    Subclasses implement the control law in :meth:`_law` (new own σ from a valid reading) and keep their extra
    state in ``_law_state`` / ``_load_law_state``; they register with
    ``@controllers.registry.register_controller(name, feedback=True)``.

    Args:
        target: the leakage ceiling, nats (> 0).
        sigma_min: lowest σ the controller chooses (> 0).
        sigma_max: highest σ it chooses (≥ sigma_min); only the budget floor may exceed it.
        noise_multiplier: σ₀, the σ before the first reading, in ``[sigma_min, sigma_max]``.
        initial: deprecated name of ``noise_multiplier`` (DeprecationWarning; removed in the next release).

    Raises:
        ValueError: naming the argument, if target ≤ 0, sigma_min ≤ 0, sigma_min > sigma_max, or
            ``noise_multiplier`` lies outside the bounds (or any of them is not a finite number).
        TypeError: if ``noise_multiplier`` is missing, or given under both names.
    """

    registry_name: ClassVar[str] = ""
    uses_mi_curve: ClassVar[bool] = False

    def __init__(
        self,
        target: float,
        *,
        sigma_min: float,
        sigma_max: float,
        noise_multiplier: float | None = None,
        initial: float | None = None,
    ) -> None:
        start = renamed_keyword(
            type(self).__name__,
            new="noise_multiplier",
            value=noise_multiplier,
            old="initial",
            old_value=initial,
        )
        self._target = check_positive("target", target)
        self._sigma_min, self._sigma_max = check_bounds(sigma_min, sigma_max)
        self._noise_multiplier = check_in_bounds("noise_multiplier", start, self._sigma_min, self._sigma_max)
        self.reset()

    @classmethod
    def from_settings(
        cls,
        *,
        target_mi: float,
        sigma_min: float,
        sigma_max: float,
        noise_multiplier: float,
        total_steps: int | None = None,
        sigma_end: float | None = None,
        **options: Any,
    ) -> FeedbackController:
        """Build from :func:`controllers.registry.build_controller`'s settings; ``total_steps`` and ``sigma_end``
        (a schedule's) are ignored."""
        return cls(
            target_mi, sigma_min=sigma_min, sigma_max=sigma_max, noise_multiplier=noise_multiplier, **options
        )

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
    def noise_multiplier(self) -> float:
        """σ₀, the σ before the first reading (the current one is :attr:`sigma`)."""
        return self._noise_multiplier

    @property
    def initial(self) -> float:
        """Deprecated name of :attr:`noise_multiplier` (DeprecationWarning)."""
        return deprecated_attribute(self, "initial", "noise_multiplier")

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
        """Back to the state right after construction (σ = σ₀, no faults, law state cleared)."""
        self._sigma = self._noise_multiplier
        self._failed = False
        self._faults = 0
        self._readings = 0
        self._last_error: float | None = None
        self._reset_law()

    def update(
        self,
        measurement: float | None,
        step: int,
        *,
        sigma_floor: float | None = None,
        mi_curve: MICurve | None = None,
    ) -> float:
        """σ for the next step.

        Args:
            measurement: the leakage reading taken at ``step`` (nats); None when no reading was taken (hold:
                state unchanged); NaN/±inf when the reading failed (fail closed: ``sigma_max`` until the
                next valid reading; the fault is counted).
            step: the optimizer step just taken (int ≥ 0).
            sigma_floor: the privacy budget's floor for the next step, or None; wins over ``sigma_max``.
            mi_curve: the estimator's curve σ ↦ (MI, stderr) nats at this reading (:data:`controllers.base.MICurve`)
                or None; used only by controllers with ``uses_mi_curve`` (ignored without a valid reading).

        Returns:
            The controller's σ in ``[sigma_min, sigma_max]``, raised to ``sigma_floor`` where that is higher.

        Raises:
            ValueError: if ``step`` is not an int ≥ 0, ``sigma_floor`` is negative or not finite,
                ``measurement`` is not a number, or ``mi_curve`` is neither None nor callable.
        """
        step = check_step(step)
        floor = check_floor(sigma_floor)
        value = check_measurement(measurement)
        curve = check_curve(mi_curve)
        if value is None:
            return apply_floor(self.sigma, floor)
        if not math.isfinite(value):
            self._failed = True
            self._faults += 1
            self._last_error = None
            return apply_floor(self.sigma, floor)
        # σ in force when the reading was taken: sigma_max while failed closed, else own σ raised to the floor
        # (the budget floor moves slowly: this step's floor stands for the one the reading was taken under).
        applied = self._sigma_max if self._failed else apply_floor(self._sigma, floor)
        overridden = self._failed or (floor is not None and floor >= self._sigma)
        self._failed = False
        self._last_error = value - self.setpoint
        own = self._law(value, step, applied=applied, overridden=overridden, mi_curve=curve)
        self._sigma = min(max(own, self._sigma_min), self._sigma_max)
        self._readings += 1
        return apply_floor(self._sigma, floor)

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
        check_state_kind(self, state)
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
            "noise_multiplier": self._noise_multiplier,
        }

    def __repr__(self) -> str:
        args = ", ".join(f"{key}={value!r}" for key, value in self.config().items())
        return f"{type(self).__name__}({args})"

    # ---- to implement ---------------------------------------------------------------------------------
    def _reset_law(self) -> None:
        """Clear the law's own state."""

    def _law(
        self, measurement: float, step: int, *, applied: float, overridden: bool, mi_curve: MICurve | None
    ) -> float:
        """New own σ from a finite reading.

        ``applied``: the σ in force when the reading was taken (≥ own σ); ``overridden``: the floor or
        fail-closed, not the law, set σ then or sets it next. A reading over the ceiling taken at ``applied``
        calls for at least ``applied``; a low one taken there must not lower the own σ (anti-windup) unless the
        law can tell from ``mi_curve`` what a lower σ would leak.
        """
        raise NotImplementedError

    def _law_state(self) -> dict[str, Any]:
        return {}

    def _load_law_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`_law_state` saved."""
