"""What a sweep prints: one progress line per finished run (with an ETA), the frontier table and, for each ε
budget, the best accuracy that holds each MI ceiling."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from adaptive_dp.sweep.frontier import best_by_budget, epsilon_of
from adaptive_dp.sweep.runner import RunOutcome


def duration(seconds: float) -> str:
    """``seconds`` as ``"42 s"``, ``"3 min 05 s"`` or ``"1 h 02 min"``."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def figures(row: Mapping[str, Any] | None) -> str:
    """A row's accuracy, ε (guarantee or odometer) and leakage in a few words."""
    if row is None:
        return "no summary.json"
    if row.get("non_private"):
        return f"acc {row['test_accuracy']:.3f}, ε = ∞ (non-private reference)"
    kind = "guarantee" if row.get("guarantee_epsilon") is not None else "odometer"
    text = f"acc {row['test_accuracy']:.3f}, ε {epsilon_of(row):.2f} ({kind})"
    if row.get("max_mi") is not None:
        text += f", MI max {row['max_mi']:.3f} nats"
        if row.get("fraction_over_ceiling") is not None:
            text += f" ({100 * row['fraction_over_ceiling']:.0f} % of readings over {row['target_mi']:g})"
    if row.get("stopped_early"):
        text += ", stopped early (budget)"
    return text


class Progress:
    """Progress lines of a sweep: ``[done/total] name: what happened; ETA``.

    The ETA is the mean duration of the runs finished in this invocation times the runs left, divided by the
    runs at once (``jobs``, at most the runs left); runs skipped as finished count as done and take no time.

    Args:
        total: runs in the grid.
        to_run: runs this invocation starts (not finished before).
        jobs: runs at once.
    """

    def __init__(self, *, total: int, to_run: int, jobs: int = 1) -> None:
        self.total, self.to_run, self.jobs = total, to_run, jobs
        self.done = self.ran = 0
        self.seconds = 0.0

    def line(self, outcome: RunOutcome, row: Mapping[str, Any] | None) -> str:
        """The line for one more finished (or skipped, or failed) run."""
        self.done += 1
        name = outcome.run.name
        if outcome.returncode is None:
            return f"[{self.done}/{self.total}] {name}: finished before, skipped — {figures(row)}"
        self.ran += 1
        self.seconds += outcome.seconds
        left = self.to_run - self.ran
        eta = (
            f"ETA {duration(self.seconds / self.ran * left / min(self.jobs, left))}"
            if left
            else "all runs done"
        )
        verb = {"interrupted": "resumed and finished", "new": "finished"}[outcome.state]
        if outcome.stopped:
            what = (
                f"interrupted (exit {outcome.returncode}; resumes on the next invocation; see {outcome.log})"
            )
        elif outcome.returncode != 0:
            what = f"FAILED (exit {outcome.returncode}; see {outcome.log})"
        else:
            what = f"{verb} in {duration(outcome.seconds)} — {figures(row)}"
        return f"[{self.done}/{self.total}] {name}: {what}; {eta}"


def _cell(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def frontier_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The frontier as a plain-text table (one line per run, ``*`` on the Pareto front)."""
    head = ["run", "acc", "ε guar.", "ε odom.", "MI max", "MI mean", "over", "time s", "front"]
    body = [
        [
            r["name"],
            _cell(r["test_accuracy"]),
            _cell(r["guarantee_epsilon"]),
            _cell(r["odometer_epsilon"]),
            _cell(r["max_mi"]),
            _cell(r["mean_mi"]),
            _cell(r["fraction_over_ceiling"]),
            f"{r['wall_time_s']:.0f}" if r.get("wall_time_s") is not None else "—",
            "*" if r.get("on_front") else "",
        ]
        for r in rows
    ]
    widths = [max(len(str(line[i])) for line in [head, *body]) for i in range(len(head))]
    return "\n".join(
        "  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() for line in [head, *body]
    )


def budget_summary(rows: Sequence[Mapping[str, Any]], *, tolerance: float) -> str:
    """For each ε budget, the best accuracy that holds each MI ceiling (:func:`best_by_budget`), as text."""
    table = best_by_budget(rows, tolerance=tolerance)
    lines = [
        f"best test accuracy per ε budget that holds each MI ceiling (held: ≤ {100 * tolerance:g} % of the "
        "run's MI readings over its ceiling):"
    ]
    for budget, cells in table.items():
        label = f"ε ≤ {budget:g}" if budget is not None else "no ε budget"
        parts = []
        for ceiling, row in cells.items():
            key = f"MI ≤ {ceiling:g}" if ceiling is not None else "no ceiling"
            ran = any(r.get("target_epsilon") == budget and r.get("target_mi") == ceiling for r in rows)
            best = (
                f"{row['test_accuracy']:.3f} ({row['name']})" if row else ("none holds" if ran else "no run")
            )
            parts.append(f"{key}: {best}")
        lines.append(f"  {label:<14} " + "; ".join(parts))
    for row in rows:
        if row.get("non_private"):
            lines.append(f"  {'ε = ∞':<14} non-private reference: {row['test_accuracy']:.3f} ({row['name']})")
    return "\n".join(lines)
