"""The training loop of ``adaptive-dp train`` as a library function: DP-SGD on a registered data set and model.

:func:`train` runs DP-SGD with Poisson sampling (opacus' default), records one step record per optimizer
step (σ used, ε odometer at δ, loss, and the leakage fields the adaptive engine fills in) and the test
accuracy after every epoch, and writes ``history.jsonl``, ``summary.json``, ``tradeoff.png``,
``checkpoint.pt`` and a W&B run (offline by default) into the output folder.

The privacy engine is built in one place, :func:`make_engine`; today it is opacus'
``PrivacyEngine(accountant="rdp")``, so ``target_mi``/``controller`` are refused with a clear error.

torch and opacus are imported inside the functions so that ``adaptive-dp --help`` stays fast.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

logger = logging.getLogger(__name__)

#: devices ``--device`` accepts.
DEVICES = ("auto", "cpu", "cuda")
#: optimizers ``--optimizer`` accepts.
OPTIMIZERS = ("sgd", "adam")
#: file format tag stored in ``checkpoint.pt``.
CHECKPOINT_FORMAT = "adaptive_dp.checkpoint/1"
#: fields of a step record that the adaptive engine fills in (None with opacus' PrivacyEngine).
ADAPTIVE_FIELDS = ("mi", "mi_gap", "sigma_floor", "controller_error")


@dataclass
class TrainConfig:
    """All options of ``adaptive-dp train`` (defaults: DP-SGD on digits, well above chance in about a minute
    on 2 CPU cores).

    Attributes:
        dataset: registered data set name ("digits", "mnist", "fashion-mnist", "cifar10").
        data_dir: data root (None: ``$ADAPTIVE_DP_DATA``, see :func:`adaptive_dp.data.get_data_root`).
        model: registered model name ("small-cnn", "tanh-cnn", "resnet20", "lenet").
        epochs: training epochs (one epoch = 1 / sample rate optimizer steps); ≥ 1.
        batch_size: expected (Poisson) batch size; sample rate q = batch_size / len(train set).
        lr: learning rate.
        optimizer: "sgd" or "adam".
        momentum: SGD momentum (ignored by Adam).
        noise_multiplier: σ, noise std / max_grad_norm; ignored when ``target_epsilon`` is given.
        max_grad_norm: per-sample gradient clipping norm C.
        target_epsilon: if given, σ is chosen by opacus so that ``epochs`` epochs spend this ε at ``delta``.
        delta: δ of every reported ε.
        target_mi: MI ceiling in nats (needs the adaptive engine).
        controller: noise controller name (needs the adaptive engine).
        seed: seeds python, numpy and torch (initialisation, Poisson sampling, noise).
        device: "auto" (CUDA when torch sees a GPU), "cpu" or "cuda".
        wandb_mode: "offline", "online", "disabled", or None (online when an API key is configured).
        wandb_project: W&B project name.
        out: output folder (None: ``runs/<UTC timestamp>``).
        test_batch_size: batch size for evaluation (no privacy cost).
        num_workers: DataLoader worker processes.
    """

    dataset: str = "digits"
    data_dir: str | None = None
    model: str = "small-cnn"
    epochs: int = 5
    batch_size: int = 64
    lr: float = 0.5
    optimizer: str = "sgd"
    momentum: float = 0.0
    noise_multiplier: float = 1.0
    max_grad_norm: float = 1.0
    target_epsilon: float | None = None
    delta: float = 1e-5
    target_mi: float | None = None
    controller: str | None = None
    seed: int = 0
    device: str = "auto"
    wandb_mode: str | None = None
    wandb_project: str = "adaptive-dp"
    out: str | None = None
    test_batch_size: int = 1024
    num_workers: int = 0

    def validate(self) -> None:
        """Check every option.

        Raises:
            ValueError: naming the option, the value and what is allowed.
        """
        _positive_int("epochs", self.epochs)
        _positive_int("batch_size", self.batch_size)
        _positive_int("test_batch_size", self.test_batch_size)
        if isinstance(self.num_workers, bool) or not isinstance(self.num_workers, int) or self.num_workers < 0:
            raise ValueError(f"num_workers must be an integer >= 0, got {self.num_workers!r}")
        _positive_float("lr", self.lr)
        _positive_float("max_grad_norm", self.max_grad_norm)
        if not (isinstance(self.noise_multiplier, (int, float)) and math.isfinite(self.noise_multiplier)
                and self.noise_multiplier >= 0):
            raise ValueError(f"noise_multiplier must be a finite number >= 0, got {self.noise_multiplier!r}")
        if not (0 <= self.momentum < 1):
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum!r}")
        if not (0 < self.delta < 1):
            raise ValueError(f"delta must be in (0, 1) (typically < 1 / training-set size), got {self.delta!r}")
        if self.target_epsilon is not None:
            _positive_float("target_epsilon", self.target_epsilon)
        if self.target_mi is not None:
            _positive_float("target_mi", self.target_mi)
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose one of: {', '.join(OPTIMIZERS)}")
        if self.device not in DEVICES:
            raise ValueError(f"unknown device {self.device!r}; choose one of: {', '.join(DEVICES)}")
        if self.wandb_mode is not None and self.wandb_mode not in ("offline", "online", "disabled"):
            raise ValueError(f"unknown wandb_mode {self.wandb_mode!r}; choose offline, online or disabled")

    def to_dict(self) -> dict[str, Any]:
        """The options as a plain dict (JSON-able)."""
        return dataclasses.asdict(self)


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def _positive_float(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


# -- set-up -----------------------------------------------------------------------------------------------------
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


def check_engine_support(config: TrainConfig) -> None:
    """Refuse options the current privacy engine cannot honour.

    Raises:
        NotImplementedError: for ``target_mi`` or ``controller``: they need the adaptive engine
            (``adaptive_dp.engine.AdaptivePrivacyEngine``), which this training loop does not use yet.
    """
    asked = [f"--{name.replace('_', '-')}" for name in ("target_mi", "controller") if getattr(config, name) is not None]
    if asked:
        raise NotImplementedError(
            f"{' and '.join(asked)} need the adaptive engine (adaptive_dp.engine.AdaptivePrivacyEngine, which "
            "measures leakage and adapts σ); this build trains with opacus' PrivacyEngine at a fixed noise "
            "multiplier. Drop the option(s) and set --noise-multiplier or --target-epsilon instead."
        )


def make_engine(config: TrainConfig):
    """The privacy engine for ``config``: opacus' ``PrivacyEngine(accountant="rdp")``.

    Raises:
        NotImplementedError: see :func:`check_engine_support`.
    """
    check_engine_support(config)
    from opacus import PrivacyEngine

    return PrivacyEngine(accountant="rdp")


def make_private(engine, config: TrainConfig, *, model, optimizer, data_loader):
    """Wrap model, optimizer and loader with ``engine`` (Poisson sampling, flat clipping at
    ``max_grad_norm``, mean loss reduction): ``make_private_with_epsilon`` when ``target_epsilon`` is given
    (σ chosen so that ``epochs`` epochs spend it at ``delta``), else ``make_private`` at ``noise_multiplier``.

    Returns:
        (GradSampleModule, DPOptimizer, DPDataLoader).
    """
    common = dict(module=model, optimizer=optimizer, data_loader=data_loader, max_grad_norm=config.max_grad_norm)
    if config.target_epsilon is not None:
        return engine.make_private_with_epsilon(
            **common, target_epsilon=config.target_epsilon, target_delta=config.delta, epochs=config.epochs
        )
    return engine.make_private(**common, noise_multiplier=config.noise_multiplier)


def make_optimizer(config: TrainConfig, params) -> torch.optim.Optimizer:
    """The (non-private) optimizer opacus wraps: SGD(lr, momentum) or Adam(lr)."""
    import torch

    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr)
    return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum)


# -- per-step and per-epoch records -----------------------------------------------------------------------------
def adaptive_fields(engine) -> dict[str, Any]:
    """The leakage/controller fields of the step just taken: from ``engine.history[-1]`` when the engine
    keeps one (the adaptive engine does), else all None."""
    history = getattr(engine, "history", None)
    last = history[-1] if history else {}
    return {field: last.get(field) for field in ADAPTIVE_FIELDS}


def make_step_record(
    *,
    step: int,
    epoch: int,
    noise_multiplier: float,
    epsilon: float,
    loss: float,
    batch_size: int,
    sample_rate: float,
    lr: float,
    mi: float | None = None,
    mi_gap: float | None = None,
    sigma_floor: float | None = None,
    controller_error: float | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """One line of ``history.jsonl``: the optimizer step's numbers.

    Args:
        step: 1-based optimizer step.
        epoch: 1-based epoch.
        noise_multiplier: σ used for this step (noise std = σ · max_grad_norm).
        epsilon: accountant's ε at the run's δ after this step (odometer).
        loss: mean training loss of the step's batch (NaN for an empty Poisson batch).
        batch_size: size of the (Poisson) batch.
        sample_rate: q.
        lr: learning rate used.
        mi, mi_gap: leakage reading taken at this step (nats), None when none was taken.
        sigma_floor: the ε-budget floor on σ for this step, None without a budget filter.
        controller_error: the controller's error (reading − target), None without a controller.
        extra: further fields, written as given.
    """
    record = {
        "step": int(step),
        "epoch": int(epoch),
        "noise_multiplier": float(noise_multiplier),
        "epsilon": float(epsilon),
        "loss": float(loss),
        "batch_size": int(batch_size),
        "sample_rate": float(sample_rate),
        "lr": float(lr),
        "mi": mi,
        "mi_gap": mi_gap,
        "sigma_floor": sigma_floor,
        "controller_error": controller_error,
    }
    record.update(extra)
    return record


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


@functools.lru_cache(maxsize=1024)
def _rdp_one_step(noise_multiplier: float, sample_rate: float, orders: tuple[float, ...]):
    """RDP of one sampled-Gaussian step at every order (opacus' ``compute_rdp``, steps=1), cached."""
    from opacus.accountants.analysis.rdp import compute_rdp

    return compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=list(orders))


