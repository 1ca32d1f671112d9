"""Set-up of a training run: seeds, device, output folder, data (with the audit split), optimizer, privacy engine.

The privacy engine is built in one place, :func:`make_engine`, and wraps model, optimizer and loader in one
place, :func:`make_private`. torch and opacus are imported inside the functions so that ``adaptive-dp --help``
stays fast.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adaptive_dp.training.config import DEVICES, GRAD_SAMPLE_MODES, TrainConfig
from adaptive_dp.training.plan import check_audit_split
from adaptive_dp.training.spend import spend_options

if TYPE_CHECKING:  # pragma: no cover
    import torch

#: the fastest correct grad-sample mode per model, measured on this project's 2-core CPU machine (shared, so
#: ±20 % noise): one DP-SGD step (forward, per-sample gradients, clip, noise, update) on 3×32×32 inputs, the four
#: modes interleaved over rounds, median ms per step; every mode's update at σ = 0 matches hooks' to ≤ 1.2e-7.
#:
#:   model      batch   hooks  functorch     ew   ghost
#:   small-cnn     64     156        231    166     181
#:   small-cnn    128     299        424    288     331
#:   small-cnn    256     889       1101    977     838
#:   lenet         64      72         95     61      86
#:   lenet        128     115        136    113     147
#:   lenet        256     249        300    948    1250
#:   tanh-cnn      64    1887       1735   1651    1537
#:   tanh-cnn     128    4850       5053   5052    4356
#:   tanh-cnn     256    9059      11437  11375   10226
#:   resnet20      64    2051       1923   2112    2351
#:   resnet20     128    4017       2788   3758    4502
#:   resnet20     256    7656       6476   8386   10438
#:
#: hooks is fastest or within the noise for small-cnn and lenet; for tanh-cnn no mode wins at every batch size
#: (ghost at 64–128, hooks at 256), so opacus' default stays; functorch is fastest for resnet20 at every size.
#: Models not listed get "hooks", opacus' default.
FASTEST_GRAD_SAMPLE_MODE: dict[str, str] = {
    "small-cnn": "hooks",
    "tanh-cnn": "hooks",
    "lenet": "hooks",
    "resnet20": "functorch",
}


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


@dataclass(frozen=True)
class RunData:
    """The data of a run: ``train_set`` (what is trained on), ``audit_set`` (the held-out audit split, None
    without one), ``test_set``, ``info`` (:class:`adaptive_dp.data.DatasetInfo`) and ``full_size`` (examples
    of the whole training set)."""

    train_set: Any
    audit_set: Any
    test_set: Any
    info: Any
    full_size: int


def load_data(config: TrainConfig) -> RunData:
    """The data of ``config.dataset``, with the audit split carved off first (``audit_fraction`` of the training
    set, seeded by ``seed``; also for a non-private run, so that it trains on the same examples as the DP run
    it is the reference for) and checked (:func:`adaptive_dp.training.plan.check_audit_split`). With ``init`` the
    public examples of the pretrain checkpoint are removed first and the audit split is carved from the rest
    (:func:`adaptive_dp.training.finetune.private_splits`).

    Raises:
        FileNotFoundError: (``adaptive_dp.data.DataNotFoundError``) the data set is not under the data root.
        ValueError: the audit split leaves fewer training examples than a batch, or under half of the data
            set (unless ``force``).
    """
    from adaptive_dp.data import audit_split, load_dataset

    full_train_set = load_dataset(config.dataset, split="train", data_dir=config.data_dir)
    test_set = load_dataset(config.dataset, split="test", data_dir=config.data_dir)
    train_set, audit_set, pool_size = full_train_set, None, len(full_train_set)
    if config.init:  # fine-tuning: the public examples of the pretrained init leave the private pool first
        from adaptive_dp.training.finetune import private_splits

        train_set, audit_set, pool_size = private_splits(config, full_train_set)
    elif config.audit_fraction:
        train_set, audit_set = audit_split(full_train_set, fraction=config.audit_fraction, seed=config.seed)
    check_audit_split(config, train_size=len(train_set), full_size=pool_size)
    return RunData(train_set, audit_set, test_set, full_train_set.info, len(full_train_set))


def resolve_grad_sample_mode(mode: str, *, model: str) -> str:
    """opacus' per-sample-gradient mode for ``--grad-sample-mode``: ``mode`` itself, or for "auto" the fastest
    mode measured for ``model`` (:data:`FASTEST_GRAD_SAMPLE_MODE`; "hooks", opacus' default, for others).

    Raises:
        ValueError: an unknown mode.
    """
    if mode not in GRAD_SAMPLE_MODES:
        raise ValueError(f"unknown grad_sample_mode {mode!r}; choose one of: {', '.join(GRAD_SAMPLE_MODES)}")
    return FASTEST_GRAD_SAMPLE_MODE.get(model, "hooks") if mode == "auto" else mode


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
    engine,
    config: TrainConfig,
    *,
    model,
    optimizer,
    data_loader,
    noise_generator,
    audit_data=None,
    grad_sample_mode: str = "hooks",
):
    """Wrap model, optimizer and loader with ``engine`` (Poisson sampling, flat clipping at ``max_grad_norm``,
    mean loss reduction) and close the leakage loop as ``config`` says.

    With ``target_epsilon``: ``make_private_with_epsilon`` (starting σ from opacus' ``get_noise_multiplier`` for
    ``epochs`` epochs at ``delta``; the Rényi filter floors σ so the guarantee is ``target_epsilon``); else
    ``make_private`` at ``noise_multiplier``. Both get the monitor (``audit_data``, ``estimator``,
    ``token_encoder``, ``monitor_every``), the controller (``target_mi``, ``controller``, σ bounds,
    ``sigma_end`` over the planned ``epochs``), the canaries (``canaries``, ``canary_mode``, ``canary_kind``; input
    canaries change the training set, so q) and ``delta`` for the per-step odometer. Without a budget a
    schedule runs from ``noise_multiplier`` (step 1) to ``sigma_end`` (the last planned step); under a budget the
    engine plans it over ``epochs`` / q steps, so it is one step short of ``sigma_end`` at the end (and never
    under the budget's floor).

    Args:
        noise_generator: the ``torch.Generator`` opacus draws the noise from (on the parameters' device; see
            :mod:`adaptive_dp.training.noise`).
        audit_data: the audit split (never trained on), None to run without the monitor.
        grad_sample_mode: opacus' per-sample-gradient mode (:func:`resolve_grad_sample_mode`).

    Returns:
        (GradSampleModule, DPOptimizer, criterion, DPDataLoader): the criterion is mean cross-entropy, or in
        ghost mode the one opacus returns (its ``backward`` runs both passes of ghost clipping).

    Raises:
        ValueError: from the engine, for settings it cannot honour (its message names the fix).
    """
    import torch

    common = dict(
        module=model,
        optimizer=optimizer,
        criterion=torch.nn.CrossEntropyLoss(),
        grad_sample_mode=grad_sample_mode,
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
        canaries=config.canaries,
        canary_mode=config.canary_mode,
        canary_kind=config.canary_kind,
        **spend_options(config),  # --spend-budget: more steps or larger batches (adaptive_dp.control.spend)
    )
    if config.target_epsilon is not None:
        out = engine.make_private_with_epsilon(
            **common, target_epsilon=config.target_epsilon, target_delta=config.delta, epochs=config.epochs
        )
    else:
        planned_steps = config.epochs * len(data_loader)  # opacus: q = 1 / len(loader), 1 / q steps per epoch
        # the engine spans a schedule over the planned steps: σ_start at step 1, sigma_end at the last one.
        out = engine.make_private(
            **common,
            noise_multiplier=config.noise_multiplier,
            total_steps=planned_steps,
            target_delta=config.delta,
        )
    if len(out) == 4:  # ghost mode
        return out
    module, dp_optimizer, loader = out
    return module, dp_optimizer, common["criterion"], loader
