"""The open-loop σ schedules of ``controllers.schedules`` as opacus noise schedulers.

For plain ``opacus.PrivacyEngine`` users: like ``opacus.schedulers.ExponentialNoise``, each scheduler wraps a
``DPOptimizer`` and, on every :meth:`step`, sets ``optimizer.noise_multiplier`` to the schedule's σ_t with
t = the number of ``step()`` calls so far (the constructor makes the first call, so the optimizer starts
at σ₀, by default the optimizer's own ``noise_multiplier``).
Call ``scheduler.step()`` once per optimizer step (for a per-step schedule) or once per epoch (then
``total_steps`` counts epochs), as with opacus' own schedulers. The accountant books whatever
``noise_multiplier`` the optimizer holds at each step, so the ε reported stays the composition of the σ used.

Source: Wei & Liu, "Dynamic Differential-Privacy Preserving SGD" (2021); opacus ``_NoiseScheduler`` API.
"""

from __future__ import annotations

from typing import Any

from opacus.optimizers import DPOptimizer
from opacus.schedulers import _NoiseScheduler  # opacus' exported base class of its noise schedulers

from controllers import CyclicDecay, ExponentialDecay, LinearDecay, Schedule, StaircaseDecay
from controllers.base import renamed_keyword

__all__ = [
    "CyclicDecayNoise",
    "ExponentialDecayNoise",
    "LinearDecayNoise",
    "ScheduleNoise",
    "StaircaseDecayNoise",
]


