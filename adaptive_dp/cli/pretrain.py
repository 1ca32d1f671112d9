"""Pretrain a model without privacy on a declared public split of the training set (for private fine-tuning).

``--public-examples K`` examples of the training set, chosen by a seeded permutation (``--seed``), are declared
public and trained on with plain Adam or SGD; the rest of the training set stays private for ``adaptive-dp train
--init OUT/checkpoint.pt [--lora-rank R]``, which removes the public examples before carving its audit split.
Writes into ``--out`` (default ``runs/<UTC timestamp>``): ``checkpoint.pt`` (model, data set, weights, the public
split record, options), ``public_split.json`` (seed, count, the indices and their SHA-256) and ``summary.json``
(test accuracy, public examples, seconds). A folder that holds a run is refused; ``--overwrite`` moves it aside.
The public examples get no privacy: the pretrained weights may reveal them (see docs/finetuning.md).
"""

from __future__ import annotations

import argparse
import warnings

# stdlib only at import time: --help stays fast
from adaptive_dp.training.config import DEVICES, OPTIMIZERS
from adaptive_dp.training.pretrain import PretrainConfig


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``adaptive-dp pretrain`` to ``parser``."""
    d = vars(PretrainConfig())
    parser.add_argument(
        "--dataset",
        default=d["dataset"],
        help="digits (embedded), mnist, fashion-mnist or cifar10 (default: %(default)s)",
    )
    parser.add_argument(
        "--model",
        default=d["model"],
        help="vit-tiny or vit-small (LoRA-ready), or small-cnn, tanh-cnn, resnet20, lenet (default: %(default)s)",
    )
    parser.add_argument(
        "--public-examples",
        type=int,
        default=d["public_examples"],
        metavar="K",
        help="training-set examples declared public and trained on (default: %(default)s)",
    )
    parser.add_argument("--epochs", type=int, default=d["epochs"], help="epochs (default: %(default)s)")
    parser.add_argument(
        "--batch-size", type=int, default=d["batch_size"], help="batch size (default: %(default)s)"
    )
    parser.add_argument("--lr", type=float, default=d["lr"], help="learning rate (default: %(default)s)")
    parser.add_argument(
        "--optimizer", choices=OPTIMIZERS, default=d["optimizer"], help="optimizer (default: %(default)s)"
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=d["seed"],
        help="seeds the public split, initialisation and batch order (default: %(default)s)",
    )
    parser.add_argument("--data-dir", default=None, help="data root (default: $ADAPTIVE_DP_DATA)")
    parser.add_argument(
        "--device",
        choices=DEVICES,
        default=d["device"],
        help="auto = CUDA when torch sees a GPU (default: %(default)s)",
    )
    parser.add_argument(
        "--test-batch-size",
        type=int,
        default=d["test_batch_size"],
        help="evaluation batch size (default: %(default)s)",
    )
    parser.add_argument("--out", default=None, help="output folder (default: runs/<UTC timestamp>)")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="move a run found in --out aside to OUT.old-<UTC time> (nothing is deleted) and start afresh",
    )
    parser.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress report (default: a bar on a terminal, a few lines per epoch in a log file)",
    )


def config_from_args(args: argparse.Namespace) -> PretrainConfig:
    """The :class:`PretrainConfig` of parsed command-line ``args``."""
    names = {f.name for f in PretrainConfig.__dataclass_fields__.values()}
    return PretrainConfig(**{k: v for k, v in vars(args).items() if k in names})


def run(args: argparse.Namespace) -> int:
    """Pretrain; print the test accuracy, where the outputs went and the fine-tuning command.

    Returns:
        0; 2 with one error line for bad usage or input (a folder holding a run, too many public examples ...);
        1 for a fault at run time. ``--debug`` shows the traceback instead of the error line.
    """
    from adaptive_dp.cli import report_failure
    from adaptive_dp.training.pretrain import pretrain

    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    try:
        summary = pretrain(
            config_from_args(args), progress=not args.no_progress, overwrite=bool(args.overwrite)
        )
    except (Exception, KeyboardInterrupt) as exc:
        return report_failure("pretrain", exc, debug=getattr(args, "debug", False))
    print(
        f"pretrained {summary['model']} on {summary['public_examples']} public {summary['dataset']} examples: "
        f"test accuracy {summary['test_accuracy']:.4f}, {summary['seconds']:.1f} s"
    )
    print(f"results in {summary['out']}/")
    for key in ("checkpoint", "public_split_file"):
        print(f"  {key:<18} {summary[key]}")
    print(
        "fine-tune privately on the rest of the training set with: adaptive-dp train "
        f"--dataset {summary['dataset']} --model {summary['model']} --init {summary['checkpoint']} --lora-rank 8"
    )
    return 0
