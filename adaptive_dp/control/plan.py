"""The plan of a private run: its budget, initial noise multiplier and planned steps."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

__all__ = ["Budget", "Plan", "check_plan_fits", "data_adaptive", "noise_search_accountant"]

INCREMENTAL_RDP = "rdp_incremental"


@dataclass(frozen=True)
class Budget:
    """A hard (ε, δ) budget over ``epochs`` planned epochs (``make_private_with_epsilon``)."""

    target_epsilon: float
    target_delta: float
    epochs: float


@dataclass(frozen=True)
class Plan:
    """The initial noise multiplier and the planned optimizer steps (None: not known)."""

    noise_multiplier: float
    total_steps: int | None


def check_plan_fits(plan: Plan, budget: Budget, *, sigma_max: float | None) -> None:
    """Refuse a budget whose uniform plan already needs more noise than ``sigma_max`` allows.

    Raises:
        ValueError: naming the σ the plan needs and the settings that would make it feasible.
    """
    if sigma_max is not None and math.isfinite(plan.noise_multiplier) and plan.noise_multiplier > sigma_max:
        raise ValueError(
            f"ε = {budget.target_epsilon} at δ = {budget.target_delta} over {budget.epochs:g} epochs needs σ = "
            f"{plan.noise_multiplier:.4g} on every step, above sigma_max = {sigma_max:.4g}, so no step could be "
            f"taken; raise sigma_max above {plan.noise_multiplier:.4g}, raise target_epsilon, or plan fewer epochs"
        )


def data_adaptive(controller: Any) -> bool:
    """Whether σ may depend on the data (any controller but an open-loop schedule, whose σ is fixed in advance)."""
    from controllers import Schedule

    return controller is not None and not isinstance(controller, Schedule)


def noise_search_accountant(mechanism: str) -> str:
    """The accountant opacus' ``get_noise_multiplier`` searches with for this engine's accountant.

    The incremental RDP accountant gives opacus' RDP ε (to ~1e-12) about 8× faster; GDP is refused earlier.
    """
    return mechanism if mechanism in (INCREMENTAL_RDP, "prv") else "rdp"
