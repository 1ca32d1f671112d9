"""The ``adaptive-dp`` console script: a thin dispatcher over the command modules in this package.

``adaptive-dp train ...`` trains with DP-SGD on real data and tracks ε, σ and MI;
``adaptive-dp attack ...`` runs gradient-inversion / identification attacks. ``adaptive-dp CMD --help``
lists each command's options. Also runnable as ``python -m adaptive_dp.cli`` (e.g. under ``torchrun``).
Building the parser imports only the standard library, so ``adaptive-dp --help`` answers at once; option
values that name registered things (``--model``, ``--dataset``) are checked against the registries
through :class:`RegistryChoices`, which imports them on first use.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Container, Iterator, Mapping, Sequence

#: command name -> (module of this package, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("adaptive_dp.cli.train", "train a model with (adaptive) DP-SGD and track ε, σ, MI"),
    "attack": (
        "adaptive_dp.cli.attack",
        "attack the gradients DP-SGD releases (DLG, iDLG, IG, identification)",
    ),
}


def _resolve(dotted: str) -> object:
    module_name, _, attribute = dotted.partition(":")
    return getattr(importlib.import_module(module_name), attribute)


class RegistryChoices(Container[str]):
    """The names of a registry as argparse ``choices``, imported on first use.

    Give the option a ``metavar`` too: argparse then lists the names only when it prints that command's
    help (``%(choices)s`` in the help text) or rejects a value ("invalid choice: ... (choose from ...)"),
    so building the parser does not import the registry (and torch) and ``adaptive-dp --help`` stays fast.

    Args:
        registry: ``"module:attribute"`` of the mapping name → entry, e.g. ``"adaptive_dp.models:MODELS"``.
        resolve: optional ``"module:function"`` mapping any accepted spelling (aliases, case) to a registered
            name and raising ValueError otherwise; without it a value must be a registered name exactly.
    """

    def __init__(self, registry: str, *, resolve: str | None = None) -> None:
        self.registry = registry
        self.resolve = resolve

    def _names(self) -> Mapping[str, object]:
        return _resolve(self.registry)

    def __contains__(self, value: object) -> bool:
        if self.resolve is None:
            return value in self._names()
        try:
            _resolve(self.resolve)(value)
        except ValueError:
            return False
        return True

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._names()))


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
        p = sub.add_parser(
            name, help=help_text, description=(module.__doc__ or help_text).strip().split("\n\n")[0]
        )
        module.configure(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args._run(args) or 0)
