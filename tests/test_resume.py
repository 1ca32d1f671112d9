"""Per-epoch checkpoints and ``resume``: an interrupted run continues exactly, lost steps stay booked, and the
steps replayed after lost ones draw fresh noise."""

from __future__ import annotations

import math

import pytest
import torch
from opacus.accountants import RDPAccountant
from train_helpers import run_cli, tiny_config

from adaptive_dp.training import loop as training
from adaptive_dp.training.checkpoint import load_checkpoint
from adaptive_dp.training.loop import resume, train
from adaptive_dp.training.tracking import read_history

# a closed loop with a hard budget: controller, monitor, Rényi filter and accountant all carry state; the batch
# statistics are logged so that the records show the batches too
LOOP = dict(
    epochs=3, target_mi=0.3, controller="pid", target_epsilon=8.0, monitor_every=4, log_private_metrics=True
)


class Interrupted(Exception):
    """Stands in for a crash (power cut, OOM kill, Ctrl-C)."""


def _crash_after_checkpoint(monkeypatch, *, epoch: int) -> None:
    """Raise right after the per-epoch checkpoint of ``epoch`` is written (no step is lost)."""
    real = training.save_run_checkpoint

    def save_then_crash(run, extra):
        written = real(run, extra)
        finished = run.progress.epochs[-1]["epoch"] if run.progress.epochs else 0
        if finished == epoch and not extra.get("complete", False):
            raise Interrupted
        return written

    monkeypatch.setattr(training, "save_run_checkpoint", save_then_crash)


def _crash_at_step(monkeypatch, *, step: int) -> None:
    """Raise once the record of optimizer step ``step`` is built (that step is logged and its noise drawn)."""
    real = training.make_step_record

    def record_then_crash(**kwargs):
        record = real(**kwargs)
        if kwargs["step"] == step:
            raise Interrupted
        return record

    monkeypatch.setattr(training, "make_step_record", record_then_crash)


def _spy_batches_and_noise(monkeypatch) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Record, per optimizer step, the batch inputs and the standard-normal draws z = noise / (σ·C) of the DP
    noise (opacus draws it with ``torch.normal(..., generator=...)``; the monitor uses ``torch.randn``)."""
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    draws: list[torch.Tensor] = []
    real_step, real_normal = training._take_step, torch.normal

    def take_step(run, epoch, x, y):
        draws.clear()
        step = run.progress.step + 1
        try:
            return real_step(run, epoch, x, y)
        finally:
            seen[step] = (x.clone(), torch.cat(draws) if draws else torch.empty(0))

    def normal(*args, **kwargs):
        out = real_normal(*args, **kwargs)
        if kwargs.get("generator") is not None:
            draws.append((out / kwargs["std"]).flatten())
        return out

    monkeypatch.setattr(training, "_take_step", take_step)
    monkeypatch.setattr(torch, "normal", normal)
    return seen


def _correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a, b]))[0, 1])


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
    assert saved["complete"] is False and saved["epoch"] == 1 and "noise_generator_state" in saved
    resumed = resume(tmp_path, progress=False)
    resumed_history = read_history(tmp_path / "history.jsonl")
    # same batches, same noise, same controller decisions: every step record matches
    names = (
        "step",
        "epoch",
        "noise_multiplier",
        "epsilon",
        "loss",
        "mi",
        "critic_gap",
        "audit_loss",
        "sigma_floor",
        "batch_size",
    )
    assert _fields(resumed_history, *names) == _fields(history, *names)
    assert resumed["resumed_at_step"] == saved["step"] and resumed["discarded_steps"] == 0
    assert not (tmp_path / "discarded_steps.jsonl").exists()  # no step lost: nothing re-seeded, exact resume
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
    assert [r["step"] for r in logged] == list(
        range(1, crash_step)
    )  # the crashing step's record never landed
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


def test_replayed_steps_draw_fresh_noise_on_the_same_batches(uninterrupted, tmp_path, monkeypatch):
    """Crash with lost steps, resume, crash again before the next checkpoint, resume: every attempt replays
    step k + 1 (k = the checkpoint's step) on the same batch from the same weights, each with noise
    independent of the other attempts' (exact noise reuse would give correlation 1); and the second resume
    still books the steps the first one lost, although that resume never wrote a checkpoint."""
    _, history, _ = uninterrupted
    steps_per_epoch = sum(r["epoch"] == 1 for r in history)
    first = steps_per_epoch + 1
    attempts = []
    for crash_step in (steps_per_epoch + 3, steps_per_epoch + 2, None):
        with monkeypatch.context() as m:
            seen = _spy_batches_and_noise(m)
            if crash_step is None:
                summary = resume(tmp_path, progress=False)
            else:
                _crash_at_step(m, step=crash_step)
                with pytest.raises(Interrupted):
                    if attempts:
                        resume(tmp_path, progress=False)
                    else:
                        train(tiny_config(tmp_path, **LOOP), progress=False)
        attempts.append(seen)
    (x0, z0), (x1, z1), (x2, z2) = (seen[first] for seen in attempts)
    assert torch.equal(x0, x1) and torch.equal(x0, x2)  # the Poisson sampler's state is restored
    assert torch.equal(attempts[0][first + 1][0], attempts[1][first + 1][0])
    limit = 6 / math.sqrt(z0.numel())  # six standard deviations of the correlation of independent draws
    assert z0.numel() == z1.numel() == z2.numel() > 1000
    for a, b in ((z0, z1), (z0, z2), (z1, z2)):
        assert abs(_correlation(a, b)) < limit
    # bookkeeping: 2 steps lost by the first attempt, 1 by the second (its crash step never got a record)
    lost = read_history(tmp_path / "discarded_steps.jsonl")
    kept = read_history(tmp_path / "history.jsonl")
    assert [(r["step"], r["discarded_by_resume"]) for r in lost] == [(first, 1), (first + 1, 1), (first, 2)]
    assert summary["discarded_steps"] == 3 and [r["step"] for r in kept] == list(range(1, len(kept) + 1))
    reference = RDPAccountant()
    for record in [*kept, *lost]:
        reference.step(noise_multiplier=record["noise_multiplier"], sample_rate=record["sample_rate"])
    assert summary["odometer_epsilon"] == pytest.approx(reference.get_epsilon(delta=1e-5), rel=1e-9)
    assert (
        summary["guarantee_epsilon"] <= LOOP["target_epsilon"] and summary["odometer_epsilon"] <= 8.0 + 1e-9
    )


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
