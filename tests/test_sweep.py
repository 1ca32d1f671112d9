"""``adaptive-dp sweep``: options derived from train's parser, grid and names, the Pareto front, resuming,
``sweep.yaml``, and one real 2×2 sweep on digits (``--jobs 2``, offline W&B runs in one group)."""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import math
import os
import random
import re
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from adaptive_dp.cli import sweep as sweep_command
from adaptive_dp.sweep import frontier, runner
from adaptive_dp.sweep.grid import Grid, run_name, validate_runs
from adaptive_dp.sweep.options import MANAGED, given_values, train_options, train_parser
from adaptive_dp.sweep.wandb_outputs import sweep_config, write_sweep_yaml

GRID = ["--target-mi", "0.3", "1.0", "--target-epsilon", "2", "8"]
TINY = [
    "--dataset",
    "digits",
    "--epochs",
    "1",
    "--batch-size",
    "512",
    "--monitor-every",
    "1",
    "--device",
    "cpu",
]


def sweep_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="adaptive-dp sweep")
    sweep_command.configure(parser)
    return parser


def grid_of(argv: list[str]) -> Grid:
    options = train_options()
    axes, flags, _ = given_values(sweep_parser().parse_args(["--out", "x", *argv]), options)
    return Grid(axes=axes, flags=flags, options=options)


