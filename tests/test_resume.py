"""Per-epoch checkpoints and ``resume``: an interrupted run continues exactly, and lost steps stay booked."""

from __future__ import annotations

import math

import pytest
import torch
from opacus.accountants import RDPAccountant
from train_helpers import run_cli, tiny_config

from adaptive_dp.training import loop as training
from adaptive_dp.training.loop import load_checkpoint, resume, train
from adaptive_dp.training.tracking import read_history

# a closed loop with a hard budget: controller, monitor, Rényi filter and accountant all carry state
LOOP = dict(epochs=3, target_mi=0.3, controller="pid", target_epsilon=8.0, monitor_every=4)


class Interrupted(Exception):
    """Stands in for a crash (power cut, OOM kill, Ctrl-C)."""


def _crash_after_checkpoint(monkeypatch, *, epoch: int) -> None:
    """Raise right after the per-epoch checkpoint of ``epoch`` is written (no step is lost)."""
    real = training.save_checkpoint

    def save_then_crash(path, **kwargs):
        written = real(path, **kwargs)
        if kwargs["epochs"][-1]["epoch"] == epoch and not kwargs["extra"].get("complete", False):
            raise Interrupted
        return written

    monkeypatch.setattr(training, "save_checkpoint", save_then_crash)


def _crash_at_step(monkeypatch, *, step: int) -> None:
    """Raise once the record of optimizer step ``step`` is built (that step is logged and its noise drawn)."""
    real = training.make_step_record

    def record_then_crash(**kwargs):
        record = real(**kwargs)
        if kwargs["step"] == step:
            raise Interrupted
        return record

    monkeypatch.setattr(training, "make_step_record", record_then_crash)


def _fields(history, *names):
    return [tuple(r[n] for n in names) for r in history]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    summary = train(tiny_config(out, **LOOP), progress=False)
    return summary, read_history(out / "history.jsonl"), load_checkpoint(out)


def test_resume_at_an_epoch_boundary_reproduces_the_uninterrupted_run(uninterrupted, tmp_path, monkeypatch):
    summary, history, final = uninterrupted
    with monkeypatch.context() as m:
        _crash_after_checkpoint(m, epoch=1)
        with pytest.raises(Interrupted):
            train(tiny_config(tmp_path, **LOOP), progress=False)
    saved = load_checkpoint(tmp_path)
    assert saved["complete"] is False and saved["epoch"] == 1
    resumed = resume(tmp_path, progress=False)
    resumed_history = read_history(tmp_path / "history.jsonl")
    # same batches, same noise, same controller decisions: every step record matches
    names = ("step", "epoch", "noise_multiplier", "epsilon", "loss", "mi", "sigma_floor", "batch_size")
    assert _fields(resumed_history, *names) == _fields(history, *names)
    assert resumed["resumed_at_step"] == saved["step"] and resumed["discarded_steps"] == 0
    assert resumed["test_accuracy"] == summary["test_accuracy"]
    assert resumed["odometer_epsilon"] == summary["odometer_epsilon"]
    assert resumed["guarantee_epsilon"] == summary["guarantee_epsilon"]
    weights = load_checkpoint(tmp_path)["model_state_dict"]
    for name, tensor in final["model_state_dict"].items():
        assert torch.equal(weights[name], tensor), name


def test_steps_lost_in_a_crash_are_booked_not_forgotten(uninterrupted, tmp_path, monkeypatch):
    summary, history, _ = uninterrupted
    steps_per_epoch = sum(r["epoch"] == 1 for r in history)
    crash_step = steps_per_epoch + 3  # three steps into epoch 2: they are lost from the model
    with monkeypatch.context() as m:
        _crash_at_step(m, step=crash_step)
        with pytest.raises(Interrupted):
            train(tiny_config(tmp_path, **LOOP), progress=False)
    logged = read_history(tmp_path / "history.jsonl")
    assert [r["step"] for r in logged] == list(range(1, crash_step))  # the crashing step's record never landed
    resumed = resume(tmp_path, progress=False)
    kept = read_history(tmp_path / "history.jsonl")
    lost = read_history(tmp_path / "discarded_steps.jsonl")
    assert [r["step"] for r in kept] == list(range(1, len(kept) + 1))  # one contiguous history
    assert [r["step"] for r in lost] == list(range(steps_per_epoch + 1, crash_step))
    assert resumed["discarded_steps"] == len(lost) == 2 and resumed["steps"] == len(kept)
    # independent truth: opacus' RDP accountant over every step whose noise was drawn, kept or lost
    reference = RDPAccountant()
    for record in [*kept[:steps_per_epoch], *lost, *kept[steps_per_epoch:]]:
        reference.step(noise_multiplier=record["noise_multiplier"], sample_rate=record["sample_rate"])
    expected = reference.get_epsilon(delta=1e-5)
    assert resumed["odometer_epsilon"] == pytest.approx(expected, rel=1e-9)
    assert kept[-1]["epsilon"] == pytest.approx(expected, rel=1e-9)
    # the budget still holds: the filter was charged for the lost steps too
    assert resumed["guarantee_epsilon"] == pytest.approx(LOOP["target_epsilon"], abs=1e-6)
    assert resumed["guarantee_epsilon"] <= LOOP["target_epsilon"]
    assert resumed["odometer_epsilon"] <= LOOP["target_epsilon"] + 1e-9
    assert math.isfinite(resumed["test_accuracy"])


def test_resume_refuses_a_finished_run(uninterrupted, tmp_path):
    summary, _, _ = uninterrupted
    with pytest.raises(ValueError, match="finished run"):
        resume(summary["outputs"]["dir"], progress=False)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        resume(tmp_path, progress=False)


def test_cli_resume_rejects_options_that_would_change_the_run(tmp_path, capsys):
    code = run_cli(["--resume", str(tmp_path), "--epochs", "4", "--lr", "0.1"])
    assert code == 2
    err = capsys.readouterr().err
    assert "drop --epochs, --lr" in err and "--wandb-mode" in err
