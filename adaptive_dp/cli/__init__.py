"""The ``adaptive-dp`` console script: a thin dispatcher over the command modules in this package.

``adaptive-dp train ...`` trains with DP-SGD on real data and tracks ε, σ and MI;
``adaptive-dp attack ...`` runs gradient-inversion / identification attacks; ``adaptive-dp sweep ...`` runs a
grid of ``train`` runs; ``adaptive-dp pretrain ...`` trains without privacy on a declared public split, for
``train --init``. ``adaptive-dp CMD --help``
lists each command's options. Also runnable as ``python -m adaptive_dp.cli`` (e.g. under ``torchrun``).
Building the parser imports only the standard library, so ``adaptive-dp --help`` answers at once; option
values that name registered things (``--model``, ``--dataset``) are checked against the registries
through :class:`RegistryChoices`, which imports them on first use.

Failures are one line on stderr, ``adaptive-dp CMD: error: ...`` naming the fix, and an exit status
(:func:`report_failure`): 2 for bad usage or input (:data:`USAGE_ERRORS`), 1 for a fault at run time (a full
disk, an I/O error, a crashed peer), 130 for Ctrl-C. ``--debug`` (every command) shows the traceback instead.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import sys
from collections.abc import Container, Iterator, Mapping, Sequence

#: command name -> (module of this package, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("adaptive_dp.cli.train", "train a model with (adaptive) DP-SGD and track ε, σ, MI"),
    "attack": (
        "adaptive_dp.cli.attack",
        "attack the gradients DP-SGD releases (DLG, iDLG, IG, identification)",
    ),
    "sweep": ("adaptive_dp.cli.sweep", "run a grid of train runs and chart their ε–MI–accuracy frontier"),
    "pretrain": (
        "adaptive_dp.cli.pretrain",
        "pretrain a model without privacy on a declared public split (for train --init)",
    ),
}


#: exceptions that mean the command was asked something it cannot do (exit status 2); everything else that
#: escapes a command is a fault at run time (exit status 1).
USAGE_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    FileNotFoundError,
    NotImplementedError,
    TypeError,
)
#: exit status of a command stopped by Ctrl-C (128 + SIGINT).
INTERRUPTED_EXIT_CODE = 130
#: what to do about an OSError, by errno.
_OS_FIXES = {
    errno.ENOSPC: "free some space on that disk",
    errno.EDQUOT: "free some space (disk quota exceeded)",
    errno.EROFS: "write to a folder on a writable file system (--out)",
    errno.EACCES: "check that path's permissions (or choose another --out)",
    errno.EPERM: "check that path's permissions (or choose another --out)",
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


def failure_message(exc: BaseException) -> str:
    """One line for ``exc``: its message (an OSError's reason, file and the fix), then its notes (e.g. the
    ``--resume`` command the training loop adds), joined with "; "."""
    if isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError):
        where = f" ({exc.filename})" if exc.filename else ""
        text = f"{exc.strerror or exc}{where}"
        fix = _OS_FIXES.get(exc.errno)
        text += f": {fix}" if fix else ""
    elif isinstance(exc, USAGE_ERRORS):
        text = str(exc)
    else:
        text = f"{type(exc).__name__}: {exc}"
    parts = [" ".join(text.split())] + [" ".join(str(n).split()) for n in getattr(exc, "__notes__", [])]
    return "; ".join(p for p in parts if p)


def report_failure(command: str, exc: BaseException, *, debug: bool = False) -> int:
    """Print ``adaptive-dp COMMAND: error: <one line>`` to stderr and return the exit status: 2 for
    :data:`USAGE_ERRORS`, 130 for ``KeyboardInterrupt``, 1 otherwise. With ``debug`` re-raise ``exc`` (the
    traceback) instead."""
    if debug:
        raise exc
    if isinstance(exc, KeyboardInterrupt):
        notes = "".join(f"; {n}" for n in getattr(exc, "__notes__", []))
        print(f"adaptive-dp{' ' + command if command else ''}: interrupted{notes}", file=sys.stderr)
        return INTERRUPTED_EXIT_CODE
    line = failure_message(exc)
    if not isinstance(exc, (OSError, *USAGE_ERRORS)):  # a fault nobody foresaw: the traceback may help
        line += "; run again with --debug for the traceback"
    print(f"adaptive-dp {command}: error: {line}", file=sys.stderr)
    return 2 if isinstance(exc, USAGE_ERRORS) else 1


#: marks an option not given on the command line (see :func:`parse_with_given`).
_NOT_GIVEN = object()


def parse_with_given(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace:
    """``parser.parse_args(argv)`` with ``_given`` set: the destinations of the options given explicitly in
    ``argv`` (whatever their value, also one equal to the default)."""
    args = parser.parse_args(argv)
    probe = argparse.Namespace(**dict.fromkeys(vars(args), _NOT_GIVEN))
    parser.parse_args(argv, namespace=probe)
    args._given = frozenset(k for k, v in vars(probe).items() if v is not _NOT_GIVEN)
    return args


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
        p.add_argument(
            "--debug", action="store_true", help="show the traceback of a failure instead of one error line"
        )
        p.set_defaults(_run=module.run, _parser=p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the process exit code (see :func:`report_failure`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        top = build_parser().parse_args(argv)
        args = parse_with_given(top._parser, argv[argv.index(top.command) + 1 :])
        args.command = top.command
    except KeyboardInterrupt as exc:
        return report_failure("", exc)
    try:
        return int(args._run(args) or 0)
    except (Exception, KeyboardInterrupt) as exc:  # every failure: one line (a traceback with --debug)
        return report_failure(args.command, exc, debug=args.debug)
