"""Training runs behind ``adaptive-dp train``: config, loop, checkpoints, tracking (W&B + JSONL), plots."""

from adaptive_dp.training.loop import TrainConfig, evaluate, load_trained_model, resume, train

__all__ = ["TrainConfig", "evaluate", "load_trained_model", "resume", "train"]
