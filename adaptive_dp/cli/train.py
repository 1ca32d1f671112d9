"""Train a model with DP-SGD on a real data set and track ε, σ and MI (W&B offline by default + JSONL).

Writes into ``--out`` (default ``runs/<UTC timestamp>``): ``history.jsonl`` (one record per optimizer step),
``summary.json``, ``tradeoff.png``, ``checkpoint.pt`` (also after every epoch) and the W&B run under
``wandb/``. ``--resume OUT`` continues an interrupted run from its last finished epoch. Only quantities ε covers
or public / held-out metrics are published unless ``--log-private-metrics`` is given (the training-batch loss
and batch size then join them; the progress bar on this terminal shows the batch loss either way).

By default 2 % of the training set is held out as the audit split (never trained on) and the leakage monitor
reads MI every 10 steps; ``--target-mi`` with ``--controller`` adapts σ, ``--target-epsilon`` adds a hard
budget (Rényi filter). If the budget cannot pay for another step, training stops early, writes all outputs
(``stopped_early: true`` in the summary) and exits 0: the budget did its job.
"""

from __future__ import annotations

import argparse
import sys
import warnings

# stdlib + the torch-free controllers registry at import time: --help stays fast
from adaptive_dp.training.config import (
    CONTROLLER_NAMES,
    DEVICES,
    ESTIMATORS,
    FEEDBACK_CONTROLLERS,
    OPTIMIZERS,
    SCHEDULE_CONTROLLERS,
    TOKEN_ENCODERS,
    WANDB_MODES,
    TrainConfig,
)


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``adaptive-dp train`` to ``parser``."""
    d = vars(TrainConfig())
    _add_data_options(parser, d)
    _add_optimisation_options(parser, d)
    _add_privacy_options(parser, d)
    _add_loop_options(parser, d)
    _add_output_options(parser, d)


def _add_data_options(parser: argparse.ArgumentParser, d: dict) -> None:
    data = parser.add_argument_group("data and model")
    data.add_argument(
        "--dataset",
        default=d["dataset"],
        help="digits (embedded), mnist, fashion-mnist or cifar10 (default: %(default)s)",
    )
    data.add_argument(
        "--data-dir",
        default=None,
        help="data root holding mnist/, fashion-mnist/, cifar10-jpeg/ ... (default: $ADAPTIVE_DP_DATA)",
    )
    data.add_argument(
        "--model", default=d["model"], help="small-cnn, tanh-cnn, resnet20 or lenet (default: %(default)s)"
    )


def _add_optimisation_options(parser: argparse.ArgumentParser, d: dict) -> None:
    opt = parser.add_argument_group("optimisation")
    opt.add_argument("--epochs", type=int, default=d["epochs"], help="training epochs (default: %(default)s)")
    opt.add_argument(
        "--batch-size",
        type=int,
        default=d["batch_size"],
        help="expected Poisson batch size; sample rate q = 1 / ceil(training-set size / batch size) "
        "(default: %(default)s)",
    )
    opt.add_argument("--lr", type=float, default=d["lr"], help="learning rate (default: %(default)s)")
    opt.add_argument(
        "--optimizer",
        choices=OPTIMIZERS,
        default=d["optimizer"],
        help="optimizer wrapped by DP-SGD (default: %(default)s)",
    )
    opt.add_argument(
        "--momentum", type=float, default=d["momentum"], help="SGD momentum (default: %(default)s)"
    )
    opt.add_argument(
        "--seed",
        type=int,
        default=d["seed"],
        help="seeds initialisation, Poisson sampling and noise (default: %(default)s)",
    )
    opt.add_argument(
        "--device",
        choices=DEVICES,
        default=d["device"],
        help="auto = CUDA when torch sees a GPU (default: %(default)s)",
    )
    opt.add_argument("--test-batch-size", type=int, default=d["test_batch_size"], help=argparse.SUPPRESS)
    opt.add_argument(
        "--num-workers",
        type=int,
        default=d["num_workers"],
        help="DataLoader worker processes (default: %(default)s)",
    )
    opt.add_argument(
        "--dist-timeout",
        type=float,
        default=d["dist_timeout"],
        metavar="SECONDS",
        help="under torchrun (e.g. `torchrun --nproc_per_node=2 -m adaptive_dp.cli train ...`): bound "
        "on joining the process group and on every collective; a rank that dies makes the "
        "others fail with a clear error after at most this long (default: %(default)s)",
    )


def _add_privacy_options(parser: argparse.ArgumentParser, d: dict) -> None:
    privacy = parser.add_argument_group("privacy")
    privacy.add_argument(
        "--noise-multiplier",
        type=float,
        default=d["noise_multiplier"],
        help="σ: noise std / max grad norm; ignored with --target-epsilon (default: %(default)s)",
    )
    privacy.add_argument(
        "--max-grad-norm",
        type=float,
        default=d["max_grad_norm"],
        help="per-sample gradient clipping norm C (default: %(default)s)",
    )
    privacy.add_argument(
        "--target-epsilon",
        type=float,
        default=None,
        help="hard budget: start at the σ that spends this ε at --delta over --epochs, and let "
        "a Rényi filter floor σ so the guarantee is this ε (also with --controller)",
    )
    privacy.add_argument(
        "--delta", type=float, default=d["delta"], help="δ of every ε (default: %(default)s)"
    )
    privacy.add_argument(
        "--log-private-metrics",
        action="store_true",
        help="also publish the training-batch loss and Poisson batch size per step (history.jsonl, "
        "W&B, summary): computed on private batches without noise, they are NOT covered "
        "by ε; off by default (summary.json: private_metrics_logged)",
    )


def _add_loop_options(parser: argparse.ArgumentParser, d: dict) -> None:
    loop = parser.add_argument_group("leakage monitor and noise controller")
    loop.add_argument(
        "--target-mi",
        type=float,
        default=None,
        metavar="NATS",
        help="MI ceiling in nats per audit example; the controller (default pid) adapts σ to stay "
        "under it. Without --target-epsilon the ε is an odometer, not a guarantee",
    )
    loop.add_argument(
        "--controller",
        choices=CONTROLLER_NAMES,
        default=None,
        help=f"{', '.join(FEEDBACK_CONTROLLERS)} (feedback: need --target-mi) or a schedule from "
        f"--noise-multiplier to --sigma-end over the planned steps: {', '.join(SCHEDULE_CONTROLLERS)}",
    )
    loop.add_argument(
        "--estimator",
        choices=ESTIMATORS,
        default=d["estimator"],
        help="leakage estimator (default: %(default)s)",
    )
    loop.add_argument(
        "--token-encoder",
        choices=TOKEN_ENCODERS,
        default=d["token_encoder"],
        help="privacy-token encoder of --estimator token-mine (default: %(default)s)",
    )
    loop.add_argument(
        "--audit-fraction",
        type=float,
        default=d["audit_fraction"],
        help="share of the training set held out as the audit split the monitor reads (never "
        "trained on, no DP protection of its own); 0 turns the monitor off (default: "
        "%(default)s)",
    )
    loop.add_argument(
        "--monitor-every",
        type=int,
        default=d["monitor_every"],
        help="optimizer steps between leakage readings; the first is before step 1 (default: %(default)s)",
    )
    loop.add_argument(
        "--sigma-min",
        type=float,
        default=None,
        help="lowest σ the controller may set (default: 0.3, or the starting σ if lower)",
    )
    loop.add_argument(
        "--sigma-max",
        type=float,
        default=None,
        help="highest σ the controller may set; with --target-epsilon, training stops when the "
        "budget needs more (default: 10, or the starting σ if higher)",
    )
    loop.add_argument(
        "--sigma-end",
        type=float,
        default=None,
        help="final σ of a schedule --controller (default: starting σ / 3)",
    )


def _add_output_options(parser: argparse.ArgumentParser, d: dict) -> None:
    track = parser.add_argument_group("tracking and outputs")
    track.add_argument(
        "--wandb-mode",
        choices=WANDB_MODES,
        default=None,
        help="W&B mode (default: $WANDB_MODE, else online when an API key is configured, else offline)",
    )
    track.add_argument(
        "--wandb-project", default=d["wandb_project"], help="W&B project (default: %(default)s)"
    )
    track.add_argument("--out", default=None, help="output folder (default: runs/<UTC timestamp>)")
    track.add_argument("--no-progress", action="store_true", help="no progress bars")
    track.add_argument(
        "--resume",
        metavar="OUT",
        default=None,
        help="continue the interrupted run in OUT from its last finished epoch, with that run's "
        "options (OUT/checkpoint.pt); only --wandb-mode and --no-progress may be given",
    )


def config_from_args(args: argparse.Namespace):
    """The :class:`adaptive_dp.training.TrainConfig` for parsed command-line ``args``."""
    return TrainConfig.from_dict(vars(args))


def _resume_conflicts(args: argparse.Namespace, parser_defaults: dict) -> list[str]:
    """Options given beside ``--resume`` that would change the run (its saved options win)."""
    allowed = {"resume", "wandb_mode", "no_progress", "command", "func", "handler"}
    return [
        f"--{k.replace('_', '-')}"
        for k, v in vars(args).items()
        if k not in allowed and k in parser_defaults and v != parser_defaults[k]
    ]


def run(args: argparse.Namespace) -> int:
    """Train; print where the results went. Returns 0, or 2 with one error line for bad input."""
    from adaptive_dp.training.loop import resume, train

    # opacus' per-sample-gradient hooks trip this torch warning on the first layer (inputs need no gradient);
    # it is harmless and would otherwise interrupt the progress bar.
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    try:
        if getattr(args, "resume", None):
            parser = argparse.ArgumentParser()
            configure(parser)
            conflicts = _resume_conflicts(args, vars(parser.parse_args([])))
            if conflicts:
                raise ValueError(
                    f"--resume continues the run with its saved options; drop {', '.join(conflicts)} "
                    "(only --wandb-mode and --no-progress may change)"
                )
            summary = resume(args.resume, progress=not args.no_progress, wandb_mode=args.wandb_mode)
        else:
            config = config_from_args(args)
            summary = train(config, progress=not args.no_progress)
    except (ValueError, FileNotFoundError, NotImplementedError) as exc:
        print(f"adaptive-dp train: error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        # adaptive_dp.distributed.DistributedError (not imported here: fast --help)
        if type(exc).__name__ != "DistributedError":
            raise
        print(f"adaptive-dp train: error: {exc}", file=sys.stderr)
        from adaptive_dp.distributed import exit_after_failure

        # a broken gloo group can abort the interpreter's teardown (exit -6 instead of 1)
        exit_after_failure(1)
    if (summary.get("distributed") or {}).get("rank", 0) == 0:  # under torchrun rank 0 reports the run
        _report(summary)
    return 0


def _report(summary: dict) -> None:
    """Print the run's figures and where its outputs went."""
    outputs = summary["outputs"]
    lo, hi = summary["noise_multiplier_range"]
    sigma = f"σ = {lo:.3f}" if lo == hi else f"σ {lo:.3f}–{hi:.3f}"
    print(
        f"test accuracy {summary['test_accuracy']:.4f}, ε = {summary['odometer_epsilon']:.3f} at δ = "
        f"{summary['delta']:g} (odometer; {sigma}, {summary['steps']} steps, {summary['wall_time_s']:.1f} s)"
    )
    if summary["guarantee_epsilon"] is not None:
        print(
            f"guarantee: ε = {summary['guarantee_epsilon']:.3f} at δ = {summary['delta']:g} (Rényi filter budget)"
        )
    if summary["mi_readings"]:
        line = (
            f"leakage: {summary['mi_readings']} readings, MI mean {summary['mean_mi']:.3f}, max "
            f"{summary['max_mi']:.3f}, final {summary['final_mi']:.3f} nats"
        )
        if summary["fraction_over_ceiling"] is not None:
            line += (
                f"; {100 * summary['fraction_over_ceiling']:.0f} % of readings over the ceiling "
                f"{summary['target_mi']:g}"
            )
        print(line)
    if summary["private_metrics_logged"]:
        print(
            "private metrics logged: the training-batch loss and batch size are published and not covered by ε"
        )
    if summary["stopped_early"]:
        print(
            f"stopped early (privacy budget exhausted; the model trained so far is saved): {summary['stop_reason']}"
        )
    if summary.get("resumed_at_step") is not None:
        line = f"resumed after step {summary['resumed_at_step']}"
        if summary.get("discarded_steps"):
            line += (
                f"; {summary['discarded_steps']} step(s) lost in the interruption are booked in ε and the budget "
                "(discarded_steps.jsonl)"
            )
        print(line)
    print(f"results in {outputs['dir']}/")
    for key in ("history", "summary", "tradeoff", "checkpoint", "wandb"):
        if outputs.get(key):
            print(f"  {key:<10} {outputs[key]}")
    if summary["wandb"]["mode"] == "offline" and outputs.get("wandb"):
        print(f"  upload the W&B run with: wandb sync {outputs['wandb']}")
