"""The noise-control loop: leakage reading → controller → budget floor → σ → step record.

This is where the noise multiplier of every optimizer step is decided. The adaptive DP optimizer
(:mod:`adaptive_dp.optimizers`) calls it at the three points of a step::

    optimizer.step()
      clip per-sample gradients, accumulate           (opacus)
      add_noise():  σ_t = loop.decide(optimizer)      reading → controller → max(σ, floor) → optimizer.noise_multiplier
                    noise N(0, σ_t² C²)               (opacus)
      step hooks:   opacus' accountant books (σ_t, q)
      pre_step end: loop.book(optimizer, record)      Rényi filter charged, odometer ε, history record appended
                                                      (spend_budget="sample-rate": q of the next batch set)
      update θ_{t+1}                                  (the wrapped torch optimizer)
      loop.after_update()                             every ``monitor_every`` steps: a reading on θ_{t+1} and the
                                                      audit split, handed to the controller at step t + 1

Soundness (``docs/accounting.md``): σ_{t+1} is a function of θ_{t+1} (a DP output) and the public audit split only,
and under a budget the Rényi filter's floor is applied after the controller, so no order ever exceeds its budget.
A failed reading reaches the controller as NaN (σ_max until the next valid reading): fail closed.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from adaptive_dp import distributed as ddp
from adaptive_dp.accountants.filter import PrivacyBudgetExhausted, RenyiFilter
from adaptive_dp.control.records import FailedReading, HistoryRecord, StepRecord

__all__ = ["NoiseControlLoop"]

logger = logging.getLogger(__name__)


class NoiseControlLoop:
    """Decides, books and records the noise multiplier of each optimizer step.

    Args:
        accountant: the engine's opacus accountant (it books each step through opacus' step hook).
        noise_multiplier: σ before the first decision (the user's, or the budget plan's).
        controller: a ``controllers`` object (``update(measurement, step, *, sigma_floor)`` → σ), or None:
            σ is then the user's (``optimizer.noise_multiplier`` as the user or an opacus scheduler set it).
        monitor: a :class:`~adaptive_dp.leakage.LeakageMonitor` (``read(noise_multiplier=, max_grad_norm=)``), or
            None (no readings).
        budget_filter: the :class:`~adaptive_dp.accountants.RenyiFilter` of a hard ε budget, or None.
        sigma_max: the budget's stop: a floor above it raises :class:`PrivacyBudgetExhausted`.
        target_mi: the MI ceiling (nats), for the controller error of controllers without ``last_error``.
        monitor_every: optimizer steps between readings (the first is taken before step 1).
        target_delta: δ of the per-step odometer ε.
        cheap_epsilon: whether ``accountant.get_epsilon`` is cheap enough to record after every step.
        on_exhausted: called (without arguments) before :class:`PrivacyBudgetExhausted` propagates, e.g. to
            save a checkpoint.
        distributed: whether rank 0 decides and broadcasts σ to the other ranks every step.
        guard: a :class:`~adaptive_dp.control.guard.MeterGuard` for estimators that can be blind, or None.
        odometer: a :class:`~adaptive_dp.accountants.RenyiOdometer` booking every step (the guarantee of a run with
            data-adaptive σ and no budget), or None.
        sample_rate: q of one step (the odometer books q × the batches accumulated into the step).
        spender: a :class:`~adaptive_dp.control.spend.BudgetSpender` (``spend_budget``): the step cap, or the q of
            each step (then charged to the filter and booked by the odometer at that q), else None.
    """

    def __init__(
        self,
        *,
        accountant: Any,
        noise_multiplier: float,
        controller: Any = None,
        monitor: Any = None,
        budget_filter: RenyiFilter | None = None,
        sigma_max: float | None = None,
        target_mi: float | None = None,
        monitor_every: int = 10,
        target_delta: float = 1e-5,
        cheap_epsilon: bool = True,
        on_exhausted: Callable[[], None] | None = None,
        distributed: bool = False,
        guard: Any = None,
        odometer: Any = None,
        sample_rate: float | None = None,
        spender: Any = None,
    ):
        self.accountant = accountant
        self.controller = controller
        self.monitor = monitor
        self.budget_filter = budget_filter
        self.sigma_max = sigma_max
        self.target_mi = target_mi
        self.monitor_every = int(monitor_every)
        self.target_delta = float(target_delta)
        self.cheap_epsilon = cheap_epsilon
        self.on_exhausted = on_exhausted
        self.distributed = distributed
        self.guard = guard
        self.odometer = odometer
        self.sample_rate = sample_rate
        self.spender = spender
        self._filter_guarantee: float | None = None  # the filter's ε (fixed at construction), once computed
        self.pending_curve: Any = (
            None  # σ′ ↦ (MI, stderr) of the pending reading, for a predictive controller
        )
        self.rank = ddp.get_rank() if distributed else 0
        self.history: list[HistoryRecord] = []  # StepRecord.as_dict() of every step booked
        self.pending: Any = None  # the reading to hand the controller at the next step
        self.user_sigma = float(noise_multiplier)  # σ the user set (used when no controller decides)
        self.last_set_sigma = float(noise_multiplier)

    # ------------------------------------------------------------------ the three points of a step
    def decide(self, optimizer: Any) -> StepRecord:
        """σ for the next step, set on ``optimizer.noise_multiplier`` before opacus adds the noise.

        Raises:
            PrivacyBudgetExhausted: the budget's floor for this step exceeds ``sigma_max`` (nothing is booked);
                :class:`~adaptive_dp.control.spend.SpendLimitReached` past ``spend_budget``'s compute cap.
            RuntimeError: the controller returned an invalid σ, or the sampler's q was changed from outside.
            DistributedError: the ranks are out of step or the broadcast failed.
        """
        step = len(self.history) + 1
        if self.spender is not None:
            try:
                self.spender.check_step(len(self.history))
            except PrivacyBudgetExhausted:
                self._exhausted()
                raise
        # every rank's filter has booked the same σ's, so every rank computes the same floor (and raises
        # PrivacyBudgetExhausted at the same step without a collective)
        floor = self._budget_floor(step) if self.budget_filter is not None else None
        if self.distributed:
            record = self._broadcast_decision(optimizer, step, floor)
        else:
            record = self._decide_locally(optimizer, step, floor)
        optimizer.noise_multiplier = record.noise_multiplier
        self.last_set_sigma = record.noise_multiplier
        return record

    def book(self, optimizer: Any, record: StepRecord) -> None:
        """After opacus' accountant booked the step: charge the filter, record the odometer, append the record.

        Raises:
            RuntimeError: σ changed between the decision and the noise, or gradient accumulation over several
                batches (``accumulated_iterations != 1``) under a budget, which books a different q.
        """
        sigma = float(optimizer.noise_multiplier)
        if sigma != record.noise_multiplier:
            raise RuntimeError(
                "optimizer.noise_multiplier changed between the engine's decision and the noise; set σ through "
                "the controller, not inside the step"
            )
        if self.budget_filter is not None:
            if optimizer.accumulated_iterations != 1:
                raise RuntimeError(
                    "the budget filter books one Poisson batch per step; gradient accumulation over several "
                    "batches changes q — use BatchMemoryManager (virtual steps) instead"
                )
            self.budget_filter.charge(sigma, sample_rate=self._step_rate())
        rate = None if self._step_rate() is None else float(self._step_rate())
        if self.odometer is not None:
            accumulated = rate * int(getattr(optimizer, "accumulated_iterations", 1))
            self.odometer.step(noise_multiplier=sigma, sample_rate=min(accumulated, 1.0))
        epsilon = float(self.accountant.get_epsilon(self.target_delta)) if self.cheap_epsilon else None
        guarantee = self._guarantee(epsilon)
        self.history.append(
            record.with_epsilon(epsilon, sample_rate=rate, guarantee_epsilon=guarantee).as_dict()
        )
        if self.spender is not None:  # q of the next batch, set before the loader draws it
            self.spender.after_book(self.budget_filter, sigma)

    def _step_rate(self) -> float | None:
        """q of the step in progress: the spender's (``spend_budget="sample-rate"``), else the fixed one."""
        return self.spender.step_rate() if self.spender is not None else self.sample_rate

    def _guarantee(self, epsilon: float | None) -> float | None:
        """The engine's formal ε after the step: the filter's target (computed once), the Rényi odometer's
        (≈ 0.4 ms per step, measured; O(#orders)), or the composition ``epsilon`` (σ fixed in advance; None for
        PRV)."""
        if self.budget_filter is not None:
            if self._filter_guarantee is None:
                self._filter_guarantee = float(self.budget_filter.guarantee_epsilon)
            return self._filter_guarantee
        if self.odometer is not None:
            return float(self.odometer.get_epsilon(self.target_delta))
        return epsilon

    def after_update(self, *, max_grad_norm: float | list[float]) -> None:
        """After θ_{t+1} is applied: take a reading when one is due (it drives σ of the next step)."""
        if self.monitor is not None and self.history and len(self.history) % self.monitor_every == 0:
            self.pending = self.read(max_grad_norm=max_grad_norm)

    def read(self, *, max_grad_norm: float | list[float]) -> Any:
        """One leakage reading at the current σ; a failure comes back as :class:`FailedReading` (fail closed)."""
        assert self.monitor is not None
        self.pending_curve = None
        try:
            reading = self.monitor.read(noise_multiplier=self.last_set_sigma, max_grad_norm=max_grad_norm)
            if not (math.isfinite(float(reading.mi)) and math.isfinite(float(reading.critic_gap))):
                raise ValueError(f"non-finite reading mi={reading.mi}, critic_gap={reading.critic_gap}")
            if self.guard is not None:
                self.guard.observe(reading, noise_multiplier=self.last_set_sigma, max_grad_norm=max_grad_norm)
            if getattr(self.controller, "uses_mi_curve", False):
                self.pending_curve = self.monitor.mi_curve()
        except Exception as exc:  # noqa: BLE001 - fail closed: any monitor fault means maximal noise
            message = f"{type(exc).__name__}: {exc}"
            logger.warning(
                "leakage monitor failed before step %d (%s); the controller gets NaN (σ_max) for that step",
                len(self.history) + 1,
                message,
            )
            return FailedReading(message)
        return reading

    # ------------------------------------------------------------------ the decision
    def _decide_locally(self, optimizer: Any, step: int, floor: float | None) -> StepRecord:
        reading, self.pending = self.pending, None
        curve, self.pending_curve = self.pending_curve, None
        fields = _reading_fields(reading)
        measurement = fields.get("mi")
        blind_floor = None if self.guard is None else self.guard.floor()
        floors = [f for f in (floor, blind_floor) if f is not None]
        error = None
        if self.controller is not None:
            # controllers' convention: update(reading, t) after t steps taken gives σ of step t + 1
            extra = {"mi_curve": curve} if curve is not None else {}
            sigma = float(
                self.controller.update(measurement, step - 1, sigma_floor=max(floors, default=None), **extra)
            )
            if measurement is not None and math.isfinite(measurement):
                error = getattr(self.controller, "last_error", None)
                if error is None and self.target_mi is not None:
                    error = measurement - self.target_mi
        else:
            if float(optimizer.noise_multiplier) != self.last_set_sigma:  # changed by the user or a scheduler
                self.user_sigma = float(optimizer.noise_multiplier)
            sigma = self.user_sigma
        # the budget wins, and a meter that cannot see never lowers the noise
        sigma = max(sigma, *floors) if floors else sigma
        if not (sigma >= 0 and math.isfinite(sigma)):
            raise RuntimeError(
                f"the controller returned an invalid noise multiplier {sigma!r} at step {step}"
            )
        if self.guard is not None:
            self.guard.note_sigma(sigma)
        return StepRecord(
            step=step,
            noise_multiplier=sigma,
            sigma_floor=floor,
            controller_error=error,
            meter_blind=blind_floor is not None,
            **fields,
        )

    def _broadcast_decision(self, optimizer: Any, step: int, floor: float | None) -> StepRecord:
        decision: Any = None
        if self.rank == 0:
            try:
                decision = asdict(self._decide_locally(optimizer, step, floor))
            except Exception as exc:  # noqa: BLE001 - tell the other ranks before raising
                ddp.broadcast_object(("error", f"{type(exc).__name__}: {exc}"), what=f"σ of step {step}")
                raise
        decision = ddp.broadcast_object(decision, what=f"broadcast of σ for step {step} from rank 0")
        if isinstance(decision, tuple):
            raise RuntimeError(f"rank 0 could not decide σ for step {step}: {decision[1]}")
        record = StepRecord(**decision)
        if record.step != step or (floor is not None and record.noise_multiplier < floor):
            raise ddp.DistributedError(
                f"rank {self.rank} is out of step with rank 0: rank 0 decided step {record.step} "
                f"(σ = {record.noise_multiplier}), this rank is at step {step} (floor {floor}); every rank must "
                "call optimizer.step() the same number of times"
            )
        return record

    def _budget_floor(self, step: int) -> float:
        assert self.budget_filter is not None and self.sigma_max is not None
        try:
            floor = float(self.budget_filter.floor(sigma_max=self.sigma_max, sample_rate=self._step_rate()))
        except PrivacyBudgetExhausted:
            self._exhausted()
            raise
        if not math.isfinite(floor) or floor > self.sigma_max:
            self._exhausted()
            raise PrivacyBudgetExhausted(
                f"privacy budget exhausted before step {step}: the next step would need σ ≥ {floor:.4g} > "
                f"sigma_max = {self.sigma_max:.4g} to stay within ε = {self.budget_filter.guarantee_epsilon} "
                f"(δ = {self.budget_filter.target_delta}); the model as trained so far is the result"
            )
        return floor

    def _exhausted(self) -> None:
        if self.on_exhausted is not None:
            self.on_exhausted()

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Controller, monitor, filter, history, pending reading and σ bookkeeping (a checkpoint's part)."""
        return {
            "version": 2,
            "history": [dict(r) for r in self.history],
            "controller": None if self.controller is None else self.controller.state_dict(),
            "monitor": None if self.monitor is None else self.monitor.state_dict(),
            "budget_filter": None if self.budget_filter is None else self.budget_filter.state_dict(),
            "pending": _pending_state(self.pending),
            "user_sigma": self.user_sigma,
            "last_set_sigma": self.last_set_sigma,
            "guard": None if self.guard is None else self.guard.state_dict(),
            "odometer": None if self.odometer is None else self.odometer.state_dict(),
            "spender": None if self.spender is None else self.spender.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (also version-1 engine states) into a loop built with the same parts.

        Raises:
            ValueError: if the saved state has a controller / monitor / filter this loop lacks, or the other way.
        """
        for name, part in (
            ("controller", self.controller),
            ("monitor", self.monitor),
            ("budget_filter", self.budget_filter),
        ):
            if (state.get(name) is None) != (part is None):
                raise ValueError(
                    f"checkpoint {'has' if state.get(name) is not None else 'lacks'} a {name} but this engine "
                    f"{'lacks' if part is None else 'has'} one; call make_private with the settings of the run "
                    "that saved it before load_checkpoint"
                )
            if part is not None:
                part.load_state_dict(state[name])
        self.history = [StepRecord.from_dict(r).as_dict() for r in state["history"]]
        self.pending = _pending_from_state(state.get("pending"))
        self.user_sigma = float(state.get("user_sigma", self.user_sigma))
        self.last_set_sigma = float(state.get("last_set_sigma", self.last_set_sigma))
        if self.guard is not None and state.get("guard") is not None:
            self.guard.load_state_dict(state["guard"])
        if self.odometer is not None:
            self._load_odometer(state.get("odometer"))
        if (state.get("spender") is None) != (self.spender is None):
            raise ValueError(
                "the checkpoint and this engine disagree on spend_budget; call make_private with the saved run's "
                "spend_budget before load_checkpoint"
            )
        if self.spender is not None:
            self.spender.load_state_dict(state["spender"])

    def _load_odometer(self, state: dict[str, Any] | None) -> None:
        if state is not None:
            self.odometer.load_state_dict(state)
            return
        for record in self.history:  # a checkpoint from before the odometer: rebuild it from the σ history
            self.odometer.step(noise_multiplier=record["noise_multiplier"], sample_rate=self.sample_rate)


def _reading_fields(reading: Any) -> dict[str, Any]:
    """The step-record fields a pending reading contributes (none, a failure, or a reading)."""
    if reading is None:
        return {}
    if isinstance(reading, FailedReading):
        return {"mi": math.nan, "monitor_error": reading.message}
    return {
        "mi": float(reading.mi),
        "critic_gap": float(reading.critic_gap),
        "audit_loss": None if getattr(reading, "audit_loss", None) is None else float(reading.audit_loss),
    }


def _pending_state(pending: Any) -> Any:
    if pending is None:
        return None
    if isinstance(pending, FailedReading):
        return ("failed", pending.message)
    return ("reading", asdict(pending))


def _pending_from_state(state: Any) -> Any:
    if state is None:
        return None
    kind, payload = state
    if kind == "failed":
        return FailedReading(payload)
    from adaptive_dp.leakage.monitor import LeakageReading

    return LeakageReading.from_dict(payload)
