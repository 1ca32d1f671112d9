"""PyTorch Lightning: adaptive DP-SGD for an existing ``LightningModule`` by adding one callback.

::

    from lightning.pytorch import Trainer
    from adaptive_dp.lightning import AdaptivePrivacyCallback

    privacy = AdaptivePrivacyCallback(target_epsilon=3.0, target_delta=1e-5, max_grad_norm=1.0,
                                      target_mi=0.5, audit_fraction=0.05)
    trainer = Trainer(max_epochs=5, callbacks=[privacy])
    trainer.fit(model, datamodule=data)           # model: returns a loss from training_step
    privacy.engine.privacy_summary()              # guarantee and odometer ε

The callback does what :meth:`AdaptivePrivacyEngine.make_private` does in a plain loop, at the points of
Lightning's fit where each object exists (in this order):

* ``setup("fit")`` — the private training data: the loader Lightning would train on (from the datamodule, the
  module's ``train_dataloader`` or ``trainer.fit(train_dataloaders=...)``) loses its audit split
  (``audit_fraction``), then Poisson sampling at q = 1/len(loader), opacus' own mechanism
  (``DPDataLoader.from_data_loader``, as ``opacus.lightning.DPLightningDataModule`` does; under DDP each rank
  samples its shard, :func:`adaptive_dp.distributed.distributed_poisson_loader`). It is installed as the fit
  loop's training data source, the attribute Lightning's own ``BatchSizeFinder`` swaps, before anything
  loads it (so ``trainer.estimated_stepping_batches`` in ``configure_optimizers`` already counts it);
* ``on_fit_start`` — ``make_private`` (or ``make_private_with_epsilon``, epochs from ``Trainer(max_epochs)``)
  on the module and the one optimizer ``configure_optimizers`` returned. opacus' per-sample-gradient hooks go
  on the module's layers (``GradSampleModule(pl_module)``; Lightning keeps calling the module itself) and the
  DP optimizer replaces the user's in ``trainer.strategy.optimizers`` (Lightning then steps it with the
  training-step closure; LR schedulers keep driving the wrapped optimizer's ``param_groups``). Under
  ``Trainer(strategy="ddp", use_distributed_sampler=False)`` the module is marked with opacus'
  ``DifferentiallyPrivateDistributedDataParallel``, so opacus builds its distributed optimizer (each rank clips,
  rank 0 adds the noise, the noisy sums are all-reduced) and rank 0 decides σ for every rank;
* ``on_train_start`` / ``on_train_epoch_end`` — the Poisson sampler and the noise generator are seeded from
  (``seed``, rank, epoch) before each epoch's first draw, so a run resumed from an epoch-end checkpoint draws
  what the uninterrupted run would have drawn (Lightning skips ``on_train_epoch_start`` on some restarts);
* ``on_train_batch_end`` — the step's record goes to ``pl_module.log`` (so to every configured logger, written
  every ``Trainer(log_every_n_steps)`` steps, and to ``trainer.callback_metrics``); then, under a budget, the
  Rényi filter is asked whether it can pay for the next step — the control loop's own test on the same filter
  state — and if not, ``trainer.should_stop`` is set: the step that would raise
  :class:`~adaptive_dp.PrivacyBudgetExhausted` never starts, the epoch ends, and Lightning writes its
  epoch-end checkpoint and metrics (with ``Trainer(min_epochs)`` Lightning may refuse to stop; the next step
  then raises, and nothing is overspent);
* ``state_dict`` / ``load_state_dict`` — Lightning checkpoints carry the accountant and the control loop
  (controller, monitor, Rényi filter, history), so ``trainer.fit(ckpt_path=...)`` continues σ and ε (exactly,
  from an epoch-end checkpoint); ``teardown`` removes opacus' hooks from the module.

Logged after every optimizer step (keys of :data:`adaptive_dp.training.tracking.WANDB_KEYS`):
``privacy/noise_multiplier``, ``privacy/epsilon`` (odometer), ``privacy/sigma_floor``,
``privacy/guarantee_epsilon`` (the engine's formal ε, of the kind ``engine.guarantee_kind`` names), and the
latest leakage reading — ``leakage/mi``, ``leakage/critic_gap``, ``control/error``, ``train/audit_loss`` —
until the next one (:func:`step_metrics`); ``privacy/budget_exhausted`` = 1 at the step after which the budget
stopped training. Nothing computed on the private batch without noise is logged unless
``log_private_metrics=True`` (``train/loss``, ``train/batch_size``, not covered by ε): the batch loss the
module logs itself is the user's business.

Requires the ``lightning`` extra (``pip install "adaptive-dp[lightning]"``); written against lightning 2.x.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from typing import Any

import numpy as np
import torch

try:
    import lightning.pytorch as pl
except ImportError as exc:  # pragma: no cover - the extra is missing
    raise ImportError(
        'adaptive_dp.lightning needs PyTorch Lightning: pip install "adaptive-dp[lightning]"'
    ) from exc
import opacus.optimizers
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.data import extract_batch_size
from opacus.data_loader import DPDataLoader
from opacus.distributed import DifferentiallyPrivateDistributedDataParallel as DPDDP
from torch.utils.data import DataLoader

from adaptive_dp import distributed as ddp
from adaptive_dp.accountants.filter import PrivacyBudgetExhausted
from adaptive_dp.control.options import AdaptiveOptions
from adaptive_dp.leakage.audit import carve_audit_split
from adaptive_dp.privacy_engine import AdaptivePrivacyEngine
from adaptive_dp.training.tracking import wandb_key

__all__ = ["AdaptivePrivacyCallback", "step_metrics"]

#: history fields of the step itself, logged after every optimizer step (when not None), under ``wandb_key``.
STEP_FIELDS = ("noise_multiplier", "epsilon", "sigma_floor")
#: history fields of the latest leakage reading, logged after every step until the next reading replaces them.
READING_FIELDS = ("mi", "critic_gap", "controller_error", "audit_loss")
#: ``make_private`` arguments the callback sets itself, and what to use instead.
_CONTROLLED = {
    "module": "the module is the LightningModule given to trainer.fit",
    "optimizer": "the optimizer is the one configure_optimizers returns",
    "data_loader": "the training data are the ones given to trainer.fit",
    "wrap_model": "the callback puts opacus' hooks on the LightningModule's layers itself",
    "poisson_sampling": "the callback always samples Poisson batches (the accounting assumes them)",
    "noise_generator": "pass seed=<int> (noise and sampling are seeded per epoch, so resumed runs continue "
    "exactly), or secure_mode=True",
}


class AdaptivePrivacyCallback(pl.Callback):
    """Train a ``LightningModule`` with (adaptive) DP-SGD: ``Trainer(callbacks=[AdaptivePrivacyCallback(...)])``.

    The keywords are those of :meth:`AdaptivePrivacyEngine.make_private` (``noise_multiplier``) or
    :meth:`~AdaptivePrivacyEngine.make_private_with_epsilon` (``target_epsilon`` + ``target_delta``; the budget
    is planned over ``Trainer(max_epochs)`` epochs, or ``epochs``), with the adaptive options of
    :class:`~adaptive_dp.control.AdaptiveOptions` (``target_mi``, ``controller``, ``estimator``, ``audit_data`` /
    ``audit_fraction``, ``monitor_every``, ``sigma_min`` / ``sigma_max``, ...) as keywords or as ``adaptive=``.
    How each piece hooks into Lightning: the module doc.

    The module's ``training_step`` returns the mean loss of its batch (``loss_reduction="mean"``, opacus'
    default) and ``configure_optimizers`` one optimizer (with or without LR schedulers). The training data are
    one ``DataLoader`` over a map-style dataset, requested in the callback's ``setup`` (after the datamodule's
    ``setup``, before the module's). With audit data, the leakage monitor calls ``pl_module(x)`` on the audit
    inputs (on a hook-free copy of the module) and scores the outputs with ``criterion`` (default
    cross-entropy), so the module needs a ``forward``.

    Args:
        max_grad_norm: C, the per-sample clipping norm.
        noise_multiplier: σ of the first step (fixed without a controller); exclusive with ``target_epsilon``.
        target_epsilon, target_delta: a hard (ε, δ) budget kept by a Rényi filter; σ starts at the uniform plan.
        epochs: epochs the budget (or an open-loop schedule) is planned for; default ``Trainer(max_epochs)``.
        accountant, secure_mode: as :class:`AdaptivePrivacyEngine` (``secure_mode=True``: opacus' secure RNG,
            no seeding, so a resumed run is not bit-identical).
        adaptive: an :class:`~adaptive_dp.control.AdaptiveOptions`; keywords given too override its fields.
        log_private_metrics: also log the private batch's loss and size (not covered by ε); default False.
        **kwargs: the adaptive options' fields (``seed`` also seeds sampling and noise) and opacus'
            ``make_private`` keywords (``criterion``, ``clipping``, ``loss_reduction``, ``grad_sample_mode``, ...).

    Attributes:
        engine: the :class:`AdaptivePrivacyEngine` (``history``, ``guarantee_epsilon``, ``get_epsilon(delta)``,
            ``privacy_summary()``); private from ``on_fit_start`` on.
        stopped_by_budget: True once training was stopped because the budget cannot pay for another step.

    Raises:
        ValueError: neither or both of ``noise_multiplier`` and ``target_epsilon``; ``target_epsilon`` without
            ``target_delta``; an invalid adaptive option; a ``make_private`` argument the callback sets itself;
            ghost clipping (it needs opacus' DP criterion inside ``training_step``); input canaries; an unknown keyword. At fit time: gradient accumulation, not exactly one optimizer, training data
            that are not a ``DataLoader``, a module without ``forward`` while audit data are given, a budget
            without a finite ``max_epochs``.
    """

    def __init__(
        self,
        *,
        max_grad_norm: float | list[float],
        noise_multiplier: float | None = None,
        target_epsilon: float | None = None,
        target_delta: float | None = None,
        epochs: float | None = None,
        accountant: str = "rdp",
        secure_mode: bool = False,
        adaptive: AdaptiveOptions | None = None,
        log_private_metrics: bool = False,
        **kwargs: Any,
    ):
        if (noise_multiplier is None) == (target_epsilon is None):
            raise ValueError(
                "pass exactly one of noise_multiplier=<σ> (make_private) or target_epsilon=<ε> with "
                "target_delta=<δ> (make_private_with_epsilon, a hard budget)"
            )
        if target_epsilon is not None and target_delta is None:
            raise ValueError("target_epsilon needs target_delta=<δ>, e.g. 1e-5 (below 1/number of examples)")
        for name, instead in _CONTROLLED.items():
            if name in kwargs:
                raise ValueError(f"AdaptivePrivacyCallback sets {name} itself: {instead}")
        unknown = sorted(set(kwargs) - AdaptiveOptions.names() - _opacus_keywords())
        if unknown:
            raise ValueError(
                f"unknown keyword(s) {unknown}: pass make_private's (criterion, clipping, ...) or the adaptive "
                f"options {sorted(AdaptiveOptions.names())}"
            )
        if "ghost" in str(kwargs.get("grad_sample_mode", "hooks")):
            raise ValueError(
                "ghost clipping needs opacus' DP criterion (the one make_private returns) inside "
                "training_step, which the callback cannot provide; use grad_sample_mode='hooks' (default) or "
                "'functorch'"
            )
        self.options, self.opacus_kwargs = AdaptiveOptions.split(kwargs, adaptive=adaptive)
        if self.options.canaries and self.options.canary_mode == "input":
            raise ValueError(
                "canary_mode='input' puts canaries into the loader make_private returns, which Lightning does not "
                "train on (the callback builds the Poisson loader before the optimizer exists); use "
                "canary_mode='gradient'"
            )
        if epochs is not None and not (epochs > 0 and math.isfinite(epochs)):
            raise ValueError(f"epochs must be a positive number, got {epochs!r}")
        self.max_grad_norm = max_grad_norm
        self.noise_multiplier = noise_multiplier
        self.target_epsilon = target_epsilon
        self.target_delta = target_delta
        self.epochs = epochs if epochs is not None else self.options.epochs
        self.log_private_metrics = bool(log_private_metrics)
        self.engine = AdaptivePrivacyEngine(accountant=accountant, secure_mode=secure_mode)
        self.stopped_by_budget = False
        # the training loader after the audit carve, before Poisson sampling (q is computed on it)
        self._train_loader: DataLoader | None = None
        self._audit: Any = self.options.audit_data
        self._hooks: Any = None  # opacus' GradSampleModule over the LightningModule's layers
        self._generators: dict[str, torch.Generator] = {}
        self._pending_state: dict[str, Any] | None = None  # loaded from a checkpoint before make_private
        self._logged_steps = 0  # history records already logged
        self._reading: dict[str, Any] | None = None  # the latest record with a leakage reading

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Carve the audit split and install the Poisson-sampled training loader (``stage == "fit"`` only).

        Raises:
            RuntimeError: the callback already made a model private (one callback, one fit).
            ValueError: gradient accumulation; training data that are not a ``DataLoader``; DDP without
                ``Trainer(use_distributed_sampler=False)``.
        """
        if stage != "fit":
            return
        if self.engine.control_loop is not None:
            raise RuntimeError(
                "this AdaptivePrivacyCallback already trained a model and its privacy accounting "
                "belongs to it; create a new callback (resume with trainer.fit(ckpt_path=...))"
            )
        if trainer.accumulate_grad_batches != 1:
            raise ValueError(
                "gradient accumulation over Poisson batches changes the sample rate the accountant "
                "books; use Trainer(accumulate_grad_batches=1) and a larger batch_size"
            )
        if ddp.is_distributed() and getattr(
            getattr(trainer, "_accelerator_connector", None), "use_distributed_sampler", False
        ):
            raise ValueError(
                "under DDP each rank Poisson-samples its own shard (opacus' distributed sampler); "
                "Lightning's DistributedSampler must stay out: Trainer(use_distributed_sampler=False)"
            )
        source = _train_data_source(trainer)
        loader = source.dataloader()
        if not isinstance(loader, DataLoader):
            raise ValueError(
                f"the training data must be one torch DataLoader over a map-style dataset (Poisson "
                f"sampling draws dataset indices), got {type(loader).__name__}"
            )
        if self.options.audit_fraction:
            loader, self._audit = carve_audit_split(
                loader, fraction=self.options.audit_fraction, seed=self.options.seed
            )
        self._train_loader = loader
        source.instance = self._poisson_loader(loader)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """``make_private`` on the module and its optimizer; the DP optimizer replaces Lightning's.

        Raises:
            ValueError: not exactly one optimizer; a module without ``forward`` while audit data are given; a
                budget without finite ``max_epochs``; whatever ``make_private`` refuses.
        """
        optimizers = trainer.strategy.optimizers
        if len(optimizers) != 1:
            raise ValueError(
                f"configure_optimizers returned {len(optimizers)} optimizers; DP-SGD needs exactly "
                "one, whose step adds the noise"
            )
        if self._audit is not None and type(pl_module).forward is pl.LightningModule.forward:
            raise ValueError(
                "the leakage monitor calls pl_module(x) on the audit inputs: define forward(x) "
                "returning what criterion (default cross-entropy) scores against the labels"
            )
        module = DPDDP(pl_module) if ddp.is_distributed() else pl_module
        out = self._make_private(trainer, module=module, optimizer=optimizers[0], device=pl_module.device)
        self._hooks, optimizer = out[0], out[1]
        trainer.strategy.optimizers = [optimizer]
        if self._pending_state is not None:
            self._restore(self._pending_state)
            self._pending_state = None
        self._logged_steps = len(self.engine.history)
        self._reading = _latest_reading(self.engine.history)
        self._stop_if_exhausted(trainer)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Seed sampling and noise for the epoch about to run (also the first epoch of a resumed run)."""
        self._seed_generators(trainer.current_epoch)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Seed sampling and noise for the next epoch (its batches are drawn after this hook)."""
        self._seed_generators(trainer.current_epoch + 1)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Log the step's record; stop before a step the budget cannot pay for."""
        history = self.engine.history
        if len(history) > self._logged_steps:
            self._reading = _latest_reading(history[self._logged_steps :], default=self._reading)
            self._logged_steps = len(history)
            self._log(
                pl_module,
                step_metrics(
                    history[-1], reading=self._reading, guarantee_epsilon=self.engine.guarantee_epsilon
                ),
            )
            if self.log_private_metrics:
                self._log(pl_module, _private_metrics(outputs, batch))
        if self._stop_if_exhausted(trainer):
            self._log(pl_module, {"privacy/budget_exhausted": 1.0})

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Remove opacus' hooks and per-sample-gradient attributes from the module after fit."""
        if stage == "fit" and self._hooks is not None:
            self._hooks.cleanup()
            self._hooks = None

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The accountant and the control loop (controller, monitor, filter, history) for Lightning checkpoints.

        Returns:
            ``{"version", "sample_rate", "accountant", "adaptive"}``; ``{}`` before ``on_fit_start`` (or the
            state loaded from a checkpoint and not yet applied).
        """
        if self.engine.control_loop is None:
            return dict(self._pending_state or {})
        return {
            "version": 1,
            "sample_rate": self.engine.sample_rate,
            "accountant": self.engine.accountant.state_dict(),
            "adaptive": self.engine.adaptive_state_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (applied at ``on_fit_start``, after ``make_private``, if not yet private).

        Raises:
            ValueError: (when applied) the checkpoint's sample rate differs from this run's (other data or batch
                size), or its controller / monitor / filter do not match this callback's settings.
        """
        if not state_dict:
            return
        if self.engine.control_loop is None:
            self._pending_state = dict(state_dict)
        else:
            self._restore(state_dict)

    # ------------------------------------------------------------------ pieces
    def _poisson_loader(self, loader: DataLoader) -> DataLoader:
        """opacus' Poisson ``DPDataLoader`` over ``loader``'s dataset at q = 1/len(loader) (per rank under DDP)."""
        distributed = ddp.is_distributed()
        generator = self.engine.secure_rng if self.engine.secure_mode else self._generator("sampler", "cpu")
        private = DPDataLoader.from_data_loader(loader, generator=generator, distributed=distributed)
        if distributed:  # yields a rank's empty batches too, so every rank takes the same number of steps
            return ddp.distributed_poisson_loader(private, generator=generator)
        if not self.engine.secure_mode:
            # the loader draws its workers' base seed from its own generator at every iter(), which Lightning
            # calls before or after the epoch's seeding depending on whether the run was resumed; keep that
            # draw off the sampler's stream
            private.generator = torch.Generator().manual_seed(self.options.seed)
        return private

    def _seed_generators(self, epoch: int) -> None:
        """The Poisson sampler (per rank) and the noise from (seed, rank, epoch): lazily drawn batches and noise
        of an epoch are the same whether or not the run was resumed from the end of the epoch before."""
        for name, generator in self._generators.items():
            rank = ddp.get_rank() if name == "sampler" else 0
            words = [self.options.seed, rank, epoch, 0 if name == "sampler" else 1]
            generator.manual_seed(
                int(np.random.SeedSequence(words).generate_state(1, dtype=np.uint64)[0] >> 1)
            )

    def _generator(self, name: str, device: torch.device | str) -> torch.Generator:
        generator = torch.Generator(device=device).manual_seed(self.options.seed)
        self._generators[name] = generator
        return generator

    def _make_private(
        self,
        trainer: pl.Trainer,
        *,
        module: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        device: torch.device,
    ) -> tuple:
        """The engine's ``make_private*`` with this callback's settings, on the carved training loader."""
        if self._train_loader is None:
            raise RuntimeError(
                "on_fit_start before setup('fit'): the callback must be in Trainer(callbacks=[...])"
            )
        options = dataclasses.replace(self.options, audit_fraction=None, audit_data=self._audit)
        if options.total_steps is None and options.epochs is None and self.target_epsilon is None:
            options = dataclasses.replace(options, epochs=self.epochs or _finite_epochs(trainer))
        kwargs = dict(
            self.opacus_kwargs,
            module=module,
            optimizer=optimizer,
            data_loader=self._train_loader,
            max_grad_norm=self.max_grad_norm,
            adaptive=options,
            wrap_model=True,
            poisson_sampling=True,
        )
        if not self.engine.secure_mode:
            kwargs["noise_generator"] = self._generator("noise", device)
        if self.target_epsilon is None:
            return self.engine.make_private(noise_multiplier=self.noise_multiplier, **kwargs)
        epochs = self.epochs or _finite_epochs(trainer)
        if epochs is None:
            raise ValueError(
                "a privacy budget is planned over the training epochs: set Trainer(max_epochs=N) or "
                "AdaptivePrivacyCallback(epochs=N)"
            )
        return self.engine.make_private_with_epsilon(
            target_epsilon=self.target_epsilon, target_delta=self.target_delta, epochs=epochs, **kwargs
        )

    def _restore(self, state: dict[str, Any]) -> None:
        saved_q, q = float(state["sample_rate"]), float(self.engine.sample_rate)
        if not math.isclose(saved_q, q, rel_tol=1e-12):
            raise ValueError(
                f"the checkpoint was trained at sample rate q = {saved_q:.6g}, this run samples at "
                f"q = {q:.6g}; resume with the same training data, batch_size and audit split"
            )
        self.engine.accountant.load_state_dict(state["accountant"])
        self.engine.load_adaptive_state_dict(state["adaptive"])

    def _stop_if_exhausted(self, trainer: pl.Trainer) -> bool:
        """Under a budget: stop before the step whose floor would exceed ``sigma_max`` (the step would raise
        :class:`PrivacyBudgetExhausted`: the same test as the control loop's, on the same filter state).

        Returns:
            True when this call stopped training.
        """
        budget_filter = self.engine.budget_filter
        if budget_filter is None or self.stopped_by_budget:
            return False
        try:
            floor = float(budget_filter.floor(sigma_max=self.engine.sigma_max))
        except PrivacyBudgetExhausted:
            floor = math.inf
        if math.isfinite(floor) and floor <= self.engine.sigma_max:
            return False
        self.stopped_by_budget = True
        trainer.should_stop = True
        rank_zero_info(
            f"adaptive_dp: privacy budget exhausted after {len(self.engine.history)} steps (the next "
            f"step would need σ > sigma_max = {self.engine.sigma_max:.4g} to stay within ε = "
            f"{self.engine.guarantee_epsilon:.4g}); stopping training"
        )
        return True

    @staticmethod
    def _log(pl_module: pl.LightningModule, metrics: dict[str, float]) -> None:
        to_loggers = bool(pl_module.trainer.loggers)  # else only trainer.callback_metrics (no warning)
        for key, value in metrics.items():
            pl_module.log(key, value, on_step=True, on_epoch=False, logger=to_loggers, prog_bar=False)


def _train_data_source(trainer: pl.Trainer) -> Any:
    """The fit loop's training-data source (``_DataLoaderSource``: ``instance`` + ``dataloader()``).

    It is Lightning's internal attribute that its own ``BatchSizeFinder`` callback swaps; checked, so that a
    Lightning release that moves it fails here with a clear message instead of training on the wrong loader.
    """
    source = getattr(trainer.fit_loop, "_data_source", None)
    if source is None or not hasattr(source, "instance") or not callable(getattr(source, "dataloader", None)):
        raise RuntimeError(
            f"lightning {pl.__version__} keeps the training data where adaptive_dp.lightning does "
            "not look (trainer.fit_loop._data_source); install lightning>=2.4,<3"
        )
    return source


def step_metrics(
    record: dict[str, Any], *, reading: dict[str, Any] | None = None, guarantee_epsilon: float | None = None
) -> dict[str, float]:
    """What is logged after an optimizer step, under the W&B keys of :func:`~adaptive_dp.training.tracking.wandb_key`.

    Args:
        record: the step's ``engine.history`` record; its :data:`STEP_FIELDS` are logged (each left out when
            None, e.g. ε of the PRV accountant).
        reading: the latest record that has a leakage reading (``mi`` not None), this one or an earlier one; its
            :data:`READING_FIELDS` are logged. Lightning keeps showing an ``on_step`` value at later steps until
            it is logged again, so the latest reading is logged, explicitly, at every step until the next one
            replaces it. A failed reading (``mi`` NaN) logs NaN for every reading field, never the reading before
            it; fields a reading does not have (``controller_error`` without a controller) are left out.
        guarantee_epsilon: the engine's formal ε guarantee, logged as ``privacy/guarantee_epsilon``; None: none.

    Returns:
        key → value (ε at the engine's δ, σ and its floor dimensionless, MI in nats, audit loss in nats for
        cross-entropy).
    """
    metrics = {wandb_key(f): float(record[f]) for f in STEP_FIELDS if _is_number(record.get(f))}
    if reading is not None:
        failed = math.isnan(reading["mi"])
        for field in READING_FIELDS:
            value = reading.get(field)
            if failed or _is_number(value):
                metrics[wandb_key(field)] = math.nan if failed else float(value)
    if guarantee_epsilon is not None:
        metrics["privacy/guarantee_epsilon"] = float(guarantee_epsilon)
    return metrics


def _latest_reading(
    records: list[dict[str, Any]], *, default: dict[str, Any] | None = None
) -> dict[str, Any] | None:
    """The last of ``records`` that has a leakage reading, else ``default``."""
    return next((r for r in reversed(records) if r.get("mi") is not None), default)


@functools.cache
def _opacus_keywords() -> frozenset[str]:
    """Keywords ``make_private*`` passes on to opacus: its own parameters and those of opacus' DP optimizers."""
    names = {"epsilon_tolerance"}
    for fn in (AdaptivePrivacyEngine.make_private, AdaptivePrivacyEngine.make_private_with_epsilon):
        names |= set(inspect.signature(fn).parameters)
    for cls in vars(opacus.optimizers).values():
        if isinstance(cls, type) and issubclass(cls, opacus.optimizers.DPOptimizer):
            names |= set(inspect.signature(cls.__init__).parameters)
    return frozenset(names - {"self", "kwargs"})


def _finite_epochs(trainer: pl.Trainer) -> int | None:
    epochs = trainer.max_epochs
    return epochs if epochs is not None and epochs > 0 else None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _private_metrics(outputs: Any, batch: Any) -> dict[str, float]:
    """The private batch's loss and size (``log_private_metrics=True`` only; not covered by ε)."""
    loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
    metrics = {}
    if isinstance(loss, torch.Tensor) and loss.numel() == 1:
        metrics[wandb_key("loss")] = float(loss.detach())
    try:
        metrics[wandb_key("batch_size")] = float(extract_batch_size(batch))
    except Exception:  # noqa: BLE001 - a batch without tensors has no size to log
        pass
    return metrics
