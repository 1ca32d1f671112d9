"""The options of ``adaptive-dp train``: :class:`TrainConfig`, its validation, and the names each option accepts.

Stdlib and the torch-free ``controllers`` package only, so that ``adaptive-dp --help`` builds its parser without
importing torch.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from controllers import FEEDBACK, SCHEDULES

#: devices ``--device`` accepts.
DEVICES = ("auto", "cpu", "cuda")
#: optimizers ``--optimizer`` accepts.
OPTIMIZERS = ("sgd", "adam")
#: leakage estimators ``--estimator`` accepts (``adaptive_dp.leakage.ESTIMATORS``).
ESTIMATORS = ("likelihood-ratio", "token-mine")
#: privacy-token encoders ``--token-encoder`` accepts (``adaptive_dp.leakage.tokens.TOKEN_ENCODERS``).
TOKEN_ENCODERS = ("span", "projection", "autoencoder", "transformer")
#: controllers ``--controller`` accepts: the ``controllers`` registry (torch-free), feedback controllers (they
#: need ``target_mi``) first, then open-loop schedules.
FEEDBACK_CONTROLLERS = tuple(FEEDBACK)
SCHEDULE_CONTROLLERS = tuple(SCHEDULES)
CONTROLLER_NAMES = FEEDBACK_CONTROLLERS + SCHEDULE_CONTROLLERS
#: W&B modes ``--wandb-mode`` accepts.
WANDB_MODES = ("offline", "online", "disabled")
#: opacus' per-sample-gradient modes ``--grad-sample-mode`` accepts; "auto" is the fastest correct one for the
#: model (:func:`adaptive_dp.training.setup.resolve_grad_sample_mode`).
GRAD_SAMPLE_MODES = ("auto", "hooks", "functorch", "ew", "ghost")
#: ways ``--spend-budget`` spends what a binding leakage ceiling leaves of the budget (``adaptive_dp.control.spend``).
SPEND_MODES = ("steps", "sample-rate")
#: canary modes ``--canary-mode`` accepts: "gradient" (white box, needs SGD) or "input" (black box).
CANARY_MODES = ("gradient", "input")
#: gradient-canary directions ``--canary-kind`` accepts.
CANARY_KINDS = ("dirac", "random")
#: options that only mean something under DP-SGD: ``non_private`` refuses values other than their defaults.
DP_ONLY_OPTIONS = (
    "target_epsilon",
    "target_mi",
    "controller",
    "sigma_min",
    "sigma_max",
    "sigma_end",
    "noise_multiplier",
    "max_grad_norm",
    "estimator",
    "token_encoder",
    "monitor_every",
    "grad_sample_mode",
    "canaries",
    "canary_mode",
    "canary_kind",
    "spend_budget",
    "spend_limit",
)


@dataclass
class TrainConfig:
    """All options of ``adaptive-dp train`` (defaults: DP-SGD on digits, well above chance in about a minute
    on 2 CPU cores).

    Attributes:
        dataset: registered data set name ("digits", "mnist", "fashion-mnist", "cifar10").
        data_dir: data root (None: ``$ADAPTIVE_DP_DATA``, see :func:`adaptive_dp.data.get_data_root`).
        model: registered model name ("small-cnn", "tanh-cnn", "resnet20", "lenet", "vit-tiny", "vit-small";
            the ViTs need the ``hf`` extra).
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
        controller: a ``controllers.CONTROLLERS`` name: a feedback controller ("pid", "threshold", ...; needs
            ``target_mi``) or an open-loop schedule ("linear", "staircase", "exponential", "cyclic" from
            ``noise_multiplier`` to ``sigma_end`` over the planned ``epochs``, or "constant").
        estimator: leakage estimator of the monitor: "likelihood-ratio" (training-free) or "token-mine".
        token_encoder: privacy-token encoder of "token-mine": "span" (projection onto the clean audit
            gradients' principal directions), "projection", "autoencoder" or "transformer".
        audit_fraction: share of the training set carved off (seeded) as the audit split before training, in
            [0, 1); these examples are never trained on (and get no DP protection). 0 turns the monitor off.
        monitor_every: optimizer steps between leakage readings (the first is taken before step 1); ≥ 1.
        sigma_min, sigma_max: bounds of the controller's σ (None: the engine's defaults 0.3 and 10, widened
            to include the starting σ); ``sigma_max`` is also where a budget stops training.
        sigma_end: final σ of a schedule controller.
        seed: integer ≥ 0; seeds python, numpy and torch (initialisation, Poisson sampling) and the noise
            generator of DP-SGD (its own stream, see :mod:`adaptive_dp.training.noise`).
        device: "auto" (CUDA when torch sees a GPU), "cpu" or "cuda".
        wandb_mode: "offline", "online", "disabled", or None (online when an API key is configured).
        wandb_project: W&B project name.
        out: output folder (None: ``runs/<UTC timestamp>``).
        test_batch_size: batch size for evaluation (no privacy cost).
        num_workers: DataLoader worker processes.
        dist_timeout: seconds; under ``torchrun`` (``WORLD_SIZE`` > 1) the bound on joining the process group
            and on every collective, so that a rank that dies or hangs makes the others fail with
            ``adaptive_dp.distributed.DistributedError`` instead of hanging (see ``docs/distributed.md``).
        log_private_metrics: also publish the per-step training-batch loss and Poisson batch size (and the
            epoch's mean batch loss) in ``history.jsonl``, W&B and the summary. They are computed on the
            private training batches *without* noise, so ε does not cover them (the batch size of Poisson
            sampling leaks membership by itself); off by default, and ``summary.json`` says which.
        grad_sample_mode: opacus' per-sample-gradient mode: "hooks", "functorch", "ew", "ghost" (ghost clipping:
            no per-sample gradients are stored, ``make_private`` returns a criterion), or "auto", the fastest
            correct mode measured for the model (:data:`adaptive_dp.training.setup.FASTEST_GRAD_SAMPLE_MODE`).
        non_private: train the same model on the same data with the plain optimizer: no clipping, no noise, no
            accountant, no monitor (ε = ∞, reported as null with ``non_private: true``). The reference point of
            every trade-off; the DP-only options (:data:`DP_ONLY_OPTIONS`) must keep their defaults.
        canaries: m canaries for a one-run audit of the run's privacy (Steinke, Nasr & Jagielski 2023,
            arXiv:2305.08846): at the end ``canary_audit.json``, ``canary_audit.png`` and ``empirical_epsilon``
            (ε̂, a lower bound on the run's ε at ``delta`` with 95 % confidence) in the summary; 0 (none) or ≥ 2.
        canary_mode: "gradient" (white box: canary gradients of norm C join the clipped sum; needs SGD) or
            "input" (black box: mislabelled training examples, scored by their loss under the final model).
        canary_kind: gradient canaries' directions: "dirac" (one coordinate each) or "random".
        force: accept an audit split that leaves fewer training examples than a batch, or fewer than half of
            the data set (refused by default: almost nothing would be trained on).
        spend_budget: with ``target_epsilon``, spend what a binding MI ceiling leaves of the budget (off by
            default: it costs compute; :mod:`adaptive_dp.control.spend`): "steps" trains past ``epochs`` while
            the budget pays (up to ``spend_limit`` × ``epochs``), "sample-rate" raises the Poisson rate (expected
            batch size) of the remaining planned steps, up to ``spend_limit`` × ``batch_size``.
        spend_limit: the cap on ``spend_budget``'s compute, a multiple of the plan > 1 (None: 4).
        init: path of a pretrain checkpoint (``adaptive-dp pretrain --out DIR`` writes ``DIR/checkpoint.pt``;
            the folder works too) to fine-tune privately; ``model`` and ``dataset`` must be its own. The public
            examples it records are removed from the training set before the audit split is carved (see
            :mod:`adaptive_dp.training.finetune` and ``docs/finetuning.md``). None: train from scratch.
        lora_rank: only with ``init``: r ≥ 1 trains LoRA adapters of rank r on ``lora_targets`` plus the
            classification head, the rest frozen; 0 or None trains every parameter (full fine-tuning).
        lora_targets: comma-separated names of the layers LoRA adapts (default the attention query and value
            projections); only with ``lora_rank`` ≥ 1.
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
    log_private_metrics: bool = False
    grad_sample_mode: str = "auto"
    non_private: bool = False
    canaries: int = 0
    canary_mode: str = "gradient"
    canary_kind: str = "dirac"
    force: bool = False
    spend_budget: str | None = None
    spend_limit: float | None = None
    init: str | None = None
    lora_rank: int | None = None
    lora_targets: str = "q_proj,v_proj"

    def validate(self) -> None:
        """Check every option.

        Raises:
            ValueError: naming the option, the value and what is allowed.
        """
        for name in ("epochs", "batch_size", "test_batch_size"):
            _positive_int(name, getattr(self, name))
        _non_negative_int("num_workers", self.num_workers)
        _non_negative_int("seed", self.seed)
        for name in ("lr", "max_grad_norm", "dist_timeout"):
            _positive_float(name, getattr(self, name))
        if not (
            isinstance(self.noise_multiplier, (int, float))
            and math.isfinite(self.noise_multiplier)
            and self.noise_multiplier >= 0
        ):
            raise ValueError(f"noise_multiplier must be a finite number >= 0, got {self.noise_multiplier!r}")
        if not (0 <= self.momentum < 1):
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum!r}")
        if not (0 < self.delta < 1):
            raise ValueError(
                f"delta must be in (0, 1) (typically < 1 / training-set size), got {self.delta!r}"
            )
        if self.target_epsilon is not None:
            _positive_float("target_epsilon", self.target_epsilon)
        if self.target_mi is not None:
            _positive_float("target_mi", self.target_mi)
        for name in ("log_private_metrics", "non_private", "force"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        _one_of("grad_sample_mode", self.grad_sample_mode, GRAD_SAMPLE_MODES)
        if self.non_private:
            self._validate_non_private()
        self._validate_adaptive()
        _one_of("optimizer", self.optimizer, OPTIMIZERS)
        self._validate_canaries()
        self._validate_spend()
        self._validate_finetune()
        _one_of("device", self.device, DEVICES)
        if self.wandb_mode is not None:
            _one_of("wandb_mode", self.wandb_mode, WANDB_MODES)

    def _validate_adaptive(self) -> None:
        """Check the monitor / controller options (see :meth:`validate`)."""
        if (
            isinstance(self.audit_fraction, bool)
            or not isinstance(self.audit_fraction, (int, float))
            or not (0 <= self.audit_fraction < 1)
        ):
            raise ValueError(
                f"audit_fraction must be in [0, 1) (0 turns the leakage monitor off), got {self.audit_fraction!r}"
            )
        _positive_int("monitor_every", self.monitor_every)
        _one_of("estimator", self.estimator, ESTIMATORS)
        _one_of("token_encoder", self.token_encoder, TOKEN_ENCODERS)
        if self.controller is not None:
            _one_of("controller", self.controller, CONTROLLER_NAMES)
        for name in ("sigma_min", "sigma_max", "sigma_end"):
            if getattr(self, name) is not None:
                _positive_float(name, getattr(self, name))
        if self.sigma_min is not None and self.sigma_max is not None and self.sigma_min > self.sigma_max:
            raise ValueError(f"sigma_min ({self.sigma_min}) must not exceed sigma_max ({self.sigma_max})")
        self._validate_combinations()

    def _validate_combinations(self) -> None:
        """Options that are valid alone but not together (see :meth:`validate`)."""
        if not self.audit_fraction and self.target_mi is not None:
            raise ValueError(
                "--target-mi needs the leakage monitor, which --audit-fraction 0 turns off; set "
                "--audit-fraction > 0 (default 0.02) or drop --target-mi"
            )
        if self.controller in FEEDBACK_CONTROLLERS and self.target_mi is None:
            raise ValueError(
                f"--controller {self.controller} steers measured leakage to a ceiling: give "
                "--target-mi NATS, or use a schedule (" + ", ".join(SCHEDULE_CONTROLLERS) + ")"
            )
        if self.sigma_end is not None and (
            self.controller not in SCHEDULE_CONTROLLERS or self.controller == "constant"
        ):
            raise ValueError(
                "--sigma-end is the final σ of a schedule: add --controller linear (or staircase, "
                "exponential, cyclic), or drop --sigma-end"
            )
        if (
            self.audit_fraction
            and self.estimator == "likelihood-ratio"
            and self.target_epsilon is None
            and self.noise_multiplier == 0
        ):
            raise ValueError(
                "the likelihood-ratio leakage monitor needs noise_multiplier > 0 (at σ = 0 nothing "
                "is private); set --noise-multiplier > 0, or --audit-fraction 0 to turn the "
                "monitor off, or --estimator token-mine"
            )

    def _validate_canaries(self) -> None:
        """Check the canary options (see :meth:`validate`)."""
        if (
            isinstance(self.canaries, bool)
            or not isinstance(self.canaries, int)
            or self.canaries < 0
            or self.canaries == 1
        ):
            raise ValueError(
                f"canaries must be 0 (no canary audit) or an integer >= 2 (e.g. 1000), got {self.canaries!r}"
            )
        _one_of("canary_mode", self.canary_mode, CANARY_MODES)
        _one_of("canary_kind", self.canary_kind, CANARY_KINDS)
        if self.canaries and self.canary_mode == "gradient" and self.optimizer != "sgd":
            raise ValueError(
                f"gradient canaries score SGD's updates, not {self.optimizer}'s: use --optimizer sgd, or "
                "--canary-mode input"
            )

    def _validate_finetune(self) -> None:
        """Check ``init``, ``lora_rank`` and ``lora_targets`` (see :meth:`validate`; torch-free: that the file is a
        pretrain checkpoint of this model and data set is checked when the run loads it)."""
        if self.lora_rank is not None:
            _non_negative_int("lora_rank", self.lora_rank)
            if self.init is None:
                raise ValueError(
                    "--lora-rank adapts a pretrained model: add --init DIR/checkpoint.pt (written by `adaptive-dp "
                    "pretrain --out DIR`), or drop --lora-rank"
                )
        if not isinstance(self.lora_targets, str) or not all(t.strip() for t in self.lora_targets.split(",")):
            raise ValueError(
                f"lora_targets must be comma-separated module names, e.g. 'q_proj,v_proj', got {self.lora_targets!r}"
            )
        if self.lora_targets != "q_proj,v_proj" and not self.lora_rank:
            raise ValueError(
                "--lora-targets names the layers LoRA adapts: add --lora-rank R (R >= 1), or drop it"
            )
        if self.init is not None:
            path = Path(self.init)
            if not (path / "checkpoint.pt" if path.is_dir() else path).is_file():
                raise ValueError(
                    f"--init {self.init}: no such file; pass the checkpoint.pt that `adaptive-dp pretrain --out DIR` "
                    "wrote (DIR/checkpoint.pt)"
                )

    def _validate_spend(self) -> None:
        """Check ``spend_budget`` / ``spend_limit`` (see :meth:`validate`)."""
        if self.spend_budget is not None:
            _one_of("spend_budget", self.spend_budget, SPEND_MODES)
            if self.target_epsilon is None and not self.non_private:
                raise ValueError(
                    f"--spend-budget {self.spend_budget} spends what is left of an ε budget: give "
                    "--target-epsilon, or drop --spend-budget"
                )
            if self.spend_budget == "sample-rate" and self.num_workers:
                raise ValueError(
                    "--spend-budget sample-rate sets q of each batch when the step before ends, and DataLoader "
                    "workers draw batches ahead: use --num-workers 0"
                )
        if self.spend_limit is not None:
            if self.spend_budget is None and not self.non_private:
                raise ValueError(
                    "--spend-limit caps --spend-budget's compute: give --spend-budget, or drop it"
                )
            if (
                isinstance(self.spend_limit, bool)
                or not isinstance(self.spend_limit, (int, float))
                or not (1 < self.spend_limit < math.inf)
            ):
                raise ValueError(f"spend_limit must be a number > 1, got {self.spend_limit!r}")

    def _validate_non_private(self) -> None:
        """``non_private`` with DP-only options changed from their defaults is refused (see :meth:`validate`)."""
        defaults = TrainConfig()
        given = [name for name in DP_ONLY_OPTIONS if getattr(self, name) != getattr(defaults, name)]
        if given:
            flags = ", ".join("--" + name.replace("_", "-") for name in given)
            raise ValueError(
                f"--non-private trains without clipping, noise, accountant or leakage monitor, so {flags} "
                f"would do nothing: drop {flags}, or drop --non-private for a DP-SGD run"
            )

    @property
    def monitor_on(self) -> bool:
        """Whether the leakage monitor runs (an audit split is carved off and the run is private)."""
        return bool(self.audit_fraction) and not self.non_private

    def to_dict(self) -> dict[str, Any]:
        """The options as a plain dict (JSON-able)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, options: dict[str, Any]) -> TrainConfig:
        """The config of saved options (a checkpoint's ``config``); keys this version does not know are
        dropped, options it added since take their defaults."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in options.items() if k in names})


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def _non_negative_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}")


def _positive_float(name: str, value: Any) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def _one_of(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; choose one of: {', '.join(allowed)}")
