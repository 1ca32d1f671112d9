"""Tracker: JSONL twin, offline W&B run read back from its transaction log, failures never stop logging."""

from __future__ import annotations

import json
import logging
import math

import pytest
import wandb

from adaptive_dp.training.plots import plot_tradeoff
from adaptive_dp.training.tracking import (
    Tracker,
    read_history,
    read_history_tail,
    read_wandb_records,
    resolve_wandb_mode,
    wandb_history,
    wandb_key,
)

STEPS = [
    {"step": 1, "epoch": 1, "noise_multiplier": 1.25, "epsilon": 0.5, "loss": 2.3, "mi": None},
    {
        "step": 2,
        "epoch": 1,
        "noise_multiplier": 1.125,
        "epsilon": 0.75,
        "loss": 2.1,
        "mi": 0.4,
        "critic_gap": 0.3,
        "audit_loss": 2.2,
    },
    {
        "step": 3,
        "epoch": 2,
        "noise_multiplier": 1.0,
        "epsilon": 1.0 / 3.0,
        "loss": 1.9,
        "mi": None,
        "sigma_floor": 0.8,
        "controller_error": -0.1,
    },
]
# an epoch record carries the latest MI reading (step 2's for epoch 2 too); W&B gets only its test metrics, so
# it never puts a reading on a step that took none (step 3)
EPOCHS = [
    {"epoch": 1, "step": 2, "epsilon": 0.75, "mi": 0.4, "test_accuracy": 0.5, "noise_multiplier": 1.125},
    {"epoch": 2, "step": 3, "epsilon": 1.0 / 3.0, "mi": 0.4, "test_accuracy": 0.625, "noise_multiplier": 1.0},
]


def _log_all(tracker: Tracker) -> None:
    """Steps and epochs in training order (an epoch record right after its last step)."""
    for record in STEPS:
        tracker.log_step(record)
        for epoch in EPOCHS:
            if epoch["step"] == record["step"]:
                tracker.log_epoch(epoch)


def test_offline_run_holds_the_jsonl_values(tmp_path):
    with Tracker(tmp_path, config={"lr": 0.5, "dataset": "digits"}, mode="offline") as tracker:
        _log_all(tracker)
        png = plot_tradeoff(STEPS, EPOCHS, tmp_path / "tradeoff.png", delta=1e-5, target_mi=0.5)
        tracker.log_image(png, "plots/tradeoff")
        tracker.finish({"test_accuracy": 0.625, "epsilon": 1.0 / 3.0, "config": {"lr": 0.5}})
        wandb_file = tracker.wandb_file

    assert read_history(tmp_path) == [json.loads(json.dumps(r)) for r in STEPS]
    assert json.loads((tmp_path / "summary.json").read_text())["test_accuracy"] == 0.625
    assert wandb_file is not None and wandb_file.parent.parent == tmp_path / "wandb"

    rows = wandb_history(wandb_file)
    for record in STEPS:
        row = rows[record["step"]]
        for field, value in record.items():
            if field in ("step",) or value is None:
                assert wandb_key(field) not in row
            else:
                assert row[wandb_key(field)] == pytest.approx(value, rel=1e-12)
    assert rows[2]["leakage/mi"] == 0.4 and rows[3]["control/error"] == -0.1 and "leakage/mi" not in rows[3]
    assert rows[2]["leakage/critic_gap"] == 0.3 and rows[2]["train/audit_loss"] == 2.2
    assert rows[2]["test/accuracy"] == 0.5 and rows[3]["test/accuracy"] == 0.625
    # table, scatter chart and image land on the last optimizer step, not on a step of their own
    assert max(rows) == 3
    assert rows[3]["epochs/table._type"] == "table-file" and rows[3]["epochs/table.nrows"] == 2
    assert rows[3]["plots/tradeoff._type"] == "image-file"
    records = read_wandb_records(wandb_file)
    config = {k: v for r in records if r["type"] == "config" for k, v in r["config"]["update"].items()}
    scatter = config["_wandb.visualize.epochs/accuracy_vs_epsilon"]["panel_config"]["fieldSettings"]
    assert scatter == {"x": "epsilon", "y": "test_accuracy"}
    summary = {k: v for r in records if r["type"] == "summary" for k, v in r["summary"]["update"].items()}
    assert summary["test_accuracy"] == 0.625
    run = next(r["run"] for r in records if r["type"] == "run")
    assert run["config"]["update"]["lr"] == 0.5


