"""Privacy-first outputs: by default a run publishes only what ε covers and public / held-out metrics.

The training-batch loss and the Poisson batch size are computed on private batches without noise (the batch
size alone leaks membership); they reach ``history.jsonl``, W&B and the summary only with
``--log-private-metrics``, and ``summary.json`` says which. The public training curve is the loss on the audit
split, which the monitor measures.
"""

from __future__ import annotations

import contextlib
import io
import json

import pytest
from train_helpers import run_cli

from adaptive_dp.data import audit_split, load_dataset
from adaptive_dp.models.cnn import build_model
from adaptive_dp.training.checkpoint import load_checkpoint
from adaptive_dp.training.loop import evaluate
from adaptive_dp.training.plots import plot_tradeoff, tradeoff_figure
from adaptive_dp.training.tracking import read_history, wandb_history

PRIVATE_KEYS = {"loss", "batch_size"}
PRIVATE_WANDB_KEYS = {"train/loss", "train/batch_size", "train/epoch_loss"}
RUN = ["--dataset", "digits", "--epochs", "1", "--batch-size", "128", "--monitor-every", "3", "--no-progress",
       "--wandb-mode", "offline"]  # fmt: skip


def _run(out, *extra) -> tuple[list[dict], dict, dict[int, dict]]:
    """A tiny CLI run; returns its history.jsonl records, summary.json and the offline W&B run's rows."""
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert run_cli([*RUN, "--out", str(out), *extra]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert ("private metrics logged" in stdout.getvalue()) == ("--log-private-metrics" in extra)
    return read_history(out), summary, wandb_history(summary["wandb"]["file"])


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("default"))


@pytest.fixture(scope="module")
def private_run(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("private"), "--log-private-metrics")


def test_default_run_publishes_no_batch_statistics(default_run):
    history, summary, rows = default_run
    assert summary["private_metrics_logged"] is False and summary["steps"] == len(history) > 3
    assert all(not PRIVATE_KEYS & r.keys() for r in history)
    assert all("train_loss" not in e for e in summary["per_epoch"])
    assert not PRIVATE_WANDB_KEYS & {key for row in rows.values() for key in row}
    saved = load_checkpoint(summary["outputs"]["checkpoint"])
    assert saved["history"] == history and all("train_loss" not in e for e in saved["epochs"])


def test_audit_loss_is_published_on_monitored_steps(default_run):
    history, summary, rows = default_run
    monitored = [r for r in history if r["mi"] is not None]
    assert [r["step"] for r in monitored] == list(range(1, len(history) + 1, 3))
    for record in history:
        row = rows[record["step"]]
        if record["mi"] is None:
            assert record["audit_loss"] is None and "train/audit_loss" not in row
        else:
            assert record["audit_loss"] > 0 and row["train/audit_loss"] == record["audit_loss"]
            assert row["leakage/critic_gap"] == record["critic_gap"]
    assert summary["per_epoch"][0]["audit_loss"] == pytest.approx(
        sum(r["audit_loss"] for r in monitored) / len(monitored)
    )


def test_first_audit_loss_is_the_initial_models_cross_entropy_on_the_audit_split(default_run):
    """Independent truth: the reading before step 1 sees the freshly initialised model (seed 0)."""
    history, summary, _ = default_run
    full = load_dataset("digits", split="train")
    _, audit = audit_split(full, fraction=summary["config"]["audit_fraction"], seed=0)
    assert summary["audit_examples_read"] == len(audit) == summary["audit_size"]  # the monitor reads them all
    info = full.info
    model = build_model("small-cnn", in_channels=info.in_channels, num_classes=info.num_classes,
                        image_size=info.image_size, seed=0)  # fmt: skip
    assert history[0]["audit_loss"] == pytest.approx(evaluate(model, audit)["loss"], rel=1e-5)


def test_log_private_metrics_adds_the_batch_statistics(default_run, private_run):
    history, summary, rows = private_run
    assert summary["private_metrics_logged"] is True and summary["config"]["log_private_metrics"] is True
    for record in history:
        assert PRIVATE_KEYS <= record.keys() and record["batch_size"] >= 0
        row = rows[record["step"]]
        assert row["train/loss"] == record["loss"] and row["train/batch_size"] == record["batch_size"]
    losses = [r["loss"] for r in history if r["batch_size"] > 0]
    assert summary["per_epoch"][0]["train_loss"] == pytest.approx(sum(losses) / len(losses))
    assert rows[history[-1]["step"]]["train/epoch_loss"] == summary["per_epoch"][0]["train_loss"]
    # logging changes nothing else: same seed, same σ, ε, readings and accuracy as the default run
    public = ("noise_multiplier", "epsilon", "mi", "critic_gap", "audit_loss")
    default_history, default_summary, _ = default_run
    assert [{k: r[k] for k in public} for r in history] == [
        {k: r[k] for k in public} for r in default_history
    ]
    assert summary["test_accuracy"] == default_summary["test_accuracy"]


def _training_curve(fig) -> list[float]:
    (ax,) = [ax for ax in fig.axes if ax.get_title() == "training curve"]
    return [float(v) for v in ax.lines[0].get_ydata()]


def test_training_curve_is_the_audit_loss_unless_private_metrics_are_logged(
    default_run, private_run, tmp_path
):
    history, summary, _ = default_run
    fig = tradeoff_figure(history, summary["per_epoch"])
    assert _training_curve(fig) == [r["audit_loss"] for r in history if r["audit_loss"] is not None]
    private_history, private_summary, _ = private_run
    fig = tradeoff_figure(private_history, private_summary["per_epoch"], loss_field="loss")
    assert _training_curve(fig) == [r["loss"] for r in private_history]
    with pytest.raises(ValueError, match="loss_field must be one of audit_loss, loss"):
        plot_tradeoff(history, summary["per_epoch"], tmp_path / "x.png", loss_field="batch_loss")
