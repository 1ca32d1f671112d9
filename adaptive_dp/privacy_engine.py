"""AdaptivePrivacyEngine: opacus' PrivacyEngine with a closed leakage loop and a hard ε budget.

Swap ``opacus.PrivacyEngine`` for :class:`AdaptivePrivacyEngine` and nothing else changes: the same
constructor, the same ``make_private`` / ``make_private_with_epsilon`` tuples, the same checkpoints. The
extra keywords turn on

* a leakage monitor on an audit split (``audit_data`` / ``audit_fraction``): every ``monitor_every``
  optimizer steps it reads the mutual information (nats) between audit examples and their released
  gradients at the current noise multiplier σ, the first reading before step 1;
* a controller (``target_mi`` + ``controller``) that turns the reading into the next step's σ;
* a Rényi filter (``make_private_with_epsilon``) that floors σ so that no RDP order ever exceeds the
  budget of the uniform plan that spends exactly ``target_epsilon``.

Per optimizer step the engine asks the controller for σ (with the budget floor), sets
``optimizer.noise_multiplier`` *before* opacus adds the noise, so the noise and the accountant both see
it, charges the filter, and appends a record to :attr:`AdaptivePrivacyEngine.history`. Why this keeps the
accounting sound is argued in ``docs/accounting.md``.

Under torch.distributed (the model wrapped in opacus' DPDDP or torch's DDP before ``make_private``, a process
group of > 1 process) rank 0 runs the monitor and the controller and broadcasts its decision every step, so
the σ rank 0 adds as noise is the σ every rank's accountant and filter book; see ``docs/distributed.md``.
"""

from __future__ import annotations

import logging
import math
import os
import types
import warnings
from collections.abc import Callable
from dataclasses import asdict
from typing import IO, Any, BinaryIO

from opacus import PrivacyEngine
from opacus.accountants.utils import get_noise_multiplier
from opacus.optimizers import DPOptimizer
from torch import nn, optim
from torch.utils.data import DataLoader, Dataset

import adaptive_dp.accountants.rdp  # noqa: F401  (registers the "rdp_incremental" accountant with opacus)
from adaptive_dp import distributed as ddp
from adaptive_dp.accountants.filter import PrivacyBudgetExhausted, RenyiFilter
from adaptive_dp.leakage.audit import as_audit_dataset, carve_audit_split

__all__ = ["AdaptivePrivacyEngine", "PrivacyBudgetExhausted", "DEFAULT_MONITOR_EVERY"]

logger = logging.getLogger(__name__)

DEFAULT_MONITOR_EVERY = 10
DEFAULT_SIGMA_MIN = 0.3
DEFAULT_SIGMA_MAX = 10.0
DEFAULT_DELTA = 1e-5
INCREMENTAL_RDP = "rdp_incremental"

# What the engine's accountant names mean: "rdp" is the incremental RDP sum (same ε as opacus' RDP,
# O(#orders) per step); "prv" and "gdp" stay opacus' own accountants.
_ACCOUNTANT_ALIASES = {"rdp": INCREMENTAL_RDP}
# Accountants whose get_epsilon is cheap enough to record the odometer after every step.
_CHEAP_ACCOUNTANTS = {INCREMENTAL_RDP, "gdp"}
_GHOST_MODES = ("ghost", "ghost_fsdp")
_FAILED = "failed"  # marker of a failed monitor reading (reaches the controller as NaN)


