"""The ε–MI–accuracy frontier of a sweep: one row per finished run, its Pareto front, the best run per budget.

Rows come from each run's ``summary.json`` (written by ``adaptive-dp train``); ε of a row is the Rényi filter's
guarantee when the run had a budget (``--target-epsilon``), else the accountant's odometer reading (no formal
guarantee when σ adapted without a budget); a non-private reference run (``train --non-private``) has ε = ∞ and
stays off the Pareto front and the per-budget table. ``DIR/frontier.json`` is ``{"runs": [row, ...], ...}``.
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
        "target_epsilon", "delta", "stopped_early", "non_private"}``.
    """
    config = dict(summary.get("config") or {})
    row: dict[str, Any] = {"name": name, "config": config, "options": dict(options)}
    row.update({key: summary.get(key) for key in SUMMARY_FIELDS})
    row["target_mi"] = config.get("target_mi")
    row["target_epsilon"] = config.get("target_epsilon")
    row["delta"] = summary.get("delta")
    row["stopped_early"] = summary.get("stopped_early")
    row["non_private"] = bool(summary.get("non_private"))
    return row


def epsilon_of(row: Mapping[str, Any]) -> float:
    """The ε a row is placed at: ``guarantee_epsilon`` if the run had a budget, else ``odometer_epsilon``;
    ``inf`` for a non-private run."""
    if row.get("non_private"):
        return math.inf
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
    """Set ``row["on_front"]`` (on the ε–accuracy Pareto front of the private runs, :func:`pareto_front`) on
    every row; returns them."""
    private = [
        i for i, r in enumerate(rows) if not r.get("non_private") and r.get("test_accuracy") is not None
    ]
    front = pareto_front([(epsilon_of(rows[i]), float(rows[i]["test_accuracy"])) for i in private])
    on_front = {private[j] for j in front}
    for i, row in enumerate(rows):
        row["on_front"] = i in on_front
    return rows


def read_rows(out: str | os.PathLike, runs: Iterable[Any]) -> list[dict[str, Any]]:
    """Frontier rows of the ``runs`` (grid points with ``name`` and ``options``) that finished
    (:func:`adaptive_dp.sweep.runner.run_state`: the ``summary.json`` in ``out/runs/<name>`` of a completed run),
    in grid order, Pareto front marked."""
    from adaptive_dp.sweep.runner import FINISHED, run_dir, run_state

    rows = []
    for run in runs:
        path = run_dir(out, run.name)
        if run_state(path) == FINISHED:
            summary = json.loads((path / "summary.json").read_text(encoding="utf-8"))
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
    the most accurate private run that holds the ceiling (:func:`holds_ceiling`), or None when no run of that
    cell does. Budgets and ceilings in increasing order, None last; non-private runs are left out."""

    def order(values: Iterable[float | None]) -> list[float | None]:
        distinct = set(values)
        return sorted(v for v in distinct if v is not None) + ([None] if None in distinct else [])

    rows = [r for r in rows if not r.get("non_private")]
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
