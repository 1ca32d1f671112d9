"""The ε–MI–accuracy frontier of a sweep: one row per finished run, its Pareto front, the best run per budget.

Rows come from each run's ``summary.json`` (written by ``adaptive-dp train``); ε of a row is the Rényi filter's
guarantee when the run had a budget (``--target-epsilon``), else the accountant's odometer reading (no formal
guarantee when σ adapted without a budget). ``DIR/frontier.json`` is ``{"runs": [row, ...], ...}``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

#: the figures of a run's ``summary.json`` a frontier row carries.
SUMMARY_FIELDS = (
    "test_accuracy",
    "guarantee_epsilon",
    "odometer_epsilon",
    "max_mi",
    "mean_mi",
    "fraction_over_ceiling",
    "wall_time_s",
)


def frontier_row(name: str, summary: Mapping[str, Any], *, options: Mapping[str, Any]) -> dict[str, Any]:
    """One frontier row from a run's ``summary.json``.

    Returns:
        ``{"name", "config" (the run's full train options), "options" (those the sweep gave it), the
        :data:`SUMMARY_FIELDS` (ε at δ, MI in nats, seconds; None where the run has none), "target_mi",
        "target_epsilon", "delta", "stopped_early"}``.
    """
    config = dict(summary.get("config") or {})
    row: dict[str, Any] = {"name": name, "config": config, "options": dict(options)}
    row.update({key: summary.get(key) for key in SUMMARY_FIELDS})
    row["target_mi"] = config.get("target_mi")
    row["target_epsilon"] = config.get("target_epsilon")
    row["delta"] = summary.get("delta")
    row["stopped_early"] = summary.get("stopped_early")
    return row


def epsilon_of(row: Mapping[str, Any]) -> float:
    """The ε a row is placed at: ``guarantee_epsilon`` if the run had a budget, else ``odometer_epsilon``."""
    value = row.get("guarantee_epsilon")
    return float(row["odometer_epsilon"] if value is None else value)


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points (ε, accuracy) that no other point dominates, by increasing ε.

    A point dominates another if its ε is ≤ and its accuracy ≥, one of them strictly (lower ε, higher
    accuracy are better). Of equal points the first is kept.
    """
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1], i))
    front: list[int] = []
    best = -math.inf
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def mark_front(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Set ``row["on_front"]`` (on the ε–accuracy Pareto front, :func:`pareto_front`) on every row; returns them."""
    front = set(pareto_front([(epsilon_of(r), float(r["test_accuracy"])) for r in rows]))
    for i, row in enumerate(rows):
        row["on_front"] = i in front
    return rows


def read_rows(out: str | os.PathLike, runs: Iterable[Any]) -> list[dict[str, Any]]:
    """Frontier rows of the ``runs`` (grid points with ``name`` and ``options``) that have a ``summary.json``
    in ``out/runs/<name>``, in grid order, Pareto front marked."""
    rows = []
    for run in runs:
        path = Path(out) / "runs" / run.name / "summary.json"
        if path.is_file():
            summary = json.loads(path.read_text(encoding="utf-8"))
            rows.append(frontier_row(run.name, summary, options=run.options))
    return mark_front(rows)


def write_frontier(path: str | os.PathLike, rows: Sequence[Mapping[str, Any]], **extra: Any) -> Path:
    """Write ``{"runs": rows, **extra}`` to ``path`` (JSON, replaced atomically: a reader never sees half)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"runs": list(rows), **extra}, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def holds_ceiling(row: Mapping[str, Any], *, tolerance: float) -> bool:
    """Whether a run kept its MI ceiling: at most ``tolerance`` (a fraction in [0, 1]) of its valid readings
    over it. A run without a ceiling holds trivially; one with a ceiling but no reading does not."""
    if row.get("target_mi") is None:
        return True
    over = row.get("fraction_over_ceiling")
    return over is not None and over <= tolerance


def best_by_budget(
    rows: Sequence[Mapping[str, Any]], *, tolerance: float
) -> dict[float | None, dict[float | None, Mapping[str, Any] | None]]:
    """For each ε budget (``target_epsilon``; None = no budget) and MI ceiling (``target_mi``; None = none),
    the most accurate run that holds the ceiling (:func:`holds_ceiling`), or None when no run of that cell
    does. Budgets and ceilings in increasing order, None last."""

    def order(values: Iterable[float | None]) -> list[float | None]:
        distinct = set(values)
        return sorted(v for v in distinct if v is not None) + ([None] if None in distinct else [])

    table: dict[float | None, dict[float | None, Mapping[str, Any] | None]] = {}
    ceilings = order(r.get("target_mi") for r in rows)
    for budget in order(r.get("target_epsilon") for r in rows):
        table[budget] = {}
        for ceiling in ceilings:
            cell = [
                r
                for r in rows
                if r.get("target_epsilon") == budget
                and r.get("target_mi") == ceiling
                and holds_ceiling(r, tolerance=tolerance)
            ]
            table[budget][ceiling] = max(cell, key=lambda r: r["test_accuracy"], default=None)
    return table