def test_failing_wandb_log_never_stops_logging(tmp_path, monkeypatch, caplog):
    def broken_log(self, *args, **kwargs):
        raise RuntimeError("W&B is down")

    monkeypatch.setattr(wandb.Run, "log", broken_log)
    with caplog.at_level(logging.WARNING, logger="adaptive_dp.training.tracking"):
        with Tracker(tmp_path, config={}, mode="offline") as tracker:
            assert tracker.active
            _log_all(tracker)
            tracker.finish({"ok": True})
    assert [r["step"] for r in read_history(tmp_path)] == [1, 2, 3]
    assert json.loads((tmp_path / "summary.json").read_text()) == {"ok": True}
    warnings = [r for r in caplog.records if "W&B log failed" in r.getMessage()]
    assert len(warnings) == 1 and "W&B is down" in warnings[0].getMessage()


def test_failing_wandb_init_keeps_the_jsonl(tmp_path, monkeypatch, caplog):
    def broken_init(*args, **kwargs):
        raise OSError("no disk for W&B")

    monkeypatch.setattr(wandb, "init", broken_init)
    with caplog.at_level(logging.WARNING, logger="adaptive_dp.training.tracking"):
        with Tracker(tmp_path, config={}, mode="offline") as tracker:
            assert not tracker.active and tracker.wandb_file is None
            _log_all(tracker)
            tracker.log_image(tmp_path / "missing.png", "plots/x")
    assert len(read_history(tmp_path)) == 3
    assert any("W&B init failed" in r.getMessage() for r in caplog.records)


def test_exception_in_training_finishes_the_run_and_keeps_lines(tmp_path):
    with pytest.raises(ZeroDivisionError):
        with Tracker(tmp_path, config={}, mode="disabled") as tracker:
            tracker.log_step(STEPS[0])
            1 / 0  # noqa: B018
    assert tracker._jsonl.closed
    assert read_history(tmp_path) == [STEPS[0]]
    assert not (tmp_path / "wandb").exists()
    assert not (tmp_path / "summary.json").exists()


def test_step_records_need_an_integer_step(tmp_path):
    with Tracker(tmp_path, config={}, mode="disabled") as tracker:
        with pytest.raises(ValueError, match="integer 'step'"):
            tracker.log_step({"epsilon": 1.0})


def test_non_finite_values_survive_the_jsonl(tmp_path):
    with Tracker(tmp_path, config={}, mode="disabled") as tracker:
        tracker.log_step({"step": 1, "loss": float("nan"), "epsilon": float("inf")})
    (record,) = read_history(tmp_path / "history.jsonl")
    assert math.isnan(record["loss"]) and record["epsilon"] == math.inf


def test_mode_resolution(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert resolve_wandb_mode(None) == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_wandb_mode(None) == "online"
    assert resolve_wandb_mode("disabled") == "disabled"
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert resolve_wandb_mode(None) == "offline"
    with pytest.raises(ValueError, match="offline, online, disabled"):
        resolve_wandb_mode("cloud")


def test_read_wandb_records_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="no W&B run"):
        read_wandb_records(tmp_path / "nope.wandb")


def test_read_history_drops_only_a_torn_last_line(tmp_path):
    path = tmp_path / "history.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "lo', encoding="utf-8")  # a crash mid-write
    with pytest.raises(json.JSONDecodeError):
        read_history(path)
    assert [r["step"] for r in read_history(path, torn_tail_ok=True)] == [1, 2]
    path.write_text('{"step": 1}\n{"st\n{"step": 3}\n', encoding="utf-8")  # damage before the end is an error
    with pytest.raises(json.JSONDecodeError):
        read_history(path, torn_tail_ok=True)


def test_read_history_tail_returns_the_torn_line(tmp_path):
    """The record a crash cut short is handed back (resume charges its step), the complete ones parsed."""
    path = tmp_path / "history.jsonl"
    path.write_text('{"step": 1}\n{"step": 2, "noise_multiplier": 1.5, "eps', encoding="utf-8")
    records, torn = read_history_tail(path)
    assert [r["step"] for r in records] == [1] and torn == '{"step": 2, "noise_multiplier": 1.5, "eps'
    path.write_text('{"step": 1}\n{"step": 2}\n', encoding="utf-8")
    assert read_history_tail(path) == ([{"step": 1}, {"step": 2}], None)
