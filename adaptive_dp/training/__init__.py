"""Training runs behind ``adaptive-dp train``, one module per stage: ``config`` (TrainConfig), ``setup`` (data,
optimizer, privacy engine), ``noise`` (the noise generator), ``loop`` (train, resume), ``records`` (what a step
publishes), ``checkpoint`` (save, load, restore), ``summary``, ``tracking`` (W&B + JSONL) and ``plots``."""

from adaptive_dp.training.checkpoint import load_trained_model
from adaptive_dp.training.config import TrainConfig
from adaptive_dp.training.loop import evaluate, resume, train

__all__ = ["TrainConfig", "evaluate", "load_trained_model", "resume", "train"]
