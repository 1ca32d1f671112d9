"""``adaptive-dp train`` with the adaptive engine on digits: monitor, controllers, schedules, budget, audit split."""

from __future__ import annotations

import json
import math

import pytest
import torch
from opacus.accountants import RDPAccountant
from train_helpers import run_cli, tiny_config

from adaptive_dp.data.datasets import load_dataset
from adaptive_dp.leakage import monitor as leakage
from adaptive_dp.leakage import tokens
from adaptive_dp.privacy_engine import RenyiFilter
from adaptive_dp.training import config as training_config
from adaptive_dp.training.loop import evaluate, load_trained_model, train
from adaptive_dp.training.tracking import read_history

DELTA = 1e-5
pytestmark = pytest.mark.filterwarnings(
    "ignore:target_mi without a privacy budget",
    "ignore:Optimal order is the largest alpha",
    "ignore:Secure RNG turned off",
    "ignore:Full backward hook is firing",
)


def opacus_epsilon(history: list[dict], delta: float = DELTA) -> float:
    """opacus' own RDP accountant recomputed on the recorded (σ, q) of every step."""
    accountant = RDPAccountant()
    accountant.history = [(r["noise_multiplier"], r["sample_rate"], 1) for r in history]
    return accountant.get_epsilon(delta)


def test_option_names_match_the_registries():
    assert set(training_config.ESTIMATORS) == set(leakage.ESTIMATORS)
    assert set(training_config.TOKEN_ENCODERS) == set(tokens.TOKEN_ENCODERS)


