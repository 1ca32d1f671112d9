"""Training runs behind ``adaptive-dp train``, one module per stage: ``config`` (TrainConfig), ``plan`` (the
audit split's and the budget's sanity, checked first), ``rundir`` (one run per folder, its lock, run ids),
``setup`` (data, optimizer, privacy engine, grad-sample mode), ``noise`` (the noise generator), ``loop`` (train,
resume), ``records`` (what a step publishes), ``checkpoint`` (save, load), ``restore`` (resume and the lost
steps it books), ``interrupt`` (Ctrl-C / SIGTERM), ``progress`` (bar or log lines), ``summary``, ``tracking``
(W&B + JSONL) and ``plots``.

The names below are loaded on first use (PEP 562), so that importing one stage (e.g. ``tracking`` from
``adaptive_dp.distributed``) does not import the loop and, through it, the privacy engine.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from adaptive_dp.training.checkpoint import load_trained_model
    from adaptive_dp.training.config import TrainConfig
    from adaptive_dp.training.loop import evaluate, resume, train

__all__ = ["TrainConfig", "evaluate", "load_trained_model", "resume", "train"]

_HOMES = {
    "TrainConfig": "adaptive_dp.training.config",
    "evaluate": "adaptive_dp.training.loop",
    "load_trained_model": "adaptive_dp.training.checkpoint",
    "resume": "adaptive_dp.training.loop",
    "train": "adaptive_dp.training.loop",
}


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
