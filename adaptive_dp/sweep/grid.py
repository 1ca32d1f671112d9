"""The grid of a sweep: the product of the values given to each ``train`` option, one named run per point.

A run's name joins the options that vary across the grid (``target-mi-0.3_target-epsilon-2``), so that the
folder ``DIR/runs/<name>`` says what the run is; options with one value are left out of the name (the grid has
one run named ``run`` when nothing varies). Names hold only ``[A-Za-z0-9._-]``.
"""

from __future__ import annotations

import hashlib
import itertools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from adaptive_dp.sweep.options import TrainOption, train_options, train_parser

#: longest run name before it is shortened to a prefix and a hash of the full name.
MAX_NAME_LENGTH = 120
#: the train flag of the non-private reference runs (:attr:`Grid.non_private`).
NON_PRIVATE_FLAG = "--non-private"


@dataclass(frozen=True)
class GridRun:
    """One point of the grid.

    Attributes:
        name: the run's name (its folder ``DIR/runs/<name>``).
        options: destination → value of every option the sweep gives this run (axes and flags; flags are True).
        argv: those options as ``adaptive-dp train`` arguments (without ``--out``).
    """

    name: str
    options: dict[str, Any]
    argv: tuple[str, ...]


@dataclass
class Grid:
    """The product grid of a sweep.

    Attributes:
        axes: destination → values (length ≥ 1), in ``train``'s option order.
        flags: destinations of the ``train`` flags set for every run.
        options: :func:`adaptive_dp.sweep.options.train_options` (for the option strings).
        non_private: also run ``train --non-private`` as a reference (ε = ∞), once per point of the axes that
            are not DP-only options (``adaptive_dp.training.config.DP_ONLY_OPTIONS``); its runs are named
            ``non-private`` (``non-private_seed-1``, ... when such an axis varies).
    """

    axes: dict[str, list[Any]]
    flags: list[str] = field(default_factory=list)
    options: dict[str, TrainOption] = field(default_factory=train_options)
    non_private: bool = False

    @property
    def varying(self) -> list[str]:
        """Destinations of the axes with more than one value (they name the runs)."""
        return [dest for dest, values in self.axes.items() if len(values) > 1]

    def runs(self) -> list[GridRun]:
        """Every point of the product grid, the last axis varying fastest, then the non-private references.

        Raises:
            ValueError: if two points get the same name (values that differ only in characters a folder
                name cannot hold), or an axis has no value.
        """
        for dest, values in self.axes.items():
            if not values:
                raise ValueError(f"{self.options[dest].flag} needs at least one value")
        runs = self._points(self.axes)
        if self.non_private:
            from adaptive_dp.training.config import DP_ONLY_OPTIONS

            kept = {d: v for d, v in self.axes.items() if d not in DP_ONLY_OPTIONS}
            runs += self._points(kept, reference=True)
        names = [r.name for r in runs]
        clashes = sorted({n for n in names if names.count(n) > 1})
        if clashes:
            raise ValueError(
                f"several grid points get the run name(s) {', '.join(clashes)}: give values that differ in "
                "letters, digits, '.', '-' or '_'"
            )
        return runs

    def _points(self, axes: dict[str, list[Any]], *, reference: bool = False) -> list[GridRun]:
        """The runs of the product of ``axes`` (named by :func:`run_name` of the axes that vary in the whole
        grid) with the grid's flags; ``reference``: non-private runs (``--non-private``, named ``non-private``
        or ``non-private_<run name>``)."""
        varying = [d for d in self.varying if d in axes]
        runs = []
        for point in itertools.product(*axes.values()):
            chosen = dict(zip(axes, point))
            argv = [t for d, v in chosen.items() for t in (self.options[d].flag, format_arg(v))]
            argv += [self.options[d].flag for d in self.flags]
            options = {**chosen, **dict.fromkeys(self.flags, True)}
            name = run_name(chosen, varying)
            if reference:
                argv.append(NON_PRIVATE_FLAG)
                options["non_private"] = True
                name = f"non-private_{name}" if varying else "non-private"
            runs.append(GridRun(name=name, options=options, argv=tuple(argv)))
        return runs


def format_arg(value: Any) -> str:
    """A value as a ``train`` command-line argument (floats exactly: ``repr``)."""
    return repr(value) if isinstance(value, float) else str(value)


def format_value(value: Any) -> str:
    """A value as it appears in a run name: floats in the shortest exact form (``2.0`` → ``2``, ``0.3``)."""
    if isinstance(value, float):
        short = format(value, "g")
        return short if float(short) == value else repr(value)
    return str(value)


def run_name(chosen: Mapping[str, Any], varying: Sequence[str]) -> str:
    """The name of the run at the grid point ``chosen`` (destination → value).

    Args:
        chosen: the point's value of every axis.
        varying: the axes with more than one value; only they enter the name, as ``<option>-<value>``
            joined by ``_`` (``target-mi-0.3_seed-1``), ``"run"`` when none varies.

    Names longer than :data:`MAX_NAME_LENGTH` become a prefix and 10 hex digits of the full name's SHA-1.
    """
    parts = [f"{dest.replace('_', '-')}-{format_value(chosen[dest])}" for dest in varying]
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", "_".join(parts)) if parts else "run"
    if len(name) > MAX_NAME_LENGTH:
        digest = hashlib.sha1(name.encode()).hexdigest()[:10]
        name = f"{name[: MAX_NAME_LENGTH - 11]}-{digest}"
    return name


def validate_runs(runs: Sequence[GridRun]) -> None:
    """Check every run's options as ``adaptive-dp train`` would, before any run starts.

    Raises:
        ValueError: naming the first run whose options ``train`` refuses, with train's message.
    """
    from adaptive_dp.cli.train import config_from_args

    parser = train_parser()
    for run in runs:
        try:
            config_from_args(parser.parse_args(list(run.argv))).validate()
        except ValueError as exc:
            raise ValueError(f"grid point {run.name} ({' '.join(run.argv)}): {exc}") from None