def odometer_epsilon(engine, delta: float) -> float:
    """ε at ``delta`` of the σ history used so far: ``engine.get_epsilon(delta)``, computed fast.

    For opacus' ``RDPAccountant`` (whose ``get_epsilon`` recomputes the fractional-order RDP of every history
    entry, ~0.3 s per call here) the per-step RDP of each (σ, q) is cached and composed linearly, as
    ``compute_rdp`` does (RDP of T steps = T × RDP of one); the conversion is opacus' own ``get_privacy_spent``
    over its default orders, so the value equals ``engine.get_epsilon(delta)``. Any other accountant is asked
    directly.

    Source: Mironov 2017 (RDP composition); Mironov, Talwar & Zhang 2019 (sampled Gaussian RDP), as in opacus.
    """
    from opacus.accountants import RDPAccountant

    accountant = getattr(engine, "accountant", None)
    if type(accountant) is not RDPAccountant:
        return float(engine.get_epsilon(delta))
    if not accountant.history:
        return 0.0
    from opacus.accountants.analysis.rdp import get_privacy_spent

    orders = tuple(RDPAccountant.DEFAULT_ALPHAS)
    rdp = sum(_rdp_one_step(float(sigma), float(q), orders) * steps for sigma, q, steps in accountant.history)
    epsilon, _ = get_privacy_spent(orders=list(orders), rdp=rdp, delta=delta)
    return float(epsilon)


