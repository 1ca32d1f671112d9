"""Run folders: one run per ``--out``, held under a lock for the life of the run, never silently mixed.

* :func:`claim` takes a folder for a new run: it refuses a folder that holds a run (``checkpoint.pt``,
  ``history.jsonl``, ``summary.json``, ...) unless asked to move that run aside (``--overwrite``: into
  ``OUT.old-<UTC time>``; nothing is ever deleted).
* :class:`RunLock` is the lock file ``OUT/.adaptive-dp.lock`` (``filelock``; the kernel drops it when the
  process dies, even on ``kill -9``). It holds the PID of its holder, so a second run on the same folder fails
  at once naming the first one.
* Every file of a run carries its run id (:func:`new_run_id`): each ``history.jsonl`` record, the checkpoint,
  the summary and the records of lost steps. :func:`check_one_run` refuses to resume a folder whose files
  belong to different runs.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

#: the lock file inside a run folder (kept after the run; it is not part of the run).
LOCK_FILE = ".adaptive-dp.lock"
#: entries whose presence means a folder holds a run.
RUN_FILES = (
    "checkpoint.pt",
    "history.jsonl",
    "summary.json",
    "discarded_steps.jsonl",
    "tradeoff.png",
    "wandb",
)


class RunFolderError(ValueError):
    """A run folder that cannot be used as asked: it holds a run, another run holds it, it mixes runs, or it
    cannot be written. The message names the folder and the fix."""


def new_run_id() -> str:
    """A fresh run id: 12 hex digits of a random UUID."""
    return uuid.uuid4().hex[:12]


def run_files(out: str | os.PathLike) -> list[str]:
    """The entries of :data:`RUN_FILES` present in ``out`` ([] for a missing or empty folder)."""
    out = Path(out)
    return [name for name in RUN_FILES if (out / name).exists()]


class RunLock:
    """The lock of a run folder, held for the life of one run (:meth:`acquire` it; as a context manager it is
    released on exit; :meth:`release` is idempotent).

    Args:
        out: the run folder (created if missing).

    Raises (from :meth:`acquire`):
        RunFolderError: another process holds the lock (its PID is in the message), or the folder cannot be
            created or written (read-only, not a folder, no permission).
    """

    def __init__(self, out: str | os.PathLike) -> None:
        self.out = Path(out)
        self.path = self.out / LOCK_FILE
        self._lock: Any = None

    def acquire(self) -> RunLock:
        """Take the lock without waiting and write this process' PID into it; returns ``self``."""
        import filelock

        try:
            self.out.mkdir(parents=True, exist_ok=True)
            lock = filelock.FileLock(str(self.path), timeout=0)
            lock.acquire()
        except filelock.Timeout:
            raise RunFolderError(
                f"{self.out} is in use by another adaptive-dp run (PID {self._holder()}): wait for it to end or "
                f"stop it, or choose another --out"
            ) from None
        except OSError as exc:
            raise RunFolderError(
                f"cannot write to --out {self.out} ({exc.strerror or exc}): choose a folder you can write to "
                "with --out, or fix the folder's permissions"
            ) from None
        self._lock = lock
        self.path.write_text(f"{os.getpid()}\n", encoding="utf-8")
        return self

    def _holder(self) -> str:
        try:
            return self.path.read_text(encoding="utf-8").strip() or "unknown"
        except OSError:
            return "unknown"

    def release(self) -> None:
        """Give the lock up (the file stays)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


def claim(out: str | os.PathLike, *, overwrite: bool = False) -> tuple[RunLock, Path | None]:
    """Lock ``out`` for a new run.

    Args:
        out: the output folder.
        overwrite: move a run found in ``out`` aside (:func:`set_aside`) instead of refusing the folder.

    Returns:
        ``(lock, moved_to)``: the held lock, and where the previous run went (None when there was none).

    Raises:
        RunFolderError: ``out`` holds a run and ``overwrite`` is False, or :meth:`RunLock.acquire` failed.
    """
    lock = RunLock(out).acquire()
    try:
        found = run_files(out)
        if found and not overwrite:
            raise RunFolderError(
                f"--out {out} holds a run ({', '.join(found)}): continue it with `adaptive-dp train --resume "
                f"{out}`, move it aside with --overwrite (to {Path(out).name}.old-<time>, nothing is deleted), or "
                "choose another --out"
            )
        moved_to = set_aside(out) if found else None
    except BaseException:
        lock.release()
        raise
    return lock, moved_to


def set_aside(out: str | os.PathLike) -> Path:
    """Move everything in ``out`` except the lock file into a new sibling folder ``OUT.old-<UTC time>``
    (suffixed ``-2``, ``-3``, ... if taken); returns that folder. Nothing is deleted."""
    out = Path(out)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    target = out.with_name(f"{out.name}.old-{stamp}")
    n = 2
    while target.exists():
        target = out.with_name(f"{out.name}.old-{stamp}-{n}")
        n += 1
    target.mkdir()
    for entry in sorted(out.iterdir()):
        if entry.name != LOCK_FILE:
            shutil.move(str(entry), str(target / entry.name))
    return target


def check_one_run(
    out: str | os.PathLike,
    *,
    run_id: str | None,
    history: Iterable[Mapping[str, Any]],
    discarded: Iterable[Mapping[str, Any]] = (),
    summary: Mapping[str, Any] | None = None,
) -> None:
    """Refuse a folder whose files belong to different runs (resuming it would continue one run on another's
    records and leave steps uncharged).

    Args:
        out: the run folder (for the message).
        run_id: the checkpoint's run id (None for a checkpoint written before run ids; then the other files
            must carry none either).
        history: the records of ``history.jsonl``; discarded: those of ``discarded_steps.jsonl``.
        summary: ``summary.json`` if there is one.

    Raises:
        RunFolderError: naming each file with records of another run, and their run ids and steps.
    """
    foreign: list[str] = []
    for name, records in (("history.jsonl", history), ("discarded_steps.jsonl", discarded)):
        others = [r for r in records if r.get("run_id") != run_id]
        if others:
            ids = sorted({str(r.get("run_id")) for r in others})
            steps = [r.get("step") for r in others]
            foreign.append(
                f"{name} holds {len(others)} record(s) of run {', '.join(ids)} (steps {steps[0]}–{steps[-1]})"
            )
    if summary is not None and summary.get("run_id") != run_id:
        foreign.append(f"summary.json is of run {summary.get('run_id')}")
    if foreign:
        raise RunFolderError(
            f"{out} mixes files of different runs: checkpoint.pt is run {run_id}, but "
            + "; ".join(foreign)
            + f". Resuming would continue one run on another's records; move the files that are not run {run_id}'s "
            "out of the folder, or start a new run with --overwrite (the folder's files are moved aside)"
        )
