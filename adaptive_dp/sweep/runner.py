"""Runs the grid: each point a normal ``adaptive-dp train`` run in its own process under ``DIR/runs/<name>``.

Every run is a subprocess ``python -m adaptive_dp.cli train ... --out DIR/runs/<name>`` (``jobs`` at once; one
by default), so one run that fails or runs out of memory leaves the others and the sweep standing, and each
opens its own W&B run; all of them join one W&B group through the ``WANDB_RUN_GROUP`` environment variable
(``train`` has no group option; ``wandb.init`` reads the variable). A run's output goes to
``DIR/logs/<name>.log`` (appended). With ``jobs`` > 1 and no ``OMP_NUM_THREADS`` set, each run gets
``cpu_count // jobs`` torch threads so the runs do not oversubscribe the cores.

Ctrl-C / SIGTERM: the train processes run in their own sessions, so a terminal's Ctrl-C reaches only the sweep,
which passes the signal on once to each running train process (each finishes its step, writes its files and
exits 130 / 143, ready for ``--resume``), starts no further run and raises :class:`SweepInterrupted`. A second
signal is passed on again (``train`` then stops at once).

Resuming a sweep (the same command again) decides per run folder (:func:`run_state`):

- ``summary.json`` of a completed run (not ``interrupted``): finished, skipped (its results are read, never
  rewritten);
- ``checkpoint.pt`` present otherwise: interrupted, continued with ``train --resume`` (its saved options; the
  σ and ε history continue, lost steps are booked);
- anything else (interrupted before its first checkpoint): started again, with ``train --overwrite`` when the
  folder exists (``train`` moves what is there aside, deleting nothing).

A run that fails is reported (its log) and left as it is; the next invocation retries it the same way.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adaptive_dp.sweep.grid import GridRun

FINISHED, INTERRUPTED, NEW = "finished", "interrupted", "new"
#: exit statuses of a train run stopped by SIGINT / SIGTERM (its files written; it can be resumed).
STOPPED_CODES = (130, 143)


class SweepInterrupted(KeyboardInterrupt):
    """The sweep was stopped by SIGINT / SIGTERM (passed on to the running train processes).

    Attributes:
        signal_name: "SIGINT" or "SIGTERM".
        exit_code: 130 or 143 (128 + the signal number).
    """

    def __init__(self, signal_name: str) -> None:
        super().__init__(f"interrupted by {signal_name}")
        self.signal_name = signal_name
        self.exit_code = 128 + int(signal.Signals[signal_name])


@dataclass(frozen=True)
class RunOutcome:
    """What became of one grid run in this invocation.

    Attributes:
        run: the grid point.
        state: its folder's state before this invocation (:func:`run_state`).
        returncode: the train process's exit status; None for a run not launched (finished before, or the sweep
            was stopped first).
        seconds: wall-clock seconds of the train process (0 for a run not launched).
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
        return self.state == FINISHED if self.returncode is None else self.returncode == 0

    @property
    def stopped(self) -> bool:
        """Whether the run was interrupted by a signal or never started because the sweep was stopped."""
        return self.returncode in STOPPED_CODES or (self.returncode is None and self.state != FINISHED)


def run_dir(out: str | os.PathLike, name: str) -> Path:
    """The folder of the run ``name`` in the sweep folder ``out``: ``out/runs/<name>``."""
    return Path(out) / "runs" / name


