"""``checkpoint.pt`` of a training run: save, load, the trained model, and restoring a run to resume it.

A checkpoint is written after every epoch (``complete: false``, with what :func:`restore_run` needs to
continue exactly) and at the end (``complete: true``). Every file is readable with
``torch.load(path, weights_only=True)``. torch is imported inside the functions (fast ``--help``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adaptive_dp.training.config import TrainConfig
from adaptive_dp.training.noise import reseed_after_lost_steps
from adaptive_dp.training.state import TrainingRun
from adaptive_dp.training.tracking import read_history

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

#: file format tag stored in ``checkpoint.pt``.
CHECKPOINT_FORMAT = "adaptive_dp.checkpoint/1"
#: where the records of steps lost in interruptions go (booked in ε and the budget, not in the model).
DISCARDED_FILE = "discarded_steps.jsonl"


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module inside an opacus GradSampleModule and/or a DPDDP / DDP wrapper (or ``model`` itself)."""
    from adaptive_dp.distributed import unwrap_distributed

    return unwrap_distributed(getattr(model, "_module", model))


def rng_states() -> dict[str, Any]:
    """RNG states of python, numpy and torch (CPU + CUDA), in a form ``torch.load(weights_only=True)`` reads."""
    import numpy as np
    import torch

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    states: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_states` returned."""
    import numpy as np
    import torch

    random.setstate(_as_tuple(states["python"]))
    n = states["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _as_tuple(value: Any) -> Any:
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def save_checkpoint(
    path: str | os.PathLike,
    *,
    model,
    optimizer,
    engine,
    config: TrainConfig,
    dataset_info,
    history,
    epochs,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``checkpoint.pt`` (atomically): everything needed to resume the run or attack the trained model.

    Holds ``model_state_dict`` (plain module keys, without opacus' ``_module.`` prefix),
    ``optimizer_state_dict``, ``accountant_state_dict`` (+ ``accountant`` name), ``config``, ``dataset_info``,
    ``history`` (step records), ``epochs`` (epoch records), ``epoch``, ``step``, ``rng_states`` and
    ``extra`` fields (see :func:`run_state_fields`, :func:`resume_fields` and the final fields of
    :func:`adaptive_dp.training.loop.train`).
    """
    import torch

    accountant = getattr(engine, "accountant", None)
    state = {
        "format": CHECKPOINT_FORMAT,
        "model_state_dict": unwrap_model(model).state_dict(),
        "optimizer_state_dict": optimizer.state_dict(),
        "accountant": accountant.mechanism() if accountant is not None else None,
        "accountant_state_dict": dict(accountant.state_dict()) if accountant is not None else None,
        "config": config.to_dict(),
        "dataset_info": dataclasses.asdict(dataset_info)
        if dataclasses.is_dataclass(dataset_info)
        else dataset_info,
        "history": list(history),
        "epochs": list(epochs),
        "epoch": epochs[-1]["epoch"] if epochs else 0,
        "step": history[-1]["step"] if history else 0,
        "rng_states": rng_states(),
        **dict(extra or {}),
    }
    path = Path(path)
    tmp = path.with_suffix(".pt.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def save_run_checkpoint(run: TrainingRun, extra: Mapping[str, Any]) -> Path:
    """:func:`save_checkpoint` of ``run`` into ``OUT/checkpoint.pt`` with :func:`run_state_fields` and
    ``extra``."""
    return save_checkpoint(
        run.out / "checkpoint.pt",
        model=run.model,
        optimizer=run.optimizer,
        engine=run.engine,
        config=run.config,
        dataset_info=run.info,
        history=run.progress.history,
        epochs=run.progress.epochs,
        extra={**run_state_fields(run), **extra},
    )


def run_state_fields(run: TrainingRun) -> dict[str, Any]:
    """Checkpoint fields of every checkpoint (per epoch and final): the engine's ``adaptive_state_dict()``
    (controller, monitor, budget filter, history, pending reading), the starting σ, the audit split, the
    discarded steps and the resume count."""
    return {
        "adaptive_state": run.engine.adaptive_state_dict(),
        "initial_noise_multiplier": run.initial_sigma,
        "audit_indices": list(run.audit_indices),
        "discarded_steps": list(run.progress.discarded),
        "resume_count": run.progress.resume_count,
    }


def resume_fields(run: TrainingRun) -> dict[str, Any]:
    """The fields a per-epoch checkpoint adds so that :func:`restore_run` can continue the run exactly: the
    Poisson sampler's and the noise generator's states."""
    return {
        "complete": False,
        "loader_generator_state": run.generator.get_state(),
        "noise_generator_state": run.noise_generator.get_state(),
    }


def load_checkpoint(path: str | os.PathLike, *, map_location="cpu") -> dict[str, Any]:
    """Read a ``checkpoint.pt`` written by :func:`adaptive_dp.training.train` (``path`` may be the run folder).

    Raises:
        FileNotFoundError: if there is no checkpoint at ``path``.
        ValueError: if the file is not an adaptive_dp checkpoint.
    """
    import torch

    path = Path(path)
    if path.is_dir():
        path = path / "checkpoint.pt"
    if not path.is_file():
        raise FileNotFoundError(
            f"no checkpoint at {path}: train a model first with `adaptive-dp train --out DIR` "
            "(it writes DIR/checkpoint.pt) and pass that file or DIR"
        )
    state = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not an adaptive_dp checkpoint (expected format {CHECKPOINT_FORMAT!r})")
    state["path"] = str(path)
    return state


def load_trained_model(path: str | os.PathLike, *, map_location="cpu") -> tuple[nn.Module, dict[str, Any]]:
    """The trained model of a run, as a plain hook-free module, and the run's configuration.

    Args:
        path: ``OUT/checkpoint.pt`` or the run folder ``OUT``.
        map_location: passed to ``torch.load``; a device (name) also receives the model.

    Returns:
        (model in eval mode, info): ``info`` is the run config (``dataset``, ``model``, ``max_grad_norm``,
        ``delta``, ``seed``, ...) with ``noise_multiplier`` set to the σ actually used (opacus' choice under
        ``target_epsilon``), plus ``sample_rate``, ``epsilon``, ``test_accuracy``, ``steps``, ``epoch``,
        ``dataset_info`` (dict of :class:`adaptive_dp.data.DatasetInfo` fields) and ``checkpoint`` (path).

    Raises:
        FileNotFoundError: if there is no checkpoint at ``path``.
        ValueError: if the file is not an adaptive_dp checkpoint.
    """
    import torch

    from adaptive_dp.models.cnn import build_model

    state = load_checkpoint(path, map_location=map_location)
    config = dict(state["config"])
    info = dict(state["dataset_info"])
    model = build_model(
        config["model"],
        in_channels=info["in_channels"],
        num_classes=info["num_classes"],
        image_size=info["image_size"],
    )
    model.load_state_dict(state["model_state_dict"])
    if isinstance(map_location, (str, torch.device)):
        model.to(map_location)
    model.eval()
    run = {
        **config,
        "noise_multiplier": state.get("noise_multiplier", config["noise_multiplier"]),
        "sample_rate": state.get("sample_rate"),
        "epsilon": state.get("epsilon"),
        "test_accuracy": state.get("test_accuracy"),
        "steps": state.get("step"),
        "epoch": state.get("epoch"),
        "dataset_info": info,
        "checkpoint": state["path"],
    }
    return model, run


# -- resume -----------------------------------------------------------------------------------------------------
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


def restore_run(state: Mapping[str, Any], run: TrainingRun) -> None:
    """Load a per-epoch checkpoint into a freshly set-up ``run`` and book the steps lost since it was written.

    Model, optimizer, accountant, engine (controller, monitor, Rényi filter), the Poisson sampler's generator
    and the noise generator are restored, and ``run.progress`` is set; the global RNG states are not (the
    caller restores them with :func:`set_rng_states` just before the first resumed step).

    Steps a crashed attempt took after the checkpoint (``OUT/history.jsonl`` records past its step, and
    records in ``OUT/discarded_steps.jsonl`` that a crashed resume booked only in memory) are lost from the
    model, but their noisy gradients were released: they are booked into the accountant and charged to the
    Rényi filter (fail closed: the odometer and the budget only count more), moved to
    ``OUT/discarded_steps.jsonl`` (tagged ``discarded_by_resume``) and dropped from ``history.jsonl``, which
    the resumed run appends to. When steps were lost the noise generator is re-seeded
    (:func:`adaptive_dp.training.noise.reseed_after_lost_steps`), so the replayed steps draw noise independent
    of the lost draws; when none was lost, the resumed run continues exactly as an uninterrupted one.

    Raises:
        ValueError: if the checkpoint is of a finished run, or has no resume state (an older format).
    """
    check_resumable(state)
    unwrap_model(run.model).load_state_dict(state["model_state_dict"])
    run.optimizer.load_state_dict(state["optimizer_state_dict"])
    run.engine.accountant.load_state_dict(state["accountant_state_dict"])
    run.engine.load_adaptive_state_dict(state["adaptive_state"])
    run.generator.set_state(state["loader_generator_state"])
    if "noise_generator_state" in state:
        run.noise_generator.set_state(state["noise_generator_state"])
    progress = run.progress
    progress.history = [dict(r) for r in state["history"]]
    progress.epochs = [dict(r) for r in state["epochs"]]
    progress.epoch_times = [float(r.get("epoch_time_s") or 0.0) for r in progress.epochs]
    progress.step = progress.history[-1]["step"] if progress.history else 0
    progress.resumed_at_step = progress.step
    progress.last_mi = next((r["mi"] for r in reversed(progress.history) if r.get("mi") is not None), None)
    run.initial_sigma = float(state.get("initial_noise_multiplier", run.initial_sigma))
    saved = [dict(r) for r in state.get("discarded_steps", [])]
    unbooked = _discarded_on_disk(run.out)[len(saved) :]
    progress.resume_count = 1 + max(
        [int(state.get("resume_count", 0))] + [int(r.get("discarded_by_resume", 0)) for r in unbooked]
    )
    lost = [
        {**r, "discarded": True, "discarded_by_resume": progress.resume_count}
        for r in _take_lost_records(run.out, kept_step=progress.step)
    ]
    _book(run, [*unbooked, *lost])
    progress.discarded = [*saved, *unbooked, *lost]
    if lost:
        with open(run.out / DISCARDED_FILE, "a", encoding="utf-8") as f:
            f.writelines(json.dumps(record) + "\n" for record in lost)
    if unbooked or lost:
        reseed_after_lost_steps(
            run.noise_generator,
            seed=run.config.seed,
            booked_steps=progress.step + len(progress.discarded),
            resume_count=progress.resume_count,
        )


def _discarded_on_disk(out: Path) -> list[dict[str, Any]]:
    """The records of ``OUT/discarded_steps.jsonl`` (every resume so far), [] without the file."""
    path = out / DISCARDED_FILE
    return read_history(path, torn_tail_ok=True) if path.is_file() else []


def _take_lost_records(out: Path, *, kept_step: int) -> list[dict[str, Any]]:
    """The records in ``OUT/history.jsonl`` past ``kept_step``; rewrites the file without them."""
    history_path = out / "history.jsonl"
    logged = read_history(history_path, torn_tail_ok=True) if history_path.is_file() else []
    lost = [r for r in logged if isinstance(r.get("step"), int) and r["step"] > kept_step]
    tmp = history_path.with_suffix(".jsonl.tmp")
    tmp.write_text(
        "".join(json.dumps(r) + "\n" for r in logged if r.get("step", 0) <= kept_step), encoding="utf-8"
    )
    os.replace(tmp, history_path)
    return lost


def _book(run: TrainingRun, records: list[Mapping[str, Any]]) -> None:
    """Book each record's step in the accountant and charge it to the Rényi filter (if any)."""
    engine = run.engine
    for record in records:
        sigma = float(record["noise_multiplier"])
        sample_rate = float(record.get("sample_rate") or run.sample_rate)
        engine.accountant.step(noise_multiplier=sigma, sample_rate=sample_rate)
        if engine.budget_filter is not None:
            engine.budget_filter.charge(sigma)
