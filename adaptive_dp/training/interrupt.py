"""Ctrl-C and SIGTERM during training: finish the step in flight, write what the run has, and say how to resume.

While :class:`StopSignals` is active (the training loop; main thread only), SIGINT and SIGTERM only set a flag;
the loop checks it after every step and at the start of every epoch, so the step in flight completes and is
recorded. A second signal while the run winds down raises ``KeyboardInterrupt`` at once (the user insists).
:func:`adaptive_dp.training.train` then writes the summary and closes the W&B run, releases the folder and
raises :class:`RunInterrupted`, which carries the summary and the ``--resume`` command.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

#: exit status of a process ended by each signal (the shell's 128 + signal number convention).
EXIT_CODES = {"SIGINT": 130, "SIGTERM": 143}


class RunInterrupted(KeyboardInterrupt):
    """A training run stopped by SIGINT / SIGTERM after writing what it had.

    Attributes:
        signal_name: "SIGINT" or "SIGTERM".
        exit_code: 130 or 143.
        summary: the summary written to ``OUT/summary.json`` (``interrupted`` holds the signal).
        resume_command: the command that continues the run from its last checkpoint.
    """

    def __init__(self, *, signal_name: str, summary: dict[str, Any], resume_command: str) -> None:
        super().__init__(f"interrupted by {signal_name}; continue with `{resume_command}`")
        self.signal_name = signal_name
        self.exit_code = EXIT_CODES.get(signal_name, 130)
        self.summary = summary
        self.resume_command = resume_command


class StopSignals:
    """A context manager that turns SIGINT / SIGTERM into a request to stop (:attr:`received`).

    Outside the main thread (where Python cannot set signal handlers) it does nothing.

    Attributes:
        received: the name of the first signal received ("SIGINT", "SIGTERM"), None before one.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