class AdaptivePrivacyEngine(PrivacyEngine):
    """Drop-in ``opacus.PrivacyEngine`` that measures gradient leakage and adapts the noise multiplier.

    Args:
        accountant: ``"rdp"`` (default): the incremental RDP accountant registered as
            ``"rdp_incremental"`` — the same ε as opacus' ``RDPAccountant`` on the same σ history, but
            O(#orders) per step instead of recomputing the whole history on each ``get_epsilon``
            (opacus' own default, PRV, recomputes everything for every σ change). ``"prv"``: opacus'
            PRV accountant (tighter; slow with a changing σ). ``"gdp"``: opacus' Gaussian accountant,
            which only supports a fixed σ (an adaptive setting with it is a ValueError).
        secure_mode: as in opacus.

    Attributes:
        history: one dict per optimizer step: ``step`` (1-based), ``noise_multiplier`` (σ used for the
            step), ``mi`` / ``mi_gap`` (nats, the reading taken for that step, else None; NaN for a
            failed reading), ``sigma_floor`` (the budget's floor, None without a budget),
            ``controller_error`` (the controller's own error at reading steps, nats: reading − its
            setpoint, e.g. (1 − margin)·target_mi for the PID; else None), ``epsilon`` (odometer ε at ``target_delta`` after the step; None for the PRV
            accountant, whose per-step recomputation is too slow), ``monitor_error`` (message of a
            failed reading, else None).
        controller, monitor, budget_filter: the parts built by ``make_private`` (None when off).
    """

    def __init__(self, *, accountant: str = "rdp", secure_mode: bool = False):
        super().__init__(accountant=_ACCOUNTANT_ALIASES.get(accountant, accountant), secure_mode=secure_mode)
        self.history: list[dict[str, Any]] = []
        self.controller: Any = None
        self.monitor: Any = None
        self.budget_filter: RenyiFilter | None = None
        self.audit_dataset: Dataset | None = None
        self.target_mi: float | None = None
        self.target_delta: float = DEFAULT_DELTA
        self.sigma_min: float | None = None
        self.sigma_max: float | None = None
        self.monitor_every: int = DEFAULT_MONITOR_EVERY
        self.sample_rate: float | None = None
        self.checkpoint_path: str | os.PathLike | None = None
        self._module: nn.Module | None = None
        self._optimizer: DPOptimizer | None = None
        self._pending: Any = None  # the reading to hand the controller at the next step
        self._current: dict[str, Any] | None = None  # record of the step in progress
        self._user_sigma: float | None = None  # σ the user set (used when no controller decides)
        self._last_set_sigma: float | None = None
        self._warned_no_guarantee = False
        self._distributed = False  # model wrapped in DPDDP / DDP under a process group of > 1 process
        self._rank = 0

    # ------------------------------------------------------------------ make_private
    def make_private(
        self,
        *,
        module: nn.Module,
        optimizer: optim.Optimizer,
        criterion=nn.CrossEntropyLoss(),
        data_loader: DataLoader,
        noise_multiplier: float,
        max_grad_norm: float | list[float],
        batch_first: bool = True,
        loss_reduction: str = "mean",
        poisson_sampling: bool = True,
        clipping: str = "flat",
        noise_generator=None,
        grad_sample_mode: str = "hooks",
        wrap_model: bool = True,
        rand_on_empty: bool = False,
        target_mi: float | None = None,
        controller: Any = None,
        estimator: str = "likelihood-ratio",
        token_encoder: str = "span",
        audit_data: Any = None,
        audit_fraction: float | None = None,
        monitor_every: int = DEFAULT_MONITOR_EVERY,
        sigma_min: float | None = None,
        sigma_max: float | None = None,
        sigma_end: float | None = None,
        total_steps: int | None = None,
        epochs: int | None = None,
        target_delta: float | None = None,
        checkpoint_path: str | os.PathLike | None = None,
        seed: int = 0,
        controller_options: dict[str, Any] | None = None,
        monitor_options: dict[str, Any] | None = None,
        **kwargs,
    ):
        """Wrap model, optimizer and data loader like opacus, and close the leakage loop.

        Takes every argument of ``opacus.PrivacyEngine.make_private`` (same meaning, same return
        tuple: ``(module, optimizer, data_loader)``, or ``(module, optimizer, criterion, data_loader)``
        in ghost mode), plus:

        Args:
            target_mi: leakage ceiling, nats of MI per audit example; None = no ceiling (monitor only,
                or everything off). Needs audit data.
            controller: a registry name of ``controllers.CONTROLLERS`` (``"pid"`` is used when
                ``target_mi`` is given without one; schedules such as ``"linear"`` need ``total_steps``
                or ``make_private_with_epsilon``), or a controller instance whose own ``target`` /
                ``sigma_min`` / ``sigma_max`` win (passing conflicting values is a ValueError).
            estimator: ``"likelihood-ratio"`` (training-free, model-aware; default) or ``"token-mine"``.
            token_encoder: privacy-token encoder for ``"token-mine"``.
            audit_data: public or held-out audit examples: a Dataset, a DataLoader, or tensors ``(x, y)``.
            audit_fraction: share of the training dataset carved off as the audit split *before* the
                private loader is built (so q is computed on what is trained on); exclusive with
                ``audit_data``. Carved examples get no DP protection.
            monitor_every: optimizer steps between leakage readings (default 10); the first reading is
                taken before step 1.
            sigma_min, sigma_max: the controller's σ range (defaults 0.3 and 10, widened to include
                ``noise_multiplier``). ``sigma_max`` is also the budget's stop: when the filter's floor
                exceeds it, training stops with ``PrivacyBudgetExhausted``.
            sigma_end: end value of open-loop schedules (σ runs from ``noise_multiplier`` to it).
            total_steps: planned optimizer steps, for schedules (``make_private_with_epsilon`` sets it
                from ``epochs``).
            epochs: alternative to ``total_steps``: planned epochs over the (carved) training loader,
                total_steps = epochs / q (no budget is set; only schedules use it).
            target_delta: δ of the per-step odometer ε in :attr:`history` (default 1e-5).
            checkpoint_path: where to save the state before raising ``PrivacyBudgetExhausted``.
            seed: seed of the monitor (and of an ``audit_fraction`` split).
            controller_options, monitor_options: extra keywords for ``controllers.build_controller`` and
                ``adaptive_dp.leakage.LeakageMonitor``.

        Raises:
            ValueError: ``target_mi`` without audit data; both ``audit_data`` and ``audit_fraction``;
                a controller instance whose settings conflict with ``target_mi`` / ``sigma_min`` /
                ``sigma_max``; a monitor with ghost clipping or ``wrap_model=False``; an adaptive σ with
                the GDP accountant; ``monitor_every`` < 1; invalid σ bounds.
        """
        return self._make_private(
            module=module, optimizer=optimizer, criterion=criterion, data_loader=data_loader,
            noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm, batch_first=batch_first,
            loss_reduction=loss_reduction, poisson_sampling=poisson_sampling, clipping=clipping,
            noise_generator=noise_generator, grad_sample_mode=grad_sample_mode, wrap_model=wrap_model,
            rand_on_empty=rand_on_empty, target_mi=target_mi, controller=controller, estimator=estimator,
            token_encoder=token_encoder, audit_data=audit_data, audit_fraction=audit_fraction,
            monitor_every=monitor_every, sigma_min=sigma_min, sigma_max=sigma_max, sigma_end=sigma_end,
            total_steps=total_steps, epochs=epochs, target_delta=target_delta, checkpoint_path=checkpoint_path,
            seed=seed, controller_options=controller_options, monitor_options=monitor_options, budget=None,
            **kwargs,
        )

    def make_private_with_epsilon(
        self,
        *,
        module: nn.Module,
        optimizer: optim.Optimizer,
        criterion=nn.CrossEntropyLoss(),
        data_loader: DataLoader,
        target_epsilon: float,
        target_delta: float,
        epochs: int,
        max_grad_norm: float | list[float],
        batch_first: bool = True,
        loss_reduction: str = "mean",
        poisson_sampling: bool = True,
        clipping: str = "flat",
        noise_generator=None,
        grad_sample_mode: str = "hooks",
        wrap_model: bool = True,
        target_mi: float | None = None,
        controller: Any = None,
        estimator: str = "likelihood-ratio",
        token_encoder: str = "span",
        audit_data: Any = None,
        audit_fraction: float | None = None,
        monitor_every: int = DEFAULT_MONITOR_EVERY,
        sigma_min: float | None = None,
        sigma_max: float | None = None,
        sigma_end: float | None = None,
        checkpoint_path: str | os.PathLike | None = None,
        seed: int = 0,
        controller_options: dict[str, Any] | None = None,
        monitor_options: dict[str, Any] | None = None,
        **kwargs,
    ):
        """opacus' ``make_private_with_epsilon`` with a hard (ε, δ) budget kept by a Rényi filter.

        The starting σ is opacus' ``get_noise_multiplier`` for ``epochs`` over the (carved) training
        loader; the planned steps are ``epochs / q``. The filter's budget B(α) is the RDP curve of the
        uniform plan that spends exactly ``target_epsilon`` over the planned steps; before every step σ
        is raised to the filter's floor (never below), so no order ever exceeds B(α) and the guarantee
        is ``target_epsilon`` at ``target_delta`` whatever the controller asks (Feldman & Zrnic 2021).
        With a controller the main use is a leakage-aware allocation of the fixed budget: noise added
        above the floor when leakage is over the ceiling lowers later floors.

        Other arguments: as in :meth:`make_private` (``total_steps`` is the planned steps here).

        Raises:
            PrivacyBudgetExhausted: from ``optimizer.step()`` (before the step is applied, after the
                state is saved to ``checkpoint_path`` if one is set) when the floor exceeds ``sigma_max``.
            ValueError: as :meth:`make_private`; non-positive ``target_epsilon`` / ``target_delta`` /
                ``epochs``.
        """
        if not (target_epsilon > 0 and math.isfinite(target_epsilon)):
            raise ValueError(f"target_epsilon must be positive and finite, got {target_epsilon!r}")
        if not 0 < target_delta < 1:
            raise ValueError(f"target_delta must be in (0, 1), got {target_delta!r}")
        if not epochs or epochs <= 0:
            raise ValueError(f"epochs must be a positive number, got {epochs!r}")
        return self._make_private(
            module=module, optimizer=optimizer, criterion=criterion, data_loader=data_loader,
            noise_multiplier=None, max_grad_norm=max_grad_norm, batch_first=batch_first,
            loss_reduction=loss_reduction, poisson_sampling=poisson_sampling, clipping=clipping,
            noise_generator=noise_generator, grad_sample_mode=grad_sample_mode, wrap_model=wrap_model,
            target_mi=target_mi, controller=controller, estimator=estimator, token_encoder=token_encoder,
            audit_data=audit_data, audit_fraction=audit_fraction, monitor_every=monitor_every,
            sigma_min=sigma_min, sigma_max=sigma_max, sigma_end=sigma_end, total_steps=None, epochs=None,
            target_delta=target_delta, checkpoint_path=checkpoint_path, seed=seed,
            controller_options=controller_options, monitor_options=monitor_options,
            budget=(float(target_epsilon), float(target_delta), epochs), **kwargs,
        )

    def _make_private(
        self, *, module, optimizer, criterion, data_loader, noise_multiplier, max_grad_norm, clipping,
        grad_sample_mode, wrap_model, target_mi, controller, estimator, token_encoder, audit_data,
        audit_fraction, monitor_every, sigma_min, sigma_max, sigma_end, total_steps, epochs, target_delta,
        checkpoint_path, seed, controller_options, monitor_options, budget, **opacus_kwargs,
    ):
        self._check_settings(
            target_mi=target_mi, monitor_every=monitor_every, audit_data=audit_data,
            audit_fraction=audit_fraction, controller=controller, budget=budget,
        )
        # 1. The audit split, before the private loader exists (q is computed on what is trained on).
        if audit_fraction:
            data_loader, audit_data = carve_audit_split(data_loader, fraction=audit_fraction, seed=seed)
        audit = as_audit_dataset(audit_data) if audit_data is not None else None
        if target_mi is not None and audit is None:
            raise ValueError(
                "target_mi needs audit data to measure leakage on: pass audit_data=<public or held-out "
                "examples> or audit_fraction=0.02 (carved from the training set before training)"
            )
        if audit is not None and (grad_sample_mode in _GHOST_MODES or not wrap_model):
            raise ValueError(
                f"the leakage monitor needs per-sample gradients from a wrapped GradSampleModule, which "
                f"grad_sample_mode={grad_sample_mode!r} / wrap_model={wrap_model} does not give; use "
                "grad_sample_mode='hooks' (or 'functorch'/'ew') with wrap_model=True, or drop the audit data"
            )

        # 2. The starting σ (opacus' get_noise_multiplier under a budget) and the planned steps.
        sample_rate = 1 / len(data_loader)
        if total_steps is not None and epochs is not None:
            raise ValueError("pass either total_steps or epochs, not both")
        planned_steps = int(epochs / sample_rate) if epochs is not None else total_steps
        if budget is not None:
            target_epsilon, budget_delta, epochs = budget
            planned_steps = int(epochs / sample_rate)
            tolerance = opacus_kwargs.pop("epsilon_tolerance", 0.01)
            if len(self.accountant) > 0:
                warnings.warn(
                    "make_private_with_epsilon called with privacy already spent; the budget filter counts "
                    "only the steps from now on", stacklevel=3,
                )
            with warnings.catch_warnings():  # the search visits σ's whose best order is the largest
                warnings.filterwarnings("ignore", message="Optimal order is the")
                noise_multiplier = get_noise_multiplier(
                    target_epsilon=target_epsilon, target_delta=budget_delta, sample_rate=sample_rate,
                    epochs=epochs, accountant=_noise_search_accountant(self.accountant.mechanism()),
                    epsilon_tolerance=tolerance,
                )
        if target_delta is not None:
            self.target_delta = float(target_delta)

        # 3. The controller (built or checked) and σ bounds.
        self.controller, self.sigma_min, self.sigma_max, self.target_mi = self._resolve_controller(
            controller, target_mi=target_mi, sigma_min=sigma_min, sigma_max=sigma_max, sigma_end=sigma_end,
            initial=float(noise_multiplier), total_steps=planned_steps, options=controller_options,
            budget=budget,
        )
        if self.target_mi is not None and audit is None:  # a feedback controller instance, no audit data
            raise ValueError(
                f"the controller steers leakage to target {self.target_mi} nats but there is no audit data to "
                "measure it on: pass audit_data=<public or held-out examples> or audit_fraction=0.02"
            )
        if clipping == "adaptive" and self.controller is not None:
            limit = 2 * float(opacus_kwargs.get("unclipped_num_std", math.inf))
            if self.sigma_max >= limit:
                raise ValueError(
                    f"adaptive clipping needs noise_multiplier < 2·unclipped_num_std = {limit}; set "
                    f"sigma_max below it (got sigma_max={self.sigma_max})"
                )

        # 4. opacus does the wrapping (a DPDDP / DDP module gets the distributed optimizer and Poisson loader).
        self._distributed = ddp.is_distributed() and isinstance(module, (ddp.DPDDP, ddp.DDP))
        self._rank = ddp.get_rank() if self._distributed else 0
        out = super().make_private(
            module=module, optimizer=optimizer, criterion=criterion, data_loader=data_loader,
            noise_multiplier=float(noise_multiplier), max_grad_norm=max_grad_norm, clipping=clipping,
            grad_sample_mode=grad_sample_mode, wrap_model=wrap_model, **opacus_kwargs,
        )
        private_module, private_optimizer, private_loader = out[0], out[1], out[-1]
        self._module, self._optimizer = private_module, private_optimizer
        self.sample_rate = 1 / len(private_loader)
        self.monitor_every = int(monitor_every)
        self.checkpoint_path = checkpoint_path
        self.audit_dataset = audit
        self.history = []
        self._user_sigma = self._last_set_sigma = float(noise_multiplier)
        self._pending = None

        # 5. The budget filter.
        if budget is not None:
            target_epsilon, budget_delta, _ = budget
            self.target_delta = budget_delta
            self.budget_filter = RenyiFilter(
                target_epsilon=target_epsilon, target_delta=budget_delta, sample_rate=self.sample_rate,
                planned_steps=planned_steps,
            )
        else:
            self.budget_filter = None

        # 6. The monitor.
        # Under DDP it runs on rank 0 only, on the plain model inside the wrappers (the monitor reads through
        # a hook-free copy, so no collective is entered on one rank alone); σ is broadcast from rank 0.
        self.monitor = None
        if audit is not None and self._rank == 0:
            from adaptive_dp.leakage.monitor import LeakageMonitor

            options = {"loss_fn": criterion, **(monitor_options or {})}
            watched = private_module
            if grad_sample_mode == "ew":  # its forward is ExpandedWeights, which torch.func cannot trace
                watched = private_module._module
            if self._distributed:
                watched = ddp.unwrap_distributed(private_module)
            self.monitor = LeakageMonitor(
                watched, audit, max_grad_norm=self._clipping_norm(), estimator=estimator,
                token_encoder=token_encoder, seed=seed, clipping="per_layer" if clipping == "per_layer" else "flat",
                **options,
            )

        # 7. Hooks: wrap step() (σ before the noise, reading after the update) and chain the step hook.
        self._install(private_optimizer)
        if self.target_mi is not None and self.budget_filter is None and not self._warned_no_guarantee:
            self._warned_no_guarantee = True
            warnings.warn(
                "target_mi without a privacy budget: σ now depends on the data through the audit readings, "
                "and get_epsilon() is an odometer reading, not a formal (ε, δ) guarantee; use "
                "make_private_with_epsilon(target_epsilon=..., target_delta=..., epochs=...) for one",
                UserWarning, stacklevel=3,
            )
        if self.monitor is not None:  # the first reading, before step 1
            self._pending = self._take_reading()
        return out

    def _check_settings(self, *, target_mi, monitor_every, audit_data, audit_fraction, controller, budget):
        if target_mi is not None and not (float(target_mi) > 0 and math.isfinite(float(target_mi))):
            raise ValueError(f"target_mi must be a positive number of nats, got {target_mi!r}")
        if not isinstance(monitor_every, int) or isinstance(monitor_every, bool) or monitor_every < 1:
            raise ValueError(f"monitor_every must be an integer >= 1 (optimizer steps), got {monitor_every!r}")
        if audit_data is not None and audit_fraction:
            raise ValueError("pass either audit_data or audit_fraction, not both")
        adaptive = controller is not None or target_mi is not None or budget is not None
        if adaptive and self.accountant.mechanism() == "gdp":
            raise ValueError(
                "the GDP accountant only supports one fixed noise multiplier, and this setting changes σ "
                "during training; use AdaptivePrivacyEngine(accountant='rdp') (default) or 'prv'"
            )

    def _resolve_controller(
        self, controller, *, target_mi, sigma_min, sigma_max, sigma_end, initial, total_steps, options, budget
    ):
        """Build a controller from its name, or check an instance against the keyword settings."""
        if controller is not None and not isinstance(controller, str):
            own_target = getattr(controller, "target", None)
            conflicts = [
                (name, given, own)
                for name, given, own in (
                    ("target_mi", target_mi, own_target),
                    ("sigma_min", sigma_min, getattr(controller, "sigma_min", None)),
                    ("sigma_max", sigma_max, getattr(controller, "sigma_max", None)),
                )
                if given is not None and own is not None and not math.isclose(float(given), float(own))
            ]
            if conflicts:
                detail = ", ".join(f"{n}={g} but the controller has {o}" for n, g, o in conflicts)
                raise ValueError(
                    f"conflicting settings: {detail}; a controller instance's own settings win, so drop "
                    "these keywords or pass a controller name instead of an instance"
                )
            return (
                controller,
                float(controller.sigma_min),
                float(controller.sigma_max),
                float(own_target) if own_target is not None else target_mi,
            )
        lo = DEFAULT_SIGMA_MIN if sigma_min is None else float(sigma_min)
        hi = DEFAULT_SIGMA_MAX if sigma_max is None else float(sigma_max)
        if sigma_min is None:
            lo = min(lo, initial, float(sigma_end) if sigma_end is not None else math.inf)
        if sigma_max is None:
            hi = max(hi, initial)
        if not (0 < lo <= hi and math.isfinite(hi)):
            raise ValueError(f"need 0 < sigma_min <= sigma_max < inf, got sigma_min={lo}, sigma_max={hi}")
        if controller is None and target_mi is not None:
            controller = "pid"
        if controller is None:
            return None, lo, hi, target_mi
        from controllers import build_controller

        # The controller is asked for step t + 1's σ after t steps, so a schedule spanning total_steps - 1
        # updates runs σ_start at the first planned step and exactly sigma_end at the last one.
        schedule_span = None if total_steps is None else max(1, int(total_steps) - 1)
        built = build_controller(
            controller, target_mi=target_mi, sigma_min=lo, sigma_max=hi, initial=initial,
            total_steps=schedule_span, sigma_end=sigma_end, **(options or {}),
        )
        return built, float(built.sigma_min), float(built.sigma_max), target_mi

    # ------------------------------------------------------------------ per-step machinery
    def _install(self, optimizer: DPOptimizer) -> None:
        original_step = getattr(optimizer, "_adaptive_dp_original_step", None) or optimizer.step
        optimizer._adaptive_dp_original_step = original_step
        engine = self

        def step(opt, closure: Callable[[], float] | None = None):
            return engine._step(opt, original_step, closure)

        optimizer.step = types.MethodType(step, optimizer)
        reduce = getattr(optimizer, "reduce_gradients", None)
        if self._distributed and reduce is not None and not hasattr(optimizer, "_adaptive_dp_original_reduce"):
            optimizer._adaptive_dp_original_reduce = reduce

            def reduce_gradients(opt):
                with ddp.collective_errors(f"all-reduce of the noisy gradients at step {len(engine.history)}"):
                    return reduce()

            optimizer.reduce_gradients = types.MethodType(reduce_gradients, optimizer)
        previous_hook = optimizer.step_hook  # opacus' accountant hook: chained, never overwritten

        def hook(opt: DPOptimizer) -> None:
            engine._on_noise_added(opt, previous_hook)

        optimizer.attach_step_hook(hook)

    def _step(self, optimizer: DPOptimizer, original_step, closure):
        if optimizer._check_skip_next_step(pop_next=False):
            return original_step(closure)  # a virtual step: clip and accumulate only, nothing is booked
        self._current = self._decide_sigma(optimizer)
        booked = len(self.history)
        try:
            result = original_step(closure)
        finally:
            self._current = None
        if len(self.history) > booked and self.monitor is not None and len(self.history) % self.monitor_every == 0:
            self._pending = self._take_reading()  # on θ after this update, for the next step
        return result

    def _decide_sigma(self, optimizer: DPOptimizer) -> dict[str, Any]:
        step = len(self.history) + 1
        # every rank's filter has booked the same σ's, so every rank computes the same floor (and raises
        # PrivacyBudgetExhausted at the same step without a collective)
        floor = self._budget_floor() if self.budget_filter is not None else None
        if not self._distributed:
            return self._decide_locally(optimizer, step, floor)
        decision: Any = None
        if self._rank == 0:
            try:
                decision = self._decide_locally(optimizer, step, floor)
            except Exception as exc:  # noqa: BLE001 - tell the other ranks before raising
                ddp.broadcast_object(("error", f"{type(exc).__name__}: {exc}"), what=f"σ of step {step}")
                raise
        decision = ddp.broadcast_object(decision, what=f"broadcast of σ for step {step} from rank 0")
        if isinstance(decision, tuple):
            raise RuntimeError(f"rank 0 could not decide σ for step {step}: {decision[1]}")
        if decision["step"] != step or (floor is not None and decision["noise_multiplier"] < floor):
            raise ddp.DistributedError(
                f"rank {self._rank} is out of step with rank 0: rank 0 decided step {decision['step']} "
                f"(σ = {decision['noise_multiplier']}), this rank is at step {step} (floor {floor}); every rank "
                "must call optimizer.step() the same number of times"
            )
        optimizer.noise_multiplier = float(decision["noise_multiplier"])
        self._last_set_sigma = optimizer.noise_multiplier
        return dict(decision)

    def _decide_locally(self, optimizer: DPOptimizer, step: int, floor: float | None) -> dict[str, Any]:
        reading, self._pending = self._pending, None
        mi = mi_gap = error = monitor_error = None
        measurement: float | None = None
        if reading is not None:
            if isinstance(reading, tuple) and reading[0] == _FAILED:
                measurement, mi, monitor_error = math.nan, math.nan, reading[1]
            else:
                measurement, mi, mi_gap = float(reading.mi), float(reading.mi), float(reading.mi_gap)
        if self.controller is not None:
            # controllers' convention: update(reading, t) after t steps taken gives σ of step t + 1
            sigma = float(self.controller.update(measurement, step - 1, sigma_floor=floor))
            if measurement is not None and math.isfinite(measurement):
                error = getattr(self.controller, "last_error", None)
                if error is None and self.target_mi is not None:
                    error = measurement - self.target_mi
        else:
            if optimizer.noise_multiplier != self._last_set_sigma:  # changed by the user or a scheduler
                self._user_sigma = float(optimizer.noise_multiplier)
            sigma = float(self._user_sigma)
        if floor is not None:
            sigma = max(sigma, floor)  # the budget wins
        if not (sigma >= 0 and math.isfinite(sigma)):
            raise RuntimeError(f"the controller returned an invalid noise multiplier {sigma!r} at step {step}")
        optimizer.noise_multiplier = sigma
        self._last_set_sigma = sigma
        return {
            "step": step, "noise_multiplier": sigma, "mi": mi, "mi_gap": mi_gap, "sigma_floor": floor,
            "controller_error": error, "epsilon": None, "monitor_error": monitor_error,
        }

    def _budget_floor(self) -> float:
        assert self.budget_filter is not None and self.sigma_max is not None
        try:
            floor = float(self.budget_filter.floor(sigma_max=self.sigma_max))
        except PrivacyBudgetExhausted:
            self._save_on_exhaustion()
            raise
        if not math.isfinite(floor) or floor > self.sigma_max:
            self._save_on_exhaustion()
            raise PrivacyBudgetExhausted(
                f"privacy budget exhausted before step {len(self.history) + 1}: the next step would need "
                f"σ ≥ {floor:.4g} > sigma_max = {self.sigma_max:.4g} to stay within ε = "
                f"{self.budget_filter.guarantee_epsilon} (δ = {self.target_delta}); the model as trained so "
                "far is the result" + (f" (state saved to {self.checkpoint_path})" if self.checkpoint_path else "")
            )
        return floor

    def _save_on_exhaustion(self) -> None:
        if self.checkpoint_path is not None and self._module is not None:
            self.save_checkpoint(path=self.checkpoint_path, module=self._module, optimizer=self._optimizer)

    def _on_noise_added(self, optimizer: DPOptimizer, previous_hook) -> None:
        """Step hook: noise is in p.grad, the update is not applied yet. Book the step once."""
        record = self._current
        if record is None:  # pre_step() called directly, outside optimizer.step()
            record = {
                "step": len(self.history) + 1, "noise_multiplier": float(optimizer.noise_multiplier),
                "mi": None, "mi_gap": None, "sigma_floor": None, "controller_error": None,
                "epsilon": None, "monitor_error": None,
            }
        sigma = float(optimizer.noise_multiplier)
        if sigma != record["noise_multiplier"]:
            raise RuntimeError(
                "optimizer.noise_multiplier changed between the engine's decision and the noise; set σ "
                "through the controller, not inside the step"
            )
        if self.budget_filter is not None:
            if optimizer.accumulated_iterations != 1:
                raise RuntimeError(
                    "the budget filter books one Poisson batch per step; gradient accumulation over several "
                    "batches changes q — use BatchMemoryManager (virtual steps) instead"
                )
            self.budget_filter.charge(sigma)
        if previous_hook is not None:
            previous_hook(optimizer)
        if self.accountant.mechanism() in _CHEAP_ACCOUNTANTS:
            record["epsilon"] = float(self.accountant.get_epsilon(self.target_delta))
        self.history.append(record)
        self._current = None

    def _clipping_norm(self) -> float | list[float]:
        """The clipping norm the monitor must use: per-layer norms, or the current (adaptive) one."""
        optimizer = self._optimizer
        if optimizer is None:
            raise RuntimeError("make_private has not been called")
        per_layer = getattr(optimizer, "max_grad_norms", None)
        if per_layer is not None:
            return [float(c) for c in per_layer]
        return float(optimizer.max_grad_norm)

    def _take_reading(self):
        """One leakage reading at the current σ; failures come back as a marker (fail closed)."""
        assert self.monitor is not None and self._optimizer is not None
        sigma = float(self._optimizer.noise_multiplier)
        try:
            reading = self.monitor.read(noise_multiplier=sigma, max_grad_norm=self._clipping_norm())
            if not (math.isfinite(float(reading.mi)) and math.isfinite(float(reading.mi_gap))):
                raise ValueError(f"non-finite reading mi={reading.mi}, mi_gap={reading.mi_gap}")
        except Exception as exc:  # noqa: BLE001 - fail closed: any monitor fault means maximal noise
            message = f"{type(exc).__name__}: {exc}"
            logger.warning(
                "leakage monitor failed before step %d (%s); the controller gets NaN (σ_max) for that step",
                len(self.history) + 1, message,
            )
            return (_FAILED, message)
        return reading

    # ------------------------------------------------------------------ privacy reports
    @property
    def guarantee_epsilon(self) -> float | None:
        """The formal ε (at the budget's δ) the Rényi filter guarantees; None without a budget."""
        return None if self.budget_filter is None else float(self.budget_filter.guarantee_epsilon)

    def privacy_summary(self, delta: float | None = None) -> dict[str, Any]:
        """Both privacy figures, labelled: the filter's guarantee and the accountant's odometer.

        Returns:
            ``{"steps", "delta", "guarantee_epsilon" (None without a budget), "odometer_epsilon",
            "accountant"}`` — the odometer is ``get_epsilon(delta)``: the accountant's composition of
            the σ history used, which is not a guarantee when σ was chosen adaptively without a budget.
        """
        delta = self.target_delta if delta is None else float(delta)
        return {
            "steps": len(self.history),
            "delta": delta,
            "guarantee_epsilon": self.guarantee_epsilon,
            "odometer_epsilon": float(self.get_epsilon(delta)) if len(self.history) else 0.0,
            "accountant": self.accountant.mechanism(),
        }

    # ------------------------------------------------------------------ checkpoints
    def adaptive_state_dict(self) -> dict[str, Any]:
        """The engine's own state (controller, monitor, filter, history, pending reading, σ)."""
        pending = self._pending
        if pending is not None and not isinstance(pending, tuple):
            pending = ("reading", asdict(pending))
        return {
            "version": 1,
            "history": [dict(r) for r in self.history],
            "controller": None if self.controller is None else self.controller.state_dict(),
            "monitor": None if self.monitor is None else self.monitor.state_dict(),
            "budget_filter": None if self.budget_filter is None else self.budget_filter.state_dict(),
            "pending": pending,
            "noise_multiplier": None if self._optimizer is None else float(self._optimizer.noise_multiplier),
            "user_sigma": self._user_sigma,
            "last_set_sigma": self._last_set_sigma,
            "target_mi": self.target_mi,
            "monitor_every": self.monitor_every,
        }

    def load_adaptive_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`adaptive_state_dict` into an engine set up by the same ``make_private`` call.

        Raises:
            ValueError: if the saved state has a controller / monitor / filter this engine lacks (or the
                other way round).
        """
        for name, part in (("controller", self.controller), ("monitor", self.monitor),
                           ("budget_filter", self.budget_filter)):
            if (state.get(name) is None) != (part is None):
                raise ValueError(
                    f"checkpoint {'has' if state.get(name) is not None else 'lacks'} a {name} but this engine "
                    f"{'lacks' if part is None else 'has'} one; call make_private with the settings of the "
                    "run that saved it before load_checkpoint"
                )
            if part is not None:
                part.load_state_dict(state[name])
        self.history = [dict(r) for r in state["history"]]
        pending = state.get("pending")
        if isinstance(pending, tuple) and pending and pending[0] == "reading":
            from adaptive_dp.leakage.monitor import LeakageReading

            pending = LeakageReading(**pending[1])
        self._pending = pending
        self._user_sigma = state.get("user_sigma")
        self._last_set_sigma = state.get("last_set_sigma")
        if self._optimizer is not None and state.get("noise_multiplier") is not None:
            self._optimizer.noise_multiplier = float(state["noise_multiplier"])

    def save_checkpoint(
        self,
        *,
        path: str | os.PathLike | BinaryIO | IO[bytes],
        module: nn.Module,
        optimizer: DPOptimizer | None = None,
        noise_scheduler=None,
        grad_clip_scheduler=None,
        checkpoint_dict: dict[str, Any] | None = None,
        module_state_dict_kwargs: dict[str, Any] | None = None,
        torch_save_kwargs: dict[str, Any] | None = None,
    ):
        """opacus' ``save_checkpoint``, plus the engine's state under ``"adaptive_dp_state_dict"``."""
        checkpoint_dict = dict(checkpoint_dict or {})
        checkpoint_dict["adaptive_dp_state_dict"] = self.adaptive_state_dict()
        return super().save_checkpoint(
            path=path, module=module, optimizer=optimizer, noise_scheduler=noise_scheduler,
            grad_clip_scheduler=grad_clip_scheduler, checkpoint_dict=checkpoint_dict,
            module_state_dict_kwargs=module_state_dict_kwargs, torch_save_kwargs=torch_save_kwargs,
        )

    def load_checkpoint(
        self,
        *,
        path: str | os.PathLike | BinaryIO | IO[bytes],
        module: nn.Module,
        optimizer: DPOptimizer | None = None,
        noise_scheduler=None,
        grad_clip_scheduler=None,
        module_load_dict_kwargs: dict[str, Any] | None = None,
        torch_load_kwargs: dict[str, Any] | None = None,
    ) -> dict:
        """opacus' ``load_checkpoint``; also restores the engine's state when the checkpoint has it.

        Call it after ``make_private`` with the settings of the run that saved the checkpoint; the next
        step then gets the σ and the ε it would have had without the interruption.
        """
        checkpoint = super().load_checkpoint(
            path=path, module=module, optimizer=optimizer, noise_scheduler=noise_scheduler,
            grad_clip_scheduler=grad_clip_scheduler, module_load_dict_kwargs=module_load_dict_kwargs,
            torch_load_kwargs=torch_load_kwargs,
        )
        state = checkpoint.pop("adaptive_dp_state_dict", None)
        if state is not None:
            self.load_adaptive_state_dict(state)
        return checkpoint


def _noise_search_accountant(mechanism: str) -> str:
    """The accountant opacus' ``get_noise_multiplier`` searches with for this engine's accountant.

    The incremental RDP accountant gives opacus' RDP ε (to ~1e-12) about 8× faster; GDP is refused earlier.
    """
    return mechanism if mechanism in (INCREMENTAL_RDP, "prv") else "rdp"
