"""The canary audit of a training run: ``canary_audit.json`` and ``canary_audit.png``.

A run with ``--canaries M`` ends with the engine's one-run audit (Steinke, Nasr & Jagielski 2023,
arXiv:2305.08846, Algorithm 1; :meth:`adaptive_dp.privacy_engine.AdaptivePrivacyEngine.canary_audit`): ε̂, a
lower bound on the run's ε at δ that holds with the audit's confidence. This module writes it with the
per-canary scores and coin flips (so the bound can be recomputed) and draws the scores of the included and the
excluded canaries: the further apart the two histograms, the more the run leaks and the larger ε̂.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from adaptive_dp.training.state import TrainingRun

logger = logging.getLogger(__name__)

#: confidence of the reported ε̂ (probability that the run's true ε is at least ε̂).
CONFIDENCE = 0.95


def canary_scores(run: TrainingRun) -> list[float]:
    """The [m] canary scores of ``run`` (higher: "more likely included"): gradient canaries' white-box scores
    Σ_t ⟨g_t, c_i⟩, or input canaries' negative loss (nats) under their wrong label in the final model.

    Raises:
        RuntimeError: the run has no canaries.
    """
    canary_run = run.engine.canary_run if run.engine is not None else None
    if canary_run is None:
        raise RuntimeError("this run has no canaries (--canaries M)")
    if run.config.canary_mode == "input":
        return [-float(v) for v in canary_run.losses(model=run.model)]
    return [float(v) for v in canary_run.scores()]


def canary_report(run: TrainingRun) -> dict[str, Any]:
    """The canary audit of a finished run: the engine's :class:`~adaptive_dp.auditing.CanaryAudit` fields
    (``epsilon_lower_bound`` ε̂ at ``delta`` = the run's δ, ``canaries``, ``guesses``, ``correct``,
    ``confidence`` = :data:`CONFIDENCE`, ``mode``, ``k``), ``kind`` (gradient canaries' directions, None for
    input canaries), and per canary ``scores`` and ``included`` (the coin flips).

    Raises:
        RuntimeError: the run has no canaries.
    """
    scores = canary_scores(run)
    audit = run.engine.canary_audit(confidence=CONFIDENCE, delta=run.config.delta)
    return {
        **audit.as_dict(),
        "kind": run.config.canary_kind if run.config.canary_mode == "gradient" else None,
        "scores": scores,
        "included": [bool(v) for v in run.engine.canary_run.included.tolist()],
    }


def write_canary_report(report: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write :func:`canary_report` as JSON to ``path`` (parent folders are created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return path


def plot_canary_scores(report: dict[str, Any], path: str | os.PathLike) -> Path:
    """Histogram of the scores of the included and the excluded canaries (one shared set of bins), titled with
    ε̂; saved as a PNG at ``path`` (matplotlib, Agg canvas). Returns the path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    scores, included = report["scores"], report["included"]
    inside = [s for s, flag in zip(scores, included) if flag]
    outside = [s for s, flag in zip(scores, included) if not flag]
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    bins = min(40, max(5, len(scores) // 5))
    lo, hi = min(scores), max(scores)
    edges = [lo + (hi - lo) * i / bins for i in range(bins + 1)] if hi > lo else bins
    ax.hist(outside, bins=edges, alpha=0.6, label=f"excluded ({len(outside)})", color="tab:blue")
    ax.hist(inside, bins=edges, alpha=0.6, label=f"included ({len(inside)})", color="tab:red")
    unit = "Σ_t ⟨g_t, c_i⟩" if report["mode"] == "gradient" else "− loss under the wrong label (nats)"
    ax.set_xlabel(f"canary score: {unit}")
    ax.set_ylabel("canaries")
    ax.legend()
    ax.set_title(
        f"{report['canaries']} {report['mode']} canaries: ε̂ = {report['epsilon_lower_bound']:.2f} at "
        f"δ = {report['delta']:g}\n({report['confidence']:.0%} confidence; {report['correct']} of "
        f"{report['guesses']} guesses right)"
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def record_canary_audit(run: TrainingRun, outputs: dict[str, Any]) -> float | None:
    """At the end of ``run`` (rank 0): write ``outputs["canary_audit"]`` (:func:`canary_report`) and
    ``outputs["canary_plot"]`` (:func:`plot_canary_scores`, logged to W&B as ``plots/canary_audit``; its path
    set to None if drawing fails: a plotting failure must not lose the audit).

    Returns:
        ε̂ (``epsilon_lower_bound``), or None for a run without canaries (or on ranks > 0).
    """
    if outputs.get("canary_audit") is None:
        return None
    report = canary_report(run)
    write_canary_report(report, outputs["canary_audit"])
    try:
        plot_canary_scores(report, outputs["canary_plot"])
        run.tracker.log_image(outputs["canary_plot"], "plots/canary_audit")
    except Exception as exc:  # noqa: BLE001 - a plotting failure must not lose the audit
        logger.warning("could not draw the canary score histogram: %s", exc)
        outputs["canary_plot"] = None
    return float(report["epsilon_lower_bound"])
