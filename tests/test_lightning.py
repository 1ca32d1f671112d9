"""adaptive_dp.lightning.AdaptivePrivacyCallback: a LightningModule on sklearn digits trained with adaptive DP-SGD.

One 2-epoch run (hard budget ε = 4, MI ceiling, audit split carved off the training data, CSV + offline W&B
loggers) serves several tests; the resume test trains 1 epoch and resumes it to compare with that run. The truths
are opacus' own ``RDPAccountant`` over the recorded σ history, the Rényi filter refusing a step even at
``sigma_max``, and the uninterrupted run itself.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

pl = pytest.importorskip("lightning.pytorch")

from lightning.pytorch.loggers import CSVLogger, WandbLogger  # noqa: E402
from opacus.accountants import RDPAccountant  # noqa: E402

from adaptive_dp import PrivacyBudgetExhausted  # noqa: E402
from adaptive_dp.data import load_dataset  # noqa: E402
from adaptive_dp.lightning import AdaptivePrivacyCallback  # noqa: E402

DELTA = 1e-5
#: budget + ceiling + carved audit split; ``epochs`` fixed so that a 1-epoch leg plans the same budget
SETTINGS = dict(
    target_epsilon=4.0,
    target_delta=DELTA,
    max_grad_norm=1.0,
    target_mi=0.3,
    audit_fraction=0.1,
    monitor_every=3,
    epochs=2,
)
PRIVACY_COLUMNS = {
    "privacy/epsilon",
    "privacy/noise_multiplier",
    "privacy/sigma_floor",
    "privacy/guarantee_epsilon",
    "leakage/mi",
    "control/error",
    "train/audit_loss",
}


class DigitsData(pl.LightningDataModule):
    """sklearn digits (1 437 training images, 8×8), shuffled batches of ``batch_size``."""

    def __init__(self, batch_size: int = 64):
        super().__init__()
        self.batch_size = batch_size

    def setup(self, stage: str) -> None:
        self.train = load_dataset("digits", split="train")

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train, batch_size=self.batch_size, shuffle=True)


class DigitsNet(pl.LightningModule):
    """A user's module: it logs its own batch loss and knows nothing about privacy."""

    def __init__(self):
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("user/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


class NoForwardNet(DigitsNet):
    """A module without ``forward`` (its ``training_step`` calls the layers)."""

    forward = pl.LightningModule.forward


def _trainer(root: Path, *, max_epochs: int, callbacks: list, logger=None, **kwargs) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=max_epochs,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        default_root_dir=str(root),
        logger=logger if logger is not None else False,
        callbacks=callbacks,
        **kwargs,
    )


def _sigmas(callback: AdaptivePrivacyCallback) -> list[float]:
    return [r["noise_multiplier"] for r in callback.engine.history]


