"""Spend what a binding leakage ceiling leaves of an ε budget (``spend_budget``; docs/accounting.md).

Under a hard ε budget (a Rényi filter) and a binding MI ceiling, the controller holds the ceiling by adding noise
above the filter's floor, and the budget is left partly unspent. The leakage the monitor reads depends on σ, not
on how many steps are taken nor on the Poisson rate q, so the rest of the budget can buy more training without
touching the ceiling:

* ``"steps"``: training goes on past the planned steps while the filter pays (its floor past the plan is the σ
  that pays one more step; the step's σ is max(controller's σ, floor), never below the controller's), up to
  ``spend_limit`` × the planned steps (:class:`SpendLimitReached`), or until the floor exceeds ``sigma_max``
  (:class:`PrivacyBudgetExhausted`). Compute: up to ``spend_limit`` × the plan's steps.
* ``"sample-rate"``: σ stays the controller's; after each step t the rate of step t + 1 is set to the largest q
  on the filter's rate grid with spent + n · ρ(σ_t, q) ≤ B at every order (n = remaining planned steps; q ≤
  ``spend_limit`` × base q, ≤ 1, never below the base q) — on the Poisson sampler (``sample_rate``, read for
  every batch), the optimizer (``expected_batch_size``, opacus' divisor of the noisy sum under mean reduction,
  and ``step_sample_rate``, which the accountant's step hook books) together, before the next batch is drawn.
  The filter charges each step's actual (σ_t, q_t) and the floor of step t + 1 is computed at q_{t+1}, so the
  guarantee is the filter's (Feldman & Zrnic 2021, §3; Lécuyer 2021, arXiv:2103.01379). Compute: the expected
  batch grows by q_t / q_base (at most ``spend_limit``×); the number of steps is the plan's.

Single process only (the batch of step t + 1 must be drawn after step t ends: no DataLoader workers, no DDP).
"""

from __future__ import annotations

import math
from typing import Any

from opacus.utils.uniform_sampler import UniformWithReplacementSampler

from adaptive_dp import distributed as ddp
from adaptive_dp.accountants.filter import PrivacyBudgetExhausted, RenyiFilter
from adaptive_dp.control.options import DEFAULT_SPEND_LIMIT, AdaptiveOptions
from adaptive_dp.control.plan import INCREMENTAL_RDP, Budget

__all__ = ["BudgetSpender", "SpendLimitReached", "build_spender", "check_spend_options"]


class SpendLimitReached(PrivacyBudgetExhausted):
    """``spend_budget="steps"`` reached its compute cap (``spend_limit`` × the planned steps).

    A :class:`PrivacyBudgetExhausted` so that code stopping on an exhausted budget stops here too; nothing was
    booked for the refused step.
    """


def check_spend_options(
    options: AdaptiveOptions, budget: Budget | None, *, accountant: Any, data_loader: Any
) -> None:
    """Refuse ``spend_budget`` settings the engine cannot honour, before anything is built.

    Raises:
        ValueError: ``spend_budget`` / ``spend_limit`` without a budget (``make_private_with_epsilon``),
            ``spend_limit`` without ``spend_budget``; ``"sample-rate"`` with an accountant other than
            ``"rdp"`` or with DataLoader workers (they draw batches ahead, before q of that step is set).
        NotImplementedError: ``spend_budget`` under torch.distributed (single process only).
    """
    mode = options.spend_budget
    if mode is None:
        if options.spend_limit is not None:
            raise ValueError(
                "spend_limit caps spend_budget's extra compute: give spend_budget='steps' or 'sample-rate'"
            )
        return
    if budget is None:
        raise ValueError(
            f"spend_budget={mode!r} spends what is left of an ε budget, and make_private has none: use "
            "make_private_with_epsilon(target_epsilon=..., ...) (CLI: --target-epsilon), or drop spend_budget"
        )
    if ddp.is_distributed():
        raise NotImplementedError(
            f"spend_budget={mode!r} runs in one process only; under torch.distributed drop spend_budget"
        )
    if mode != "sample-rate":
        return
    if accountant.mechanism() != INCREMENTAL_RDP:
        raise ValueError(
            "spend_budget='sample-rate' books a different q every step, which the incremental RDP accountant "
            f"does and {accountant.mechanism()!r} does not here: use AdaptivePrivacyEngine(accountant='rdp')"
        )
    if getattr(data_loader, "num_workers", 0):
        raise ValueError(
            "spend_budget='sample-rate' sets q of each batch when the step before ends, and DataLoader workers "
            "draw batches ahead of that: use num_workers=0"
        )