def _fmt(value: float | None, digits: int = 3) -> str:
    return "–" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


# -- checkpoints ------------------------------------------------------------------------------------------------
def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module inside an opacus GradSampleModule (or ``model`` itself)."""
    return getattr(model, "_module", model)


def rng_states() -> dict[str, Any]:
    """RNG states of python, numpy and torch (CPU + CUDA), in a form ``torch.load(weights_only=True)`` reads."""
    import numpy as np
    import torch

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    states: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
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
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _as_tuple(value: Any) -> Any:
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def save_checkpoint(path: str | os.PathLike, *, model, optimizer, engine, config: TrainConfig, dataset_info,
                    history, epochs, extra: Mapping[str, Any] | None = None) -> Path:
    """Write ``checkpoint.pt``: everything needed to resume the run or attack the trained model.

    Holds ``model_state_dict`` (plain module keys, without opacus' ``_module.`` prefix),
    ``optimizer_state_dict``, ``accountant_state_dict`` (+ ``accountant`` name), ``config``, ``dataset_info``,
    ``history`` (step records), ``epochs`` (epoch records), ``epoch``, ``step``, ``rng_states`` and
    ``extra`` fields (noise multiplier used, sample rate, ε, test accuracy ...). Readable with
    ``torch.load(path, weights_only=True)``.
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
        "dataset_info": dataclasses.asdict(dataset_info) if dataclasses.is_dataclass(dataset_info) else dataset_info,
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


def load_checkpoint(path: str | os.PathLike, *, map_location="cpu") -> dict[str, Any]:
    """Read a ``checkpoint.pt`` written by :func:`train` (``path`` may be the run folder).

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

    from adaptive_dp.models import build_model

    state = load_checkpoint(path, map_location=map_location)
    config = dict(state["config"])
    info = dict(state["dataset_info"])
    model = build_model(config["model"], in_channels=info["in_channels"], num_classes=info["num_classes"],
                        image_size=info["image_size"])
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


# -- the loop -----------------------------------------------------------------------------------------------------
def _versions() -> dict[str, str]:
    import opacus
    import torch

    from adaptive_dp import __version__

    return {"adaptive_dp": __version__, "torch": torch.__version__, "opacus": opacus.__version__}


def train(config: TrainConfig, *, progress: bool = True) -> dict[str, Any]:
    """Train with DP-SGD as ``config`` says and write the run's outputs into ``config.out``.

    Per optimizer step: σ used, ε (accountant odometer at ``delta``), loss (and MI fields once the adaptive
    engine exists) go to ``history.jsonl`` and W&B; per epoch: test accuracy. At the end: ``tradeoff.png``,
    ``checkpoint.pt`` (see :func:`save_checkpoint`) and ``summary.json``.

    Args:
        config: the options (validated here).
        progress: show a tqdm progress bar per epoch (loss, σ, ε, MI).

    Returns:
        The summary (also in ``OUT/summary.json``): ``test_accuracy``, ``test_loss``, ``epsilon``, ``delta``,
        ``noise_multiplier``, ``sample_rate``, ``steps``, ``epochs``, ``wall_time_s``, ``epoch_times_s``,
        ``per_epoch``, ``device``, ``dataset``, ``model``, ``config``, ``outputs`` (paths), ``wandb``, ``versions``.

    Raises:
        ValueError: bad options (unknown data set/model/device ...).
        FileNotFoundError: (``adaptive_dp.data.DataNotFoundError``) the data set is not under the data root.
        NotImplementedError: ``target_mi``/``controller`` without the adaptive engine.
    """
    import torch
    from torch.nn import functional as F
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    from adaptive_dp.data import load_dataset
    from adaptive_dp.models import build_model
    from adaptive_dp.plots import plot_tradeoff
    from adaptive_dp.tracking import Tracker

    t_start = time.perf_counter()
    config = dataclasses.replace(config)
    config.validate()
    check_engine_support(config)
    device = resolve_device(config.device)

    train_set = load_dataset(config.dataset, split="train", data_dir=config.data_dir)
    test_set = load_dataset(config.dataset, split="test", data_dir=config.data_dir)
    info = train_set.info
    if config.batch_size > len(train_set):
        raise ValueError(f"batch_size {config.batch_size} exceeds the training set ({len(train_set)} examples)")

    out = Path(config.out) if config.out else default_out_dir()
    config.out = str(out)
    seed_everything(config.seed)
    model = build_model(config.model, in_channels=info.in_channels, num_classes=info.num_classes,
                        image_size=info.image_size, seed=config.seed).to(device)
    optimizer = make_optimizer(config, model.parameters())
    generator = torch.Generator().manual_seed(config.seed)
    train_loader = DataLoader(train_set, batch_size=config.batch_size, shuffle=True, generator=generator,
                              num_workers=config.num_workers)
    test_loader = DataLoader(test_set, batch_size=config.test_batch_size, shuffle=False,
                             num_workers=config.num_workers)
    engine = make_engine(config)
    model, optimizer, train_loader = make_private(engine, config, model=model, optimizer=optimizer,
                                                  data_loader=train_loader)
    sample_rate = float(getattr(train_loader, "sample_rate", 1.0 / len(train_loader)))
    history: list[dict[str, Any]] = []
    epoch_records: list[dict[str, Any]] = []
    epoch_times: list[float] = []
    step = 0
    with Tracker(out, config=config.to_dict(), mode=config.wandb_mode, project=config.wandb_project,
                 run_name=out.name) as tracker:
        for epoch in range(1, config.epochs + 1):
            t_epoch = time.perf_counter()
            model.train()
            losses: list[float] = []
            bar = tqdm(train_loader, desc=f"epoch {epoch}/{config.epochs}", disable=not progress,
                       dynamic_ncols=True, leave=True)
            for x, y in bar:
                x, y = x.to(device), y.to(device)
                optimizer.zero_grad(set_to_none=True)
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                optimizer.step()
                step += 1
                record = make_step_record(
                    step=step, epoch=epoch, noise_multiplier=optimizer.noise_multiplier,
                    epsilon=odometer_epsilon(engine, config.delta), loss=loss.item(), batch_size=len(y),
                    sample_rate=sample_rate, lr=optimizer.param_groups[0]["lr"], **adaptive_fields(engine),
                )
                history.append(record)
                tracker.log_step(record)
                if math.isfinite(record["loss"]):
                    losses.append(record["loss"])
                bar.set_postfix_str(
                    f"loss={_fmt(record['loss'])} σ={_fmt(record['noise_multiplier'])} "
                    f"ε={_fmt(record['epsilon'], 2)} MI={_fmt(record['mi'])}", refresh=False,
                )
            bar.close()
            epoch_times.append(time.perf_counter() - t_epoch)
            test = evaluate(model, test_loader, device=device)
            last = history[-1] if history else {}
            epoch_record = {
                "epoch": epoch, "step": step, "epsilon": last.get("epsilon"), "mi": last.get("mi"),
                "test_accuracy": test["accuracy"], "test_loss": test["loss"],
                "noise_multiplier": last.get("noise_multiplier"),
                "train_loss": sum(losses) / len(losses) if losses else None,
                "epoch_time_s": epoch_times[-1],
            }
            epoch_records.append(epoch_record)
            tracker.log_epoch(epoch_record)
            if progress:
                tqdm.write(f"epoch {epoch}: test accuracy {test['accuracy']:.4f}, ε = {_fmt(last.get('epsilon'))} "
                           f"at δ = {config.delta:g}, {epoch_times[-1]:.1f} s")

        final = epoch_records[-1]
        noise_multiplier = float(optimizer.noise_multiplier)
        outputs = {
            "dir": str(out),
            "history": str(tracker.history_path),
            "summary": str(tracker.summary_path),
            "tradeoff": str(out / "tradeoff.png"),
            "checkpoint": str(out / "checkpoint.pt"),
            "wandb": str(tracker.wandb_dir) if tracker.wandb_dir is not None else None,
        }
        try:
            plot_tradeoff(history, epoch_records, outputs["tradeoff"], delta=config.delta, target_mi=config.target_mi,
                          title=f"{config.dataset} / {config.model}: DP-SGD")
            tracker.log_image(outputs["tradeoff"], "plots/tradeoff")
        except Exception as exc:  # noqa: BLE001 - a plotting failure must not lose the trained model
            logger.warning("could not draw the trade-off figure: %s", exc)
            outputs["tradeoff"] = None
        save_checkpoint(
            outputs["checkpoint"], model=model, optimizer=optimizer, engine=engine, config=config,
            dataset_info=info, history=history, epochs=epoch_records,
            extra={"noise_multiplier": noise_multiplier, "sample_rate": sample_rate,
                   "epsilon": final["epsilon"], "delta": config.delta, "test_accuracy": final["test_accuracy"]},
        )
        summary = {
            "test_accuracy": final["test_accuracy"],
            "test_loss": final["test_loss"],
            "epsilon": final["epsilon"],
            "delta": config.delta,
            "epsilon_meaning": "RDP accountant composition of the noise multipliers used (opacus get_epsilon)",
            "noise_multiplier": noise_multiplier,
            "max_grad_norm": config.max_grad_norm,
            "sample_rate": sample_rate,
            "steps": step,
            "epochs": config.epochs,
            "wall_time_s": time.perf_counter() - t_start,
            "epoch_times_s": epoch_times,
            "per_epoch": epoch_records,
            "device": str(device),
            "engine": f"{type(engine).__module__}.{type(engine).__name__}",
            "dataset": {"name": info.name, "train_size": len(train_set), "test_size": len(test_set),
                        "num_classes": info.num_classes, "image_size": info.image_size},
            "model": config.model,
            "config": config.to_dict(),
            "outputs": outputs,
            "wandb": {"mode": tracker.mode, "dir": outputs["wandb"],
                      "file": str(tracker.wandb_file) if tracker.wandb_file is not None else None},
            "versions": _versions(),
        }
        tracker.finish(summary)
    return json.loads(json.dumps(summary))