def _csv_rows(logger: CSVLogger) -> list[dict[str, str]]:
    with open(Path(logger.log_dir) / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def _checkpoint(root: Path) -> Path:
    (path,) = sorted(root.rglob("*.ckpt"))
    return path


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """2 epochs with the budget and the ceiling, logged to CSV and to an offline W&B run."""
    root = tmp_path_factory.mktemp("lightning_full")
    callback = AdaptivePrivacyCallback(**SETTINGS)
    csv_logger = CSVLogger(str(root))
    wandb_logger = WandbLogger(offline=True, save_dir=str(root), project="adaptive-dp-lightning")
    trainer = _trainer(root, max_epochs=2, callbacks=[callback], logger=[csv_logger, wandb_logger])
    trainer.fit(DigitsNet(), datamodule=DigitsData())
    wandb_logger.experiment.finish()
    return callback, trainer, csv_logger, root


@pytest.fixture(scope="module")
def first_epoch_checkpoint(tmp_path_factory) -> Path:
    """The same settings stopped after 1 of the 2 planned epochs: Lightning's epoch-end checkpoint."""
    root = tmp_path_factory.mktemp("lightning_half")
    callback = AdaptivePrivacyCallback(**SETTINGS)
    _trainer(root, max_epochs=1, callbacks=[callback]).fit(DigitsNet(), datamodule=DigitsData())
    return _checkpoint(root)


def test_sigma_adapts_above_the_budget_floor(full_run):
    callback, trainer, _, _ = full_run
    engine, history = callback.engine, callback.engine.history
    steps_per_epoch = len(trainer.train_dataloader)
    assert len(history) == trainer.global_step == 2 * steps_per_epoch
    # the audit split was carved off before Poisson sampling: q is computed on what is trained on
    assert len(trainer.train_dataloader.dataset) + len(engine.audit_dataset) == 1437
    # the loader samples at (never above) the q the accountant books: opacus books 1/len(Poisson loader)
    assert trainer.train_dataloader.sample_rate <= engine.sample_rate == pytest.approx(1 / steps_per_epoch)
    readings = [r["mi"] for r in history if r["mi"] is not None]
    assert len(readings) >= len(history) // SETTINGS["monitor_every"] and all(m > 0 for m in readings)
    sigmas = _sigmas(callback)
    assert all(r["sigma_floor"] <= s <= engine.sigma_max for r, s in zip(history, sigmas))
    assert len(set(sigmas)) > 3  # the controller moved σ, above what the budget needs:
    assert any(s > 1.01 * r["sigma_floor"] for r, s in zip(history, sigmas))
    assert engine.get_epsilon(DELTA) <= engine.guarantee_epsilon <= SETTINGS["target_epsilon"]


def test_epsilon_is_opacus_rdp_over_the_sigma_history(full_run):
    callback, _, _, _ = full_run
    accountant = RDPAccountant()
    for sigma in _sigmas(callback):
        accountant.step(noise_multiplier=sigma, sample_rate=callback.engine.sample_rate)
    expected = accountant.get_epsilon(DELTA)
    assert callback.engine.get_epsilon(DELTA) == pytest.approx(expected, rel=1e-9)
    assert callback.engine.history[-1]["epsilon"] == pytest.approx(expected, rel=1e-9)


def test_csv_logger_gets_privacy_metrics_and_no_private_batch_statistics(full_run):
    callback, _, csv_logger, _ = full_run
    rows = [r for r in _csv_rows(csv_logger) if r.get("privacy/noise_multiplier")]
    assert PRIVACY_COLUMNS <= set(rows[0])
    assert "user/loss" in rows[0]  # the module's own logging is untouched
    assert not {"train/loss", "train/batch_size"} & set(rows[0])  # nothing from us on the private batch
    history = callback.engine.history
    assert len(rows) == len(history)
    latest = None
    for row, record in zip(rows, history):
        latest = record if record["mi"] is not None else latest
        assert float(row["privacy/noise_multiplier"]) == pytest.approx(record["noise_multiplier"], rel=1e-6)
        assert float(row["privacy/epsilon"]) == pytest.approx(record["epsilon"], rel=1e-6)
        assert float(row["leakage/mi"]) == pytest.approx(latest["mi"], rel=1e-6)  # the latest reading
    assert float(rows[-1]["privacy/guarantee_epsilon"]) == pytest.approx(
        callback.engine.guarantee_epsilon, rel=1e-6
    )


def test_wandb_offline_run_has_the_privacy_metrics(full_run):
    from adaptive_dp.training.tracking import wandb_history

    callback, _, _, root = full_run
    (run_dir,) = (root / "wandb").glob("offline-run-*")
    rows = [row for _, row in sorted(wandb_history(run_dir).items()) if "privacy/epsilon" in row]
    assert len(rows) == len(callback.engine.history)
    assert rows[-1]["privacy/epsilon"] == pytest.approx(callback.engine.get_epsilon(DELTA), rel=1e-6)
    assert {"leakage/mi", "privacy/noise_multiplier"} <= set(rows[-1])


def test_resume_from_a_lightning_checkpoint_continues_sigma_and_epsilon(
    full_run, first_epoch_checkpoint, tmp_path
):
    full, trainer, _, _ = full_run
    saved = torch.load(first_epoch_checkpoint, weights_only=False)["callbacks"]["AdaptivePrivacyCallback"]
    assert len(saved["adaptive"]["history"]) == len(trainer.train_dataloader)  # one epoch of steps
    resumed = AdaptivePrivacyCallback(**SETTINGS)
    _trainer(tmp_path, max_epochs=2, callbacks=[resumed]).fit(
        DigitsNet(), datamodule=DigitsData(), ckpt_path=str(first_epoch_checkpoint)
    )
    assert _sigmas(resumed) == _sigmas(full)  # same readings, same controller, same floors
    assert resumed.engine.get_epsilon(DELTA) == full.engine.get_epsilon(DELTA)
    assert resumed.engine.guarantee_epsilon == full.engine.guarantee_epsilon
    assert resumed.engine.budget_filter.spent.tolist() == full.engine.budget_filter.spent.tolist()


def test_resume_with_another_sample_rate_is_refused(first_epoch_checkpoint, tmp_path):
    resumed = AdaptivePrivacyCallback(**SETTINGS)
    with pytest.raises(ValueError, match="sample rate"):
        _trainer(tmp_path, max_epochs=2, callbacks=[resumed]).fit(
            DigitsNet(), datamodule=DigitsData(batch_size=32), ckpt_path=str(first_epoch_checkpoint)
        )


def test_exhausted_budget_stops_training_cleanly_with_a_checkpoint(tmp_path):
    # budget planned for 1 epoch, Trainer asked for 3: the filter must stop it early
    callback = AdaptivePrivacyCallback(
        target_epsilon=1.0, target_delta=DELTA, max_grad_norm=1.0, epochs=1, log_private_metrics=True
    )
    logger = CSVLogger(str(tmp_path))
    trainer = _trainer(tmp_path, max_epochs=3, callbacks=[callback], logger=logger)
    trainer.fit(DigitsNet(), datamodule=DigitsData())  # no PrivacyBudgetExhausted crosses Lightning
    engine, steps = callback.engine, len(callback.engine.history)
    assert callback.stopped_by_budget and trainer.should_stop
    assert len(trainer.train_dataloader) <= steps < 2 * len(trainer.train_dataloader)
    with pytest.raises(PrivacyBudgetExhausted):  # the next step could not be paid even at sigma_max
        engine.budget_filter.charge(engine.sigma_max)
    assert engine.get_epsilon(DELTA) <= engine.guarantee_epsilon <= 1.0
    saved = torch.load(_checkpoint(tmp_path), weights_only=False)["callbacks"]["AdaptivePrivacyCallback"]
    assert len(saved["adaptive"]["history"]) == steps
    rows = _csv_rows(logger)
    assert float(rows[-1]["privacy/budget_exhausted"]) == 1.0
    assert {"train/loss", "train/batch_size"} <= set(rows[0])  # log_private_metrics=True adds them


def test_fixed_sigma_is_poisson_dp_sgd_and_leaves_no_hooks(tmp_path):
    sizes = []

    class BatchSizes(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            sizes.append(len(batch[1]))

    callback = AdaptivePrivacyCallback(noise_multiplier=1.3, max_grad_norm=1.0)
    model = DigitsNet()
    before = [p.detach().clone() for p in model.parameters()]
    trainer = _trainer(tmp_path, max_epochs=1, callbacks=[callback, BatchSizes()])
    trainer.fit(model, datamodule=DigitsData())
    assert _sigmas(callback) == [1.3] * len(trainer.train_dataloader)
    assert float(trainer.callback_metrics["privacy/noise_multiplier"]) == pytest.approx(1.3)
    assert "leakage/mi" not in trainer.callback_metrics  # no audit data, no readings
    assert len(set(sizes)) > 5 and abs(sum(sizes) / len(sizes) - 1437 / len(sizes)) < 6  # Poisson, mean N·q
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())  # opacus' hooks removed at teardown


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(max_grad_norm=1.0), "exactly one of"),
        (
            dict(max_grad_norm=1.0, noise_multiplier=1.0, target_epsilon=3.0, target_delta=DELTA),
            "exactly one of",
        ),
        (dict(max_grad_norm=1.0, target_epsilon=3.0), "target_delta"),
        (dict(max_grad_norm=1.0, noise_multiplier=1.0, wrap_model=False), "wrap_model"),
        (dict(max_grad_norm=1.0, noise_multiplier=1.0, noise_generator=torch.Generator()), "seed="),
        (dict(max_grad_norm=1.0, noise_multiplier=1.0, grad_sample_mode="ghost"), "ghost"),
        (dict(max_grad_norm=1.0, noise_multiplier=1.0, target_mi=0.5), "audit"),
        (dict(max_grad_norm=1.0, noise_multiplier=1.0, target_mii=0.5), "unknown keyword"),
        (
            dict(max_grad_norm=1.0, noise_multiplier=1.0, canaries=100, canary_mode="input"),
            "canary_mode='gradient'",
        ),
    ],
)
def test_bad_settings_are_refused_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdaptivePrivacyCallback(**kwargs)


