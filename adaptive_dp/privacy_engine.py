"""AdaptivePrivacyEngine: opacus' PrivacyEngine with a closed leakage loop and a hard ε budget.

Swap ``opacus.PrivacyEngine`` for :class:`AdaptivePrivacyEngine` and nothing else changes: the same
constructor, the same ``make_private`` / ``make_private_with_epsilon`` tuples, the same checkpoints, σ = 0
(clipping only) included. The adaptive keywords (:class:`~adaptive_dp.control.AdaptiveOptions`) turn on

* a leakage monitor on an audit split (``audit_data`` / ``audit_fraction``), read every ``monitor_every`` steps;
* a controller (``target_mi`` + ``controller``) that turns the reading into the next step's σ;
* a Rényi filter (``make_private_with_epsilon``) that floors σ so no RDP order ever exceeds its budget.

``make_private`` is opacus' own, preceded and followed by small ``_prepare_*`` steps; σ of each step is
decided by the optimizer opacus' dispatch picks, replaced by its adaptive subclass
(:mod:`adaptive_dp.optimizers`), which hands it to one :class:`~adaptive_dp.control.NoiseControlLoop`. Why the
accounting stays sound, and which check enforces each precondition: ``docs/accounting.md``.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

from opacus import PrivacyEngine
from opacus.accountants.utils import get_noise_multiplier
from opacus.grad_sample import AbstractGradSampleModule
from opacus.optimizers import DPOptimizer
from torch import nn, optim
from torch.utils.data import DataLoader

import adaptive_dp.accountants.rdp  # noqa: F401  (registers the "rdp_incremental" accountant with opacus)
from adaptive_dp import distributed as ddp
from adaptive_dp.accountants.filter import PrivacyBudgetExhausted, RenyiFilter
from adaptive_dp.accountants.odometer import RenyiOdometer
from adaptive_dp.control.loop import NoiseControlLoop
from adaptive_dp.control.options import DEFAULT_MONITOR_EVERY, AdaptiveOptions
from adaptive_dp.control.plan import (
    INCREMENTAL_RDP,
    Budget,
    Plan,
    check_plan_fits,
    data_adaptive,
    noise_search_accountant,
)
from adaptive_dp.control.spend import build_spender, check_spend_options
from adaptive_dp.engine_state import EngineStateMixin
from adaptive_dp.leakage.audit import as_audit_dataset, carve_audit_split
from adaptive_dp.leakage.overlap import check_audit_disjoint
from adaptive_dp.optimizers import NOISE_IN_BACKWARD, clipping_norm, get_adaptive_optimizer_class

__all__ = ["AdaptiveOptions", "AdaptivePrivacyEngine", "DEFAULT_MONITOR_EVERY", "PrivacyBudgetExhausted"]

DEFAULT_SIGMA_MIN = 0.3
DEFAULT_SIGMA_MAX = 10.0
DEFAULT_DELTA = 1e-5

# What the engine's accountant names mean: "rdp" is the incremental RDP sum (same ε as opacus' RDP,
# O(#orders) per step); "prv" and "gdp" stay opacus' own accountants.
_ACCOUNTANT_ALIASES = {"rdp": INCREMENTAL_RDP}
# Accountants whose get_epsilon is cheap enough to record the odometer after every step.
_CHEAP_ACCOUNTANTS = {INCREMENTAL_RDP, "gdp"}


class AdaptivePrivacyEngine(EngineStateMixin, PrivacyEngine):
    """Drop-in ``opacus.PrivacyEngine`` that measures gradient leakage and adapts the noise multiplier.

    Args:
        accountant: ``"rdp"`` (default): the incremental RDP accountant registered as ``"rdp_incremental"`` —
            the same ε as opacus' ``RDPAccountant`` on the same σ history at O(#orders) per step. ``"prv"``:
            opacus' PRV accountant (tighter; slow with a changing σ). ``"gdp"``: opacus' Gaussian accountant,
            which only supports a fixed σ (an adaptive setting with it is a ValueError).
        secure_mode: as in opacus.

    Attributes:
        history: one dict per optimizer step (:class:`~adaptive_dp.control.StepRecord` fields): ``step``
            (1-based), ``noise_multiplier`` (σ used), ``mi`` / ``critic_gap`` (the reading handed to the
            controller at that step, else None; ``mi`` NaN for a failed reading), ``sigma_floor``,
            ``controller_error``, ``epsilon`` (odometer ε at ``target_delta`` after the step; None for PRV),
            ``monitor_error``, ``audit_loss``.
        control_loop: the :class:`~adaptive_dp.control.NoiseControlLoop` (None before ``make_private``).
    """

    def __init__(self, *, accountant: str = "rdp", secure_mode: bool = False):
        super().__init__(accountant=_ACCOUNTANT_ALIASES.get(accountant, accountant), secure_mode=secure_mode)
        self.control_loop: NoiseControlLoop | None = None
        self.options = AdaptiveOptions()
        self.audit_dataset: Any = None
        self.target_mi: float | None = None
        self.sigma_min: float | None = None
        self.sigma_max: float | None = None
        self.sample_rate: float | None = None
        self.canary_run: Any = None  # GradientCanaryRun / InputCanaryRun with canaries=, else None
        self._module: nn.Module | None = None
        self._optimizer: DPOptimizer | None = None

    # ------------------------------------------------------------------ parts of the loop
    @property
    def history(self) -> list[dict[str, Any]]:
        """One record per optimizer step (see the class doc); empty before ``make_private``."""
        return [] if self.control_loop is None else self.control_loop.history

    @property
    def controller(self) -> Any:
        """The controller deciding σ (None: σ is the user's)."""
        return None if self.control_loop is None else self.control_loop.controller

    @property
    def monitor(self) -> Any:
        """The leakage monitor (None without audit data, and on ranks other than 0)."""
        return None if self.control_loop is None else self.control_loop.monitor

    @property
    def budget_filter(self) -> RenyiFilter | None:
        """The Rényi filter of a hard ε budget (``make_private_with_epsilon``), else None."""
        return None if self.control_loop is None else self.control_loop.budget_filter

    @property
    def monitor_every(self) -> int:
        """Optimizer steps between leakage readings."""
        return self.options.monitor_every

    @property
    def target_delta(self) -> float:
        """δ of the odometer ε in :attr:`history` (the budget's δ under a budget)."""
        return DEFAULT_DELTA if self.control_loop is None else self.control_loop.target_delta

    # ------------------------------------------------------------------ make_private
    def make_private(
        self,
        *,
        module: nn.Module,
        optimizer: optim.Optimizer,
        criterion=nn.CrossEntropyLoss(),  # noqa: B008 - opacus' default
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
        adaptive: AdaptiveOptions | None = None,
        **kwargs,
    ):
        """opacus' ``make_private``, plus the adaptive options (keywords or an :class:`AdaptiveOptions`).

        Takes every argument of ``opacus.PrivacyEngine.make_private`` (same meaning, same return tuple:
        ``(module, optimizer, data_loader)``, or ``(module, optimizer, criterion, data_loader)`` in ghost mode),
        plus the fields of :class:`~adaptive_dp.control.AdaptiveOptions` as keywords (``target_mi``,
        ``controller``, ``estimator``, ``token_encoder``, ``audit_data``, ``audit_fraction``, ``monitor_every``,
        ``sigma_min``, ``sigma_max``, ``sigma_end``, ``total_steps``, ``epochs``, ``target_delta``,
        ``checkpoint_path``, ``seed``, ``controller_options``, ``monitor_options``) or as ``adaptive=``.
        Without any of them it behaves exactly like opacus (σ = 0 included).

        Raises:
            RuntimeError: the engine already made a model private (one engine, one private model).
            ValueError: an invalid option (one message each, naming the fix), among them audit data that is or
                overlaps the training data (:class:`~adaptive_dp.leakage.overlap.AuditOverlapError`).
        """
        options, opacus_kwargs = AdaptiveOptions.split(kwargs, adaptive=adaptive)
        return self._make_private(
            options,
            None,
            module=module,
            optimizer=optimizer,
            criterion=criterion,
            data_loader=data_loader,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            batch_first=batch_first,
            loss_reduction=loss_reduction,
            poisson_sampling=poisson_sampling,
            clipping=clipping,
            noise_generator=noise_generator,
            grad_sample_mode=grad_sample_mode,
            wrap_model=wrap_model,
            rand_on_empty=rand_on_empty,
            **opacus_kwargs,
        )

    def make_private_with_epsilon(
        self,
        *,
        module: nn.Module,
        optimizer: optim.Optimizer,
        criterion=nn.CrossEntropyLoss(),  # noqa: B008 - opacus' default
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
        adaptive: AdaptiveOptions | None = None,
        **kwargs,
    ):
        """opacus' ``make_private_with_epsilon`` with a hard (ε, δ) budget kept by a Rényi filter.

        The starting σ is opacus' ``get_noise_multiplier`` for ``epochs`` over the (carved) training loader; the
        planned steps are ``epochs / q``. The filter's budget B(α) is the RDP curve of the uniform plan that
        spends exactly ``target_epsilon``; before every step σ is raised to the filter's floor, so no order ever
        exceeds B(α) and the guarantee is ``target_epsilon`` at ``target_delta`` whatever the controller asks
        (Feldman & Zrnic 2021). ``spend_budget="steps"`` / ``"sample-rate"`` spends what a binding leakage ceiling
        leaves of it with more steps or larger Poisson batches (:mod:`adaptive_dp.control.spend`; off by default).
        Other arguments: as :meth:`make_private`.

        Raises:
            PrivacyBudgetExhausted: from ``optimizer.step()`` (before the step is applied, after the state is saved
                to ``checkpoint_path`` if one is set) when the floor exceeds ``sigma_max``.
            ValueError: as :meth:`make_private`; non-positive ``target_epsilon`` / ``target_delta`` / ``epochs``;
                ``poisson_sampling=False`` (the budget's accounting assumes Poisson sampling); ``spend_budget``
                settings the engine cannot honour (:func:`~adaptive_dp.control.spend.check_spend_options`).
            NotImplementedError: ``spend_budget`` under torch.distributed.
        """
        if not (target_epsilon > 0 and math.isfinite(target_epsilon)):
            raise ValueError(f"target_epsilon must be positive and finite, got {target_epsilon!r}")
        if not 0 < target_delta < 1:
            raise ValueError(f"target_delta must be in (0, 1), got {target_delta!r}")
        if not epochs or epochs <= 0:
            raise ValueError(f"epochs must be a positive number, got {epochs!r}")
        options, opacus_kwargs = AdaptiveOptions.split(kwargs, adaptive=adaptive)
        budget = Budget(float(target_epsilon), float(target_delta), float(epochs))
        return self._make_private(
            options,
            budget,
            module=module,
            optimizer=optimizer,
            criterion=criterion,
            data_loader=data_loader,
            noise_multiplier=None,
            max_grad_norm=max_grad_norm,
            batch_first=batch_first,
            loss_reduction=loss_reduction,
            poisson_sampling=poisson_sampling,
            clipping=clipping,
            noise_generator=noise_generator,
            grad_sample_mode=grad_sample_mode,
            wrap_model=wrap_model,
            **opacus_kwargs,
        )

    def _make_private(self, options: AdaptiveOptions, budget: Budget | None, *, data_loader, **opacus_kwargs):
        """The steps of both ``make_private*``: each ``_prepare_*`` below does one thing."""
        self._prepare_engine(options, budget, opacus_kwargs)
        check_spend_options(options, budget, accountant=self.accountant, data_loader=data_loader)
        data_loader, audit = self._prepare_audit(options, data_loader)
        data_loader = self._prepare_input_canaries(options, data_loader)
        tolerance = opacus_kwargs.pop("epsilon_tolerance", 0.01)
        plan = self._prepare_plan(
            options, budget, data_loader, opacus_kwargs.pop("noise_multiplier"), tolerance
        )
        controller = self._prepare_controller(options, budget, plan, opacus_kwargs)
        if self.target_mi is not None and audit is None:  # a feedback controller instance, no audit data
            raise ValueError(
                f"the controller steers leakage to target {self.target_mi} nats but there is no audit data to "
                "measure it on: pass audit_data=<public or held-out examples> or audit_fraction=0.02"
            )
        distributed = ddp.is_distributed() and isinstance(opacus_kwargs["module"], (ddp.DPDDP, ddp.DDP))
        out = super().make_private(
            data_loader=data_loader, noise_multiplier=plan.noise_multiplier, **opacus_kwargs
        )
        module, optimizer, loader = out[0], out[1], out[-1]
        self._check_optimizer(optimizer, controller)
        self._module, self._optimizer, self.sample_rate = module, optimizer, 1 / len(loader)
        monitor = self._prepare_monitor(
            options, audit, module, distributed=distributed, settings=opacus_kwargs
        )
        guard = self._prepare_guard(options, plan, monitor, controller)
        spender = build_spender(
            options,
            planned_steps=plan.total_steps,
            base_rate=self.sample_rate,
            loader=loader,
            optimizer=optimizer,
        )
        self.control_loop = self._prepare_loop(
            options,
            budget,
            plan,
            controller=controller,
            monitor=monitor,
            distributed=distributed,
            guard=guard,
            spender=spender,
        )
        optimizer.attach_control_loop(self.control_loop)
        self._prepare_gradient_canaries(options, optimizer)
        if monitor is not None:  # the first reading, before step 1
            self.control_loop.pending = self.control_loop.read(max_grad_norm=clipping_norm(optimizer))
        return out

    # ------------------------------------------------------------------ the _prepare_* steps
    def _prepare_engine(self, options: AdaptiveOptions, budget: Budget | None, opacus_kwargs: dict) -> None:
        """Refuse what breaks the guarantee before anything is built (one engine, one model; Poisson; GDP)."""
        if self.control_loop is not None:
            raise RuntimeError(
                "this AdaptivePrivacyEngine already made a model private, and its accountant and budget belong to "
                "that model; create a new AdaptivePrivacyEngine() for another model (one engine, one private model)"
            )
        adaptive = options.adaptive or budget is not None
        if adaptive and self.accountant.mechanism() == "gdp":
            raise ValueError(
                "the GDP accountant only supports one fixed noise multiplier, and this setting changes σ during "
                "training; use AdaptivePrivacyEngine(accountant='rdp') (default) or 'prv'"
            )
        if opacus_kwargs.get("poisson_sampling", True):
            return
        if budget is not None:
            raise ValueError(
                "poisson_sampling=False with a hard ε budget: the accountant and the Rényi filter assume Poisson "
                "sampling (each example in each batch independently with probability q), and shuffled fixed-size "
                "batches are not covered (the printed guarantee would not hold); keep poisson_sampling=True"
            )
        if options.adaptive:
            warnings.warn(
                "poisson_sampling=False: the accountant books q = 1/len(data_loader) as if batches were Poisson "
                "samples, but shuffled fixed-size batches are not covered by that analysis, so the reported ε "
                "does not hold for this run; keep poisson_sampling=True for a valid ε",
                UserWarning,
                stacklevel=4,
            )

    def _prepare_audit(self, options: AdaptiveOptions, data_loader: DataLoader) -> tuple[DataLoader, Any]:
        """The audit split, before the private loader exists (so q is computed on what is trained on)."""
        audit_data = options.audit_data
        if options.audit_fraction:
            data_loader, audit_data = carve_audit_split(
                data_loader, fraction=options.audit_fraction, seed=options.seed
            )
        if audit_data is None:
            return data_loader, None
        audit = as_audit_dataset(audit_data)
        check_audit_disjoint(train=data_loader, audit=audit_data, audit_dataset=audit, seed=options.seed)
        self.audit_dataset = audit
        return data_loader, audit

    def _prepare_input_canaries(self, options: AdaptiveOptions, data_loader: DataLoader) -> DataLoader:
        """Black-box canaries: mislabelled examples put into the training loader (after the audit carve, before q)."""
        if not options.canaries or options.canary_mode != "input":
            return data_loader
        from adaptive_dp.auditing import InputCanaryRun

        data_loader, self.canary_run = InputCanaryRun.insert(
            data_loader, count=options.canaries, num_classes=None, seed=options.seed
        )
        return data_loader

    def _prepare_gradient_canaries(self, options: AdaptiveOptions, optimizer: DPOptimizer) -> None:
        """White-box canaries: canary gradients added to the clipped sum before the noise, scored every step."""
        if not options.canaries or options.canary_mode != "gradient":
            return
        from adaptive_dp.auditing import GradientCanaryRun, sgd_momentum

        if isinstance(optimizer.max_grad_norm, (list, tuple)):
            raise ValueError(
                "gradient canaries need one clipping norm (flat clipping); use canary_mode='input'"
            )
        self.canary_run = GradientCanaryRun(
            count=options.canaries,
            params=list(optimizer.params),
            max_grad_norm=float(optimizer.max_grad_norm),
            sample_rate=self.sample_rate,
            seed=options.seed,
            kind=options.canary_kind,
            momentum=sgd_momentum(optimizer),
        )
        self.canary_run.attach(optimizer)

    def _prepare_plan(
        self,
        options: AdaptiveOptions,
        budget: Budget | None,
        data_loader: DataLoader,
        noise_multiplier: float | None,
        tolerance: float,
    ) -> Plan:
        """The initial noise multiplier (opacus' ``get_noise_multiplier`` under a budget) and the planned steps."""
        sample_rate = 1 / len(data_loader)
        if budget is None:
            epochs = options.epochs
            steps = int(epochs / sample_rate) if epochs is not None else options.total_steps
            return Plan(float(noise_multiplier), steps)
        if len(self.accountant) > 0:
            warnings.warn(
                "make_private_with_epsilon called with privacy already spent; the budget filter counts only the "
                "steps from now on",
                stacklevel=4,
            )
        with warnings.catch_warnings():  # the search visits σ's whose best order is the largest
            warnings.filterwarnings("ignore", message="Optimal order is the")
            sigma = get_noise_multiplier(
                target_epsilon=budget.target_epsilon,
                target_delta=budget.target_delta,
                sample_rate=sample_rate,
                epochs=budget.epochs,
                accountant=noise_search_accountant(self.accountant.mechanism()),
                epsilon_tolerance=tolerance,
            )
        return Plan(float(sigma), int(budget.epochs / sample_rate))

    def _prepare_controller(
        self, options: AdaptiveOptions, budget: Budget | None, plan: Plan, opacus_kwargs: dict
    ) -> Any:
        """Build the controller from its name, or check an instance against the keywords; set the σ bounds."""
        from adaptive_dp.control.build import resolve_controller

        controller, self.sigma_min, self.sigma_max, self.target_mi = resolve_controller(
            options,
            initial=plan.noise_multiplier,
            total_steps=plan.total_steps,
            needs_bounds=budget is not None,
            default_bounds=(DEFAULT_SIGMA_MIN, DEFAULT_SIGMA_MAX),
        )
        if budget is not None:
            check_plan_fits(plan, budget, sigma_max=self.sigma_max)
        if opacus_kwargs.get("clipping") == "adaptive" and controller is not None:
            limit = 2 * float(opacus_kwargs.get("unclipped_num_std", math.inf))
            if self.sigma_max >= limit:
                raise ValueError(
                    f"adaptive clipping needs noise_multiplier < 2·unclipped_num_std = {limit}; set sigma_max below "
                    f"it (got sigma_max={self.sigma_max})"
                )
        return controller

    def _prepare_optimizer(
        self,
        *,
        optimizer: optim.Optimizer,
        noise_multiplier: float,
        max_grad_norm: float | list[float],
        expected_batch_size: int,
        loss_reduction: str = "mean",
        distributed: bool = False,
        clipping: str = "flat",
        noise_generator=None,
        grad_sample_mode="hooks",
        **kwargs,
    ) -> DPOptimizer:
        """opacus' optimizer dispatch, returning the adaptive subclass of opacus' choice."""
        if isinstance(optimizer, DPOptimizer):
            optimizer = optimizer.original_optimizer
        generator = self.secure_rng if self.secure_mode else noise_generator
        optim_class = get_adaptive_optimizer_class(
            clipping=clipping, distributed=distributed, grad_sample_mode=grad_sample_mode
        )
        return optim_class(
            optimizer=optimizer,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            expected_batch_size=expected_batch_size,
            loss_reduction=loss_reduction,
            generator=generator,
            secure_mode=self.secure_mode,
            **kwargs,
        )

    def _prepare_monitor(
        self,
        options: AdaptiveOptions,
        audit: Any,
        private_module: Any,
        *,
        distributed: bool,
        settings: dict[str, Any],
    ) -> Any:
        """The leakage monitor on the audit split (rank 0 only under DDP; it reads through a hook-free copy).

        ``settings`` are the opacus keywords of the ``make_private`` call (criterion, clipping, wrap_model, ...).
        """
        if audit is None or (distributed and ddp.get_rank() != 0):
            return None
        from adaptive_dp.leakage.monitor import LeakageMonitor

        watched = private_module if settings.get("wrap_model", True) else settings["module"]
        if isinstance(watched, AbstractGradSampleModule):  # the plain model inside opacus' wrapper (any mode)
            watched = watched._module
        if distributed:
            watched = ddp.unwrap_distributed(watched)
        monitor_options = {"loss_fn": settings.get("criterion"), **options.monitor_options}
        clipping = "per_layer" if settings.get("clipping") == "per_layer" else "flat"
        self._monitor_settings = {"watched": watched, "audit": audit, "clipping": clipping, **monitor_options}
        return LeakageMonitor(
            watched,
            audit,
            max_grad_norm=clipping_norm(self._optimizer),
            estimator=options.estimator,
            token_encoder=options.token_encoder,
            seed=options.seed,
            clipping=clipping,
            **monitor_options,
        )

    def _prepare_guard(self, options: AdaptiveOptions, plan: Plan, monitor: Any, controller: Any) -> Any:
        """The blind-meter guard: a learned estimator steering σ is checked against the likelihood-ratio reference."""
        if (
            monitor is None
            or controller is None
            or options.estimator == "likelihood-ratio"
            or not options.meter_guard
        ):
            return None
        from adaptive_dp.control.guard import MeterGuard
        from adaptive_dp.leakage.monitor import LeakageMonitor

        settings = dict(self._monitor_settings)
        watched, audit, clipping = settings.pop("watched"), settings.pop("audit"), settings.pop("clipping")
        settings = {k: v for k, v in settings.items() if k in ("loss_fn", "batch_size", "max_audit")}
        reference = LeakageMonitor(
            watched,
            audit,
            max_grad_norm=clipping_norm(self._optimizer),
            estimator="likelihood-ratio",
            seed=options.seed + 1,
            clipping=clipping,
            **settings,
        )
        return MeterGuard(
            reference=reference, noise_multiplier=plan.noise_multiplier, target_mi=self.target_mi
        )

    def _prepare_loop(
        self,
        options: AdaptiveOptions,
        budget: Budget | None,
        plan: Plan,
        *,
        controller: Any,
        monitor: Any,
        distributed: bool,
        guard: Any,
        spender: Any = None,
    ) -> NoiseControlLoop:
        """The noise-control loop with its budget filter (and ``spend_budget``'s spender)."""
        budget_filter = None
        delta = options.target_delta if options.target_delta is not None else DEFAULT_DELTA
        if budget is not None:
            delta = budget.target_delta
            budget_filter = RenyiFilter(
                target_epsilon=budget.target_epsilon,
                target_delta=budget.target_delta,
                sample_rate=self.sample_rate,
                planned_steps=plan.total_steps,
            )
        self.options = options
        return NoiseControlLoop(
            accountant=self.accountant,
            noise_multiplier=plan.noise_multiplier,
            controller=controller,
            monitor=monitor,
            budget_filter=budget_filter,
            sigma_max=self.sigma_max,
            target_mi=self.target_mi,
            monitor_every=options.monitor_every,
            target_delta=delta,
            cheap_epsilon=self.accountant.mechanism() in _CHEAP_ACCOUNTANTS,
            on_exhausted=self._save_on_exhaustion,
            distributed=distributed,
            guard=guard,
            sample_rate=self.sample_rate,
            odometer=RenyiOdometer() if budget is None and data_adaptive(controller) else None,
            spender=spender,
        )

    def _check_optimizer(self, optimizer: DPOptimizer, controller: Any) -> None:
        if controller is not None and isinstance(optimizer, NOISE_IN_BACKWARD):
            raise ValueError(
                f"{type(optimizer).__name__} adds the noise inside backward hooks, before σ of the step can be "
                "decided; use clipping='flat' for a controller under DDP"
            )

    def _save_on_exhaustion(self) -> None:
        path = self.options.checkpoint_path
        if path is not None and self._module is not None:
            self.save_checkpoint(path=path, module=self._module, optimizer=self._optimizer)
