"""Train a model with DP-SGD on a real data set and track ε, σ and MI (W&B offline by default + JSONL).

Writes into ``--out`` (default ``runs/<UTC timestamp>``): ``history.jsonl`` (one record per optimizer step),
``summary.json``, ``tradeoff.png``, ``checkpoint.pt`` (also at the start and after every epoch) and the W&B run
under ``wandb/``. A folder that holds a run is refused: ``--resume OUT`` continues an interrupted run from its
last checkpoint, ``--overwrite`` moves the old run aside to ``OUT.old-<UTC time>`` (nothing is deleted); a
lock keeps a second run off a folder in use. Ctrl-C or SIGTERM finishes the step in flight, writes what the run
has and prints the ``--resume`` command (exit status 130 / 143). Only quantities ε covers or public / held-out
metrics are published unless ``--log-private-metrics`` is given (the training-batch loss and batch size then
join them; the progress bar on a terminal shows the batch loss either way; in a log file progress is a few
plain lines per epoch). ``--non-private`` trains the same model on the same data with plain SGD (ε = ∞,
``summary.json``: ``epsilon: null``, ``non_private: true``): the reference point of a trade-off.

By default 2 % of the training set is held out as the audit split (never trained on) and the leakage monitor
reads MI every 10 steps; ``--target-mi`` with ``--controller`` adapts σ, ``--target-epsilon`` adds a hard
budget (Rényi filter). If the budget cannot pay for another step, training stops early, writes all outputs
(``stopped_early: true`` in the summary) and exits 0: the budget did its job. ``--canaries M`` audits the run
with M canaries (one run, Steinke et al. 2023): ``canary_audit.json``, ``canary_audit.png`` and
``empirical_epsilon`` (ε̂, a lower bound on ε) in ``summary.json``; ``--noise-multiplier 0`` with
``--audit-fraction 0`` is the check that the audit has power (ε = ∞, so ε̂ should be large).
"""

from __future__ import annotations

import argparse
import sys
import warnings

# stdlib + the torch-free controllers registry at import time: --help stays fast
from adaptive_dp.training.config import (
    CANARY_KINDS,
    CANARY_MODES,
    CONTROLLER_NAMES,
    DEVICES,
    DP_ONLY_OPTIONS,
    ESTIMATORS,
    FEEDBACK_CONTROLLERS,
    GRAD_SAMPLE_MODES,
    OPTIMIZERS,
    SCHEDULE_CONTROLLERS,
    SPEND_MODES,
    TOKEN_ENCODERS,
    WANDB_MODES,
    TrainConfig,
)

#: options ``--resume`` accepts beside it (they change how the run is shown, not what it computes).
RESUME_OPTIONS = ("resume", "wandb_mode", "no_progress", "debug")


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
        "--model",
        default=d["model"],
        help="small-cnn, tanh-cnn, resnet20, lenet, vit-tiny or vit-small (default: %(default)s)",
    )
    data.add_argument(
        "--init",
        metavar="CKPT",
        default=None,
        help="fine-tune the model of `adaptive-dp pretrain --out DIR` (DIR/checkpoint.pt; same --model and "
        "--dataset): its public examples are removed from the training set before the audit split",
    )
    data.add_argument(
        "--lora-rank",
        type=int,
        default=None,
        metavar="R",
        help="with --init: train rank-R LoRA adapters and the classification head, the rest frozen; 0 = full "
        "fine-tuning (default: full fine-tuning)",
    )
    data.add_argument(
        "--lora-targets",
        default=d["lora_targets"],
        help="comma-separated layers LoRA adapts (default: %(default)s)",
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
        "--non-private",
        action="store_true",
        help="train the same model on the same data with the plain optimizer: no clipping, no noise, no "
        "accountant, no leakage monitor (ε = ∞; summary.json: epsilon null, non_private true) — the "
        "reference point of a privacy-utility trade-off; the DP options below must not be given with it",
    )
    privacy.add_argument(
        "--grad-sample-mode",
        choices=GRAD_SAMPLE_MODES,
        default=d["grad_sample_mode"],
        help="opacus' per-sample-gradient mode; ghost = ghost clipping (no per-sample gradients stored); "
        "auto = the fastest correct mode measured for the model (default: %(default)s)",
    )
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
        "--spend-budget",
        choices=SPEND_MODES,
        default=None,
        help="with --target-epsilon: spend what a binding --target-mi ceiling leaves of the budget — 'steps' "
        "trains past --epochs while the budget pays, 'sample-rate' raises the Poisson batch size of the "
        "planned steps (off by default: it costs up to --spend-limit × the plan's compute)",
    )
    privacy.add_argument(
        "--spend-limit",
        type=float,
        default=None,
        help="cap on --spend-budget's compute, a multiple of the plan: total steps ('steps') or batch size "
        "('sample-rate') (default: 4)",
    )
    privacy.add_argument(
        "--delta", type=float, default=d["delta"], help="δ of every ε (default: %(default)s)"
    )
    _add_canary_options(privacy, d)
    privacy.add_argument(
        "--log-private-metrics",
        action="store_true",
        help="also publish the training-batch loss and Poisson batch size per step (history.jsonl, "
        "W&B, summary): computed on private batches without noise, they are NOT covered "
        "by ε; off by default (summary.json: private_metrics_logged)",
    )


