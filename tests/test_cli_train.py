"""``adaptive-dp train`` end to end on digits: outputs, W&B read-back, checkpoint reload, seeds, clear errors."""

from __future__ import annotations

import json
import math

import pytest
import torch
import wandb
from opacus.accountants import RDPAccountant
from PIL import Image
from train_helpers import run_cli, tiny_config

from adaptive_dp.data.datasets import load_dataset
from adaptive_dp.training.checkpoint import rng_states, set_rng_states
from adaptive_dp.training.loop import evaluate, load_trained_model, train
from adaptive_dp.training.tracking import read_history, wandb_history

TINY = ["--dataset", "digits", "--epochs", "1", "--batch-size", "128", "--no-progress"]


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """One tiny CLI run on digits with an offline W&B run; returns (out dir, stdout)."""
    out = tmp_path_factory.mktemp("cli_run")
    capture = pytest.MonkeyPatch()
    capture.setenv("WANDB_MODE", "offline")
    import contextlib
    import io

    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = run_cli([*TINY, "--out", str(out), "--wandb-mode", "offline"])
    capture.undo()
    assert code == 0
    return out, stdout.getvalue()


def test_cli_writes_all_outputs(cli_run):
    out, stdout = cli_run
    summary = json.loads((out / "summary.json").read_text())
    history = read_history(out)
    assert f"results in {out}/" in stdout
    assert summary["steps"] == len(history) == history[-1]["step"] > 0
    assert [r["step"] for r in history] == list(range(1, len(history) + 1))
    for record in history:
        assert {
            "step",
            "epoch",
            "noise_multiplier",
            "epsilon",
            "audit_loss",
            "mi",
            "critic_gap",
            "sigma_floor",
            "controller_error",
        } <= record.keys()
        assert record["noise_multiplier"] == 1.0 and record["sigma_floor"] is None  # no controller, no budget
        # the default monitor (audit fraction 0.02, every 10 steps) reads MI for steps 1, 11, 21, ...
        monitored = (record["step"] - 1) % 10 == 0
        assert (record["mi"] is not None) == monitored == (record["critic_gap"] is not None)
        if (
            monitored
        ):  # nats, an estimate on a few dozen audit examples: the bound below plus ~3 standard errors
            assert 0 <= record["mi"] <= 0.5 + 0.3
    # capacity bound of the Gaussian mechanism at σ = 1: I ≤ 1 / (2σ²) = 0.5 nats; the mean of the readings
    # averages their estimation noise down
    readings = [r["mi"] for r in history if r["mi"] is not None]
    assert sum(readings) / len(readings) <= 0.5 + 0.1
    assert summary["mi_readings"] == sum(r["mi"] is not None for r in history) >= 2
    assert summary["odometer_epsilon"] == summary["epsilon"]
    # σ fixed in advance: the accountant's composition is the guarantee
    assert summary["guarantee_kind"] == "composition"
    assert summary["guarantee_epsilon"] == pytest.approx(summary["odometer_epsilon"], rel=1e-9)
    assert summary["epsilon"] == history[-1]["epsilon"] and summary["delta"] == 1e-5
    assert 0.1 < summary["test_accuracy"] <= 1.0
    assert len(summary["epoch_times_s"]) == 1 and summary["wall_time_s"] > 0
    assert summary["config"]["batch_size"] == 128 and summary["config"]["out"] == str(out)
    with Image.open(out / "tradeoff.png") as png:
        assert png.format == "PNG" and png.size[0] > 400
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert not any(k.startswith("_module.") for k in state["model_state_dict"])
    assert {
        "optimizer_state_dict",
        "accountant_state_dict",
        "config",
        "dataset_info",
        "history",
        "rng_states",
        "epoch",
        "adaptive_state",
    } <= state.keys()
    assert state["adaptive_state"]["history"][-1]["step"] == len(history)
    assert state["adaptive_state"]["monitor"] is not None and state["adaptive_state"]["controller"] is None
    assert state["history"] == history and state["epoch"] == 1


def test_epsilon_matches_opacus_accountant(cli_run):
    """The odometer after every step equals opacus' own RDP accountant fed the same (σ, q, steps)."""
    out, _ = cli_run
    history = read_history(out)
    train_size = json.loads((out / "summary.json").read_text())["dataset"]["train_size"]
    q = history[0]["sample_rate"]
    assert q == 1 / math.ceil(train_size / 128)  # opacus' sample rate: 1 / (batches per epoch)
    for record in (history[0], history[-1]):
        accountant = RDPAccountant()
        accountant.history = [(1.0, q, record["step"])]
        assert record["epsilon"] == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-9)