@pytest.mark.parametrize(
    "model, trainer_kwargs, match",
    [
        (DigitsNet, dict(accumulate_grad_batches=2), "accumulate_grad_batches=1"),
        (NoForwardNet, {}, "define forward"),
    ],
)
def test_unsupported_training_setups_are_refused_before_any_step(tmp_path, model, trainer_kwargs, match):
    callback = AdaptivePrivacyCallback(noise_multiplier=1.0, max_grad_norm=1.0, audit_fraction=0.1)
    with pytest.raises(ValueError, match=match):
        _trainer(tmp_path, max_epochs=1, callbacks=[callback], **trainer_kwargs).fit(
            model(), datamodule=DigitsData()
        )
    assert callback.engine.history == []


def test_open_loop_schedule_spans_the_trainers_epochs_and_reaches_tensorboard(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # data given to fit directly (no datamodule); the linear schedule's length comes from Trainer(max_epochs)
    callback = AdaptivePrivacyCallback(
        noise_multiplier=2.0, max_grad_norm=1.0, controller="linear", sigma_end=0.5
    )
    loader = DataLoader(load_dataset("digits", split="train"), batch_size=128)
    logger = TensorBoardLogger(str(tmp_path))
    trainer = _trainer(tmp_path, max_epochs=2, callbacks=[callback], logger=logger)
    trainer.fit(DigitsNet(), train_dataloaders=loader)
    sigmas = _sigmas(callback)
    steps = len(sigmas)
    assert steps == 2 * len(loader)
    assert sigmas == pytest.approx([2.0 - 1.5 * t / (steps - 1) for t in range(steps)], abs=1e-9)
    events = EventAccumulator(logger.log_dir)
    events.Reload()
    logged = [e.value for e in events.Scalars("privacy/noise_multiplier")]
    assert logged == pytest.approx(sigmas, rel=1e-6)


def test_step_metrics_hold_the_latest_reading_and_never_hide_a_failed_one():
    from adaptive_dp.lightning import step_metrics

    step = {"step": 7, "noise_multiplier": 1.5, "epsilon": 0.8, "sigma_floor": None, "mi": None}
    reading = {
        "step": 6,
        "noise_multiplier": 1.5,
        "mi": 0.4,
        "critic_gap": 2.0,
        "controller_error": None,
        "audit_loss": 1.1,
    }
    metrics = step_metrics(step, reading=reading, guarantee_epsilon=3.0)
    assert metrics == {
        "privacy/noise_multiplier": 1.5,
        "privacy/epsilon": 0.8,
        "leakage/mi": 0.4,
        "leakage/critic_gap": 2.0,
        "train/audit_loss": 1.1,
        "privacy/guarantee_epsilon": 3.0,
    }
    failed = dict(reading, mi=math.nan, critic_gap=None, audit_loss=None, monitor_error="MonitorError: ...")
    metrics = step_metrics(step, reading=failed)
    assert all(
        math.isnan(metrics[k])
        for k in ("leakage/mi", "leakage/critic_gap", "control/error", "train/audit_loss")
    )
    assert "privacy/guarantee_epsilon" not in metrics and "privacy/sigma_floor" not in metrics