def _add_canary_options(privacy, d: dict) -> None:
    privacy.add_argument(
        "--canaries",
        type=int,
        default=d["canaries"],
        metavar="M",
        help="audit the run with M canaries (one-run audit, Steinke et al. 2023): at the end OUT/canary_audit.json "
        "and canary_audit.png, and empirical_epsilon (ε̂, a 95 %%-confidence lower bound on ε at --delta) in "
        "summary.json; 0 = none (default: %(default)s)",
    )
    privacy.add_argument(
        "--canary-mode",
        choices=CANARY_MODES,
        default=d["canary_mode"],
        help="gradient: white-box canary gradients of norm C added before the noise (needs --optimizer sgd); "
        "input: mislabelled training examples scored by their loss under the final model (default: %(default)s)",
    )
    privacy.add_argument(
        "--canary-kind",
        choices=CANARY_KINDS,
        default=d["canary_kind"],
        help="gradient canaries' directions: dirac (one coordinate each) or random (default: %(default)s)",
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
        "--force",
        action="store_true",
        help="accept an audit split that leaves fewer training examples than a batch, or under half of the "
        "data set (refused by default)",
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
    track.add_argument(
        "--out",
        default=None,
        help="output folder (default: runs/<UTC timestamp>); one that holds a run needs --resume or --overwrite",
    )
    track.add_argument(
        "--overwrite",
        action="store_true",
        help="move a run found in --out aside to OUT.old-<UTC time> (nothing is deleted) and start afresh",
    )
    track.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress report (default: a bar on a terminal, a few lines per epoch in a log file)",
    )
    track.add_argument(
        "--resume",
        metavar="OUT",
        default=None,
        help="continue the interrupted run in OUT from its last checkpoint, with that run's options "
        "(OUT/checkpoint.pt); only --wandb-mode, --no-progress and --debug may be given",
    )


def config_from_args(args: argparse.Namespace):
    """The :class:`adaptive_dp.training.TrainConfig` for parsed command-line ``args`` (options that are not
    training options, e.g. ``--overwrite``, are left out)."""
    return TrainConfig.from_dict(vars(args))


def _explicit_options(args: argparse.Namespace) -> set[str]:
    """The destinations of the options given on the command line: ``args._given`` (set by the dispatcher,
    :func:`adaptive_dp.cli.parse_with_given`), else those whose value differs from the default."""
    given = getattr(args, "_given", None)
    if given is not None:
        return set(given)
    parser = argparse.ArgumentParser()
    configure(parser)
    defaults = vars(parser.parse_args([]))
    return {k for k, v in vars(args).items() if k in defaults and v != defaults[k]}


def _flags(dests) -> str:
    return ", ".join(f"--{k.replace('_', '-')}" for k in sorted(dests))


def _check_explicit(args: argparse.Namespace) -> None:
    """Refuse options beside ``--resume`` other than :data:`RESUME_OPTIONS` (also ones equal to their default:
    the saved run's options win), and DP options beside ``--non-private``.

    Raises:
        ValueError: naming the options to drop.
    """
    explicit = _explicit_options(args)
    if getattr(args, "resume", None):
        conflicts = explicit - set(RESUME_OPTIONS)
        if conflicts:
            raise ValueError(
                f"--resume continues the run with its saved options; drop {_flags(conflicts)} "
                "(only --wandb-mode, --no-progress and --debug may be given)"
            )
    elif getattr(args, "non_private", False):
        dp_only = explicit & set(DP_ONLY_OPTIONS)
        if dp_only:
            raise ValueError(
                f"--non-private trains without clipping, noise, accountant or leakage monitor, so "
                f"{_flags(dp_only)} would do nothing: drop them, or drop --non-private for a DP-SGD run"
            )


