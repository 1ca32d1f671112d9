"""``checkpoint.pt`` of a training run: save (atomically), load (a damaged file is one clear error), the trained
model.

A checkpoint is written when the run starts and after every epoch (``complete: false``, with what
:func:`adaptive_dp.training.restore.restore_run` needs to continue exactly) and at the end (``complete: true``). Every file is readable with
``torch.load(path, weights_only=True)``. torch is imported inside the functions (fast ``--help``).
"""

from __future__ import annotations

import dataclasses
import os
import random
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adaptive_dp.training.config import TrainConfig
from adaptive_dp.training.state import TrainingRun

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

#: file format tag stored in ``checkpoint.pt``.
CHECKPOINT_FORMAT = "adaptive_dp.checkpoint/1"


class CheckpointError(ValueError):
    """A ``checkpoint.pt`` that cannot be used: damaged (empty, cut short), or not an adaptive_dp checkpoint."""


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

    The file is written to ``checkpoint.pt.tmp``, synced, and renamed over ``path``: a crash or a full disk
    leaves the previous checkpoint as it was and no temporary file behind.

    Raises:
        OSError: the write failed (``filename`` is ``path``; e.g. ENOSPC for a full disk).
    """

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
    return save_atomic(path, state)


def save_atomic(path: str | os.PathLike, state: Mapping[str, Any]) -> Path:
    """``torch.save(state)`` to ``path`` atomically: written to ``<path>.tmp``, synced, renamed over ``path``. A
    crash or a full disk leaves the previous file as it was and no temporary file behind.

    Raises:
        OSError: the write failed (``filename`` is ``path``; e.g. ENOSPC for a full disk).
    """
    import torch

    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)  # a full disk must not keep a partial file on it; the old file stays
        if isinstance(exc, OSError) and exc.filename is None:
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
        raise
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
    """Checkpoint fields of every checkpoint (per epoch and final): the run id, the engine's
    ``adaptive_state_dict()`` (controller, monitor, budget filter, history, pending reading; None for a
    non-private run), the starting σ, the audit split, the discarded steps and the resume count."""
    return {
        "run_id": run.run_id,
        "non_private": run.engine is None,
        "adaptive_state": run.engine.adaptive_state_dict() if run.engine is not None else None,
        "initial_noise_multiplier": run.initial_sigma,
        "audit_indices": list(run.audit_indices),
        "discarded_steps": list(run.progress.discarded),
        "resume_count": run.progress.resume_count,
    }


def resume_fields(run: TrainingRun) -> dict[str, Any]:
    """The fields a per-epoch checkpoint adds so that :func:`adaptive_dp.training.restore.restore_run` can
    continue the run exactly: the sampler's and the noise generator's states."""
    fields = {"complete": False, "loader_generator_state": run.generator.get_state()}
    if run.noise_generator is not None:
        fields["noise_generator_state"] = run.noise_generator.get_state()
    return fields


def load_checkpoint(path: str | os.PathLike, *, map_location="cpu") -> dict[str, Any]:
    """Read a ``checkpoint.pt`` written by :func:`adaptive_dp.training.train` (``path`` may be the run folder).

    Raises:
        FileNotFoundError: if there is no checkpoint at ``path``.
        CheckpointError: (a ValueError) the file is empty or damaged (cut short by a copy or a full disk), or
            not an adaptive_dp checkpoint.
        PermissionError: the file cannot be read.
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
    if path.stat().st_size == 0:
        raise _damaged(path, "the file is empty")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except PermissionError:
        raise
    except Exception as exc:  # noqa: BLE001 - torch raises RuntimeError, EOFError, KeyError, OSError ... on damage
        detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:120]
        raise _damaged(path, f"cut short or corrupt: {type(exc).__name__}: {detail}") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path} is not an adaptive_dp checkpoint (expected format {CHECKPOINT_FORMAT!r}): pass the "
            "OUT/checkpoint.pt that `adaptive-dp train` wrote"
        )
    state["path"] = str(path)
    return state


def _damaged(path: Path, why: str) -> CheckpointError:
    return CheckpointError(
        f"{path} is damaged and cannot be used ({why}): restore it from a copy, or train again "
        "(`adaptive-dp train --out DIR`; --overwrite moves a damaged run folder aside)"
    )


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
    if config.get("init"):  # a fine-tuning run: its state dict holds the LoRA adapters too
        from adaptive_dp.training.finetune import with_adapters

        model = with_adapters(model, config)
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
