"""The training loop of ``adaptive-dp train`` as a library function: DP-SGD on a registered data set and model.

:func:`train` runs DP-SGD with Poisson sampling (opacus' default), records one step record per optimizer
step (σ used, ε odometer at δ, loss, and the leakage fields the adaptive engine fills in) and the test
accuracy after every epoch, and writes ``history.jsonl``, ``summary.json``, ``tradeoff.png``,
``checkpoint.pt`` and a W&B run (offline by default) into the output folder.

The privacy engine is built in one place, :func:`make_engine`: :class:`adaptive_dp.privacy_engine.AdaptivePrivacyEngine`
with the incremental RDP accountant (the same ε as opacus' RDP accountant, O(#orders) per step). By default an
audit split (2 % of the training set, carved off *before* the private loader is built and never trained on) feeds
the leakage monitor, so MI (nats) is logged every ``monitor_every`` steps; ``target_mi`` + ``controller`` close the
loop (σ adapts), ``target_epsilon`` adds a hard budget kept by a Rényi filter (the guarantee). When the budget
cannot pay for another step (``PrivacyBudgetExhausted``), training stops early: the model trained so far, the
checkpoint and the summary (``stopped_early: true`` and the reason) are written as usual.

torch and opacus are imported inside the functions so that ``adaptive-dp --help`` stays fast.
"""

from __future__ import annotations

