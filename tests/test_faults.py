"""Reliability of ``adaptive-dp train`` / ``attack`` (issue 17): no run is ever lost or silently mixed, and every
fault is one line that names the fix, with exit status 2 (usage / input) or 1 (run time), 130 / 143 after a
signal. Each test reproduces one case of the issue and failed on the behaviour before it.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier
from train_helpers import run_cli

from adaptive_dp.cli import main
from adaptive_dp.data import audit_split, load_dataset
from adaptive_dp.training import loop as training
from adaptive_dp.training.checkpoint import load_checkpoint
from adaptive_dp.training.rundir import LOCK_FILE
from adaptive_dp.training.tracking import Tracker, read_history, read_wandb_records

REPO = Path(__file__).resolve().parents[1]
#: a tiny fixed-σ run: 6 steps per epoch on digits, no monitor (the cheapest real training)
FAST = ["--dataset", "digits", "--batch-size", "256", "--audit-fraction", "0", "--no-progress", "--wandb-mode",
        "disabled"]  # fmt: skip
pytestmark = pytest.mark.filterwarnings(
    "ignore:Secure RNG turned off",
    "ignore:Full backward hook is firing",
    "ignore:Optimal order is the largest alpha",
)


class Crash(Exception):
    """Stands in for a crash (power cut, OOM kill) in the middle of an epoch."""


def _cli(argv: list[str]) -> tuple[int, str, str]:
    """``adaptive-dp train ARGV`` in this process: (exit status, stdout, stderr). A KeyboardInterrupt that
    escapes fails the test instead of stopping pytest."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = run_cli(argv)
        except KeyboardInterrupt:
            pytest.fail("KeyboardInterrupt escaped `adaptive-dp train`")
    return code, out.getvalue(), err.getvalue()


def _one_error_line(err: str, command: str = "train") -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and lines, err
    assert lines[0].startswith(f"adaptive-dp {command}: error: "), err
    return lines[0]


def _fake_run(out: Path, tag: str) -> dict[str, bytes]:
    """Files of a run in ``out`` (their content is never read by a refused or overwriting run)."""
    out.mkdir(parents=True, exist_ok=True)
    files = {"history.jsonl": f'{{"step": 1, "tag": "{tag}"}}\n', "summary.json": f'{{"tag": "{tag}"}}\n'}
    for name, text in files.items():
        (out / name).write_text(text, encoding="utf-8")
    (out / "wandb").mkdir(exist_ok=True)
    return {name: (out / name).read_bytes() for name in files}


def _crash_at_step(monkeypatch, step: int) -> None:
    real = training.make_step_record

    def record_then_crash(**kwargs):
        if kwargs["step"] == step:
            raise Crash
        return real(**kwargs)

    monkeypatch.setattr(training, "make_step_record", record_then_crash)


@pytest.fixture(scope="module")
def crashed(tmp_path_factory):
    """A 2-epoch fixed-σ run that crashed at step 4 of epoch 1 (steps 1–3 logged, only the start checkpoint)."""
    out = tmp_path_factory.mktemp("crashed") / "run"
    with pytest.MonkeyPatch.context() as m:
        _crash_at_step(m, 4)
        code, _, err = _cli([*FAST, "--epochs", "2", "--out", str(out)])
    assert code == 1 and "Crash" in err and f"--resume {out}" in err
    return out


def _copy(run: Path, tmp_path: Path) -> Path:
    target = tmp_path / "run"
    shutil.copytree(run, target, ignore=shutil.ignore_patterns(LOCK_FILE))
    return target


# --- run folders -------------------------------------------------------------------------------------------------
def test_out_holding_a_run_is_refused(tmp_path):
    out = tmp_path / "run"
    before = _fake_run(out, "A")
    code, _, err = _cli([*FAST, "--epochs", "1", "--out", str(out)])
    line = _one_error_line(err)
    assert code == 2 and "holds a run" in line and f"--resume {out}" in line and "--overwrite" in line
    assert {name: (out / name).read_bytes() for name in before} == before  # nothing replaced


