"""Progress of a training run: a tqdm bar on a terminal, a few plain lines in a log file.

On a terminal (stderr is a TTY) each epoch gets a tqdm bar with σ, ε, MI and the batch loss (the user's own
screen). Anywhere else — CI, ``nohup``, ``2> run.log`` — carriage-return updates would pile up in the log, so
the epoch prints one line every :data:`LINES_PER_EPOCH`-th of its steps instead (and none of the private batch
loss unless the run publishes it): a 1-epoch CIFAR-10 run's log stays a few kB.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TextIO

#: progress lines per epoch when stderr is not a terminal.
LINES_PER_EPOCH = 10


def progress_mode(show: bool, stream: TextIO | None = None) -> str:
    """``"off"`` (not shown), ``"bar"`` (``stream``, default stderr, is a terminal) or ``"lines"``."""
    if not show:
        return "off"
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    try:
        return "bar" if callable(isatty) and isatty() else "lines"
    except ValueError:  # a closed stream
        return "lines"


def fmt(value: float | None, digits: int = 3) -> str:
    """``value`` with ``digits`` decimals, "–" for None or a non-finite value."""
    return "–" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


class EpochProgress:
    """Iterate over one epoch's batches and report progress as :func:`progress_mode` says.

    Args:
        batches: the epoch's loader (``len`` gives the expected steps).
        epoch, epochs: 1-based epoch and the planned number of epochs.
        show: whether to report at all.
        loss_in_lines: whether the plain lines may show the batch loss (a private metric: only when the run
            publishes it).
        stream: where the bar or the lines go (default stderr).
    """

    def __init__(
        self,
        batches: Iterable[Any],
        *,
        epoch: int,
        epochs: int,
        show: bool,
        loss_in_lines: bool = False,
        stream: TextIO | None = None,
    ) -> None:
        self.stream = sys.stderr if stream is None else stream
        self.mode = progress_mode(show, self.stream)
        self.batches = batches
        self.label = f"epoch {epoch}/{epochs}"
        self.total = len(batches) if hasattr(batches, "__len__") else None
        self.every = max(1, math.ceil((self.total or LINES_PER_EPOCH) / LINES_PER_EPOCH))
        self.loss_in_lines = loss_in_lines
        self.steps = 0
        self.t0 = time.perf_counter()
        self._bar: Any = None
        if self.mode == "bar":
            from tqdm.auto import tqdm

            self._bar = tqdm(batches, desc=self.label, dynamic_ncols=True, leave=True, file=self.stream)

    def __iter__(self) -> Iterator[Any]:
        return iter(self._bar if self._bar is not None else self.batches)

    def update(
        self, *, loss: float | None, sigma: float | None, epsilon: float | None, mi: float | None
    ) -> None:
        """Report the step just taken (σ used, ε after it, the latest MI reading in nats, the batch loss)."""
        self.steps += 1
        figures = f"σ={fmt(sigma)} ε={fmt(epsilon, 2)} MI={fmt(mi)}"
        if self._bar is not None:
            self._bar.set_postfix_str(f"loss={fmt(loss)} {figures}", refresh=False)
        elif self.mode == "lines" and (self.steps % self.every == 0 or self.steps == self.total):
            loss_part = f"loss={fmt(loss)} " if self.loss_in_lines else ""
            of = f"/{self.total}" if self.total else ""
            elapsed = time.perf_counter() - self.t0
            print(
                f"{self.label} step {self.steps}{of}: {loss_part}{figures} ({elapsed:.1f} s)",
                file=self.stream,
            )
            self.stream.flush()

    def write(self, line: str) -> None:
        """Print a line to stdout without breaking the bar."""
        if self.mode == "off":
            return
        if self._bar is not None:
            from tqdm.auto import tqdm

            tqdm.write(line)
        else:
            print(line, flush=True)

    def close(self) -> None:
        """Close the bar (if any)."""
        if self._bar is not None:
            self._bar.close()
