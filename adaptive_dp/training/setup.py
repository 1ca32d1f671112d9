"""Set-up of a training run: seeds, device, output folder, data (with the audit split), optimizer, privacy engine.

The privacy engine is built in one place, :func:`make_engine`, and wraps model, optimizer and loader in one
place, :func:`make_private`. torch and opacus are imported inside the functions so that ``adaptive-dp --help``
stays fast.
"""

from __future__ import annotations

import os
import random
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adaptive_dp.training.config import DEVICES, TrainConfig

if TYPE_CHECKING:  # pragma: no cover
    import torch


def seed_everything(seed: int) -> None:
    """Seed python's ``random``, numpy's global RNG and torch (CPU and every CUDA device)."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(device: str = "auto") -> torch.device:
    """The torch device for ``--device``: "auto" is CUDA when torch sees a GPU, else CPU.

    Raises:
        ValueError: for an unknown name, or "cuda" when torch sees no GPU (use "auto" or "cpu").
    """
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        return torch.device("cpu")
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda: torch sees no CUDA GPU here; use --device auto or --device cpu")
        return torch.device("cuda")
    raise ValueError(f"unknown device {device!r}; choose one of: {', '.join(DEVICES)}")


def default_out_dir(root: str | os.PathLike = "runs") -> Path:
    """A fresh ``runs/<UTC timestamp>`` folder name (suffixed ``-2``, ``-3``, ... if it exists already)."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    path = Path(root) / stamp
    n = 2
    while path.exists():
        path = Path(root) / f"{stamp}-{n}"
        n += 1
    return path


def load_data(config: TrainConfig) -> tuple[Any, Any, Any, Any]:
    """``(train_set, audit_set, test_set, info)`` of ``config.dataset``.

    With the monitor on, the audit split (``audit_fraction`` of the training set, seeded by ``seed``) is carved
    off first and ``train_set`` is the rest; else ``audit_set`` is None. ``info``: the data set's
    :class:`adaptive_dp.data.DatasetInfo`.

    Raises:
        FileNotFoundError: (``adaptive_dp.data.DataNotFoundError``) the data set is not under the data root.
        ValueError: ``batch_size`` larger than the training set.
    """
    from adaptive_dp.data import audit_split, load_dataset

    full_train_set = load_dataset(config.dataset, split="train", data_dir=config.data_dir)
    test_set = load_dataset(config.dataset, split="test", data_dir=config.data_dir)
    train_set, audit_set = full_train_set, None
    if config.monitor_on:
        train_set, audit_set = audit_split(full_train_set, fraction=config.audit_fraction, seed=config.seed)
    if config.batch_size > len(train_set):
        raise ValueError(
            f"batch_size {config.batch_size} exceeds the training set ({len(train_set)} examples)"
        )
    return train_set, audit_set, test_set, full_train_set.info


def make_loaders(config: TrainConfig, *, train_set, test_set) -> tuple[Any, Any, torch.Generator]:
    """``(train_loader, test_loader, generator)``: the training loader (shuffled, ``batch_size``; ``make_private``
    turns it into a Poisson loader at q = 1 / len(loader) that samples with ``generator``, seeded with
    ``seed``) and the test loader (``test_batch_size``, in order)."""
    import torch
    from torch.utils.data import DataLoader

    generator = torch.Generator().manual_seed(config.seed)
    train_loader = DataLoader(
        train_set,
        batch_size=config.batch_size,
        shuffle=True,
        generator=generator,
        num_workers=config.num_workers,
    )
    test_loader = DataLoader(
        test_set, batch_size=config.test_batch_size, shuffle=False, num_workers=config.num_workers
    )
    return train_loader, test_loader, generator


def make_optimizer(config: TrainConfig, params) -> torch.optim.Optimizer:
    """The (non-private) optimizer opacus wraps: SGD(lr, momentum) or Adam(lr)."""
    import torch

    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr)
    return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum)


def make_engine(config: TrainConfig):
    """The privacy engine for ``config``: ``AdaptivePrivacyEngine(accountant="rdp")`` — the incremental RDP
    accountant (same ε as opacus' ``RDPAccountant`` on the same σ history, O(#orders) per step, so the
    odometer after every step is cheap)."""
    from adaptive_dp.privacy_engine import AdaptivePrivacyEngine

    return AdaptivePrivacyEngine(accountant="rdp")


def make_private(
    engine, config: TrainConfig, *, model, optimizer, data_loader, noise_generator, audit_data=None
):
    """Wrap model, optimizer and loader with ``engine`` (Poisson sampling, flat clipping at ``max_grad_norm``,
    mean loss reduction) and close the leakage loop as ``config`` says.

    With ``target_epsilon``: ``make_private_with_epsilon`` (starting σ from opacus' ``get_noise_multiplier`` for
    ``epochs`` epochs at ``delta``; the Rényi filter floors σ so the guarantee is ``target_epsilon``); else
    ``make_private`` at ``noise_multiplier``. Both get the monitor (``audit_data``, ``estimator``,
    ``token_encoder``, ``monitor_every``), the controller (``target_mi``, ``controller``, σ bounds,
    ``sigma_end`` over the planned ``epochs``) and ``delta`` for the per-step odometer. Without a budget a
    schedule runs from ``noise_multiplier`` (step 1) to ``sigma_end`` (the last planned step); under a budget the
    engine plans it over ``epochs`` / q steps, so it is one step short of ``sigma_end`` at the end (and never
    under the budget's floor).

    Args:
        noise_generator: the ``torch.Generator`` opacus draws the noise from (on the parameters' device; see
            :mod:`adaptive_dp.training.noise`).
        audit_data: the audit split (never trained on), None to run without the monitor.

    Returns:
        (GradSampleModule, DPOptimizer, DPDataLoader).

    Raises:
        ValueError: from the engine, for settings it cannot honour (its message names the fix).
    """
    common = dict(
        module=model,
        optimizer=optimizer,
        data_loader=data_loader,
        max_grad_norm=config.max_grad_norm,
        noise_generator=noise_generator,
        target_mi=config.target_mi,
        controller=config.controller,
        estimator=config.estimator,
        token_encoder=config.token_encoder,
        audit_data=audit_data,
        monitor_every=config.monitor_every,
        sigma_min=config.sigma_min,
        sigma_max=config.sigma_max,
        sigma_end=config.sigma_end,
        seed=config.seed,
    )
    if config.target_epsilon is not None:
        return engine.make_private_with_epsilon(
            **common, target_epsilon=config.target_epsilon, target_delta=config.delta, epochs=config.epochs
        )
    planned_steps = config.epochs * len(data_loader)  # opacus: q = 1 / len(loader), 1 / q steps per epoch
    # the engine spans a schedule over the planned steps: σ_start at step 1, sigma_end at the last one.
    return engine.make_private(
        **common,
        noise_multiplier=config.noise_multiplier,
        total_steps=planned_steps,
        target_delta=config.delta,
    )