def run_sweep(argv: list[str]) -> tuple[int, str, str]:
    """``adaptive-dp sweep ARGV`` through the command's parser and run(); returns (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = sweep_command.run(sweep_parser().parse_args(argv))
    return code, out.getvalue(), err.getvalue()


@pytest.fixture
def launches(monkeypatch):
    """Count (and keep) the train commands the sweep launches; the real launcher still runs them."""
    seen: list[list[str]] = []
    real = runner.launch_train

    def counting(command, *, log, env):
        seen.append(list(command))
        return real(command, log=log, env=env)

    monkeypatch.setattr(runner, "launch_train", counting)
    return seen


# -- options and grid ------------------------------------------------------------------------------------------
def test_sweep_takes_every_train_option_with_several_values():
    train = {a.dest: a for a in train_parser()._actions if a.option_strings}
    sweep = {a.dest: a for a in sweep_parser()._actions if a.option_strings}
    for dest, action in train.items():
        if dest in MANAGED:
            continue
        assert sweep[dest].option_strings == action.option_strings
        assert sweep[dest].default == action.default
        if action.nargs == 0:  # a flag stays a flag
            assert sweep[dest].nargs == 0
        elif dest in ("wandb_mode", "wandb_project"):  # tracking: one value for the sweep
            assert sweep[dest].nargs is None
        else:
            assert sweep[dest].nargs == "+", dest
    args = sweep_parser().parse_args(["--out", "x", "--seed", "0", "1", "--controller", "pid", "threshold"])
    assert args.seed == [0, 1] and args.controller == ["pid", "threshold"]
    with pytest.raises(SystemExit):  # train's choices still apply to every value
        sweep_parser().parse_args(["--out", "x", "--controller", "pid", "no-such-controller"])


def test_grid_expansion_and_names():
    grid = grid_of([*GRID, "--controller", "pid", "--seed", "0", "1", "0", "--log-private-metrics"])
    runs = grid.runs()
    assert grid.varying == ["seed", "target_epsilon", "target_mi"]  # train's option order, duplicates dropped
    assert len(runs) == 2 * 2 * 2
    assert runs[0].name == "seed-0_target-epsilon-2_target-mi-0.3"
    assert runs[-1].name == "seed-1_target-epsilon-8_target-mi-1"
    parser = train_parser()
    expected = set(itertools.product([0, 1], [2.0, 8.0], [0.3, 1.0]))
    got = set()
    for run in runs:
        assert re.fullmatch(r"[A-Za-z0-9._-]+", run.name)
        parsed = parser.parse_args(list(run.argv))  # train itself reads the run's arguments back
        got.add((parsed.seed, parsed.target_epsilon, parsed.target_mi))
        assert parsed.controller == "pid" and parsed.log_private_metrics is True
        assert {k: getattr(parsed, k) for k in run.options} == run.options
    assert got == expected
    assert len({r.name for r in runs}) == len(runs)


def test_names_single_point_long_and_clashing():
    assert [r.name for r in grid_of(["--epochs", "1"]).runs()] == ["run"]
    long = run_name({"data_dir": "/x" * 100}, ["data_dir"])
    assert len(long) == 120 and re.fullmatch(r"[A-Za-z0-9._-]+-[0-9a-f]{10}", long)
    with pytest.raises(ValueError, match="get the run name"):
        grid_of(["--data-dir", "a/b", "a-b"]).runs()


def test_non_private_reference_runs_drop_the_dp_options():
    grid = grid_of([*GRID, "--controller", "pid", "--seed", "0", "1", "--epochs", "1"])
    grid.non_private = True
    runs = grid.runs()
    references = [r for r in runs if r.options.get("non_private")]
    assert [r.name for r in references] == ["non-private_seed-0", "non-private_seed-1"]
    assert len(runs) == 2 * 2 * 2 + 2
    parser = train_parser()
    for run in references:
        parsed = parser.parse_args(list(run.argv))
        assert parsed.non_private and parsed.epochs == 1
        assert parsed.target_mi is None and parsed.target_epsilon is None and parsed.controller is None
    validate_runs(runs)  # train accepts every run, the references included


def test_a_bad_grid_point_is_one_clear_error_before_any_run(tmp_path, launches):
    code, _, err = run_sweep(["--out", str(tmp_path), "--controller", "pid", "linear", *TINY])
    assert code == 2 and launches == []
    assert "controller-pid" in err and "--target-mi" in err and len(err.strip().splitlines()) == 1


# -- frontier maths --------------------------------------------------------------------------------------------
def test_pareto_front_of_a_hand_example():
    points = [(2, 0.80), (2, 0.75), (4, 0.85), (8, 0.84), (8, 0.90), (1, 0.50), (4, 0.85)]
    # by hand: (1, .50) is the only point at ε 1; (2, .80) beats (2, .75); (4, .85) beats everything below
    # .85 at larger ε and its copy (index 6) adds nothing; (8, .90) is the most accurate; (8, .84) is dominated
    assert frontier.pareto_front(points) == [5, 0, 2, 4]


def test_pareto_front_matches_the_definition():
    rng = random.Random(0)
    for _ in range(50):
        points = [
            (rng.choice([1, 2, 4, 8]), rng.choice([0.5, 0.6, 0.7, 0.8])) for _ in range(rng.randint(1, 9))
        ]
        front = frontier.pareto_front(points)
        for i, (e, a) in enumerate(points):
            dominated = any(
                (e2 <= e and a2 >= a and (e2, a2) != (e, a)) or ((e2, a2) == (e, a) and j < i)
                for j, (e2, a2) in enumerate(points)
            )
            assert (i in front) is not dominated


def test_best_by_budget_respects_the_tolerance():
    def row(name, eps, mi, acc, over):
        return {
            "name": name,
            "target_epsilon": eps,
            "target_mi": mi,
            "test_accuracy": acc,
            "fraction_over_ceiling": over,
        }

    rows = [
        row("a", 2.0, 0.3, 0.70, 0.0),
        row("b", 2.0, 0.3, 0.75, 0.2),  # more accurate but over its ceiling on 20 % of readings
        row("c", 2.0, 1.0, 0.72, 0.0),
        row("d", 8.0, 0.3, 0.90, 0.5),
        row("e", 8.0, 1.0, 0.88, None),  # a ceiling without readings holds nothing
        {**row("f", None, None, 0.99, None), "non_private": True},  # the reference: in no cell
    ]
    strict = frontier.best_by_budget(rows, tolerance=0.1)
    assert {b: {c: r and r["name"] for c, r in cells.items()} for b, cells in strict.items()} == {
        2.0: {0.3: "a", 1.0: "c"},
        8.0: {0.3: None, 1.0: None},
    }
    assert frontier.best_by_budget(rows, tolerance=0.25)[2.0][0.3]["name"] == "b"


# -- sweep.yaml --------------------------------------------------------------------------------------------------
def test_sweep_yaml_parses_and_names_only_real_train_options(tmp_path):
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

    grid = grid_of([*GRID, "--controller", "pid", "--epochs", "1", "--log-private-metrics"])
    path = write_sweep_yaml(tmp_path / "sweep.yaml", sweep_config(grid, project="p", name="n"))
    config = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert config["method"] == "grid" and config["program"]
    assert config["command"][-3:] == ["adaptive_dp.cli", "train", "${args_no_boolean_flags}"]
    parser = train_parser()
    real = {s for a in parser._actions for s in a.option_strings}
    assert {f"--{k}" for k in config["parameters"]} <= real
    # the grid W&B expands, formatted by W&B's own agent code, is the sweep's grid as train parses it
    params = config["parameters"]
    keys = list(params)
    choices = [params[k]["values"] if "values" in params[k] else [params[k]["value"]] for k in keys]
    agent = []
    for point in itertools.product(*choices):
        command = {"args": {k: {"value": v} for k, v in zip(keys, point)}}
        argv = create_sweep_command_args(command)["args_no_boolean_flags"]
        agent.append(vars(parser.parse_args(argv)))
    ours = [vars(parser.parse_args(list(r.argv))) for r in grid.runs()]
    assert sorted(map(json.dumps, agent)) == sorted(map(json.dumps, ours))


# -- resuming ------------------------------------------------------------------------------------------------
def test_train_command_per_run_state(tmp_path):
    run = grid_of(GRID).runs()[0]
    fresh = tmp_path / "fresh"
    new = runner.train_command(run, path=fresh, state=runner.NEW, shared={"wandb_mode": "offline"})
    assert new == [
        sys.executable, "-m", "adaptive_dp.cli", "train", *run.argv,
        "--out", str(fresh), "--no-progress", "--wandb-mode", "offline",
    ]  # fmt: skip
    shared = {"wandb_mode": "offline", "wandb_project": "p", "debug": True}
    resumed = runner.train_command(run, path=tmp_path, state=runner.INTERRUPTED, shared=shared)
    parsed = train_parser().parse_args([a for a in resumed[4:] if a != "--debug"])
    assert Path(parsed.resume) == tmp_path and "--debug" in resumed
    assert parsed.target_mi is None and parsed.target_epsilon is None  # the checkpoint's options win
    assert parsed.wandb_mode == "offline" and parsed.wandb_project == "adaptive-dp"  # only what resume takes
    restarted = runner.train_command(run, path=tmp_path, state=runner.NEW, shared={})
    assert restarted[-1] == "--overwrite"  # a partial folder is started again (train moves it aside)


def _fake_summary(target_epsilon: float, target_mi: float, **extra) -> dict:
    return {
        "config": {"target_epsilon": target_epsilon, "target_mi": target_mi},
        "test_accuracy": 0.5 + target_epsilon / 100,
        "guarantee_epsilon": target_epsilon,
        "odometer_epsilon": target_epsilon * 0.9,
        "max_mi": target_mi,
        "mean_mi": target_mi / 2,
        "fraction_over_ceiling": 0.0,
        "wall_time_s": 1.0,
        "delta": 1e-5,
        **extra,
    }


def test_resume_skips_finished_runs_and_resumes_interrupted_ones(tmp_path, monkeypatch):
    runs = grid_of(GRID).runs()
    finished, interrupted, partial = (runner.run_dir(tmp_path, r.name) for r in runs[:3])
    finished.mkdir(parents=True)
    (finished / "summary.json").write_text(json.dumps(_fake_summary(2.0, 0.3)))
    before = (finished / "summary.json").read_bytes()
    interrupted.mkdir(
        parents=True
    )  # what train leaves after Ctrl-C: a summary marked interrupted, a checkpoint
    (interrupted / "checkpoint.pt").write_bytes(b"stands for a checkpoint")
    (interrupted / "summary.json").write_text(json.dumps(_fake_summary(2.0, 1.0, interrupted="SIGINT")))
    partial.mkdir(parents=True)  # died before its first checkpoint
    (partial / "history.jsonl").write_text("")
    assert [runner.run_state(p) for p in (finished, interrupted, partial)] == [
        "finished",
        "interrupted",
        "new",
    ]
    assert [r["name"] for r in frontier.read_rows(tmp_path, runs)] == [runs[0].name]
    commands: list[list[str]] = []

    def fake_train(command, *, log, env):  # writes the summary a real run would
        commands.append(list(command))
        assert env["WANDB_RUN_GROUP"] == "g"
        parsed = train_parser().parse_args([a for a in command[4:] if a != "--overwrite"])
        out = Path(parsed.resume or parsed.out)
        run = next(r for r in runs if runner.run_dir(tmp_path, r.name) == out)
        out.mkdir(parents=True, exist_ok=True)
        summary = _fake_summary(run.options["target_epsilon"], run.options["target_mi"])
        (out / "summary.json").write_text(json.dumps(summary))
        return 0

    monkeypatch.setattr(runner, "launch_train", fake_train)
    outcomes = runner.run_grid(runs, out=tmp_path, group="g")
    assert [o.state for o in outcomes] == ["finished", "interrupted", "new", "new"] and all(
        o.ok for o in outcomes
    )
    assert len(commands) == 3  # the finished run is not launched again
    assert commands[0][4:6] == ["--resume", str(interrupted)]
    assert "--overwrite" in commands[1] and "--overwrite" not in commands[2]
    assert (finished / "summary.json").read_bytes() == before
    assert [r["name"] for r in frontier.read_rows(tmp_path, runs)] == [r.name for r in runs]
    commands.clear()
    runner.run_grid(runs, out=tmp_path, group="g")
    assert commands == []


# a stand-in for a train process: on SIGINT it "writes its files" and exits 130, as train does
_CHILD = (
    "import signal, sys, time\n"
    "signal.signal(signal.SIGINT, lambda *a: sys.exit(130))\n"
    "print('ready', flush=True)\n"
    "time.sleep(60)\n"
)


def test_ctrl_c_is_passed_on_once_and_stops_the_sweep(tmp_path, monkeypatch):
    runs = grid_of(GRID).runs()
    monkeypatch.setattr(runner, "train_command", lambda run, **_: [sys.executable, "-c", _CHILD])
    codes: list[int] = []
    real = runner.launch_train

    def launch(command, *, log, env):
        codes.append(real(command, log=log, env=env))
        return codes[-1]

    monkeypatch.setattr(runner, "launch_train", launch)

    def press_ctrl_c():
        log = tmp_path / "logs" / f"{runs[0].name}.log"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not (log.is_file() and "ready" in log.read_text().splitlines()):
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=press_ctrl_c, daemon=True).start()
    start = time.monotonic()
    with pytest.raises(runner.SweepInterrupted) as caught:
        runner.run_grid(runs, out=tmp_path, group="g", jobs=1)
    assert caught.value.exit_code == 130 and time.monotonic() - start < 30
    assert codes == [130]  # the running child got the signal and ended; no further run started
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the sweep's handler is gone


# -- one real sweep ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def real_sweep(tmp_path_factory):
    """A 2×2 digits sweep (1 epoch, 3 steps per run), two runs at once, offline W&B runs."""
    out = tmp_path_factory.mktemp("sweep")
    start = time.perf_counter()
    code, stdout, stderr = run_sweep(
        ["--out", str(out), *GRID, *TINY, "--jobs", "2", "--wandb-mode", "offline"]
    )
    logs = "\n".join(p.read_text()[-2000:] for p in sorted((out / "logs").glob("*.log")))
    assert code == 0, f"{stdout}\n{stderr}\n{logs}"
    return out, stdout, time.perf_counter() - start


def test_real_sweep_frontier_json_holds_each_runs_results(real_sweep):
    out, _, _ = real_sweep
    data = json.loads((out / "frontier.json").read_text())
    names = [r.name for r in grid_of(GRID).runs()]
    assert [r["name"] for r in data["runs"]] == names and data["failed"] == []
    for row in data["runs"]:
        run = out / "runs" / row["name"]
        summary = json.loads((run / "summary.json").read_text())
        for key in frontier.SUMMARY_FIELDS:
            assert row[key] == summary[key], key
        # independent of summary.json: the MI readings in the run's own step records
        readings = [
            r["mi"]
            for r in map(json.loads, (run / "history.jsonl").read_text().splitlines())
            if r.get("mi") is not None
        ]
        assert readings and math.isclose(row["max_mi"], max(readings))
        over = sum(m > row["config"]["target_mi"] for m in readings) / len(readings)
        assert math.isclose(row["fraction_over_ceiling"], over)
        assert row["guarantee_epsilon"] <= row["config"]["target_epsilon"] + 1e-6  # the budget held
        assert row["odometer_epsilon"] <= row["guarantee_epsilon"] + 1e-6
    points = [(frontier.epsilon_of(r), r["test_accuracy"]) for r in data["runs"]]
    front = [r["name"] for i, r in enumerate(data["runs"]) if i in frontier.pareto_front(points)]
    assert data["pareto_front"] == front and front


def test_real_sweep_runs_two_at_once_in_one_wandb_group(real_sweep):
    from PIL import Image

    from adaptive_dp.training.tracking import read_wandb_records

    out, stdout, _ = real_sweep
    group = json.loads((out / "plan.json").read_text())["group"]
    first, second = (out / "runs" / n for n in [r.name for r in grid_of(GRID).runs()][:2])
    started = time.strptime(
        re.search(r"== (\S+ \S+)", (out / "logs" / f"{second.name}.log").read_text()).group(1),
        "%Y-%m-%d %H:%M:%S",
    )
    assert time.mktime(started) < (first / "summary.json").stat().st_mtime  # --jobs 2: overlapping runs
    run_record = next(r for r in read_wandb_records(first / "wandb") if r.get("type") == "run")
    assert run_record["run"]["run_group"] == group
    records = read_wandb_records(out / "wandb")
    assert next(r for r in records if r.get("type") == "run")["run"]["run_group"] == group
    assert any("frontier" in json.dumps(r) for r in records if r.get("type") == "history")
    assert Image.open(out / "frontier.png").size[0] > 800
    assert len(re.findall(r"^\[\d/4\] .*(ETA|all runs done)", stdout, re.M)) == 4
    assert "ε ≤ 2" in stdout and "ε ≤ 8" in stdout and "MI ≤ 0.3" in stdout


def test_rerunning_a_finished_sweep_launches_nothing(real_sweep, launches):
    out, _, _ = real_sweep
    before = {p: p.stat().st_mtime for p in (out / "runs").glob("*/summary.json")}
    rows = json.loads((out / "frontier.json").read_text())["runs"]
    code, stdout, _ = run_sweep(["--out", str(out), *GRID, *TINY, "--jobs", "2", "--wandb-mode", "disabled"])
    assert code == 0 and launches == []
    assert stdout.count("finished before, skipped") == 4
    assert {p: p.stat().st_mtime for p in before} == before
    assert json.loads((out / "frontier.json").read_text())["runs"] == rows


def test_changing_a_planned_run_is_refused(real_sweep, launches):
    out, _, _ = real_sweep
    code, _, err = run_sweep(["--out", str(out), *GRID, *TINY, "--lr", "0.1"])
    assert code == 2 and launches == [] and "already holds run" in err


def test_the_non_private_reference_is_off_the_front():
    rows = [
        {"name": "a", "guarantee_epsilon": 2.0, "odometer_epsilon": 1.5, "test_accuracy": 0.8},
        {"name": "b", "guarantee_epsilon": 8.0, "odometer_epsilon": 7.0, "test_accuracy": 0.9},
        {
            "name": "ref",
            "guarantee_epsilon": None,
            "odometer_epsilon": None,
            "test_accuracy": 0.95,
            "non_private": True,
        },
    ]
    assert [r["on_front"] for r in frontier.mark_front(rows)] == [True, True, False]
    assert frontier.epsilon_of(rows[2]) == math.inf


@pytest.mark.slow
def test_ctrl_c_on_a_real_sweep_then_resume(tmp_path):
    """SIGINT to `adaptive-dp sweep`: the run in flight writes its files (exit 130); the same command again
    resumes it with `train --resume` and adds the non-private reference."""
    import subprocess

    argv = [sys.executable, "-m", "adaptive_dp.cli", "sweep", "--out", str(tmp_path), "--target-mi", "0.3"]
    argv += [
        "--epochs",
        "3",
        "--batch-size",
        "128",
        "--device",
        "cpu",
        "--wandb-mode",
        "disabled",
        "--non-private",
    ]
    sweep = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    history = tmp_path / "runs" / "run" / "history.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not (
        history.is_file() and len(history.read_text().splitlines()) >= 3
    ):
        time.sleep(0.2)
    sweep.send_signal(signal.SIGINT)
    output = sweep.communicate(timeout=300)[0]
    assert sweep.returncode == 130, output
    summary = json.loads((tmp_path / "runs" / "run" / "summary.json").read_text())
    assert summary["interrupted"] == "SIGINT" and not (tmp_path / "runs" / "non-private").exists()
    again = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "--resume" in (tmp_path / "logs" / "run.log").read_text().split("\n==")[-1].splitlines()[0]
    rows = json.loads((tmp_path / "frontier.json").read_text())["runs"]
    assert [(r["name"], r["non_private"], r["on_front"]) for r in rows] == [
        ("run", False, True),
        ("non-private", True, False),
    ]
    assert json.loads((tmp_path / "runs" / "run" / "summary.json").read_text())["resumed_at_step"] is not None