class ScheduleNoise(_NoiseScheduler):
    """Drive ``optimizer.noise_multiplier`` with any :class:`controllers.Schedule`.

    Args:
        optimizer: an opacus ``DPOptimizer`` (anything with a ``noise_multiplier`` attribute).
        schedule: the schedule; σ_t = ``schedule.sigma_at(t)``.
        last_epoch: index of the last step taken (−1: start fresh, as in opacus).

    Raises:
        ValueError: if ``optimizer`` has no ``noise_multiplier`` (opacus' message) or ``schedule`` is not a
            :class:`controllers.Schedule`.
    """

    def __init__(self, optimizer: DPOptimizer, schedule: Schedule, *, last_epoch: int = -1) -> None:
        if not isinstance(schedule, Schedule):
            raise ValueError(
                f"schedule must be a controllers Schedule (LinearDecay, ...), got {type(schedule).__name__}; "
                "feedback controllers need the AdaptivePrivacyEngine"
            )
        self.schedule = schedule
        super().__init__(optimizer, last_epoch=last_epoch)

    def get_noise_multiplier(self) -> float:
        """σ at the current step count (``last_epoch``)."""
        return self.schedule.sigma_at(max(self.last_epoch, 0))

    def state_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict: the step count and the schedule's own state_dict."""
        return {"last_epoch": self.last_epoch, "schedule": self.schedule.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved (does not touch the optimizer until the next ``step()``).

        Raises:
            ValueError: if the dict lacks ``last_epoch``/``schedule`` or holds another kind of schedule.
        """
        try:
            last_epoch, schedule = int(state_dict["last_epoch"]), state_dict["schedule"]
        except (KeyError, TypeError, ValueError):
            raise ValueError("state_dict must come from ScheduleNoise.state_dict()") from None
        self.schedule.load_state_dict(schedule)
        self.last_epoch = last_epoch


def _schedule(
    kind: type[Schedule],
    optimizer: DPOptimizer,
    *,
    noise_multiplier: float | None,
    sigma_start: float | None,
    **settings: Any,
) -> Schedule:
    """The ``kind`` schedule starting at ``noise_multiplier`` (default: the optimizer's current one)."""
    start = renamed_keyword(
        f"{kind.__name__}Noise",
        new="noise_multiplier",
        value=noise_multiplier,
        old="sigma_start",
        old_value=sigma_start,
        required=False,
        internal=(__file__,),
    )
    if start is None:
        if not hasattr(optimizer, "noise_multiplier"):
            raise ValueError(
                "NoiseSchedulers require your optimizer to have a .noise_multiplier attr; wrap it with "
                "opacus (PrivacyEngine.make_private) first"
            )
        start = float(optimizer.noise_multiplier)
    return kind(noise_multiplier=start, **settings)


class LinearDecayNoise(ScheduleNoise):
    """Linear σ_t = σ₀ + (σ_T − σ₀)·t/T for ``optimizer.noise_multiplier``.

    Args:
        optimizer: an opacus ``DPOptimizer``.
        sigma_end: σ_T (> 0).
        total_steps: T, in ``step()`` calls (≥ 1).
        noise_multiplier: σ₀; default: the optimizer's current ``noise_multiplier``.
        last_epoch: as in opacus (−1 = fresh).
        sigma_start: deprecated name of ``noise_multiplier`` (DeprecationWarning; removed in the next release).

    Raises:
        ValueError: naming the argument (see :class:`controllers.LinearDecay`).
        TypeError: if σ₀ is given under both names.
    """

    def __init__(
        self,
        optimizer: DPOptimizer,
        *,
        sigma_end: float,
        total_steps: int,
        noise_multiplier: float | None = None,
        last_epoch: int = -1,
        sigma_start: float | None = None,
    ) -> None:
        schedule = _schedule(
            LinearDecay,
            optimizer,
            noise_multiplier=noise_multiplier,
            sigma_start=sigma_start,
            sigma_end=sigma_end,
            total_steps=total_steps,
        )
        super().__init__(optimizer, schedule, last_epoch=last_epoch)


class ExponentialDecayNoise(ScheduleNoise):
    """Exponential σ_t = σ₀·(σ_T/σ₀)^(t/T) for ``optimizer.noise_multiplier``.

    Unlike opacus' ``ExponentialNoise`` (σ ← γ·σ every call, open-ended) this one is parametrised by its
    endpoints and stops at σ_T. Args/Raises as :class:`LinearDecayNoise`.
    """

    def __init__(
        self,
        optimizer: DPOptimizer,
        *,
        sigma_end: float,
        total_steps: int,
        noise_multiplier: float | None = None,
        last_epoch: int = -1,
        sigma_start: float | None = None,
    ) -> None:
        schedule = _schedule(
            ExponentialDecay,
            optimizer,
            noise_multiplier=noise_multiplier,
            sigma_start=sigma_start,
            sigma_end=sigma_end,
            total_steps=total_steps,
        )
        super().__init__(optimizer, schedule, last_epoch=last_epoch)


class CyclicDecayNoise(ScheduleNoise):
    """Cosine σ_t = σ₀·cos(arccos(σ_T/σ₀)·t/T) for ``optimizer.noise_multiplier`` (σ_T ≤ σ₀).

    Args/Raises as :class:`LinearDecayNoise`; also ValueError if ``sigma_end`` > σ₀.
    """

    def __init__(
        self,
        optimizer: DPOptimizer,
        *,
        sigma_end: float,
        total_steps: int,
        noise_multiplier: float | None = None,
        last_epoch: int = -1,
        sigma_start: float | None = None,
    ) -> None:
        schedule = _schedule(
            CyclicDecay,
            optimizer,
            noise_multiplier=noise_multiplier,
            sigma_start=sigma_start,
            sigma_end=sigma_end,
            total_steps=total_steps,
        )
        super().__init__(optimizer, schedule, last_epoch=last_epoch)


class StaircaseDecayNoise(ScheduleNoise):
    """Step decay σ_t = σ₀ − (σ₀ − σ_T)·⌊t/s⌋/⌊T/s⌋ for ``optimizer.noise_multiplier``.

    Args:
        step_size: s in ``step()`` calls (default max(1, T // 10)); the rest as :class:`LinearDecayNoise`.

    Raises:
        ValueError: naming the argument (see :class:`controllers.StaircaseDecay`).
        TypeError: if σ₀ is given under both names.
    """

    def __init__(
        self,
        optimizer: DPOptimizer,
        *,
        sigma_end: float,
        total_steps: int,
        step_size: int | None = None,
        noise_multiplier: float | None = None,
        last_epoch: int = -1,
        sigma_start: float | None = None,
    ) -> None:
        schedule = _schedule(
            StaircaseDecay,
            optimizer,
            noise_multiplier=noise_multiplier,
            sigma_start=sigma_start,
            sigma_end=sigma_end,
            total_steps=total_steps,
            step_size=step_size,
        )
        super().__init__(optimizer, schedule, last_epoch=last_epoch)
