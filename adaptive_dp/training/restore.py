"""Resuming a run: check the folder holds one run, restore its state, and book every step the interruption lost.

Steps a crashed attempt took after the checkpoint it resumes from are lost from the model, but their noisy
gradients were released: they are booked into the accountant and charged to the Rényi filter (fail closed: the
odometer and the budget only count more), moved from ``history.jsonl`` to ``discarded_steps.jsonl`` and their
replays draw fresh noise (:func:`adaptive_dp.training.noise.reseed_after_lost_steps`). A torn last line of
``history.jsonl`` (the crash hit while the record was written) is such a step too: its σ is read from the torn
text when it survived whole, else the lowest σ the run could have used is charged.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from adaptive_dp.training.noise import reseed_after_lost_steps
from adaptive_dp.training.rundir import check_one_run
from adaptive_dp.training.state import TrainingRun
from adaptive_dp.training.tracking import read_history, read_history_tail

#: where the records of steps lost in interruptions go (booked in ε and the budget, not in the model).
DISCARDED_FILE = "discarded_steps.jsonl"
#: fields :func:`restore_run` adds to a lost step's record.
DISCARD_FIELDS = ("discarded", "discarded_by_resume")
#: σ of a torn record, when its text holds the whole number (a comma follows it).
_TORN_SIGMA = re.compile(r'"noise_multiplier":\s*([-+0-9.eE]+)\s*,')


def check_resumable(state: Mapping[str, Any]) -> None:
    """Raise unless ``state`` is a per-epoch checkpoint of an unfinished run.

    Raises:
        ValueError: if the checkpoint is of a finished run, or has no resume state (an older format).
    """
    if state.get("complete", True) or "loader_generator_state" not in state:
        raise ValueError(
            f"{state.get('path', 'the checkpoint')} is the checkpoint of a finished run (or of a version without "
            "per-epoch checkpoints): nothing to resume; start a new run with another --out"
        )


def check_run_folder(state: Mapping[str, Any], out: str | os.PathLike) -> None:
    """Refuse to resume a folder whose history, lost-step records or summary are not the checkpoint's run.

    Raises:
        adaptive_dp.training.rundir.RunFolderError: naming the files of another run.
    """
    out = Path(out)
    history = read_history_tail(out / "history.jsonl")[0] if (out / "history.jsonl").is_file() else []
    summary_path = out / "summary.json"
    try:
        summary = json.loads(summary_path.read_text(encoding="utf-8")) if summary_path.is_file() else None
    except json.JSONDecodeError:
        summary = {"run_id": "<unreadable summary.json>"}
    check_one_run(
        out, run_id=state.get("run_id"), history=history, discarded=_discarded_on_disk(out), summary=summary
    )


def restore_run(state: Mapping[str, Any], run: TrainingRun) -> None:
    """Load a per-epoch checkpoint into a freshly set-up ``run`` and book the steps lost since it was written.

    Model, optimizer, accountant, engine (controller, monitor, Rényi filter), the sampler's generator and the
    noise generator are restored, and ``run.progress`` is set; the global RNG states are not (the caller
    restores them with :func:`adaptive_dp.training.checkpoint.set_rng_states` just before the first resumed
    step). Lost steps (``history.jsonl`` records past the checkpoint's step, its torn last line, and records in
    ``discarded_steps.jsonl`` that a crashed resume booked only in memory) are booked (see the module doc);
    when none was lost, the resumed run continues exactly as an uninterrupted one.

    Raises:
        ValueError: if the checkpoint is of a finished run, or has no resume state (an older format).
    """
    check_resumable(state)
    _load_states(state, run)
    progress = run.progress
    saved = [dict(r) for r in state.get("discarded_steps", [])]
    unbooked = _discarded_on_disk(run.out)[len(saved) :]
    progress.resume_count = 1 + max(
        [int(state.get("resume_count", 0))] + [int(r.get("discarded_by_resume", 0)) for r in unbooked]
    )
    seen = [_without_discard_fields(r) for r in unbooked]
    lost = [
        {**r, "discarded": True, "discarded_by_resume": progress.resume_count}
        for r in _lost_records(run, kept_step=progress.step)
        if _without_discard_fields(r) not in seen  # a crash between the two files' writes: booked already
    ]
    lost = _book(run, [*unbooked, *lost])[len(unbooked) :]
    progress.discarded = [*saved, *unbooked, *lost]
    if lost:  # first the lost records, then the history without them: a crash in between loses none
        _append_discarded(run.out, lost)
    _rewrite_history(run.out, kept_step=progress.step)
    if (unbooked or lost) and run.noise_generator is not None:
        reseed_after_lost_steps(
            run.noise_generator,
            seed=run.config.seed,
            booked_steps=progress.step + len(progress.discarded),
            resume_count=progress.resume_count,
        )


def _load_states(state: Mapping[str, Any], run: TrainingRun) -> None:
    """The checkpoint's model, optimizer, accountant, engine and generator states, and the run's progress."""
    from adaptive_dp.training.checkpoint import unwrap_model

    unwrap_model(run.model).load_state_dict(state["model_state_dict"])
    run.optimizer.load_state_dict(state["optimizer_state_dict"])
    if run.engine is not None:
        run.engine.accountant.load_state_dict(state["accountant_state_dict"])
        run.engine.load_adaptive_state_dict(state["adaptive_state"])
    run.generator.set_state(state["loader_generator_state"])
    if "noise_generator_state" in state and run.noise_generator is not None:
        run.noise_generator.set_state(state["noise_generator_state"])
    progress = run.progress
    progress.history = [dict(r) for r in state["history"]]
    progress.epochs = [dict(r) for r in state["epochs"]]
    progress.epoch_times = [float(r.get("epoch_time_s") or 0.0) for r in progress.epochs]
    progress.step = progress.history[-1]["step"] if progress.history else 0
    progress.resumed_at_step = progress.step
    progress.last_mi = next((r["mi"] for r in reversed(progress.history) if r.get("mi") is not None), None)
    run.initial_sigma = float(state.get("initial_noise_multiplier", run.initial_sigma))


def _without_discard_fields(record: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k not in DISCARD_FIELDS}


def _discarded_on_disk(out: Path) -> list[dict[str, Any]]:
    """The records of ``OUT/discarded_steps.jsonl`` (every resume so far), [] without the file."""
    path = Path(out) / DISCARDED_FILE
    return read_history(path, torn_tail_ok=True) if path.is_file() else []


def _lost_records(run: TrainingRun, *, kept_step: int) -> list[dict[str, Any]]:
    """The records in ``OUT/history.jsonl`` past ``kept_step``, plus one for a torn last line (σ None when the
    torn text does not hold it whole; :func:`_book` then charges the lowest σ the run could have used)."""
    path = run.out / "history.jsonl"
    if not path.is_file():
        return []
    logged, torn = read_history_tail(path)
    lost = [r for r in logged if isinstance(r.get("step"), int) and r["step"] > kept_step]
    if torn is not None:
        last = max([kept_step] + [r["step"] for r in logged if isinstance(r.get("step"), int)])
        match = _TORN_SIGMA.search(torn)
        lost.append(
            {
                "step": last + 1,
                "noise_multiplier": float(match.group(1)) if match else None,
                "sample_rate": _highest_rate(run),
                "torn_record": True,
                "run_id": run.run_id,
            }
        )
    return lost


def _rewrite_history(out: Path, *, kept_step: int) -> None:
    """``OUT/history.jsonl`` without the records past ``kept_step`` and without a torn last line (atomic)."""
    path = out / "history.jsonl"
    if not path.is_file():
        return
    kept = [r for r in read_history_tail(path)[0] if r.get("step", 0) <= kept_step]
    _write_jsonl(path, kept)


def _append_discarded(out: Path, records: list[dict[str, Any]]) -> None:
    """Add ``records`` to ``OUT/discarded_steps.jsonl`` (rewritten atomically, so never torn)."""
    path = out / DISCARDED_FILE
    _write_jsonl(path, [*_discarded_on_disk(out), *records])


def _write_jsonl(path: Path, records: list[Mapping[str, Any]]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _book(run: TrainingRun, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Book each record's step in the accountant and charge it to the Rényi filter (if any), in order; a record
    without σ (a torn one) gets the lowest σ the run could have used at that point (fail closed). Returns the
    records with every σ filled in. A non-private run books nothing."""
    engine = run.engine
    booked = []
    for record in records:
        if engine is not None:
            if record.get("noise_multiplier") is None:
                record = {**record, "noise_multiplier": _lowest_sigma(run), "noise_multiplier_assumed": True}
            sigma = float(record["noise_multiplier"])
            sample_rate = float(record.get("sample_rate") or run.sample_rate)
            engine.accountant.step(noise_multiplier=sigma, sample_rate=sample_rate)
            if engine.budget_filter is not None:  # at the step's own q (--spend-budget sample-rate)
                engine.budget_filter.charge(sigma, sample_rate=sample_rate)
        booked.append(record)
    return booked


def _highest_rate(run: TrainingRun) -> float:
    """The highest q the run's next step could have used: ``--spend-budget sample-rate``'s cap, else the fixed q
    (charging it with the lowest σ charges the most a torn step could have cost)."""
    spender = getattr(getattr(run.engine, "control_loop", None), "spender", None)
    return spender.max_rate if spender is not None and spender.mode == "sample-rate" else run.sample_rate


def _lowest_sigma(run: TrainingRun) -> float:
    """The lowest σ the run's next step could have used: the controller's σ_min (or the fixed σ without a
    controller), raised to the budget's floor; charging it charges the most a step could have cost."""
    engine = run.engine
    lowest = (
        float(engine.sigma_min) if engine.sigma_min is not None else float(run.optimizer.noise_multiplier)
    )
    if engine.budget_filter is not None:
        floor = engine.budget_filter.floor()
        if math.isfinite(floor):
            lowest = max(lowest, floor)
    return lowest
