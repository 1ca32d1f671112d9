"""The state of one training run, passed between the stages (set-up, loop, checkpoint, summary).

:class:`TrainingRun` holds what the set-up built (the private model, optimizer and loaders, the engine, the
generators) and :class:`RunProgress` what the loop accumulates (step and epoch records, lost steps). The
checkpoint stores the progress and the objects' states; :func:`adaptive_dp.training.checkpoint.restore_run`
puts them back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adaptive_dp.training.config import TrainConfig


@dataclass
class RunProgress:
    """What the training loop has done so far.

    Attributes:
        history: the step records kept (published: ``history.jsonl``), one per optimizer step.
        epochs: the epoch records.
        epoch_times: wall time of each epoch, seconds.
        step: optimizer steps taken and kept.
        last_mi: the latest MI reading (nats), None before the first.
        stop_reason: why training stopped early (the budget is exhausted), None while it goes on.
        discarded: records of the steps lost in interruptions (booked, not in the model), every resume.
        resumed_at_step: the step a resumed run continued after, None for a run that was not resumed.
        resume_count: resumes this run's state has been through (0 for an uninterrupted run).
        interrupted: the signal that stopped the run ("SIGINT", "SIGTERM"), None while it goes on.
    """

    history: list[dict[str, Any]] = field(default_factory=list)
    epochs: list[dict[str, Any]] = field(default_factory=list)
    epoch_times: list[float] = field(default_factory=list)
    step: int = 0
    last_mi: float | None = None
    stop_reason: str | None = None
    discarded: list[dict[str, Any]] = field(default_factory=list)
    resumed_at_step: int | None = None
    resume_count: int = 0
    interrupted: str | None = None


@dataclass
class TrainingRun:
    """One training run: its options, the objects the set-up built, and its :class:`RunProgress`.

    Attributes:
        config: the validated options (``config.out`` is the output folder).
        device: the torch device.
        context: the ``adaptive_dp.distributed.DistributedContext`` under torchrun, else None.
        out: the output folder.
        info: the data set's :class:`adaptive_dp.data.DatasetInfo`.
        sizes: ``train_size`` (audit split excluded), ``audit_size``, ``test_size``.
        audit_indices: indices of the audit split in the full training set.
        model, optimizer, train_loader: what ``make_private`` returned (GradSampleModule, DPOptimizer,
            Poisson DPDataLoader); the plain model, optimizer and shuffled loader of a non-private run.
        criterion: the loss of a step (mean cross-entropy; in ghost mode the criterion ``make_private``
            returned, whose ``backward`` does the two passes of ghost clipping).
        test_loader: the test split's loader.
        engine: the privacy engine (None for a non-private run).
        generator: the Poisson sampler's generator (the batches).
        noise_generator: the generator opacus draws the noise from (see :mod:`adaptive_dp.training.noise`; None
            for a non-private run).
        run_id: the run's id, written into every record, checkpoint and summary
            (:mod:`adaptive_dp.training.rundir`).
        grad_sample_mode: opacus' per-sample-gradient mode in use (None for a non-private run).
        previous_run: where ``--overwrite`` moved the run found in the folder (None when there was none).
        sample_rate: q.
        initial_sigma: the starting σ (opacus' choice under ``target_epsilon``).
        t_start: ``time.perf_counter()`` when :func:`adaptive_dp.training.train` was called.
        progress: what the loop has done so far.
        tracker: the run's Tracker (``RankTracker`` under DDP), set when the loop opens it.
    """

    config: TrainConfig
    device: Any
    context: Any
    out: Path
    info: Any
    sizes: dict[str, int]
    audit_indices: list[int]
    model: Any
    optimizer: Any
    train_loader: Any
    criterion: Any
    test_loader: Any
    engine: Any
    generator: Any
    noise_generator: Any
    sample_rate: float
    initial_sigma: float
    t_start: float
    run_id: str | None = None
    grad_sample_mode: str | None = None
    previous_run: Path | None = None
    progress: RunProgress = field(default_factory=RunProgress)
    tracker: Any = None

    @property
    def is_main(self) -> bool:
        """Whether this process writes the run's files (always, except on ranks > 0 under DDP)."""
        return self.context is None or self.context.is_main