def run(args: argparse.Namespace) -> int:
    """Train (or resume); print what happened and where the results went.

    Returns:
        0; 2 with one error line for bad usage or input (a folder holding a run, a budget out of reach ...); 1
        for a fault at run time (a full disk ...); 130 / 143 after Ctrl-C / SIGTERM (the run's files written,
        the ``--resume`` command printed). ``--debug`` shows the traceback instead of the error line.
    """
    from adaptive_dp.cli import report_failure
    from adaptive_dp.training.interrupt import RunInterrupted
    from adaptive_dp.training.loop import resume, train

    # opacus' per-sample-gradient hooks trip this torch warning on the first layer (inputs need no gradient);
    # it is harmless and would otherwise interrupt the progress bar.
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    progress = not args.no_progress
    try:
        _check_explicit(args)
        if getattr(args, "resume", None):
            summary = resume(args.resume, progress=progress, wandb_mode=args.wandb_mode)
        else:
            summary = train(config_from_args(args), progress=progress, overwrite=bool(args.overwrite))
    except RunInterrupted as exc:
        _report_interrupted(exc)
        return exc.exit_code
    except (Exception, KeyboardInterrupt) as exc:
        if type(exc).__name__ == "DistributedError":  # not imported at the top: fast --help
            _exit_after_distributed_failure(exc)
        return report_failure("train", exc, debug=getattr(args, "debug", False))
    if (summary.get("distributed") or {}).get("rank", 0) == 0:  # under torchrun rank 0 reports the run
        _report(summary)
    return 0


def _exit_after_distributed_failure(exc: BaseException) -> None:
    """One error line, then leave at once (a broken gloo group can abort the interpreter's teardown)."""
    from adaptive_dp.distributed import exit_after_failure

    print(f"adaptive-dp train: error: {exc}", file=sys.stderr)
    exit_after_failure(1)


def _report_interrupted(exc) -> None:
    """What an interrupted run did and how to continue it."""
    summary = exc.summary
    print(
        f"interrupted by {exc.signal_name} after step {summary['steps']}: history, summary and W&B run written "
        f"to {summary['outputs']['dir']}/",
        file=sys.stderr,
    )
    print(f"continue the run with: {exc.resume_command}", file=sys.stderr)


def _report(summary: dict) -> None:
    """Print what happened (one line), the run's figures and where its outputs went."""
    from adaptive_dp.training.summary import outcome_line

    outputs = summary["outputs"]
    print(outcome_line(summary))
    epsilon = (
        "ε = ∞ (non-private)"
        if summary["non_private"]
        else f"ε = {summary['odometer_epsilon']:.3f} at δ = {summary['delta']:g} (odometer)"
    )
    print(
        f"test accuracy {summary['test_accuracy']:.4f}, {epsilon}; {summary['steps']} steps, "
        f"{summary['wall_time_s']:.1f} s"
    )
    if summary["guarantee_epsilon"] is not None and summary.get("guarantee_kind") != "composition":
        print(
            f"guarantee: ε = {summary['guarantee_epsilon']:.3f} at δ = {summary['delta']:g} "
            f"({summary.get('guarantee_kind') or 'renyi-filter'})"
        )
    if summary["mi_readings"]:
        print(
            f"leakage: {summary['mi_readings']} readings, MI mean {summary['mean_mi']:.3f}, max "
            f"{summary['max_mi']:.3f}, final {summary['final_mi']:.3f} nats"
        )
    if summary["private_metrics_logged"] and not summary["non_private"]:
        print(
            "private metrics logged: the training-batch loss and batch size are published and not covered by ε"
        )
    if summary.get("spend_budget"):
        print(
            f"spend budget ({summary['spend_budget']}): {summary['steps_past_plan']} steps past the plan of "
            f"{summary['planned_steps']}, mean q {summary['mean_sample_rate']:.4g} — "
            f"{summary['compute_vs_plan']:.2f}× the plan's compute, {100 * summary['budget_spent']:.1f} % of the "
            "budget spent"
        )
    if summary["stopped_early"]:
        print(
            f"stopped early (privacy budget exhausted; the model trained so far is saved): {summary['stop_reason']}"
        )
    if summary.get("empirical_epsilon") is not None:
        print(
            f"canary audit: empirical ε ≥ {summary['empirical_epsilon']:.3f} at δ = {summary['delta']:g} "
            f"(95 % confidence, {summary['canaries']} canaries)"
        )
    _report_history(summary)
    print(f"results in {outputs['dir']}/")
    for key in ("history", "summary", "tradeoff", "checkpoint", "canary_audit", "canary_plot", "wandb"):
        if outputs.get(key):
            print(f"  {key:<12} {outputs[key]}")
    if summary["wandb"]["mode"] == "offline" and outputs.get("wandb"):
        print(f"  upload the W&B run with: wandb sync {outputs['wandb']}")


def _report_history(summary: dict) -> None:
    """Lines about the run's past: a previous run moved aside, a resume and the steps it booked."""
    if summary.get("previous_run_moved_to"):
        print(f"the previous run in this folder was moved to {summary['previous_run_moved_to']}/")
    if summary.get("resumed_at_step") is not None:
        line = f"resumed after step {summary['resumed_at_step']}"
        if summary.get("discarded_steps"):
            line += (
                f"; {summary['discarded_steps']} step(s) lost in the interruption are booked in ε and the budget "
                "(discarded_steps.jsonl)"
            )
        print(line)