@pytest.fixture(scope="module")
def pid_run(tmp_path_factory):
    """digits, MI ceiling 0.05 nats (the default monitor reads ~0.15 at σ = 1), PID, a reading every 2 steps."""
    out = tmp_path_factory.mktemp("pid")
    code = run_cli(
        [
            "--dataset",
            "digits",
            "--epochs",
            "1",
            "--batch-size",
            "128",
            "--wandb-mode",
            "disabled",
            "--target-mi",
            "0.05",
            "--controller",
            "pid",
            "--monitor-every",
            "2",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    return out, json.loads((out / "summary.json").read_text()), read_history(out)


def test_pid_raises_sigma_to_meet_the_ceiling(pid_run):
    _, summary, history = pid_run
    sigmas = [r["noise_multiplier"] for r in history]
    assert history[0]["mi"] > 0.05  # the reading before step 1 is over the ceiling ...
    assert sigmas[0] > 1.0 and max(sigmas) > 1.0  # ... so the controller adds noise from step 1 on
    assert len(set(sigmas)) > 1 and all(0.3 <= s <= 10.0 for s in sigmas)
    readings = [r for r in history if r["mi"] is not None]
    assert [r["step"] for r in readings] == list(range(1, len(history) + 1, 2))
    for r in history:
        assert {"mi", "critic_gap", "controller_error", "sigma_floor"} <= r.keys() and r[
            "sigma_floor"
        ] is None
        assert (r["controller_error"] is None) == (r["mi"] is None)
    # more noise, less leakage: the last reading is below the first one, taken at σ = 1
    assert readings[-1]["mi"] < readings[0]["mi"]
    mis = [r["mi"] for r in readings]
    assert summary["mi_readings"] == len(mis) and summary["max_mi"] == max(mis)
    assert summary["mean_mi"] == pytest.approx(sum(mis) / len(mis))
    assert summary["fraction_over_ceiling"] == sum(m > 0.05 for m in mis) / len(mis)
    assert summary["noise_multiplier_range"] == [min(sigmas), max(sigmas)]
    # σ chosen from the readings without a budget: the guarantee is the Rényi odometer's, above the composition
    assert summary["controller"] == "pid" and summary["guarantee_kind"] == "renyi-odometer"
    assert (
        summary["guarantee_epsilon"] >= summary["odometer_epsilon"]
        and "Rényi odometer" in summary["epsilon_meaning"]
    )


def test_adaptive_odometer_matches_opacus_on_the_sigma_history(pid_run):
    _, summary, history = pid_run
    for k in (1, len(history) // 2, len(history)):
        assert history[k - 1]["epsilon"] == pytest.approx(opacus_epsilon(history[:k]), rel=1e-9)
    assert summary["odometer_epsilon"] == summary["epsilon"] == history[-1]["epsilon"]


def test_checkpoint_carries_the_adaptive_state(pid_run):
    out, summary, history = pid_run
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    adaptive = state["adaptive_state"]
    assert adaptive["history"][-1]["noise_multiplier"] == history[-1]["noise_multiplier"]
    assert adaptive["controller"] is not None and adaptive["monitor"] is not None
    model, run = load_trained_model(out)
    accuracy = evaluate(model, load_dataset("digits", split="test"))["accuracy"]
    assert accuracy == summary["test_accuracy"] and run["noise_multiplier"] == history[-1]["noise_multiplier"]


def test_budget_with_controller_guarantees_target_epsilon(tmp_path):
    summary = train(
        tiny_config(tmp_path, target_epsilon=3.0, target_mi=0.05, controller="pid"), progress=False
    )
    history = read_history(tmp_path)
    assert summary["guarantee_epsilon"] == pytest.approx(3.0) and summary["guarantee_epsilon"] <= 3.0
    assert summary["odometer_epsilon"] <= 3.0
    assert summary["odometer_epsilon"] == pytest.approx(opacus_epsilon(history), rel=1e-9)
    assert all(r["sigma_floor"] is not None and r["noise_multiplier"] >= r["sigma_floor"] for r in history)
    assert not summary["stopped_early"] and summary["steps"] == len(history) == 11
    assert "guarantee" in summary["epsilon_meaning"]


def test_schedule_runs_to_sigma_end(tmp_path):
    summary = train(
        tiny_config(tmp_path, controller="linear", noise_multiplier=2.0, sigma_end=0.8), progress=False
    )
    sigmas = [r["noise_multiplier"] for r in read_history(tmp_path)]
    assert sigmas[0] == pytest.approx(2.0) and sigmas[-1] == pytest.approx(0.8)
    assert all(a >= b for a, b in zip(sigmas, sigmas[1:]))  # linear decay: never up
    assert summary["noise_multiplier"] == pytest.approx(0.8)


def test_training_set_excludes_the_audit_split(tmp_path):
    full = len(load_dataset("digits", split="train"))
    with_audit = train(tiny_config(tmp_path / "a", audit_fraction=0.1), progress=False)
    assert with_audit["audit_size"] == with_audit["dataset"]["audit_size"] == round(0.1 * full)
    assert with_audit["dataset"]["train_size"] == full - round(0.1 * full)
    q = read_history(tmp_path / "a")[0]["sample_rate"]
    assert q == 1 / math.ceil(with_audit["dataset"]["train_size"] / 128)  # q of what is trained on
    off = train(tiny_config(tmp_path / "b", audit_fraction=0.0), progress=False)
    assert off["audit_size"] == 0 and off["dataset"]["train_size"] == full and off["mi_readings"] == 0
    assert all(r["mi"] is None for r in read_history(tmp_path / "b"))


def test_budget_exhausted_mid_training_stops_cleanly(tmp_path, monkeypatch, capsys):
    """A filter planned for half the run refuses the step after its plan: all outputs, exit 0, the reason."""
    import adaptive_dp.privacy_engine as engine_module

    class HalfPlan(RenyiFilter):
        def __init__(self, *, planned_steps, **kwargs):
            super().__init__(planned_steps=planned_steps // 2, **kwargs)

    monkeypatch.setattr(engine_module, "RenyiFilter", HalfPlan)
    code = run_cli(
        [
            "--dataset",
            "digits",
            "--epochs",
            "2",
            "--batch-size",
            "128",
            "--wandb-mode",
            "disabled",
            "--target-epsilon",
            "2",
            "--no-progress",
            "--out",
            str(tmp_path),
        ]
    )
    captured = capsys.readouterr().out
    assert code == 0 and "stopped early" in captured and "budget" in captured
    summary = json.loads((tmp_path / "summary.json").read_text())
    history = read_history(tmp_path)
    assert summary["stopped_early"] and "budget exhausted" in summary["stop_reason"]
    steps = summary["steps"]
    # 22 steps asked for, 11 planned by the filter; past its plan a step runs only while what is left pays
    assert steps == len(history) and 11 <= steps < 22 and history[-1]["epoch"] == 2
    assert summary["odometer_epsilon"] <= summary["guarantee_epsilon"] + 1e-9
    assert summary["odometer_epsilon"] == pytest.approx(opacus_epsilon(history), rel=1e-9)
    assert len(summary["per_epoch"]) == 2 and summary["per_epoch"][-1]["step"] == steps
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["stopped_early"] and len(state["adaptive_state"]["history"]) == steps
    assert load_trained_model(tmp_path)[1]["steps"] == steps


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--audit-fraction", "0", "--target-mi", "0.5"], "--audit-fraction > 0"),
        (["--controller", "threshold"], "--target-mi"),
        (["--monitor-every", "0"], "monitor_every must be"),
        (["--sigma-min", "2", "--sigma-max", "1"], "sigma_min"),
        (["--noise-multiplier", "0"], "--audit-fraction 0"),
    ],
)
def test_bad_adaptive_options_are_one_clear_error(tmp_path, capsys, argv, message):
    code = run_cli(
        [
            "--dataset",
            "digits",
            "--epochs",
            "1",
            "--no-progress",
            "--out",
            str(tmp_path / "out"),
            "--wandb-mode",
            "disabled",
            *argv,
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("adaptive-dp train: error:") and message in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()
