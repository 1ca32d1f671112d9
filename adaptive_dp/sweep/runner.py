"""Runs the grid: each point a normal ``adaptive-dp train`` run in its own process under ``DIR/runs/<name>``.

Every run is a subprocess ``python -m adaptive_dp.cli train ... --out DIR/runs/<name>`` (``jobs`` at once; one
by default), so one run that fails or runs out of memory leaves the others and the sweep standing, and each
opens its own W&B run; all of them join one W&B group through the ``WANDB_RUN_GROUP`` environment variable
(``train`` has no group option; ``wandb.init`` reads the variable). A run's output goes to
``DIR/logs/<name>.log`` (appended). With ``jobs`` > 1 and no ``OMP_NUM_THREADS`` set, each run gets
``cpu_count // jobs`` torch threads so the runs do not oversubscribe the cores.

Resuming a sweep (the same command again) decides per run folder (:func:`run_state`):

- ``summary.json`` present: finished, skipped (its results are read, never rewritten);
- ``checkpoint.pt`` present, no summary: interrupted after an epoch, continued with ``train --resume`` (its
  saved options; the σ and ε history continue, lost steps are booked);
- anything else (interrupted before its first checkpoint): started again with ``train --overwrite`` (when
  ``train`` has that option) — nothing finished is in such a folder.

A run that fails is reported (its log) and left as it is; the next invocation retries it the same way.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from adaptive_dp.sweep.grid import GridRun
from adaptive_dp.sweep.options import train_parser

FINISHED, INTERRUPTED, NEW = "finished", "interrupted", "new"


@dataclass(frozen=True)
class RunOutcome:
    """What became of one grid run in this invocation.

    Attributes:
        run: the grid point.
        state: its folder's state before this invocation (:func:`run_state`).
        returncode: the train process's exit status; None for a run skipped as finished.
        seconds: wall-clock seconds of the train process (0 for a skipped run).
        log: ``DIR/logs/<name>.log``.
    """

    run: GridRun
    state: str
    returncode: int | None
    seconds: float
    log: Path

    @property
    def ok(self) -> bool:
        """Whether the run has its results (finished before, or its process exited 0)."""
        return self.returncode in (None, 0)


def run_dir(out: str | os.PathLike, name: str) -> Path:
    """The folder of the run ``name`` in the sweep folder ``out``: ``out/runs/<name>``."""
    return Path(out) / "runs" / name


def run_state(path: str | os.PathLike) -> str:
    """``"finished"`` (``summary.json`` present), ``"interrupted"`` (``checkpoint.pt``, no summary) or ``"new"``."""
    path = Path(path)
    if (path / "summary.json").is_file():
        return FINISHED
    if (path / "checkpoint.pt").is_file():
        return INTERRUPTED
    return NEW


def train_command(run: GridRun, *, path: Path, state: str, shared: dict[str, str]) -> list[str]:
    """The command line of ``adaptive-dp train`` for ``run`` in the folder ``path`` in ``state``.

    Args:
        run: the grid point.
        path: its run folder.
        state: :func:`run_state` of ``path`` (not ``"finished"``).
        shared: the tracking options given to the sweep (``{"wandb_mode": ..., "wandb_project": ...}``).
    """
    parser = train_parser()
    flags = {a.dest: a for a in parser._actions}  # argparse has no public accessor for its actions
    command = [sys.executable, "-m", "adaptive_dp.cli", "train"]
    if state == INTERRUPTED:  # the run's saved options; only the W&B mode may change
        resume = flags["resume"]
        command += (
            [resume.option_strings[0], str(path)] if resume.nargs != 0 else ["--out", str(path), "--resume"]
        )
        if "wandb_mode" in shared:
            command += ["--wandb-mode", shared["wandb_mode"]]
        return [*command, "--no-progress"]
    command += [*run.argv, "--out", str(path), "--no-progress"]
    command += [t for dest, v in shared.items() for t in (flags[dest].option_strings[0], v)]
    if path.exists() and "overwrite" in flags:
        command.append("--overwrite")
    return command


def launch_train(command: Sequence[str], *, log: Path, env: dict[str, str]) -> int:
    """Run one ``train`` process to its end, its output appended to ``log``; returns its exit status."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a", encoding="utf-8") as stream:
        stream.write(f"\n== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(command)}\n")
        stream.flush()
        return subprocess.run(
            command, stdout=stream, stderr=subprocess.STDOUT, env=env, check=False
        ).returncode


def child_env(*, group: str, jobs: int) -> dict[str, str]:
    """The environment of the train processes: this one, plus ``WANDB_RUN_GROUP=group`` and (with ``jobs`` > 1,
    unless set) ``OMP_NUM_THREADS = cpu_count // jobs``."""
    env = dict(os.environ)
    env["WANDB_RUN_GROUP"] = group
    if jobs > 1 and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))
    return env


def run_grid(
    runs: Sequence[GridRun],
    *,
    out: str | os.PathLike,
    jobs: int = 1,
    group: str,
    shared: dict[str, str] | None = None,
    on_done: Callable[[RunOutcome], None] | None = None,
) -> list[RunOutcome]:
    """Run every grid point that has no results yet, ``jobs`` at once.

    Args:
        runs: the grid (:meth:`adaptive_dp.sweep.grid.Grid.runs`).
        out: the sweep folder; run ``r`` writes into ``out/runs/<r.name>``.
        jobs: train processes at once, ≥ 1.
        group: the W&B group of every run (``WANDB_RUN_GROUP``).
        shared: shared tracking options (``wandb_mode``, ``wandb_project``) for every run.
        on_done: called in this thread with each outcome as it arrives (finished runs skipped first).

    Returns:
        One :class:`RunOutcome` per run, in grid order.

    Raises:
        ValueError: if ``jobs`` < 1.
    """
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"--jobs must be an integer >= 1, got {jobs!r}")
    shared = dict(shared or {})
    outcomes: dict[str, RunOutcome] = {}
    pending = []
    for run in runs:
        path, log = run_dir(out, run.name), Path(out) / "logs" / f"{run.name}.log"
        state = run_state(path)
        if state == FINISHED:
            outcomes[run.name] = RunOutcome(run, state, None, 0.0, log)
            if on_done is not None:
                on_done(outcomes[run.name])
        else:
            pending.append((run, state, train_command(run, path=path, state=state, shared=shared), log))
    env = child_env(group=group, jobs=jobs)

    def work(run: GridRun, state: str, command: list[str], log: Path) -> RunOutcome:
        start = time.perf_counter()
        code = launch_train(command, log=log, env=env)
        return RunOutcome(run, state, code, time.perf_counter() - start, log)

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = [pool.submit(work, *item) for item in pending]
        for future in as_completed(futures):
            outcome = future.result()
            outcomes[outcome.run.name] = outcome
            if on_done is not None:
                on_done(outcome)
    return [outcomes[run.name] for run in runs]
