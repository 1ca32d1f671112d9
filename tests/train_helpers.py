"""Helpers shared by the `adaptive-dp train` tests (not a test module: pytest collects only test_*.py)."""

from __future__ import annotations

import argparse

from adaptive_dp.cli import parse_with_given
from adaptive_dp.cli import train as train_command
from adaptive_dp.training.config import TrainConfig


def run_cli(argv: list[str]) -> int:
    """``adaptive-dp train ARGV`` through the command's own parser and run(), with the explicitly given options
    marked as the dispatcher marks them."""
    parser = argparse.ArgumentParser(prog="adaptive-dp train")
    train_command.configure(parser)
    return train_command.run(parse_with_given(parser, argv))


def tiny_config(tmp_path, **overrides) -> TrainConfig:
    """A one-epoch digits run on the CPU without W&B, writing into ``tmp_path``; ``overrides`` win."""
    options = dict(
        dataset="digits", epochs=1, batch_size=128, wandb_mode="disabled", out=str(tmp_path), device="cpu"
    )
    options.update(overrides)
    return TrainConfig(**options)
