"""The ``adaptive-dp`` console script: a thin dispatcher over the command modules in this package.

``adaptive-dp train ...`` trains with DP-SGD on real data and tracks ε, σ and MI;
``adaptive-dp attack ...`` runs gradient-inversion / identification attacks. ``adaptive-dp CMD --help``
lists each command's options. Also runnable as ``python -m adaptive_dp.cli`` (e.g. under ``torchrun``).
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Sequence

#: command name -> (module of this package, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("adaptive_dp.cli.train", "train a model with (adaptive) DP-SGD and track ε, σ, MI"),
    "attack": ("adaptive_dp.cli.attack", "attack the gradients DP-SGD releases (DLG, iDLG, IG, identification)"),
}


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser, one sub-parser per entry of :data:`COMMANDS`."""
    from adaptive_dp import __version__

    parser = argparse.ArgumentParser(
        prog="adaptive-dp",
        description="Closed-loop DP-SGD: measure gradient leakage while training and adapt the noise.",
    )
    parser.add_argument("--version", action="version", version=f"adaptive-dp {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=help_text, description=(module.__doc__ or help_text).strip().split("\n\n")[0])
        module.configure(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args._run(args) or 0)

