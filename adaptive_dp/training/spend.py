"""``--spend-budget`` in the training loop: the epochs it may run, the step fields it adds, its summary figures.

The engine does the spending (:mod:`adaptive_dp.control.spend`); the loop only has to offer the extra epochs of
``"steps"`` (the engine stops them with ``SpendLimitReached`` / ``PrivacyBudgetExhausted``, which the loop records as
``stop_reason``) and to publish what each step booked: its Poisson rate q and the engine's guarantee ε so far.
"""

from __future__ import annotations

import math
from typing import Any

from adaptive_dp.training.config import TrainConfig
from adaptive_dp.training.state import TrainingRun

__all__ = ["run_epochs", "spend_options", "spend_summary", "step_privacy_fields"]

#: summary fields of :func:`spend_summary` (None in a run without an engine).
SPEND_FIELDS = (
    "spend_budget",
    "spend_limit",
    "planned_steps",
    "steps_past_plan",
    "base_sample_rate",
    "mean_sample_rate",
    "compute_vs_plan",
    "budget_spent",
)


def spend_options(config: TrainConfig) -> dict[str, Any]:
    """The engine keywords of ``--spend-budget`` / ``--spend-limit`` (None: off; the engine refuses them without
    a budget)."""
    return {"spend_budget": config.spend_budget, "spend_limit": config.spend_limit}


def run_epochs(config: TrainConfig) -> int:
    """The most epochs the loop may run: ``epochs``, or ⌈``spend_limit`` × ``epochs``⌉ with ``spend_budget="steps"``
    (the engine stops at ``spend_limit`` × the planned steps, or earlier when the budget cannot pay a step)."""
    if config.spend_budget != "steps" or config.non_private:
        return config.epochs
    from adaptive_dp.control.options import DEFAULT_SPEND_LIMIT  # the control package imports torch

    limit = DEFAULT_SPEND_LIMIT if config.spend_limit is None else float(config.spend_limit)
    return math.ceil(limit * config.epochs)


def step_privacy_fields(run: TrainingRun) -> dict[str, Any]:
    """``sample_rate`` (q the step's batch was drawn at and booked with) and ``guarantee_epsilon`` (the engine's
    formal ε at its δ after the step; None for a non-private run or where the engine has none per step) of the
    step just taken; with ``spend_budget`` also ``steps_past_plan`` (steps taken beyond the plan so far)."""
    engine = run.engine
    history = getattr(engine, "history", None) if engine is not None else None
    last = history[-1] if history else {}
    rate = last.get("sample_rate")
    fields = {
        "sample_rate": run.sample_rate if rate is None else float(rate),
        "guarantee_epsilon": last.get("guarantee_epsilon"),
    }
    if run.config.spend_budget is not None and getattr(engine, "budget_filter", None) is not None:
        fields["steps_past_plan"] = max(len(history) - engine.budget_filter.planned_steps, 0)
    return fields


def spend_summary(run: TrainingRun) -> dict[str, Any]:
    """The compute the run's plan and ``spend_budget`` cost (:meth:`AdaptivePrivacyEngine.spend_summary`):
    ``spend_budget``, ``spend_limit``, ``planned_steps``, ``steps_past_plan``, ``base_sample_rate``,
    ``mean_sample_rate``, ``compute_vs_plan`` (expected examples processed over the plan's), ``budget_spent``;
    all None for a non-private run."""
    if run.engine is None or not hasattr(run.engine, "spend_summary"):
        return dict.fromkeys(SPEND_FIELDS)
    summary = run.engine.spend_summary()
    return {key: summary.get(key) for key in SPEND_FIELDS}