class BudgetSpender:
    """The per-step plan of ``spend_budget``: the step cap (``"steps"``) or the sample rate of the next batch.

    Args:
        mode: ``"steps"`` or ``"sample-rate"``.
        planned_steps: T, the steps the budget is planned for.
        base_rate: q_base = 1 / len(data_loader), the plan's rate.
        limit: ``spend_limit`` (None: :data:`~adaptive_dp.control.options.DEFAULT_SPEND_LIMIT`).
        sampler: the private loader's Poisson batch sampler (``sample_rate`` read per batch); "sample-rate" only.
        optimizer: the DP optimizer (``expected_batch_size``, ``step_sample_rate``); "sample-rate" only.
        dataset_size: N, examples the sampler draws from (expected batch = int(N · q), as opacus).

    Raises:
        ValueError: "sample-rate" without a sampler that has a ``sample_rate`` (Poisson sampling).
    """

    def __init__(
        self,
        mode: str,
        *,
        planned_steps: int,
        base_rate: float,
        limit: float | None = None,
        sampler: Any = None,
        optimizer: Any = None,
        dataset_size: int | None = None,
    ) -> None:
        self.mode = mode
        self.limit = float(DEFAULT_SPEND_LIMIT if limit is None else limit)
        self.planned_steps = int(planned_steps)
        self.base_rate = float(base_rate)
        self.max_steps = math.ceil(self.limit * self.planned_steps) if mode == "steps" else None
        self.max_rate = min(self.limit * self.base_rate, 1.0)
        self.sampler, self.optimizer, self.dataset_size = sampler, optimizer, dataset_size
        if mode == "sample-rate" and not isinstance(sampler, UniformWithReplacementSampler):
            raise ValueError(
                "spend_budget='sample-rate' needs the private loader's Poisson sampler (poisson_sampling=True)"
            )
        self.rate = self.base_rate  # q of the next batch (and, while a step runs, of its batch)
        if mode == "sample-rate":
            self._apply(self.base_rate)

    # ------------------------------------------------------------------ the points of a step
    def check_step(self, steps_taken: int) -> None:
        """Before σ of a step is decided: refuse it past the compute cap, and check q was not changed from outside.

        Raises:
            SpendLimitReached: ``"steps"`` and ``steps_taken`` ≥ ``max_steps``.
            RuntimeError: the sampler's ``sample_rate`` is not the one this spender set (someone else changed it).
        """
        if self.max_steps is not None and steps_taken >= self.max_steps:
            raise SpendLimitReached(
                f"spend_budget='steps' stops at its compute cap: {steps_taken} steps = spend_limit "
                f"{self.limit:g} × {self.planned_steps} planned steps; the model as trained so far is the result"
            )
        if self.mode == "sample-rate" and self.sampler.sample_rate != self.rate:
            raise RuntimeError(
                f"the sampler's sample_rate is {self.sampler.sample_rate}, not the q = {self.rate} the budget "
                "planned for this batch; with spend_budget='sample-rate' only the engine sets it"
            )

    def step_rate(self) -> float:
        """q the batch of the step in progress was drawn at (the rate the filter and the accountant book)."""
        return self.rate

    def after_book(self, budget_filter: RenyiFilter, noise_multiplier: float) -> None:
        """After step t is booked at σ_t: set q of step t + 1 (``"sample-rate"``; the base q past the plan)."""
        if self.mode != "sample-rate":
            return
        rate = self.base_rate
        if budget_filter.remaining_steps > 0 and noise_multiplier > 0 and math.isfinite(noise_multiplier):
            rate = budget_filter.max_sample_rate(noise_multiplier, max_rate=self.max_rate)
        self._apply(rate)

    def _apply(self, rate: float) -> None:
        """Set q on the sampler, the optimizer's divisor and its booked rate together (before the next draw)."""
        self.rate = float(rate)
        self.sampler.sample_rate = self.rate
        self.optimizer.expected_batch_size = max(int(self.dataset_size * self.rate), 1)
        self.optimizer.step_sample_rate = self.rate

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The mode, the cap and the rate of the next batch (plain values)."""
        return {"mode": self.mode, "limit": self.limit, "rate": self.rate}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` and set the saved q of the next batch on the sampler and the optimizer.

        Raises:
            ValueError: the state is of another mode or cap.
        """
        if state.get("mode") != self.mode or float(state.get("limit", -1)) != self.limit:
            raise ValueError(
                f"checkpoint was saved with spend_budget={state.get('mode')!r}, spend_limit={state.get('limit')}; "
                f"this engine has {self.mode!r}, {self.limit:g}: use the saved run's settings"
            )
        if self.mode == "sample-rate":
            self._apply(float(state["rate"]))


def build_spender(
    options: AdaptiveOptions, *, planned_steps: int | None, base_rate: float, loader: Any, optimizer: Any
) -> BudgetSpender | None:
    """The :class:`BudgetSpender` of ``options.spend_budget`` for the private ``loader``, or None when off."""
    if options.spend_budget is None:
        return None
    return BudgetSpender(
        options.spend_budget,
        planned_steps=int(planned_steps),
        base_rate=base_rate,
        limit=options.spend_limit,
        sampler=getattr(loader, "batch_sampler", None),
        optimizer=optimizer,
        dataset_size=len(loader.dataset),
    )