def test_offline_wandb_run_holds_the_jsonl_values(cli_run):
    out, _ = cli_run
    summary = json.loads((out / "summary.json").read_text())
    assert summary["wandb"]["mode"] == "offline"
    wandb_file = summary["wandb"]["file"]
    assert wandb_file.startswith(str(out / "wandb"))
    rows = wandb_history(wandb_file)
    history = read_history(out)
    assert sorted(rows) == [r["step"] for r in history]
    for record in history:
        row = rows[record["step"]]
        assert row["privacy/epsilon"] == record["epsilon"]
        assert row["privacy/noise_multiplier"] == record["noise_multiplier"]
        if record["mi"] is None:
            assert "leakage/mi" not in row and "leakage/critic_gap" not in row
        else:
            assert row["leakage/mi"] == record["mi"] and row["leakage/critic_gap"] == record["critic_gap"]
    assert sum("leakage/mi" in row for row in rows.values()) == summary["mi_readings"] >= 2
    assert rows[history[-1]["step"]]["test/accuracy"] == summary["test_accuracy"]


def test_checkpoint_reload_gives_the_same_test_accuracy(cli_run):
    out, _ = cli_run
    model, run = load_trained_model(out / "checkpoint.pt")
    # a plain module: no opacus wrapper, no per-sample-gradient hooks
    assert not hasattr(model, "_module") and not model.training
    assert all(not m._forward_hooks and not m._backward_hooks for m in model.modules())
    assert run["dataset"] == "digits" and run["model"] == "small-cnn" and run["max_grad_norm"] == 1.0
    test_set = load_dataset(run["dataset"], split="test")
    accuracy = evaluate(model, test_set)["accuracy"]
    assert accuracy == json.loads((out / "summary.json").read_text())["test_accuracy"] == run["test_accuracy"]


def test_checkpoint_rng_states_restore_the_streams():
    import random

    import numpy as np

    state = rng_states()
    first = (random.random(), np.random.rand(), torch.rand(3))
    set_rng_states(state)
    second = (random.random(), np.random.rand(), torch.rand(3))
    assert first[:2] == second[:2] and torch.equal(first[2], second[2])


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="adaptive-dp train --out"):
        load_trained_model(tmp_path)


def test_seed_repeats_the_run(cli_run, tmp_path):
    """Same seed: the same readings, ε and accuracy as the CLI run (seed 0, W&B offline there, disabled here),
    so the same batches and noise; another seed: other Poisson batches (logged here as private metrics)."""
    out, _ = cli_run
    fields = ("mi", "critic_gap", "audit_loss", "epsilon")
    reference = [{k: r[k] for k in fields} for r in read_history(out)]
    again = train(tiny_config(tmp_path / "same", seed=0, log_private_metrics=True), progress=False)
    same = read_history(tmp_path / "same")
    assert [{k: r[k] for k in fields} for r in same] == reference
    assert again["test_accuracy"] == json.loads((out / "summary.json").read_text())["test_accuracy"]
    train(tiny_config(tmp_path / "other", seed=1, log_private_metrics=True), progress=False)
    assert [r["batch_size"] for r in read_history(tmp_path / "other")] != [r["batch_size"] for r in same]


@pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha")
def test_target_epsilon_is_met(tmp_path):
    summary = train(tiny_config(tmp_path, target_epsilon=2.0), progress=False)
    assert 1.9 < summary["epsilon"] <= 2.0
    assert summary["guarantee_epsilon"] == pytest.approx(2.0)
    assert summary["noise_multiplier"] != 1.0  # chosen by opacus, not the --noise-multiplier default


def test_failing_wandb_never_stops_training(tmp_path, monkeypatch):
    def broken_log(self, *args, **kwargs):
        raise RuntimeError("W&B is down")

    monkeypatch.setattr(wandb.Run, "log", broken_log)
    summary = train(tiny_config(tmp_path, wandb_mode="offline"), progress=False)
    assert len(read_history(tmp_path)) == summary["steps"] > 0
    assert (tmp_path / "checkpoint.pt").is_file() and (tmp_path / "summary.json").is_file()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--dataset", "imagenet"], "imagenet"),
        (["--audit-fraction", "0", "--target-mi", "0.5"], "--audit-fraction"),
        (["--controller", "pid"], "--target-mi"),
        (["--sigma-end", "0.5"], "--controller linear"),
        (["--audit-fraction", "1.5"], "audit_fraction must be"),
        (["--epochs", "0"], "epochs must be"),
        (["--lr", "-1"], "lr must be"),
        (["--seed", "-1"], "seed must be an integer >= 0"),
    ],
)
def test_bad_input_is_one_clear_error(tmp_path, capsys, argv, message):
    code = run_cli([*TINY, "--out", str(tmp_path / "out"), "--wandb-mode", "disabled", *argv])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("adaptive-dp train: error:") and message in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def test_missing_data_dir_names_the_folder(tmp_path, capsys):
    missing = tmp_path / "no-such-data"
    code = run_cli([*TINY, "--dataset", "mnist", "--data-dir", str(missing), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and str(missing) in err
    with pytest.raises(FileNotFoundError):
        train(tiny_config(tmp_path / "out", dataset="mnist", data_dir=str(missing)))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error when torch sees no GPU")
def test_cuda_without_gpu_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="--device auto"):
        train(tiny_config(tmp_path, device="cuda"))