import dataclasses
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
#: fields of a step record that the adaptive engine fills in (None when it has nothing for the step).
ADAPTIVE_FIELDS = ("mi", "mi_gap", "sigma_floor", "controller_error")
#: leakage estimators ``--estimator`` accepts (``adaptive_dp.leakage.ESTIMATORS``).
ESTIMATORS = ("likelihood-ratio", "token-mine")
#: privacy-token encoders ``--token-encoder`` accepts (``adaptive_dp.leakage.tokens.TOKEN_ENCODERS``).
TOKEN_ENCODERS = ("span", "projection", "autoencoder", "transformer")
#: controllers ``--controller`` accepts (``controllers.CONTROLLERS``): feedback controllers, then schedules.
FEEDBACK_CONTROLLERS = ("pid", "threshold")
SCHEDULE_CONTROLLERS = ("linear", "staircase", "exponential", "cyclic", "constant")
CONTROLLER_NAMES = FEEDBACK_CONTROLLERS + SCHEDULE_CONTROLLERS


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
        noise_multiplier: σ, noise std / max_grad_norm (the starting σ of a controller or schedule); ignored
            when ``target_epsilon`` is given.
        max_grad_norm: per-sample gradient clipping norm C.
        target_epsilon: if given, a hard budget: the starting σ is opacus' choice for ``epochs`` epochs at this ε
            and ``delta``, and a Rényi filter floors σ so that the run's guarantee is this ε (also with a
            controller).
        delta: δ of every reported ε.
        target_mi: MI ceiling in nats per audit example; the controller (default "pid") steers σ to keep the
            measured leakage under it. Needs the monitor (``audit_fraction`` > 0).
        controller: a ``controllers.CONTROLLERS`` name: "pid", "threshold" (feedback, need ``target_mi``) or
            "linear", "staircase", "exponential", "cyclic", "constant" (open-loop schedules from
            ``noise_multiplier`` to ``sigma_end`` over the planned ``epochs``).
        estimator: leakage estimator of the monitor: "likelihood-ratio" (training-free) or "token-mine".
        token_encoder: privacy-token encoder of "token-mine": "span" (projection onto the clean audit
            gradients' principal directions), "projection", "autoencoder" or "transformer".
        audit_fraction: share of the training set carved off (seeded) as the audit split before training, in
            [0, 1); these examples are never trained on (and get no DP protection). 0 turns the monitor off.
        monitor_every: optimizer steps between leakage readings (the first is taken before step 1); ≥ 1.
        sigma_min, sigma_max: bounds of the controller's σ (None: the engine's defaults 0.3 and 10, widened
            to include the starting σ); ``sigma_max`` is also where a budget stops training.
        sigma_end: final σ of a schedule controller.
        seed: seeds python, numpy and torch (initialisation, Poisson sampling, noise).
        device: "auto" (CUDA when torch sees a GPU), "cpu" or "cuda".
        wandb_mode: "offline", "online", "disabled", or None (online when an API key is configured).
        wandb_project: W&B project name.
        out: output folder (None: ``runs/<UTC timestamp>``).
        test_batch_size: batch size for evaluation (no privacy cost).
        num_workers: DataLoader worker processes.
        dist_timeout: seconds; under ``torchrun`` (``WORLD_SIZE`` > 1) the bound on joining the process group
            and on every collective, so that a rank that dies or hangs makes the others fail with
            ``adaptive_dp.distributed.DistributedError`` instead of hanging (see ``docs/distributed.md``).
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
    estimator: str = "likelihood-ratio"
    token_encoder: str = "span"
    audit_fraction: float = 0.02
    monitor_every: int = 10
    sigma_min: float | None = None
    sigma_max: float | None = None
    sigma_end: float | None = None
    seed: int = 0
    device: str = "auto"
    wandb_mode: str | None = None
    wandb_project: str = "adaptive-dp"
    out: str | None = None
    test_batch_size: int = 1024
    num_workers: int = 0
    dist_timeout: float = 60.0

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
        _positive_float("dist_timeout", self.dist_timeout)
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
        self._validate_adaptive()
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose one of: {', '.join(OPTIMIZERS)}")
        if self.device not in DEVICES:
            raise ValueError(f"unknown device {self.device!r}; choose one of: {', '.join(DEVICES)}")
        if self.wandb_mode is not None and self.wandb_mode not in ("offline", "online", "disabled"):
            raise ValueError(f"unknown wandb_mode {self.wandb_mode!r}; choose offline, online or disabled")

    def _validate_adaptive(self) -> None:
        """Check the monitor / controller options (see :meth:`validate`)."""
        if isinstance(self.audit_fraction, bool) or not isinstance(self.audit_fraction, (int, float)) or not (
                0 <= self.audit_fraction < 1):
            raise ValueError(f"audit_fraction must be in [0, 1) (0 turns the leakage monitor off), "
                             f"got {self.audit_fraction!r}")
        _positive_int("monitor_every", self.monitor_every)
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"unknown estimator {self.estimator!r}; choose one of: {', '.join(ESTIMATORS)}")
        if self.token_encoder not in TOKEN_ENCODERS:
            raise ValueError(f"unknown token_encoder {self.token_encoder!r}; choose one of: "
                             f"{', '.join(TOKEN_ENCODERS)}")
        if self.controller is not None and self.controller not in CONTROLLER_NAMES:
            raise ValueError(f"unknown controller {self.controller!r}; choose one of: {', '.join(CONTROLLER_NAMES)}")
        for name in ("sigma_min", "sigma_max", "sigma_end"):
            if getattr(self, name) is not None:
                _positive_float(name, getattr(self, name))
        if self.sigma_min is not None and self.sigma_max is not None and self.sigma_min > self.sigma_max:
            raise ValueError(f"sigma_min ({self.sigma_min}) must not exceed sigma_max ({self.sigma_max})")
        if not self.audit_fraction and self.target_mi is not None:
            raise ValueError("--target-mi needs the leakage monitor, which --audit-fraction 0 turns off; set "
                             "--audit-fraction > 0 (default 0.02) or drop --target-mi")
        if self.controller in FEEDBACK_CONTROLLERS and self.target_mi is None:
            raise ValueError(f"--controller {self.controller} steers measured leakage to a ceiling: give "
                             "--target-mi NATS, or use a schedule (" + ", ".join(SCHEDULE_CONTROLLERS) + ")")
        if self.sigma_end is not None and self.controller not in SCHEDULE_CONTROLLERS[:-1]:
            raise ValueError("--sigma-end is the final σ of a schedule: add --controller linear (or staircase, "
                             "exponential, cyclic), or drop --sigma-end")
        if (self.audit_fraction and self.estimator == "likelihood-ratio" and self.target_epsilon is None
                and self.noise_multiplier == 0):
            raise ValueError("the likelihood-ratio leakage monitor needs noise_multiplier > 0 (at σ = 0 nothing "
                             "is private); set --noise-multiplier > 0, or --audit-fraction 0 to turn the "
                             "monitor off, or --estimator token-mine")

    @property
    def monitor_on(self) -> bool:
        """Whether the leakage monitor runs (an audit split is carved off)."""
        return bool(self.audit_fraction)

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


