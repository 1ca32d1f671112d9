"""``DIR/frontier.png``: test accuracy against ε (the Pareto front drawn) and against the highest MI reading.

One marker per run, coloured by its MI ceiling (grey without one); a filled circle where ε is the Rényi filter's
guarantee, a hollow triangle where it is only the odometer reading. matplotlib, Agg canvas (no pyplot global
state, no display).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from adaptive_dp.sweep.frontier import epsilon_of, pareto_front

NO_CEILING_COLOUR = "0.55"


def _colours(rows: Sequence[Mapping[str, Any]]):
    """A colour per row from its ``target_mi`` (viridis, log scale when the ceilings span ≥ 5×), the
    ScalarMappable for the colour bar (None without ceilings) and the distinct ceilings (its ticks)."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import LogNorm, Normalize

    ceilings = sorted({r["target_mi"] for r in rows if r.get("target_mi") is not None})
    if not ceilings:
        return [NO_CEILING_COLOUR] * len(rows), None, []
    lo, hi = ceilings[0], ceilings[-1]
    if lo == hi:
        lo, hi = lo / 2, hi * 2
    norm = LogNorm(lo, hi) if hi / lo >= 5 else Normalize(lo, hi)
    mappable = ScalarMappable(norm=norm, cmap="viridis")
    colours = [
        NO_CEILING_COLOUR if r.get("target_mi") is None else mappable.to_rgba(r["target_mi"]) for r in rows
    ]
    return colours, mappable, ceilings


def _scatter(ax, xs, rows, colours) -> None:
    for x, row, colour in zip(xs, rows, colours):
        guaranteed = row.get("guarantee_epsilon") is not None
        ax.scatter(
            [x],
            [row["test_accuracy"]],
            marker="o" if guaranteed else "^",
            s=60,
            facecolors=colour if guaranteed else "none",
            edgecolors=colour,
            linewidths=1.5,
            zorder=3,
        )


def _spent(ax, xs, rows, colours) -> None:
    """A thin line from the ε spent (odometer) to the guarantee, for runs with a budget."""
    for x, row, colour in zip(xs, rows, colours):
        spent = row.get("odometer_epsilon")
        if row.get("guarantee_epsilon") is not None and spent is not None and spent < x:
            ax.plot([spent, x], [row["test_accuracy"]] * 2, color=colour, linewidth=1, alpha=0.6, zorder=1)
            ax.scatter([spent], [row["test_accuracy"]], marker="|", s=60, color=colour, zorder=2)


def _epsilon_panel(ax, rows, colours) -> None:
    xs = [epsilon_of(r) for r in rows]
    _spent(ax, xs, rows, colours)
    _scatter(ax, xs, rows, colours)
    front = pareto_front([(x, r["test_accuracy"]) for x, r in zip(xs, rows)])
    fx, fy = [xs[i] for i in front], [rows[i]["test_accuracy"] for i in front]
    ax.plot(fx + [max(xs)], fy + [fy[-1]], drawstyle="steps-post", color="crimson", linewidth=1.2, zorder=2)
    ax.scatter(
        fx, fy, s=180, facecolors="none", edgecolors="crimson", linewidths=1.2, zorder=4, label="Pareto front"
    )
    budgets = [r.get("guarantee_epsilon") is not None for r in rows]
    if any(budgets):
        ax.scatter([], [], marker="o", color="0.3", label="ε = guarantee (Rényi filter)")
        ax.scatter([], [], marker="|", s=60, color="0.3", label="ε spent (odometer) of a budget")
    if not all(budgets):
        ax.scatter(
            [], [], marker="^", facecolors="none", edgecolors="0.3", label="ε = odometer (no guarantee)"
        )
    if max(xs) / max(min(xs), 1e-12) > 20:
        ax.set_xscale("log")
    delta = rows[0].get("delta")
    ax.set_xlabel(f"ε at δ = {delta:g}" if delta is not None else "ε")
    ax.set_ylabel("test accuracy")
    ax.set_title("accuracy against ε")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, fontsize=8, frameon=False)


def _mi_panel(ax, rows, colours) -> None:
    shown = [(r, c) for r, c in zip(rows, colours) if r.get("max_mi") is not None]
    _scatter(ax, [r["max_mi"] for r, _ in shown], [r for r, _ in shown], [c for _, c in shown])
    drawn = set()
    for row, colour in shown:
        if row.get("target_mi") is not None and row["target_mi"] not in drawn:
            drawn.add(row["target_mi"])
            ax.axvline(row["target_mi"], color=colour, linestyle="--", linewidth=1, zorder=1)
    ax.set_xlabel("highest MI reading (nats per audit example); dashed: ceilings")
    ax.set_title("accuracy against measured leakage")


def _references(axes, rows) -> None:
    """A dashed grey line per non-private reference run at its accuracy."""
    for row in rows:
        for ax in axes:
            ax.axhline(row["test_accuracy"], color="0.4", linestyle=":", linewidth=1.2, zorder=1)
        axes[0].plot(
            [],
            [],
            color="0.4",
            linestyle=":",
            label=f"non-private reference (ε = ∞): {row['test_accuracy']:.3f}",
        )


def plot_frontier(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike, *, title: str = "") -> Path:
    """Draw the frontier of ``rows`` (:mod:`adaptive_dp.sweep.frontier` rows) into ``path`` (PNG); non-private
    reference runs are dotted lines at their accuracy, rows without a test accuracy are left out.

    Raises:
        ValueError: if no private run has a test accuracy.
    """
    shown = [r for r in rows if r.get("test_accuracy") is not None]
    private = [r for r in shown if not r.get("non_private")]
    if not private:
        raise ValueError("no finished private run to plot: the frontier needs a run with a test accuracy")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    colours, mappable, ceilings = _colours(private)
    fig = Figure(figsize=(12, 4.8))
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2, sharey=True)
    _references((left, right), [r for r in shown if r.get("non_private")])
    _epsilon_panel(left, private, colours)
    _mi_panel(right, private, colours)
    for ax in (left, right):
        ax.grid(alpha=0.3)
    if mappable is not None:
        bar = fig.colorbar(mappable, ax=[left, right], label="MI ceiling (nats)", pad=0.02)
        bar.set_ticks(ceilings, labels=[f"{c:g}" for c in ceilings])
    fig.suptitle(title or f"ε–MI–accuracy frontier ({len(private)} runs)")
    path = Path(path)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path