def run_state(path: str | os.PathLike) -> str:
    """``"finished"`` (a ``summary.json`` that is not marked ``interrupted``), ``"interrupted"``
    (``checkpoint.pt`` present otherwise) or ``"new"``."""
    path = Path(path)
    try:
        summary = json.loads((path / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):  # missing, or torn by a crash while written
        summary = None
    if isinstance(summary, dict) and not summary.get("interrupted"):
        return FINISHED
    if (path / "checkpoint.pt").is_file():
        return INTERRUPTED
    return NEW


def _option_args(options: dict[str, Any]) -> list[str]:
    """``{"wandb_mode": "offline", "debug": True}`` → ``["--wandb-mode", "offline", "--debug"]``."""
    argv: list[str] = []
    for dest, value in options.items():
        flag = "--" + dest.replace("_", "-")
        argv += [flag] if value is True else [flag, str(value)]
    return argv


def train_command(run: GridRun, *, path: Path, state: str, shared: dict[str, Any]) -> list[str]:
    """The command line of ``adaptive-dp train`` for ``run`` in the folder ``path`` in ``state``.

    Args:
        run: the grid point.
        path: its run folder.
        state: :func:`run_state` of ``path`` (not ``"finished"``).
        shared: options for every run (``wandb_mode``, ``wandb_project``, ``debug``: True); a resumed run
            gets those ``train --resume`` accepts (``adaptive_dp.cli.train.RESUME_OPTIONS``).
    """
    from adaptive_dp.cli.train import RESUME_OPTIONS

    command = [sys.executable, "-m", "adaptive_dp.cli", "train"]
    if state == INTERRUPTED:  # the run's saved options
        kept = {d: v for d, v in shared.items() if d in RESUME_OPTIONS}
        return [*command, "--resume", str(path), "--no-progress", *_option_args(kept)]
    command += [*run.argv, "--out", str(path), "--no-progress", *_option_args(shared)]
    if path.exists():
        command.append("--overwrite")
    return command


class _Children:
    """The train processes running now (in their own sessions), to pass a signal on to them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: set[subprocess.Popen] = set()

    def add(self, process: subprocess.Popen) -> None:
        with self._lock:
            self._running.add(process)

    def discard(self, process: subprocess.Popen) -> None:
        with self._lock:
            self._running.discard(process)

    def send(self, signum: int) -> None:
        with self._lock:
            running = list(self._running)
        for process in running:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signum)


CHILDREN = _Children()


def launch_train(command: Sequence[str], *, log: Path, env: dict[str, str]) -> int:
    """Run one ``train`` process to its end in its own session, its output appended to ``log``; returns its
    exit status."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a", encoding="utf-8") as stream:
        stream.write(f"\n== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(command)}\n")
        stream.flush()
        process = subprocess.Popen(
            command, stdout=stream, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        CHILDREN.add(process)
        try:
            return process.wait()
        finally:
            CHILDREN.discard(process)


@contextlib.contextmanager
def signals_to_children() -> Iterator[None]:
    """While active (main thread only; elsewhere it does nothing): SIGINT / SIGTERM are passed on to the
    running train processes and raise :class:`SweepInterrupted` here."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handle(signum: int, frame: Any) -> None:
        CHILDREN.send(signum)
        raise SweepInterrupted(signal.Signals(signum).name)

    previous = {s: signal.signal(s, handle) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def child_env(*, group: str, jobs: int) -> dict[str, str]:
    """The environment of the train processes: this one, plus ``WANDB_RUN_GROUP=group`` and (with ``jobs`` > 1,
    unless set) ``OMP_NUM_THREADS = cpu_count // jobs``."""
    env = dict(os.environ)
    env["WANDB_RUN_GROUP"] = group
    if jobs > 1 and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))
    return env


def _wind_down(pool: ThreadPoolExecutor) -> None:
    """Wait for the running train processes to end, starting no new one; further signals are passed on."""
    while True:
        try:
            pool.shutdown(wait=True, cancel_futures=True)
            return
        except SweepInterrupted:
            continue


def run_grid(
    runs: Sequence[GridRun],
    *,
    out: str | os.PathLike,
    jobs: int = 1,
    group: str,
    shared: dict[str, Any] | None = None,
    on_done: Callable[[RunOutcome], None] | None = None,
) -> list[RunOutcome]:
    """Run every grid point that has no results yet, ``jobs`` at once.

    Args:
        runs: the grid (:meth:`adaptive_dp.sweep.grid.Grid.runs`).
        out: the sweep folder; run ``r`` writes into ``out/runs/<r.name>``.
        jobs: train processes at once, ≥ 1.
        group: the W&B group of every run (``WANDB_RUN_GROUP``).
        shared: options for every run (:func:`train_command`).
        on_done: called in this thread with each outcome as it arrives (finished runs skipped first).

    Returns:
        One :class:`RunOutcome` per run, in grid order.

    Raises:
        ValueError: if ``jobs`` < 1.
        SweepInterrupted: on SIGINT / SIGTERM, once the running train processes have ended (see the module
            docstring).
    """
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"--jobs must be an integer >= 1, got {jobs!r}")
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
            pending.append(
                (run, state, train_command(run, path=path, state=state, shared=dict(shared or {})), log)
            )
    env, stop = child_env(group=group, jobs=jobs), threading.Event()

    def work(run: GridRun, state: str, command: list[str], log: Path) -> RunOutcome:
        if stop.is_set():
            return RunOutcome(run, state, None, 0.0, log)
        start = time.perf_counter()
        code = launch_train(command, log=log, env=env)
        return RunOutcome(run, state, code, time.perf_counter() - start, log)

    pool = ThreadPoolExecutor(max_workers=jobs)
    with signals_to_children():
        try:
            for future in as_completed([pool.submit(work, *item) for item in pending]):
                outcome = future.result()
                outcomes[outcome.run.name] = outcome
                if on_done is not None:
                    on_done(outcome)
        except SweepInterrupted:
            stop.set()
            _wind_down(pool)
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
    return [outcomes[run.name] for run in runs]