def test_overwrite_moves_the_old_run_aside(tmp_path):
    out = tmp_path / "run"
    before = _fake_run(out, "A")
    code, stdout, _ = _cli([*FAST, "--epochs", "1", "--out", str(out), "--overwrite"])
    assert code == 0
    (old,) = tmp_path.glob("run.old-*")
    assert {name: (old / name).read_bytes() for name in before} == before and (old / "wandb").is_dir()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["previous_run_moved_to"] == str(old) and str(old) in stdout
    assert {r["run_id"] for r in read_history(out)} == {summary["run_id"]}
    assert load_checkpoint(out)["run_id"] == summary["run_id"]


def test_a_second_run_on_a_folder_in_use_fails_at_once_naming_the_holder(tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom adaptive_dp.training.rundir import RunLock\n"
         f"lock = RunLock({str(out)!r}).acquire()\nprint('held', flush=True)\ntime.sleep(120)"],
        stdout=subprocess.PIPE, text=True, cwd=REPO,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        t0 = time.perf_counter()
        code, _, err = _cli([*FAST, "--epochs", "1", "--out", str(out)])
        elapsed = time.perf_counter() - t0
    finally:
        holder.kill()
        holder.wait()
    line = _one_error_line(err)
    assert code == 2 and f"PID {holder.pid}" in line and "in use" in line
    assert elapsed < 30 and sorted(p.name for p in out.iterdir()) == [LOCK_FILE]  # nothing trained or written


def test_resume_refuses_a_folder_that_mixes_runs(crashed, tmp_path):
    out = _copy(crashed, tmp_path)
    run_id = load_checkpoint(out)["run_id"]
    with open(out / "history.jsonl", "a", encoding="utf-8") as f:  # run B started there by mistake
        f.write(
            json.dumps({"step": 1, "noise_multiplier": 1.0, "epsilon": 0.1, "run_id": "b0b0b0b0b0b0"}) + "\n"
        )
    (out / "summary.json").write_text(json.dumps({"run_id": "b0b0b0b0b0b0"}))
    code, _, err = _cli(["--resume", str(out)])
    line = _one_error_line(err)
    assert code == 2 and "mixes files of different runs" in line and run_id in line
    assert "history.jsonl" in line and "summary.json" in line and "b0b0b0b0b0b0" in line


# --- one-line errors ---------------------------------------------------------------------------------------------
def _read_only_out(tmp_path: Path) -> Path:
    if os.geteuid() != 0:
        folder = tmp_path / "read-only"
        folder.mkdir()
        folder.chmod(0o555)
        return folder / "run"
    if not Path("/sys").is_dir():  # root ignores permissions: a read-only file system instead
        pytest.skip("running as root without /sys: no read-only folder to write to")
    return Path("/sys/adaptive-dp-test-out")


def test_read_only_out_is_one_line(tmp_path):
    out = _read_only_out(tmp_path)
    code, _, err = _cli([*FAST, "--epochs", "1", "--out", str(out)])
    line = _one_error_line(err)
    assert code == 2 and f"cannot write to --out {out}" in line and "--out" in line


