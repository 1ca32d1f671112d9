"""The training loop of ``adaptive-dp train`` as a library function: DP-SGD on a registered data set and model.

:func:`train` runs DP-SGD with Poisson sampling (opacus' default), records one step record per optimizer
step (σ used, ε odometer at δ, and the leakage fields the adaptive engine fills in; see
:mod:`adaptive_dp.training.records` for what is published by default) and the test accuracy after every
epoch, and writes ``history.jsonl``, ``summary.json``, ``tradeoff.png``, ``checkpoint.pt`` and a W&B run
(offline by default) into the output folder. :func:`resume` continues an interrupted run.

The stages live in their own modules: options (:mod:`~adaptive_dp.training.config`), the plan's sanity
(:mod:`~adaptive_dp.training.plan`), the run folder and its lock (:mod:`~adaptive_dp.training.rundir`), set-up
and the privacy engine (:mod:`~adaptive_dp.training.setup`, :mod:`~adaptive_dp.training.noise`), records
(:mod:`~adaptive_dp.training.records`), checkpoints (:mod:`~adaptive_dp.training.checkpoint`) and resume
(:mod:`~adaptive_dp.training.restore`), signals (:mod:`~adaptive_dp.training.interrupt`), progress
(:mod:`~adaptive_dp.training.progress`), the summary (:mod:`~adaptive_dp.training.summary`), tracking and the
figure. ``non_private`` trains the same model on the same data with the plain optimizer (no engine). By default an audit split (2 % of
the training set, carved off *before* the private loader is built and never trained on) feeds the leakage
monitor, so MI (nats) is logged every ``monitor_every`` steps; ``target_mi`` + ``controller`` close the loop
(σ adapts), ``target_epsilon`` adds a hard budget kept by a Rényi filter (the guarantee). When the budget
cannot pay for another step (``PrivacyBudgetExhausted``), training stops early: the model trained so far, the
checkpoint and the summary (``stopped_early: true`` and the reason) are written as usual.

torch and opacus are imported inside the functions so that ``adaptive-dp --help`` stays fast.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adaptive_dp.training.canary_report import record_canary_audit
from adaptive_dp.training.checkpoint import (
    load_checkpoint,
    load_trained_model,
    resume_fields,
    save_run_checkpoint,
    set_rng_states,
)
from adaptive_dp.training.config import TrainConfig
from adaptive_dp.training.interrupt import RunInterrupted, StopSignals
from adaptive_dp.training.noise import make_noise_generator
from adaptive_dp.training.plan import check_budget
from adaptive_dp.training.progress import EpochProgress, fmt
from adaptive_dp.training.records import adaptive_fields, make_epoch_record, make_step_record, step_epsilon
from adaptive_dp.training.restore import check_resumable, check_run_folder, restore_run
from adaptive_dp.training.rundir import RunLock, claim, new_run_id
from adaptive_dp.training.setup import (
    RunData,
    default_out_dir,
    load_data,
    make_engine,
    make_loaders,
    make_optimizer,
    make_private,
    resolve_device,
    resolve_grad_sample_mode,
    seed_everything,
)
from adaptive_dp.training.spend import run_epochs, step_privacy_fields
from adaptive_dp.training.state import TrainingRun
from adaptive_dp.training.summary import build_summary, output_paths, privacy_figures

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

# ``load_trained_model`` and ``resolve_device`` are re-exported: ``adaptive_dp.cli.attack`` imports them from here.
__all__ = ["TrainConfig", "evaluate", "load_trained_model", "resolve_device", "resume", "train"]

logger = logging.getLogger(__name__)


def evaluate(model: nn.Module, data, *, device=None, batch_size: int = 1024) -> dict[str, float]:
    """Test accuracy and mean cross-entropy of ``model`` on a data set or loader (no privacy cost).

    Args:
        model: classifier, input [B, C, H, W], output [B, K] logits (a GradSampleModule works too).
        data: a ``Dataset`` of (x, y) or a ``DataLoader``.
        device: where to run (default: the device of the model's first parameter).
        batch_size: batch size when ``data`` is a Dataset.

    Returns:
        ``{"accuracy": fraction in [0, 1], "loss": mean cross-entropy (nats), "n": examples}``.

    Raises:
        ValueError: if ``data`` is empty.
    """
    import torch
    from torch.nn import functional as F
    from torch.utils.data import DataLoader

    if device is None:
        device = next(model.parameters()).device
    loader = data if isinstance(data, DataLoader) else DataLoader(data, batch_size=batch_size, shuffle=False)
    was_training = model.training
    model.eval()
    correct, total, loss_sum = 0, 0, 0.0
    with torch.no_grad():
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            logits = model(x)
            loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
            correct += (logits.argmax(dim=1) == y).sum().item()
            total += y.numel()
    model.train(was_training)
    if total == 0:
        raise ValueError("cannot evaluate on an empty data set")
    return {"accuracy": correct / total, "loss": loss_sum / total, "n": total}


def train(
    config: TrainConfig,
    *,
    progress: bool = True,
    overwrite: bool = False,
    _resume_state: Mapping[str, Any] | None = None,
    _lock: RunLock | None = None,
) -> dict[str, Any]:
    """Train as ``config`` says (DP-SGD, or plain SGD with ``non_private``) and write the run's outputs into
    ``config.out`` (see the module doc for what each file holds).

    Before anything is built or written the plan is checked (:mod:`adaptive_dp.training.plan`) and the folder
    claimed (:mod:`adaptive_dp.training.rundir`: a folder holding a run is refused unless ``overwrite`` moves
    it aside; a lock keeps a second run out). Per optimizer step a record (σ used, ε odometer at ``delta``, the
    run id, the monitor's and controller's fields; the training-batch ``loss`` and ``batch_size`` only with
    ``log_private_metrics`` or ``non_private``) goes to ``history.jsonl`` and W&B; per epoch the test accuracy.
    A budget that cannot pay for another step stops training early (``stopped_early: true``; no exception).
    ``checkpoint.pt`` is written at the start and after every epoch (atomically), so :func:`resume` continues a
    crashed or interrupted run. SIGINT / SIGTERM finish the step in flight, write the summary and close the
    W&B run, then raise :class:`~adaptive_dp.training.interrupt.RunInterrupted` (single process only).

    Args:
        config: the options (validated here).
        progress: report progress: a tqdm bar per epoch on a terminal, a few lines per epoch otherwise.
        overwrite: move a run found in ``config.out`` aside to ``OUT.old-<UTC time>`` instead of refusing.

    Returns:
        The summary (also ``OUT/summary.json``; :func:`adaptive_dp.training.summary.build_summary`):
        ``test_accuracy``, ``epsilon`` (the odometer; None for a non-private run), ``guarantee_epsilon``,
        ``noise_multiplier_range``, ``steps``, ``stopped_early``, the leakage figures, ``run_id``, ``outputs``...

    Raises:
        ValueError: bad options; a budget above ``sigma_max`` or out of reach; an audit split leaving too little
            (see :mod:`adaptive_dp.training.plan`); ``RunFolderError``: the folder holds a run, is in use, or
            cannot be written.
        FileNotFoundError: (``adaptive_dp.data.DataNotFoundError``) the data set is not under the data root.
        RunInterrupted: SIGINT / SIGTERM stopped the run (after writing what it had).
        OSError: a write failed (e.g. a full disk); the previous checkpoint stays intact.
    """
    from adaptive_dp import distributed as ddp

    t_start = time.perf_counter()
    config = dataclasses.replace(config)
    config.validate()
    device = resolve_device(config.device)
    if not ddp.launched_by_torchrun():
        return _train(
            config,
            device=device,
            progress=progress,
            t_start=t_start,
            context=None,
            resume_state=_resume_state,
            lock=_lock,
            overwrite=overwrite,
        )
    if _resume_state is not None or config.non_private:
        raise NotImplementedError(
            "resuming a run, or a --non-private run, under torchrun is not supported yet; run it in one process "
            "(without torchrun)"
        )
    # under torchrun: one process per rank, DPDDP + opacus' distributed optimizer (rank 0 adds the noise)
    owned = not ddp.is_distributed()
    context = ddp.init_distributed(timeout_s=config.dist_timeout, device=str(device))
    try:
        return _train(
            config,
            device=device,
            progress=progress and context.is_main,
            t_start=t_start,
            context=context,
            overwrite=overwrite,
        )
    finally:
        if owned:
            ddp.shutdown()


def resume(out: str | os.PathLike, *, progress: bool = True, wandb_mode: str | None = None) -> dict[str, Any]:
    """Continue an interrupted :func:`train` run from the last checkpoint in ``out``.

    The options are the saved run's (``checkpoint.pt`` holds its :class:`TrainConfig`); only the W&B mode
    may change. Training continues at the epoch after the last finished one with the same batches, noise
    and controller state as an uninterrupted run would have (same machine and versions), and appends to
    ``out/history.jsonl``; the W&B run is a new one named ``<out>-resumed-at-step-<k>``. Steps taken after
    the checkpoint (a torn last line of the history included) are booked, never forgotten, and their replays
    draw fresh noise (see :mod:`adaptive_dp.training.restore`); the summary counts them in
    ``discarded_steps``.

    Returns:
        The summary of the finished run, as :func:`train` returns it.

    Raises:
        FileNotFoundError: no ``checkpoint.pt`` in ``out``.
        ValueError: the run is finished already; the checkpoint is damaged or not an adaptive_dp checkpoint
            (``CheckpointError``); another run holds the folder, or its files belong to different runs
            (``RunFolderError``).
        RunInterrupted, OSError: as :func:`train`.
    """
    load_checkpoint(out)  # a missing or damaged checkpoint fails before the folder is locked
    with RunLock(out).acquire() as lock:
        state = load_checkpoint(out)
        check_resumable(state)
        check_run_folder(state, out)
        config = TrainConfig.from_dict(state["config"])
        config.out = str(Path(out))
        if wandb_mode is not None:
            config.wandb_mode = wandb_mode
        return train(config, progress=progress, _resume_state=state, _lock=lock)


def _train(
    config: TrainConfig,
    *,
    device,
    progress: bool,
    t_start: float,
    context,
    overwrite: bool = False,
    resume_state: Mapping[str, Any] | None = None,
    lock: RunLock | None = None,
) -> dict[str, Any]:
    """:func:`train` after validation: check the plan, claim the folder, set up, run the epochs, finish.

    ``context``: the DistributedContext under torchrun, else None; ``resume_state``: a checkpoint to continue
    from and ``lock`` the folder's lock :func:`resume` holds."""
    from adaptive_dp import distributed as ddp

    data = load_data(config)
    check_budget(config, train_size=len(data.train_set))
    run_id = resume_state.get("run_id") if resume_state is not None else new_run_id()
    out = Path(config.out) if config.out else default_out_dir()
    if context is not None:  # rank 0's folder (a timestamped default differs between ranks) and run id
        out, run_id = ddp.broadcast_object((str(out), run_id), what="broadcast of the output folder")
        out = Path(out)
    config.out = str(out)
    moved_to = None
    if lock is None and (context is None or context.is_main):
        lock, moved_to = claim(out, overwrite=overwrite)
    try:
        run = _set_up(config, data, out=out, device=device, context=context, t_start=t_start)
        run.run_id, run.previous_run = run_id, moved_to
        if resume_state is not None:
            restore_run(resume_state, run)
        rng = resume_state["rng_states"] if resume_state is not None else None
        return _run(run, progress=progress, resume_rng_states=rng)
    except (Exception, KeyboardInterrupt) as exc:  # a second Ctrl-C is a KeyboardInterrupt too
        if not isinstance(exc, RunInterrupted) and lock is not None and (out / "checkpoint.pt").is_file():
            exc.add_note(f"continue the run with `adaptive-dp train --resume {out}`")
        raise
    finally:
        if lock is not None:
            lock.release()


def _run(run: TrainingRun, *, progress: bool, resume_rng_states: Mapping[str, Any] | None) -> dict[str, Any]:
    """Open the tracker, write the starting checkpoint (fresh runs), run the epochs, finish (or stop on a
    signal); ``resume_rng_states``: the global RNG states of the checkpoint a resumed run continues from."""
    resumed = resume_rng_states is not None
    signals = StopSignals() if run.context is None else contextlib.nullcontext()
    with signals:  # from here on a signal stops the run after the step in flight (also during W&B's init)
        run.tracker = _open_tracker(run, resumed=resumed)
        with run.tracker:
            return _run_epochs(run, progress=progress, signals=signals, resume_rng_states=resume_rng_states)


def _run_epochs(run: TrainingRun, *, progress: bool, signals: Any, resume_rng_states) -> dict[str, Any]:
    """The epochs of :func:`_run` inside its tracker and signal handling."""
    config = run.config
    if resume_rng_states is not None:  # last: nothing between here and the first step may draw random numbers
        set_rng_states(resume_rng_states)
    elif run.is_main:  # a run stopped in its first epoch can be resumed too
        save_run_checkpoint(run, resume_fields(run))
    for epoch in range(len(run.progress.epochs) + 1, run_epochs(config) + 1):  # --spend-budget steps: more
        if getattr(signals, "received", None):
            break
        _run_epoch(run, epoch, show=progress, signals=signals)
        if run.progress.stop_reason is not None:
            break
    run.progress.interrupted = getattr(signals, "received", None)
    if run.progress.interrupted is not None:
        _stop_interrupted(run)
    return _finish_run(run)


def _set_up(config: TrainConfig, data: RunData, *, out: Path, device, context, t_start: float) -> TrainingRun:
    """Seeds, model, optimizer, loaders, and (unless non-private) the noise generator and the privacy engine's
    ``make_private``; under DDP each rank Poisson-samples its shard at the global q."""
    import torch

    from adaptive_dp import distributed as ddp
    from adaptive_dp.training.finetune import build_run_model

    seed_everything(config.seed)
    info = data.info
    model = build_run_model(config, info).to(device)  # with --init: the pretrained weights (+ LoRA adapters)
    if context is not None:
        model = ddp.wrap_model(model)  # DPDDP: rank 0's initial parameters on every rank
    optimizer = make_optimizer(config, [p for p in model.parameters() if p.requires_grad])
    train_loader, test_loader, generator = make_loaders(
        config, train_set=data.train_set, test_set=data.test_set
    )
    engine = noise_generator = mode = None
    criterion = torch.nn.CrossEntropyLoss()
    if not config.non_private:
        noise_generator = make_noise_generator(config.seed, device=device)
        engine = make_engine(config)
        mode = resolve_grad_sample_mode(config.grad_sample_mode, model=config.model)
        model, optimizer, criterion, train_loader = make_private(
            engine,
            config,
            model=model,
            optimizer=optimizer,
            data_loader=train_loader,
            noise_generator=noise_generator,
            audit_data=data.audit_set,
            grad_sample_mode=mode,
        )
    if context is not None:  # each rank Poisson-samples its shard at the global q, with its own generator
        train_loader = ddp.distributed_poisson_loader(
            train_loader, generator=torch.Generator().manual_seed(config.seed + 1_000_003 * context.rank)
        )
    audit = data.audit_set
    return TrainingRun(
        config=config,
        device=device,
        context=context,
        out=out,
        info=info,
        sizes={
            "train_size": len(data.train_set),
            "audit_size": len(audit) if audit else 0,
            "test_size": len(data.test_set),
        },
        audit_indices=list(getattr(audit, "indices", [])) if audit is not None else [],
        model=model,
        optimizer=optimizer,
        train_loader=train_loader,
        criterion=criterion,
        test_loader=test_loader,
        engine=engine,
        generator=generator,
        noise_generator=noise_generator,
        t_start=t_start,
        sample_rate=float(getattr(train_loader, "sample_rate", 1.0 / len(train_loader))),
        initial_sigma=float(optimizer.noise_multiplier) if engine is not None else 0.0,
        grad_sample_mode=mode,
    )


def _open_tracker(run: TrainingRun, *, resumed: bool):
    """The run's Tracker (rank 0 / single process) and, under DDP, the RankTracker of every rank (its own
    ``OUT/history.rank<R>.jsonl``); a resumed run appends to ``history.jsonl`` and opens a new W&B run."""
    from adaptive_dp import distributed as ddp
    from adaptive_dp.training.tracking import Tracker

    config, step = run.config, run.progress.step
    tracker = None
    if run.is_main:
        tracker = Tracker(
            run.out,
            config=config.to_dict(),
            mode=config.wandb_mode,
            project=config.wandb_project,
            run_name=f"{run.out.name}-resumed-at-step-{step}" if resumed else run.out.name,
            resume=resumed,
        )
        tracker.restore_epochs(run.progress.epochs, last_step=step if resumed else None)
    if run.context is not None:
        tracker = ddp.RankTracker(run.out, rank=run.context.rank, main=tracker)
    return tracker


def _run_epoch(run: TrainingRun, epoch: int, *, show: bool, signals: Any = None) -> None:
    """One pass over the loader (stops at a step the budget refuses, or after the step in flight when a signal
    came), then :func:`_end_epoch` (not after a signal: the epoch is not finished)."""
    t_epoch = time.perf_counter()
    run.model.train()
    batch_losses: list[float] = []
    bar = EpochProgress(
        run.train_loader,
        epoch=epoch,
        epochs=run_epochs(run.config),
        show=show,
        loss_in_lines=_publishes_batch_stats(run),
    )
    for x, y in bar:
        loss = _take_step(run, epoch, x, y)
        if loss is None:
            break
        if math.isfinite(loss):
            batch_losses.append(loss)
        record = run.progress.history[-1]
        bar.update(
            loss=loss, sigma=record["noise_multiplier"], epsilon=record["epsilon"], mi=run.progress.last_mi
        )
        if getattr(signals, "received", None):
            bar.close()
            return
    bar.close()
    _end_epoch(run, epoch, batch_losses=batch_losses, t_epoch=t_epoch, show=show)


def _publishes_batch_stats(run: TrainingRun) -> bool:
    """Whether the training-batch loss and size are published: on request, and always without DP (ε = ∞)."""
    return run.config.log_private_metrics or run.config.non_private


def _take_step(run: TrainingRun, epoch: int, x, y) -> float | None:
    """One optimizer step on the batch ``(x, y)``; records and logs it. Returns the batch loss (for the progress
    bar), or None when the Rényi filter refused the step (nothing was booked; ``stop_reason`` is set)."""
    from adaptive_dp.accountants.filter import PrivacyBudgetExhausted

    x, y = x.to(run.device), y.to(run.device)
    run.optimizer.zero_grad(set_to_none=True)
    loss = run.criterion(run.model(x), y)
    loss.backward()  # in ghost mode: both passes of ghost clipping
    try:
        run.optimizer.step()
    except PrivacyBudgetExhausted as exc:
        run.progress.stop_reason = str(exc)
        return None
    progress, publish = run.progress, _publishes_batch_stats(run)
    progress.step += 1
    batch_loss = loss.item()
    record = make_step_record(
        step=progress.step,
        epoch=epoch,
        noise_multiplier=run.optimizer.noise_multiplier if run.engine is not None else 0.0,
        epsilon=step_epsilon(run.engine, run.config.delta),
        **step_privacy_fields(run),  # the step's q and the guarantee ε so far
        lr=run.optimizer.param_groups[0]["lr"],
        **adaptive_fields(run.engine),
        loss=batch_loss if publish else None,
        batch_size=len(y) if publish else None,
        run_id=run.run_id,
    )
    progress.history.append(record)
    run.tracker.log_step(record)
    if record["mi"] is not None:
        progress.last_mi = record["mi"]
    return batch_loss


def _end_epoch(
    run: TrainingRun, epoch: int, *, batch_losses: list[float], t_epoch: float, show: bool
) -> None:
    """Test metrics, the epoch record, and the per-epoch checkpoint (not after the last epoch, nor when the
    budget stopped training: the final checkpoint follows)."""
    progress, config = run.progress, run.config
    progress.epoch_times.append(time.perf_counter() - t_epoch)
    test = evaluate(run.model, run.test_loader, device=run.device)
    record = make_epoch_record(
        epoch=epoch,
        step=progress.step,
        history=progress.history,
        test=test,
        noise_multiplier=float(run.optimizer.noise_multiplier) if run.engine is not None else 0.0,
        last_mi=progress.last_mi,
        epoch_time_s=progress.epoch_times[-1],
        batch_losses=batch_losses if _publishes_batch_stats(run) else None,
    )
    progress.epochs.append(record)
    run.tracker.log_epoch(record)
    if progress.stop_reason is None and epoch < run_epochs(config) and run.is_main:
        save_run_checkpoint(run, resume_fields(run))
    if show:
        epsilon = (
            "∞ (non-private)" if run.engine is None else f"{fmt(record['epsilon'])} at δ = {config.delta:g}"
        )
        print(
            f"epoch {epoch}: test accuracy {test['accuracy']:.4f}, ε = {epsilon}, MI = {fmt(progress.last_mi)} "
            f"nats, {progress.epoch_times[-1]:.1f} s",
            flush=True,
        )
        if progress.stop_reason is not None:
            print(f"stopped early after {progress.step} steps: {progress.stop_reason}", flush=True)


def _stop_interrupted(run: TrainingRun) -> None:
    """Write the summary of a run a signal stopped (the last checkpoint stays: the run can be resumed), close
    the W&B run, and raise :class:`RunInterrupted`."""
    from adaptive_dp.training.interrupt import EXIT_CODES

    command = f"adaptive-dp train --resume {run.out}"
    outputs = output_paths(run)
    outputs["tradeoff"] = None
    summary = build_summary(run, outputs=outputs, figures=privacy_figures(run))
    summary["resume_command"] = command
    code = EXIT_CODES.get(run.progress.interrupted, 1)
    run.tracker.finish(summary, exit_code=code)
    raise RunInterrupted(
        signal_name=run.progress.interrupted, summary=json.loads(json.dumps(summary)), resume_command=command
    )


def _finish_run(run: TrainingRun) -> dict[str, Any]:
    """Trade-off figure, final checkpoint, canary audit and summary of a (possibly stopped-early) run; returns
    the summary.

    Under DDP only rank 0 draws the figure and writes the checkpoint and summary.
    """
    outputs = output_paths(run)
    figures = privacy_figures(run)
    if run.is_main:
        budget = figures["guarantee_epsilon"] if figures["guarantee_kind"] == "renyi-filter" else None
        _write_figure(run, outputs, guarantee_epsilon=budget)
        save_run_checkpoint(
            run,
            {
                "complete": True,
                "noise_multiplier": figures["noise_multiplier"],
                "sample_rate": run.sample_rate,
                "epsilon": figures["epsilon"],
                "odometer_epsilon": figures["epsilon"],
                "guarantee_epsilon": figures["guarantee_epsilon"],
                "guarantee_kind": figures["guarantee_kind"],
                "delta": run.config.delta,
                "test_accuracy": run.progress.epochs[-1]["test_accuracy"],
                "stopped_early": run.progress.stop_reason is not None,
            },
        )
    figures["empirical_epsilon"] = record_canary_audit(run, outputs)
    summary = build_summary(run, outputs=outputs, figures=figures)
    run.tracker.finish(summary)
    return json.loads(json.dumps(summary))


def _write_figure(run: TrainingRun, outputs: dict[str, Any], *, guarantee_epsilon: float | None) -> None:
    """``tradeoff.png`` with the budget's ε (``guarantee_epsilon``, None without a budget) as a line (its path set to None in ``outputs`` if drawing fails: a plotting failure must not lose
    the trained model); its training curve is the audit loss unless the run publishes the batch loss."""
    from adaptive_dp.training.plots import plot_tradeoff

    config = run.config
    kind = "non-private SGD" if config.non_private else "DP-SGD"
    try:
        plot_tradeoff(
            run.progress.history,
            run.progress.epochs,
            outputs["tradeoff"],
            delta=config.delta,
            target_mi=config.target_mi,
            guarantee_epsilon=guarantee_epsilon,
            loss_field="loss" if _publishes_batch_stats(run) else "audit_loss",
            title=f"{config.dataset} / {config.model}: {kind}"
            + (f", {config.controller}" if config.controller else ""),
        )
        run.tracker.log_image(outputs["tradeoff"], "plots/tradeoff")
    except Exception as exc:  # noqa: BLE001 - a plotting failure must not lose the trained model
        logger.warning("could not draw the trade-off figure: %s", exc)
        outputs["tradeoff"] = None