def make_engine(config: TrainConfig):
    """The privacy engine for ``config``: ``AdaptivePrivacyEngine(accountant="rdp")`` — the incremental RDP
    accountant (same ε as opacus' ``RDPAccountant`` on the same σ history, O(#orders) per step, so the
    odometer after every step is cheap)."""
    from adaptive_dp.privacy_engine import AdaptivePrivacyEngine

    return AdaptivePrivacyEngine(accountant="rdp")


def make_private(engine, config: TrainConfig, *, model, optimizer, data_loader, audit_data=None):
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
        audit_data: the audit split (never trained on), None to run without the monitor.

    Returns:
        (GradSampleModule, DPOptimizer, DPDataLoader).

    Raises:
        ValueError: from the engine, for settings it cannot honour (its message names the fix).
    """
    common = dict(
        module=model, optimizer=optimizer, data_loader=data_loader, max_grad_norm=config.max_grad_norm,
        target_mi=config.target_mi, controller=config.controller, estimator=config.estimator,
        token_encoder=config.token_encoder, audit_data=audit_data, monitor_every=config.monitor_every,
        sigma_min=config.sigma_min, sigma_max=config.sigma_max, sigma_end=config.sigma_end, seed=config.seed,
    )
    if config.target_epsilon is not None:
        return engine.make_private_with_epsilon(
            **common, target_epsilon=config.target_epsilon, target_delta=config.delta, epochs=config.epochs
        )
    planned_steps = config.epochs * len(data_loader)  # opacus: q = 1 / len(loader), 1 / q steps per epoch
    # the engine spans a schedule over the planned steps: σ_start at step 1, sigma_end at the last one.
    return engine.make_private(**common, noise_multiplier=config.noise_multiplier,
                               total_steps=planned_steps, target_delta=config.delta)


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


def _fmt(value: float | None, digits: int = 3) -> str:
    return "–" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


# -- checkpoints ------------------------------------------------------------------------------------------------
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
    ``extra`` fields (noise multiplier of the last step, sample rate, ε, test accuracy, ``stopped_early``, and
    ``adaptive_state``: the engine's ``adaptive_state_dict()`` — controller, monitor, budget filter, history,
    pending reading). Readable with
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

    from adaptive_dp.models.cnn import build_model

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


def train(config: TrainConfig, *, progress: bool = True, _resume_state: Mapping[str, Any] | None = None
          ) -> dict[str, Any]:
    """Train with DP-SGD as ``config`` says and write the run's outputs into ``config.out``.

    The audit split (``audit_fraction`` of the training set, seeded by ``seed``) is carved off first; the model
    is trained on the rest only (q = 1 / ceil(len(rest) / batch_size)). Per optimizer step: σ used, ε (odometer
    at ``delta``), loss, and the leakage fields (``mi``/``mi_gap`` on monitored steps — steps 1, 1 + k, 1 + 2k,
    ... for ``monitor_every`` = k —, ``sigma_floor`` under a budget, ``controller_error`` with a feedback
    controller) go to ``history.jsonl`` and W&B; per epoch: test accuracy. At the end: ``tradeoff.png``,
    ``checkpoint.pt`` (see :func:`save_checkpoint`; it carries the engine's adaptive state) and ``summary.json``.

    A hard budget (``target_epsilon``) that cannot pay for another step within ``sigma_max`` stops training
    early (the budget did its job): the outputs are written as after a full run, with ``stopped_early: true``
    and ``stop_reason`` in the summary; no exception escapes.

    ``checkpoint.pt`` is also written after every epoch (atomically), so a crashed or interrupted run
    continues from its last finished epoch with :func:`resume` (``adaptive-dp train --resume OUT``).

    Args:
        config: the options (validated here).
        progress: show a tqdm progress bar per epoch (loss, σ, ε, latest MI).

    Returns:
        The summary (also in ``OUT/summary.json``): ``test_accuracy``, ``test_loss``, ``epsilon`` (= the
        odometer), ``odometer_epsilon``, ``guarantee_epsilon`` (the Rényi filter's ε with ``target_epsilon``,
        else None), ``epsilon_meaning``, ``delta``, ``noise_multiplier`` (σ of the last step),
        ``noise_multiplier_range``, ``sample_rate``, ``steps``, ``epochs``, ``stopped_early``, ``stop_reason``,
        the leakage summary of :func:`leakage_summary` (``mi_readings``, ``max_mi``, ``mean_mi``, ``final_mi``,
        ``target_mi``, ``fraction_over_ceiling``), ``audit_size`` (examples held out), ``audit_examples_read``
        (how many of them the monitor reads, at most 256), ``wall_time_s``, ``epoch_times_s``,
        ``per_epoch``, ``device``, ``dataset`` (``train_size`` excludes the audit split), ``model``, ``config``,
        ``outputs`` (paths), ``wandb``, ``versions``.

    Raises:
        ValueError: bad options (unknown data set/model/device/controller, ``target_mi`` without the monitor ...).
        FileNotFoundError: (``adaptive_dp.data.DataNotFoundError``) the data set is not under the data root.
    """
    from adaptive_dp import distributed as ddp

    t_start = time.perf_counter()
    config = dataclasses.replace(config)
    config.validate()
    device = resolve_device(config.device)
    if not ddp.launched_by_torchrun():
        return _train(config, device=device, progress=progress, t_start=t_start, context=None,
                      resume_state=_resume_state)
    if _resume_state is not None:
        raise NotImplementedError("resuming a run under torchrun is not supported yet; resume it in one process "
                                  "(`adaptive-dp train --resume OUT` without torchrun)")
    # under torchrun: one process per rank, DPDDP + opacus' distributed optimizer (rank 0 adds the noise)
    owned = not ddp.is_distributed()
    context = ddp.init_distributed(timeout_s=config.dist_timeout, device=str(device))
    try:
        return _train(config, device=device, progress=progress and context.is_main, t_start=t_start,
                      context=context)
    finally:
        if owned:
            ddp.shutdown()


def _train(config: TrainConfig, *, device, progress: bool, t_start: float, context,
           resume_state: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """:func:`train` after validation; ``context``: the DistributedContext under torchrun, else None;
    ``resume_state``: a per-epoch checkpoint to continue from (see :func:`resume`)."""
    import torch
    from torch.nn import functional as F
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    from adaptive_dp import distributed as ddp
    from adaptive_dp.accountants.filter import PrivacyBudgetExhausted
    from adaptive_dp.data.datasets import audit_split, load_dataset
    from adaptive_dp.models.cnn import build_model
    from adaptive_dp.training.tracking import Tracker

    rank = context.rank if context is not None else 0

    full_train_set = load_dataset(config.dataset, split="train", data_dir=config.data_dir)
    test_set = load_dataset(config.dataset, split="test", data_dir=config.data_dir)
    info = full_train_set.info
    train_set, audit_set = full_train_set, None
    if config.monitor_on:
        train_set, audit_set = audit_split(full_train_set, fraction=config.audit_fraction, seed=config.seed)
    if config.batch_size > len(train_set):
        raise ValueError(f"batch_size {config.batch_size} exceeds the training set ({len(train_set)} examples)")

    out = Path(config.out) if config.out else default_out_dir()
    if context is not None:  # rank 0's folder (a timestamped default differs between ranks)
        out = Path(ddp.broadcast_object(str(out), what="broadcast of the output folder"))
    config.out = str(out)
    seed_everything(config.seed)
    model = build_model(config.model, in_channels=info.in_channels, num_classes=info.num_classes,
                        image_size=info.image_size, seed=config.seed).to(device)
    if context is not None:
        model = ddp.wrap_model(model)  # DPDDP: rank 0's initial parameters on every rank
    optimizer = make_optimizer(config, model.parameters())
    generator = torch.Generator().manual_seed(config.seed)
    train_loader = DataLoader(train_set, batch_size=config.batch_size, shuffle=True, generator=generator,
                              num_workers=config.num_workers)
    test_loader = DataLoader(test_set, batch_size=config.test_batch_size, shuffle=False,
                             num_workers=config.num_workers)
    engine = make_engine(config)
    model, optimizer, train_loader = make_private(engine, config, model=model, optimizer=optimizer,
                                                  data_loader=train_loader, audit_data=audit_set)
    if context is not None:  # each rank Poisson-samples its shard at the global q, with its own generator
        train_loader = ddp.distributed_poisson_loader(
            train_loader, generator=torch.Generator().manual_seed(config.seed + 1_000_003 * rank))
    initial_sigma = float(optimizer.noise_multiplier)
    sample_rate = float(getattr(train_loader, "sample_rate", 1.0 / len(train_loader)))
    history: list[dict[str, Any]] = []
    epoch_records: list[dict[str, Any]] = []
    epoch_times: list[float] = []
    step = 0
    last_mi: float | None = None
    stop_reason: str | None = None
    discarded: list[dict[str, Any]] = []
    audit_indices = list(getattr(audit_set, "indices", [])) if audit_set is not None else []
    if resume_state is not None:
        history, epoch_records, discarded = restore_run(
            resume_state, out=out, model=model, optimizer=optimizer, engine=engine, generator=generator,
            sample_rate=sample_rate)
        epoch_times = [float(r.get("epoch_time_s") or 0.0) for r in epoch_records]
        step = history[-1]["step"] if history else 0
        last_mi = next((r["mi"] for r in reversed(history) if r.get("mi") is not None), None)
        initial_sigma = float(resume_state.get("initial_noise_multiplier", initial_sigma))
    first_epoch = len(epoch_records) + 1
    if context is None or rank == 0:
        tracker = Tracker(out, config=config.to_dict(), mode=config.wandb_mode, project=config.wandb_project,
                          run_name=out.name if resume_state is None else f"{out.name}-resumed-at-step-{step}",
                          resume=resume_state is not None)
        tracker.restore_epochs(epoch_records, last_step=step if resume_state is not None else None)
    if context is not None:  # every rank: OUT/history.rank<R>.jsonl; rank 0 also the main tracker
        tracker = ddp.RankTracker(out, rank=rank, main=tracker if rank == 0 else None)
    if resume_state is not None:  # last: nothing between here and the first step may draw random numbers
        set_rng_states(resume_state["rng_states"])
    with tracker:
        for epoch in range(first_epoch, config.epochs + 1):
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
                try:
                    optimizer.step()
                except PrivacyBudgetExhausted as exc:  # the filter refused the step: nothing was booked
                    stop_reason = str(exc)
                    break
                step += 1
                record = make_step_record(
                    step=step, epoch=epoch, noise_multiplier=optimizer.noise_multiplier,
                    epsilon=_step_epsilon(engine, config.delta), loss=loss.item(), batch_size=len(y),
                    sample_rate=sample_rate, lr=optimizer.param_groups[0]["lr"], **adaptive_fields(engine),
                    monitor_error=(engine.history[-1].get("monitor_error") if engine.history else None),
                )
                history.append(record)
                tracker.log_step(record)
                if record["mi"] is not None:
                    last_mi = record["mi"]
                if math.isfinite(record["loss"]):
                    losses.append(record["loss"])
                bar.set_postfix_str(
                    f"loss={_fmt(record['loss'])} σ={_fmt(record['noise_multiplier'])} "
                    f"ε={_fmt(record['epsilon'], 2)} MI={_fmt(last_mi)}", refresh=False,
                )
            bar.close()
            epoch_times.append(time.perf_counter() - t_epoch)
            test = evaluate(model, test_loader, device=device)
            last = history[-1] if history else {}
            epoch_record = {
                "epoch": epoch, "step": step, "epsilon": last.get("epsilon", 0.0), "mi": last_mi,
                "test_accuracy": test["accuracy"], "test_loss": test["loss"],
                "noise_multiplier": last.get("noise_multiplier", float(optimizer.noise_multiplier)),
                "train_loss": sum(losses) / len(losses) if losses else None,
                "epoch_time_s": epoch_times[-1],
            }
            epoch_records.append(epoch_record)
            tracker.log_epoch(epoch_record)
            if stop_reason is None and epoch < config.epochs and (context is None or context.is_main):
                save_checkpoint(out / "checkpoint.pt", model=model, optimizer=optimizer, engine=engine,
                                config=config, dataset_info=info, history=history, epochs=epoch_records,
                                extra=_resume_extra(engine, generator=generator, initial_sigma=initial_sigma,
                                                    audit_indices=audit_indices, discarded=discarded))
            if progress:
                tqdm.write(f"epoch {epoch}: test accuracy {test['accuracy']:.4f}, ε = {_fmt(epoch_record['epsilon'])} "
                           f"at δ = {config.delta:g}, MI = {_fmt(last_mi)} nats, {epoch_times[-1]:.1f} s")
            if stop_reason is not None:
                if progress:
                    tqdm.write(f"stopped early after {step} steps: {stop_reason}")
                break

        summary = _finish_run(
            config, tracker=tracker, engine=engine, model=model, optimizer=optimizer, info=info, out=out,
            history=history, epoch_records=epoch_records, epoch_times=epoch_times, sample_rate=sample_rate,
            initial_sigma=initial_sigma, stop_reason=stop_reason, device=device, t_start=t_start,
            sizes={"train_size": len(train_set), "audit_size": len(audit_set) if audit_set is not None else 0,
                   "test_size": len(test_set)},
            context=context, audit_indices=audit_indices, discarded=discarded,
            resumed_at_step=resume_state.get("step") if resume_state is not None else None,
        )
    return summary


def _run_state_extra(engine, *, initial_sigma: float, audit_indices, discarded) -> dict[str, Any]:
    """Checkpoint fields of every checkpoint (per epoch and final): engine state, starting σ, audit split,
    discarded steps."""
    return {"adaptive_state": engine.adaptive_state_dict(), "initial_noise_multiplier": initial_sigma,
            "audit_indices": list(audit_indices), "discarded_steps": list(discarded)}


def _resume_extra(engine, *, generator, initial_sigma: float, audit_indices: list[int],
                  discarded: list[dict[str, Any]]) -> dict[str, Any]:
    """The fields a per-epoch checkpoint adds so that :func:`resume` can continue the run exactly."""
    return {"complete": False, "loader_generator_state": generator.get_state(),
            **_run_state_extra(engine, initial_sigma=initial_sigma, audit_indices=audit_indices,
                               discarded=discarded)}


def restore_run(state: Mapping[str, Any], *, out: Path, model, optimizer, engine, generator, sample_rate: float
                ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """Load a per-epoch checkpoint into freshly wrapped objects and book the steps lost since it was written.

    Model, optimizer, accountant, engine (controller, monitor, Rényi filter) and the Poisson sampler's
    generator are restored; the global RNG states are not (the caller restores them with
    :func:`set_rng_states` just before the first resumed step, so that an uninterrupted run and a resumed one
    draw the same batches and the same noise). Steps the crashed attempt took after the checkpoint
    (``OUT/history.jsonl`` records past its step) are lost from the model, but their noisy gradients were
    computed on private data: they are booked into the accountant and charged to the Rényi filter (fail
    closed: the odometer and the budget only count more), moved to ``OUT/discarded_steps.jsonl`` and
    dropped from ``history.jsonl``, which the resumed run appends to.

    Returns:
        ``(history, epoch_records, discarded)``: the step records kept, the epoch records, and every
        discarded step record so far (earlier resumes included).

    Raises:
        ValueError: if the checkpoint is of a finished run, or has no resume state (an older format).
    """
    from adaptive_dp.training.tracking import read_history

    _check_resumable(state)
    unwrap_model(model).load_state_dict(state["model_state_dict"])
    optimizer.load_state_dict(state["optimizer_state_dict"])
    engine.accountant.load_state_dict(state["accountant_state_dict"])
    engine.load_adaptive_state_dict(state["adaptive_state"])
    generator.set_state(state["loader_generator_state"])
    history = [dict(r) for r in state["history"]]
    kept_step = history[-1]["step"] if history else 0
    discarded = [dict(r) for r in state.get("discarded_steps", [])]
    history_path = out / "history.jsonl"
    logged = read_history(history_path, torn_tail_ok=True) if history_path.is_file() else []
    lost = [{**r, "discarded": True} for r in logged if isinstance(r.get("step"), int) and r["step"] > kept_step]
    for record in lost:
        sigma = float(record["noise_multiplier"])
        engine.accountant.step(noise_multiplier=sigma, sample_rate=float(record.get("sample_rate") or sample_rate))
        if engine.budget_filter is not None:
            engine.budget_filter.charge(sigma)
    discarded += lost
    if lost:
        with open(out / "discarded_steps.jsonl", "a", encoding="utf-8") as f:
            f.writelines(json.dumps(record) + "\n" for record in lost)
    tmp = history_path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in logged if r.get("step", 0) <= kept_step),
                   encoding="utf-8")
    os.replace(tmp, history_path)
    return history, [dict(r) for r in state["epochs"]], discarded


def _check_resumable(state: Mapping[str, Any]) -> None:
    if state.get("complete", True) or "loader_generator_state" not in state:
        raise ValueError(
            f"{state.get('path', 'the checkpoint')} is the checkpoint of a finished run (or of a version without "
            "per-epoch checkpoints): nothing to resume; start a new run with another --out"
        )


def resume(out: str | os.PathLike, *, progress: bool = True, wandb_mode: str | None = None) -> dict[str, Any]:
    """Continue an interrupted :func:`train` run from the per-epoch checkpoint in ``out``.

    The options are the saved run's (``checkpoint.pt`` holds its :class:`TrainConfig`); only the W&B mode
    may change. Training continues at the epoch after the last finished one with the same batches, noise
    and controller state as an uninterrupted run would have (same machine and versions), and appends to
    ``out/history.jsonl``; the W&B run is a new one named ``<out>-resumed-at-step-<k>``. Steps taken after
    the checkpoint are booked, never forgotten (see :func:`restore_run`); the summary counts them in
    ``discarded_steps``.

    Returns:
        The summary of the finished run, as :func:`train` returns it.

    Raises:
        FileNotFoundError: no ``checkpoint.pt`` in ``out``.
        ValueError: the run is finished already, or the checkpoint is not an adaptive_dp checkpoint.
    """
    state = load_checkpoint(out)
    _check_resumable(state)
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    config = TrainConfig(**{k: v for k, v in state["config"].items() if k in fields})
    config.out = str(Path(out))
    if wandb_mode is not None:
        config.wandb_mode = wandb_mode
    return train(config, progress=progress, _resume_state=state)


def _step_epsilon(engine, delta: float) -> float:
    """The odometer after the step just taken: the engine's history records it (cheap incremental RDP)."""
    last = engine.history[-1] if getattr(engine, "history", None) else {}
    epsilon = last.get("epsilon")
    return float(engine.get_epsilon(delta)) if epsilon is None else float(epsilon)


def leakage_summary(history: list[Mapping[str, Any]], *, target_mi: float | None = None) -> dict[str, Any]:
    """Summary of the MI readings (nats) in a run's step records.

    Args:
        history: step records; ``mi`` is a reading (nats), None on steps without one, NaN for a failed one.
        target_mi: the MI ceiling (nats), if any.

    Returns:
        ``{"mi_readings": count of valid readings, "failed_readings": count of NaN readings, "max_mi",
        "mean_mi", "final_mi" (None without readings), "target_mi", "fraction_over_ceiling"}`` — the last is the
        share of valid readings above ``target_mi`` (None without a ceiling or readings).
    """
    values = [r.get("mi") for r in history if r.get("mi") is not None]
    valid = [float(v) for v in values if math.isfinite(float(v))]
    over = None
    if target_mi is not None and valid:
        over = sum(v > target_mi for v in valid) / len(valid)
    return {
        "mi_readings": len(valid),
        "failed_readings": len(values) - len(valid),
        "max_mi": max(valid) if valid else None,
        "mean_mi": sum(valid) / len(valid) if valid else None,
        "final_mi": valid[-1] if valid else None,
        "target_mi": target_mi,
        "fraction_over_ceiling": over,
    }


def _write_figure_and_checkpoint(config: TrainConfig, *, tracker, engine, model, optimizer, info, history,
                                 epoch_records, outputs, extra) -> None:
    """``tradeoff.png`` (its path set to None in ``outputs`` if drawing fails) and ``checkpoint.pt``."""
    from adaptive_dp.training.plots import plot_tradeoff

    try:
        plot_tradeoff(history, epoch_records, outputs["tradeoff"], delta=config.delta, target_mi=config.target_mi,
                      guarantee_epsilon=extra["guarantee_epsilon"],
                      title=f"{config.dataset} / {config.model}: DP-SGD"
                            + (f", {config.controller}" if config.controller else ""))
        tracker.log_image(outputs["tradeoff"], "plots/tradeoff")
    except Exception as exc:  # noqa: BLE001 - a plotting failure must not lose the trained model
        logger.warning("could not draw the trade-off figure: %s", exc)
        outputs["tradeoff"] = None
    save_checkpoint(outputs["checkpoint"], model=model, optimizer=optimizer, engine=engine, config=config,
                    dataset_info=info, history=history, epochs=epoch_records, extra=extra)


def _finish_run(config: TrainConfig, *, tracker, engine, model, optimizer, info, out: Path, history, epoch_records,
                epoch_times, sample_rate, initial_sigma, stop_reason, device, t_start, sizes,
                context=None, audit_indices=(), discarded=(), resumed_at_step=None) -> dict[str, Any]:
    """Trade-off figure, checkpoint and summary of a (possibly stopped-early) run; returns the summary.

    Under DDP (``context`` given) only rank 0 draws the figure and writes the checkpoint and summary.
    """
    final = epoch_records[-1]
    noise_multiplier = float(optimizer.noise_multiplier)
    privacy = engine.privacy_summary(config.delta)
    odometer = history[-1]["epsilon"] if history and not discarded else float(engine.get_epsilon(config.delta))
    guarantee = privacy["guarantee_epsilon"]
    sigmas = [r["noise_multiplier"] for r in history] or [noise_multiplier]
    leakage = leakage_summary(history, target_mi=config.target_mi)
    outputs = {
        "dir": str(out),
        "history": str(tracker.history_path),
        "summary": str(tracker.summary_path),
        "tradeoff": str(out / "tradeoff.png"),
        "checkpoint": str(out / "checkpoint.pt"),
        "wandb": str(tracker.wandb_dir) if tracker.wandb_dir is not None else None,
    }
    main = context is None or context.is_main
    if context is not None:
        outputs["rank_history"] = str(tracker.rank_history_path)
    if main:
        _write_figure_and_checkpoint(
            config, tracker=tracker, engine=engine, model=model, optimizer=optimizer, info=info, history=history,
            epoch_records=epoch_records, outputs=outputs,
            extra={"noise_multiplier": noise_multiplier, "sample_rate": sample_rate, "epsilon": odometer,
                   "odometer_epsilon": odometer, "guarantee_epsilon": guarantee, "delta": config.delta,
                   "test_accuracy": final["test_accuracy"], "stopped_early": stop_reason is not None,
                   "complete": True, **_run_state_extra(engine, initial_sigma=initial_sigma,
                                                        audit_indices=audit_indices, discarded=discarded)},
        )
    else:  # under DDP only rank 0 draws the figure and writes the checkpoint
        outputs["tradeoff"] = outputs["checkpoint"] = None
    if guarantee is not None:
        meaning = (f"guarantee_epsilon: the Rényi filter's formal ε at δ = {config.delta:g} (target_epsilon); "
                   "epsilon = odometer_epsilon: the RDP accountant's composition of the σ history used")
    elif config.target_mi is not None or config.controller in FEEDBACK_CONTROLLERS:
        meaning = ("odometer only: RDP composition of the σ history used; σ was chosen from audit readings "
                   "without a budget, so this is no formal (ε, δ) guarantee (use --target-epsilon for one)")
    else:
        meaning = "RDP accountant composition of the noise multipliers used (opacus get_epsilon)"
    summary = {
        "test_accuracy": final["test_accuracy"],
        "test_loss": final["test_loss"],
        "epsilon": odometer,
        "odometer_epsilon": odometer,
        "guarantee_epsilon": guarantee,
        "delta": config.delta,
        "epsilon_meaning": meaning,
        "noise_multiplier": noise_multiplier,
        "initial_noise_multiplier": initial_sigma,
        "noise_multiplier_range": [min(sigmas), max(sigmas)],
        "max_grad_norm": config.max_grad_norm,
        "sample_rate": sample_rate,
        "steps": len(history),
        "discarded_steps": len(discarded),
        "resumed_at_step": resumed_at_step,
        "epochs": config.epochs,
        "stopped_early": stop_reason is not None,
        "stop_reason": stop_reason,
        "controller": config.controller if config.controller or config.target_mi is None else "pid",
        "estimator": config.estimator if config.monitor_on else None,
        "monitor_every": config.monitor_every if config.monitor_on else None,
        **leakage,
        "audit_size": sizes["audit_size"],
        "audit_examples_read": int(engine.monitor.x.shape[0]) if getattr(engine, "monitor", None) is not None else 0,
        "wall_time_s": time.perf_counter() - t_start,
        "epoch_times_s": epoch_times,
        "per_epoch": epoch_records,
        "device": str(device),
        "distributed": None if context is None else {"rank": context.rank, "world_size": context.world_size,
                                                     "backend": context.backend, "timeout_s": context.timeout_s},
        "engine": f"{type(engine).__module__}.{type(engine).__name__}",
        "accountant": privacy["accountant"],
        "dataset": {"name": info.name, **sizes, "num_classes": info.num_classes, "image_size": info.image_size},
        "model": config.model,
        "config": config.to_dict(),
        "outputs": outputs,
        "wandb": {"mode": tracker.mode, "dir": outputs["wandb"],
                  "file": str(tracker.wandb_file) if tracker.wandb_file is not None else None},
        "versions": _versions(),
    }
    tracker.finish(summary)
    return json.loads(json.dumps(summary))