@pytest.mark.parametrize("damage", ["empty", "truncated"])
def test_damaged_checkpoint_is_one_line_on_resume_and_attack(tmp_path, capsys, damage):
    out = tmp_path / "run"
    out.mkdir()
    path = out / "checkpoint.pt"
    torch.save({"format": "adaptive_dp.checkpoint/1", "weights": torch.zeros(4096)}, path)
    data = path.read_bytes()
    path.write_bytes(b"" if damage == "empty" else data[: len(data) // 2])
    code = main(["train", "--resume", str(out)])
    line = _one_error_line(capsys.readouterr().err)
    assert code == 2 and "damaged" in line and str(path) in line
    code = main(
        ["attack", "--checkpoint", str(path), "--n-images", "1", "--no-progress", "--out", str(tmp_path)]
    )
    line = _one_error_line(capsys.readouterr().err, "attack")
    assert code == 2 and "damaged" in line and str(path) in line


def test_full_disk_keeps_the_previous_checkpoint_and_no_temporary_file(tmp_path, monkeypatch):
    out = tmp_path / "run"
    real_save, calls = torch.save, []

    def save(obj, f, *args, **kwargs):  # the second checkpoint (after epoch 1) meets a full disk
        if str(getattr(f, "name", f)).endswith("checkpoint.pt.tmp"):
            calls.append(1)
        if len(calls) != 2:
            return real_save(obj, f, *args, **kwargs)
        f.write(b"\0" * 65536)  # part of the file made it to the disk
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", save)
    code, _, err = _cli([*FAST, "--epochs", "2", "--out", str(out)])
    line = _one_error_line(err)
    assert code == 1 and "No space left on device" in line and "free some space" in line
    assert f"--resume {out}" in line and str(out / "checkpoint.pt") in line
    assert not list(out.glob("*.tmp"))
    monkeypatch.setattr(torch, "save", real_save)
    assert load_checkpoint(out)["step"] == 0  # the checkpoint written at the start is intact


class Killed(Exception):
    """What the test's own signal handler raises when a signal reaches it: the run did not take the signal."""


@pytest.mark.parametrize(
    ("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"]
)
def test_a_signal_finishes_the_step_writes_the_run_and_prints_resume(tmp_path, monkeypatch, signum, code):
    out = tmp_path / "run"
    real = training._take_step

    def take_step(run, epoch, x, y):
        loss = real(run, epoch, x, y)
        if run.progress.step == 3:  # Ctrl-C / SIGTERM while step 3 runs
            os.kill(os.getpid(), signum)
        return loss

    def killed(*_):
        raise Killed

    monkeypatch.setattr(training, "_take_step", take_step)
    previous = signal.signal(signum, killed)
    try:
        exit_code, _, err = _cli([*FAST, "--epochs", "2", "--out", str(out), "--wandb-mode", "offline"])
    except Killed:
        pytest.fail(f"{signal.Signals(signum).name} was not handled by the run")
    finally:
        signal.signal(signum, previous)
    assert exit_code == code and "Traceback" not in err
    assert f"adaptive-dp train --resume {out}" in err
    assert [r["step"] for r in read_history(out)] == [1, 2, 3]  # the step in flight finished, no more
    summary = json.loads((out / "summary.json").read_text())
    assert summary["interrupted"] == signal.Signals(signum).name and summary["steps"] == 3
    exits = [r for r in read_wandb_records(summary["wandb"]["file"]) if r.get("type") == "exit"]
    assert [r["exit"]["exit_code"] for r in exits] == [code]  # the W&B run is finalised
    monkeypatch.undo()
    exit_code, _, _ = _cli(["--resume", str(out), "--wandb-mode", "disabled"])
    resumed = json.loads((out / "summary.json").read_text())
    assert exit_code == 0 and resumed["discarded_steps"] == 3 and resumed["interrupted"] is None


# --- impossible settings -----------------------------------------------------------------------------------------
def test_budget_above_sigma_max_fails_with_the_sigma_it_needs(tmp_path):
    full = load_dataset("digits", split="train")
    train_size = len(audit_split(full, fraction=0.02, seed=0)[0])
    q = 1 / math.ceil(train_size / 64)
    needed = get_noise_multiplier(target_epsilon=0.3, target_delta=1e-5, sample_rate=q, epochs=5)
    assert needed > 2
    out = tmp_path / "run"
    code, _, err = _cli(["--target-epsilon", "0.3", "--sigma-max", "2", "--no-progress", "--out", str(out)])
    line = _one_error_line(err)
    assert (
        code == 2
        and f"needs σ = {needed:.3f}" in line
        and "--sigma-max" in line
        and "--target-epsilon" in line
    )
    accountant = RDPAccountant()
    accountant.history = [(2.0, q, int(5 / q))]
    assert f"{accountant.get_epsilon(1e-5):.3f}" in line  # the ε that σ = σ_max would spend
    assert not out.exists()


def test_budget_no_sigma_can_meet_is_one_line_with_the_options(tmp_path):
    code, _, err = _cli(["--target-epsilon", "0.01", "--no-progress", "--out", str(tmp_path / "run")])
    line = _one_error_line(err)
    assert code == 2 and "cannot be met" in line and "raise --target-epsilon" in line and "--delta" in line


def test_audit_split_leaving_too_little_is_refused_unless_forced(tmp_path):
    argv = ["--dataset", "digits", "--epochs", "1", "--no-progress", "--wandb-mode", "disabled"]
    code, _, err = _cli(
        [*argv, "--audit-fraction", "0.999", "--batch-size", "1", "--out", str(tmp_path / "a")]
    )
    assert code == 2 and "under half of the data set" in _one_error_line(err) and "--force" in err
    code, _, err = _cli(
        [*argv, "--audit-fraction", "0.3", "--batch-size", "1024", "--out", str(tmp_path / "b")]
    )
    assert code == 2 and "fewer than one batch" in _one_error_line(err)
    code, _, _ = _cli([*argv, "--audit-fraction", "0.999", "--batch-size", "1", "--force", "--monitor-every", "100",
                       "--out", str(tmp_path / "c")])  # fmt: skip
    summary = json.loads((tmp_path / "c" / "summary.json").read_text())
    assert code == 0 and summary["dataset"]["train_size"] == 1 and summary["steps"] == 1


# --- resume -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "given", [["--seed", "0"], ["--epochs", "5"], ["--wandb-mode", "disabled", "--lr", "0.5"]]
)
def test_resume_refuses_explicit_options_equal_to_their_defaults(tmp_path, given):
    code, _, err = _cli(["--resume", str(tmp_path), *given])
    line = _one_error_line(err)
    dropped = [g for g in given if g.startswith("--") and g != "--wandb-mode"]
    assert code == 2 and f"drop {', '.join(dropped)}" in line


@pytest.mark.parametrize("tear", ["after_sigma", "before_sigma"])
def test_a_torn_last_line_is_a_lost_step_and_charged(crashed, tmp_path, tear):
    out = _copy(crashed, tmp_path)
    logged = read_history(out)
    torn = json.dumps({**logged[-1], "step": 4})
    cut = torn.index('"epsilon"') if tear == "after_sigma" else torn.index('"noise_multiplier"') + 10
    with open(out / "history.jsonl", "a", encoding="utf-8") as f:
        f.write(torn[:cut])  # the crash hit while step 4's record was being written
    code, _, _ = _cli(["--resume", str(out)])
    summary = json.loads((out / "summary.json").read_text())
    lost = read_history(out / "discarded_steps.jsonl")
    assert code == 0 and [r["step"] for r in lost] == [1, 2, 3, 4] and summary["discarded_steps"] == 4
    assert lost[-1]["torn_record"] and lost[-1]["noise_multiplier"] == 1.0
    kept = read_history(out)
    reference = RDPAccountant()  # every release: the 4 lost steps (the torn one too) and the kept ones
    for record in [*lost, *kept]:
        reference.step(noise_multiplier=record["noise_multiplier"], sample_rate=record["sample_rate"])
    assert summary["odometer_epsilon"] == pytest.approx(reference.get_epsilon(delta=1e-5), rel=1e-9)


# --- W&B ----------------------------------------------------------------------------------------------------------
def test_wandb_online_init_without_network_is_bounded(tmp_path, monkeypatch, caplog):
    with socket.socket() as s:  # a local port nothing listens on: no network needed, every request refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "0123456789abcdef0123456789abcdef01234567")  # set but unusable
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{port}")
    t0 = time.perf_counter()
    with caplog.at_level("WARNING", logger="adaptive_dp.training.tracking"):
        tracker = Tracker(tmp_path, config={"seed": 0}, mode=None)  # online: an API key is configured
    elapsed = time.perf_counter() - t0
    with tracker:
        tracker.log_step({"step": 1, "epsilon": 0.5})
    assert elapsed < 20, f"W&B init held training up {elapsed:.1f} s"
    assert tracker.mode == "offline" and tracker.run is not None  # goes on as an offline W&B run
    (warning,) = [r.getMessage() for r in caplog.records if "online init failed" in r.getMessage()]
    assert "\n" not in warning and "offline" in warning
    assert [r["step"] for r in read_history(tmp_path)] == [1]
