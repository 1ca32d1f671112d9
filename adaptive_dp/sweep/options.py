"""The options of ``adaptive-dp sweep``, derived from ``adaptive-dp train``'s own parser (one source).

:func:`add_train_options` calls :func:`adaptive_dp.cli.train.configure` on a fresh parser and copies each of its
options into the sweep's parser: an option that takes one value takes one or more (``nargs="+"``, each value a
grid axis point), a flag stays a flag (set for every run), tracking options (:data:`SHARED`) keep one value,
and the options the sweep sets per run itself (:data:`MANAGED`) are left out. A new ``train`` option thus
appears in ``sweep`` without an edit here. Stdlib only (and the torch-free option lists of ``train``).
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

#: train options the sweep sets for each run itself (``--out DIR/runs/<name>``, resuming, the non-private
#: reference run) or that the ``adaptive-dp`` dispatcher adds to every command (``--debug``): never copied.
MANAGED = ("out", "resume", "overwrite", "no_progress", "non_private", "debug", "help")
#: train options that configure tracking, not the experiment: one value for the whole sweep.
SHARED = ("wandb_mode", "wandb_project")


@dataclass(frozen=True)
class TrainOption:
    """One option of ``adaptive-dp train`` as the sweep sees it.

    Attributes:
        dest: the argparse destination (``"target_mi"``), also the key of a run's options.
        flag: the long option string (``"--target-mi"``).
        takes_value: False for a flag (``store_true``), True for an option with one value.
        shared: one value for the whole sweep (:data:`SHARED`), never an axis.
        default: train's default (a flag is given when its value differs from it).
    """

    dest: str
    flag: str
    takes_value: bool
    shared: bool = False
    default: Any = None


def train_parser() -> argparse.ArgumentParser:
    """A fresh parser holding exactly the options of ``adaptive-dp train`` (its ``configure``)."""
    from adaptive_dp.cli import train

    parser = argparse.ArgumentParser(prog="adaptive-dp train")
    train.configure(parser)
    return parser


def _long_flag(action: argparse.Action) -> str:
    longs = [s for s in action.option_strings if s.startswith("--")]
    return (longs or action.option_strings)[0]


def train_options(parser: argparse.ArgumentParser | None = None) -> dict[str, TrainOption]:
    """The options of ``adaptive-dp train`` that a sweep may set, by destination, in the parser's order.

    Raises:
        ValueError: if ``train`` grew an option kind the sweep cannot copy (a positional argument, an option
            with ``nargs`` other than one value or none).
    """
    parser = parser or train_parser()
    options: dict[str, TrainOption] = {}
    # argparse has no public accessor for a parser's actions; ``_actions`` is the documented-by-use one
    for action in parser._actions:
        if action.dest in MANAGED:
            continue
        if not action.option_strings or action.nargs not in (None, 0):
            raise ValueError(
                f"train option {action.dest!r} (nargs={action.nargs!r}) cannot become a sweep axis: "
                "teach adaptive_dp.sweep.options to copy it"
            )
        options[action.dest] = TrainOption(
            dest=action.dest,
            flag=_long_flag(action),
            takes_value=action.nargs is None,
            shared=action.dest in SHARED,
            default=action.default,
        )
    return options


def add_train_options(parser: argparse.ArgumentParser) -> dict[str, TrainOption]:
    """Copy the options of ``adaptive-dp train`` into ``parser`` (the sweep's), grouped as in train's help.

    A single-value option gets ``nargs="+"`` (given values arrive as a list; an option not given keeps train's
    scalar default, so the two are told apart), a flag stays a flag, a :data:`SHARED` option keeps one value.

    Returns:
        :func:`train_options` of train's parser.
    """
    source = train_parser()
    options = train_options(source)
    for group in source._action_groups:
        copied = [a for a in group._group_actions if a.dest in options]
        if not copied:
            continue
        target = parser.add_argument_group(group.title, group.description)
        for action in copied:
            _copy_action(target, action, options[action.dest])
    return options


def _copy_action(target: Any, action: argparse.Action, option: TrainOption) -> None:
    kwargs: dict[str, Any] = {"dest": action.dest, "default": action.default, "help": action.help}
    if not option.takes_value:
        if not isinstance(action.const, bool):
            raise ValueError(f"train flag {option.flag} is not a store_true/store_false flag")
        kwargs["action"] = "store_true" if action.const else "store_false"
    else:
        kwargs.update(type=action.type, choices=action.choices, metavar=action.metavar)
        if not option.shared:
            kwargs["nargs"] = "+"
    target.add_argument(*action.option_strings, **kwargs)


def given_values(
    args: argparse.Namespace, options: Mapping[str, TrainOption]
) -> tuple[dict[str, list[Any]], list[str], dict[str, Any]]:
    """Split parsed sweep ``args`` into the grid's axes, the flags set and the shared options given.

    Returns:
        ``(axes, flags, shared)``: ``axes`` maps the destination of every single-value option given to its
        values (duplicates dropped, order kept; one value is an axis of length 1), in train's option order;
        ``flags`` the destinations of the flags given; ``shared`` the :data:`SHARED` options given (other than
        train's default).
    """
    axes: dict[str, list[Any]] = {}
    flags: list[str] = []
    shared: dict[str, Any] = {}
    for dest, option in options.items():
        value = getattr(args, dest, None)
        if option.shared:
            if value is not None and value != option.default:
                shared[dest] = value
        elif not option.takes_value:
            if value is not None and value != option.default:
                flags.append(dest)
        elif isinstance(value, list):  # given on the command line (a default is never a list)
            axes[dest] = list(dict.fromkeys(value))
    return axes, flags, shared
