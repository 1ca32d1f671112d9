"""The privacy-utility trade-off figure of a training run (matplotlib, Agg canvas; no pyplot global state).

Four panels: ε (odometer, at δ) over optimizer steps, with the budget's guarantee as a line when there is one;
the noise multiplier σ over steps (with the ε-budget floor when there is one); measured leakage (MI, nats) over
steps, with the MI ceiling when there is one; test accuracy against ε, one point per epoch.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def _series(records: Sequence[Mapping[str, Any]], field: str) -> tuple[list[float], list[float]]:
    """(steps, values) of the records whose ``field`` is a finite number."""
    xs: list[float] = []
    ys: list[float] = []
    for i, r in enumerate(records):
        v = r.get(field)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            xs.append(r.get("step", i + 1))
            ys.append(float(v))
    return xs, ys


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4")


def plot_tradeoff(
    history: Sequence[Mapping[str, Any]],
    epochs: Sequence[Mapping[str, Any]],
    path: str | os.PathLike,
    *,
    delta: float | None = None,
    target_mi: float | None = None,
    guarantee_epsilon: float | None = None,
    title: str | None = None,
) -> Path:
    """Draw the trade-off figure of a run and save it as a PNG.

    Args:
        history: one record per optimizer step (``step``, ``epsilon``, ``noise_multiplier``, optionally
            ``sigma_floor``, ``mi``, ``mi_gap``; None values are skipped).
        epochs: one record per epoch (``epoch``, ``epsilon``, ``test_accuracy``).
        path: where to write the PNG (parent folders are created).
        delta: δ of the ε values, for the axis label.
        target_mi: the MI ceiling (nats) to draw as a dashed line, if any.
        guarantee_epsilon: the Rényi filter's guarantee (ε at ``delta``) to draw as a dashed line, if any.
        title: figure title.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    eps_label = "ε" if delta is None else f"ε (δ = {delta:g})"
    fig = Figure(figsize=(11, 7.5), layout="constrained")
    FigureCanvasAgg(fig)
    (ax_eps, ax_sigma), (ax_mi, ax_acc) = fig.subplots(2, 2)

    xs, ys = _series(history, "epsilon")
    ax_eps.plot(xs, ys, color="C0", label="odometer (σ history used)")
    if guarantee_epsilon is not None:
        ax_eps.axhline(guarantee_epsilon, color="C3", linestyle="--", label="guarantee (Rényi filter budget)")
        ax_eps.legend()
    ax_eps.set(xlabel="optimizer step", ylabel=eps_label, title="privacy spent (accountant odometer)")
    if not xs:
        _empty(ax_eps, "no ε recorded")

    xs, ys = _series(history, "noise_multiplier")
    ax_sigma.plot(xs, ys, color="C1", label="σ used")
    fx, fy = _series(history, "sigma_floor")
    if fx:
        ax_sigma.plot(fx, fy, color="C3", linestyle="--", label="ε-budget floor")
    ax_sigma.set(xlabel="optimizer step", ylabel="noise multiplier σ", title="noise multiplier")
    if fx:
        ax_sigma.legend()

    mx, my = _series(history, "mi")
    gx, gy = _series(history, "mi_gap")
    if mx:
        ax_mi.plot(mx, my, marker=".", color="C2", label="MI")
    if gx:
        ax_mi.plot(gx, gy, marker=".", color="C4", alpha=0.7, label="MI gap")
    if target_mi is not None:
        ax_mi.axhline(target_mi, color="C3", linestyle="--", label="MI ceiling (target)")
    ax_mi.set(xlabel="optimizer step", ylabel="nats", title="measured gradient leakage")
    if mx or gx or target_mi is not None:
        ax_mi.legend()
    if not (mx or gx):
        _empty(ax_mi, "no leakage readings\n(leakage monitor not enabled)")

    ex, ey, labels = [], [], []
    for r in epochs:
        e, a = r.get("epsilon"), r.get("test_accuracy")
        if isinstance(e, (int, float)) and isinstance(a, (int, float)) and math.isfinite(e) and math.isfinite(a):
            ex.append(float(e))
            ey.append(float(a))
            labels.append(r.get("epoch", len(ex)))
    ax_acc.plot(ex, ey, marker="o", color="C0")
    if guarantee_epsilon is not None and ex:
        ax_acc.axvline(guarantee_epsilon, color="C3", linestyle="--", label="guarantee")
        ax_acc.legend()
    for e, a, lab in zip(ex, ey, labels):
        ax_acc.annotate(str(lab), (e, a), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax_acc.set(xlabel=eps_label, ylabel="test accuracy", title="test accuracy vs ε (label: epoch)")
    if not ex:
        _empty(ax_acc, "no evaluated epochs")

    if title:
        fig.suptitle(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path
