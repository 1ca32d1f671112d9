"""The privacy-utility trade-off figure of a training run (matplotlib, Agg canvas; no pyplot global state).

Five panels: ε (odometer, at δ) over optimizer steps, with the budget's guarantee as a line when there is one;
the noise multiplier σ over steps (with the ε-budget floor when there is one); measured leakage (MI, nats)
over steps, with the MI ceiling when there is one, and the critic gap on its own axis; test accuracy against
ε, one point per epoch; and the training curve — by default the loss on the audit split (public, measured by
the monitor), the training-batch loss only when the run logged private metrics — with the test loss per
epoch.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from adaptive_dp.training.records import critic_gap

#: panel layout of the figure (``subplot_mosaic``).
LAYOUT = [["epsilon", "sigma", "leakage"], ["accuracy", "loss", "loss"]]
#: training-curve fields :func:`plot_tradeoff` draws, and their legend labels.
LOSS_LABELS = {
    "audit_loss": "loss on the audit split (public)",
    "loss": "training-batch loss (private metric, not covered by ε)",
}


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


def _epsilon_panel(ax, history, *, eps_label: str, guarantee_epsilon: float | None) -> None:
    xs, ys = _series(history, "epsilon")
    ax.plot(xs, ys, color="C0", label="odometer (σ history used)")
    if guarantee_epsilon is not None:
        ax.axhline(guarantee_epsilon, color="C3", linestyle="--", label="guarantee (Rényi filter budget)")
        ax.legend()
    ax.set(xlabel="optimizer step", ylabel=eps_label, title="privacy spent (accountant odometer)")
    if not xs:
        _empty(ax, "no ε recorded")


def _sigma_panel(ax, history) -> None:
    xs, ys = _series(history, "noise_multiplier")
    ax.plot(xs, ys, color="C1", label="σ used")
    fx, fy = _series(history, "sigma_floor")
    if fx:
        ax.plot(fx, fy, color="C3", linestyle="--", label="ε-budget floor")
        ax.legend()
    ax.set(xlabel="optimizer step", ylabel="noise multiplier σ", title="noise multiplier")


def _leakage_panel(ax, history, *, target_mi: float | None) -> None:
    mx, my = _series(history, "mi")
    gx, gy = _series(
        [{"step": r.get("step", i + 1), "critic_gap": critic_gap(r)} for i, r in enumerate(history)],
        "critic_gap",
    )
    if mx:
        ax.plot(mx, my, marker=".", color="C2", label="MI")
    if target_mi is not None:
        ax.axhline(target_mi, color="C3", linestyle="--", label="MI ceiling (target)")
    ax.set(xlabel="optimizer step", ylabel="MI (nats)", title="measured gradient leakage")
    if mx or target_mi is not None:
        ax.legend(loc="upper left")
    if gx:  # a difference of critic scores, not nats: its own axis
        gap_ax = ax.twinx()
        gap_ax.plot(gx, gy, marker=".", color="C4", alpha=0.6, label="critic gap")
        gap_ax.set_ylabel("critic gap (matched − mismatched score)")
        gap_ax.legend(loc="upper right")
    if not (mx or gx):
        _empty(ax, "no leakage readings\n(leakage monitor not enabled)")


def _accuracy_panel(ax, epochs, *, eps_label: str, guarantee_epsilon: float | None) -> None:
    ex, ey, labels = [], [], []
    for r in epochs:
        e, a = r.get("epsilon"), r.get("test_accuracy")
        if (
            isinstance(e, (int, float))
            and isinstance(a, (int, float))
            and math.isfinite(e)
            and math.isfinite(a)
        ):
            ex.append(float(e))
            ey.append(float(a))
            labels.append(r.get("epoch", len(ex)))
    ax.plot(ex, ey, marker="o", color="C0")
    if guarantee_epsilon is not None and ex:
        ax.axvline(guarantee_epsilon, color="C3", linestyle="--", label="guarantee")
        ax.legend()
    for e, a, lab in zip(ex, ey, labels):
        ax.annotate(str(lab), (e, a), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set(xlabel=eps_label, ylabel="test accuracy", title="test accuracy vs ε (label: epoch)")
    if not ex:
        _empty(ax, "no evaluated epochs")


def _loss_panel(ax, history, epochs, *, loss_field: str) -> None:
    xs, ys = _series(history, loss_field)
    if xs:
        ax.plot(
            xs,
            ys,
            marker="." if loss_field == "audit_loss" else None,
            color="C5",
            label=LOSS_LABELS[loss_field],
        )
    tx, ty = _series(epochs, "test_loss")
    if tx:
        ax.plot(tx, ty, marker="o", color="C0", label="test loss (per epoch)")
    ax.set(xlabel="optimizer step", ylabel="cross-entropy (nats)", title="training curve")
    if xs or tx:
        ax.legend()
    else:
        _empty(ax, "no loss recorded")


def tradeoff_figure(
    history: Sequence[Mapping[str, Any]],
    epochs: Sequence[Mapping[str, Any]],
    *,
    delta: float | None = None,
    target_mi: float | None = None,
    guarantee_epsilon: float | None = None,
    loss_field: str = "audit_loss",
    title: str | None = None,
):
    """The trade-off figure of a run as a ``matplotlib.figure.Figure`` (arguments as :func:`plot_tradeoff`);
    the panels of :data:`LAYOUT` are told apart by their titles.

    Raises:
        ValueError: if ``loss_field`` is not one of :data:`LOSS_LABELS`.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if loss_field not in LOSS_LABELS:
        raise ValueError(f"loss_field must be one of {', '.join(LOSS_LABELS)}, got {loss_field!r}")
    eps_label = "ε" if delta is None else f"ε (δ = {delta:g})"
    fig = Figure(figsize=(15, 7.5), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplot_mosaic(LAYOUT)
    _epsilon_panel(axes["epsilon"], history, eps_label=eps_label, guarantee_epsilon=guarantee_epsilon)
    _sigma_panel(axes["sigma"], history)
    _leakage_panel(axes["leakage"], history, target_mi=target_mi)
    _accuracy_panel(axes["accuracy"], epochs, eps_label=eps_label, guarantee_epsilon=guarantee_epsilon)
    _loss_panel(axes["loss"], history, epochs, loss_field=loss_field)
    if title:
        fig.suptitle(title)
    return fig


def plot_tradeoff(
    history: Sequence[Mapping[str, Any]],
    epochs: Sequence[Mapping[str, Any]],
    path: str | os.PathLike,
    *,
    delta: float | None = None,
    target_mi: float | None = None,
    guarantee_epsilon: float | None = None,
    loss_field: str = "audit_loss",
    title: str | None = None,
) -> Path:
    """Draw the trade-off figure of a run and save it as a PNG.

    Args:
        history: one record per optimizer step (``step``, ``epsilon``, ``noise_multiplier``, optionally
            ``sigma_floor``, ``mi``, ``critic_gap``, ``audit_loss``, ``loss``; None values are skipped).
        epochs: one record per epoch (``epoch``, ``epsilon``, ``test_accuracy``, ``test_loss``).
        path: where to write the PNG (parent folders are created).
        delta: δ of the ε values, for the axis label.
        target_mi: the MI ceiling (nats) to draw as a dashed line, if any.
        guarantee_epsilon: the Rényi filter's guarantee (ε at ``delta``) to draw as a dashed line, if any.
        loss_field: the step field of the training curve: ``"audit_loss"`` (public; the default) or ``"loss"``
            (the training-batch loss, only in runs that log private metrics).
        title: figure title.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: if ``loss_field`` is not one of :data:`LOSS_LABELS`.
    """
    fig = tradeoff_figure(
        history,
        epochs,
        delta=delta,
        target_mi=target_mi,
        guarantee_epsilon=guarantee_epsilon,
        loss_field=loss_field,
        title=title,
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path
