"""Sanity of a training plan, checked before anything is built or written: the audit split and the ε budget.

A plan that cannot work must fail at once with the numbers that say why and the options that would make it
work, never train 0 steps and report success: an audit split that leaves almost nothing to train on, a budget
whose σ is above ``--sigma-max``, or a budget no σ can meet.

The σ a budget needs is opacus' ``get_noise_multiplier`` for the planned epochs at the training loader's sample
rate, the same search ``AdaptivePrivacyEngine.make_private_with_epsilon`` runs (RDP accountant; the engine's
incremental RDP gives the same ε to ~1e-12).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

from adaptive_dp.training.config import TrainConfig

#: tolerance of the ε search (absolute, in ε): opacus' default, which the engine uses too.
EPSILON_TOLERANCE = 0.01


@dataclass(frozen=True)
class BudgetPlan:
    """What a hard budget asks of the noise.

    Attributes:
        sample_rate: q = 1 / batches per epoch of the training loader.
        steps: planned optimizer steps, ``int(epochs / q)`` (opacus' count).
        sigma: the noise multiplier that spends exactly ``target_epsilon`` at δ over ``steps`` (opacus'
            ``get_noise_multiplier``).
    """

    sample_rate: float
    steps: int
    sigma: float


def check_audit_split(config: TrainConfig, *, train_size: int, full_size: int) -> None:
    """Refuse an audit split that leaves fewer training examples than a batch, or fewer than half of the
    data set, unless ``config.force``.

    Args:
        train_size: examples left for training after the audit split.
        full_size: examples of the whole training set.

    Raises:
        ValueError: naming both sizes and the options that fix it.
    """
    if config.force:
        return
    audit = full_size - train_size
    if train_size < config.batch_size:
        raise ValueError(
            f"the audit split ({audit} of {full_size} examples, --audit-fraction {config.audit_fraction:g}) leaves "
            f"{train_size} training examples, fewer than one batch (--batch-size {config.batch_size}): lower "
            "--audit-fraction or --batch-size, or add --force to train anyway"
        )
    if 2 * train_size < full_size:
        raise ValueError(
            f"the audit split ({audit} of {full_size} examples, --audit-fraction {config.audit_fraction:g}) leaves "
            f"{train_size} training examples, under half of the data set: lower --audit-fraction (the default "
            "0.02 is enough for the monitor), or add --force to train on so few"
        )


def check_budget(config: TrainConfig, *, train_size: int) -> BudgetPlan | None:
    """The σ the budget (``target_epsilon`` at ``delta`` over ``epochs``) needs; refuse a budget that no σ up
    to ``sigma_max`` meets. None without a budget (or for a non-private run).

    Args:
        train_size: examples the private loader samples from (the audit split excluded).

    Raises:
        ValueError: ``sigma_max`` is below the σ needed (the message gives that σ, the ε ``sigma_max`` would
            spend and the epochs it would pay for), or opacus finds no σ at all ("The privacy budget is too
            low.": the message gives the smallest ε the accountant can certify for this plan).
    """
    if config.target_epsilon is None or config.non_private:
        return None
    sample_rate = 1.0 / math.ceil(train_size / config.batch_size)
    steps = int(config.epochs / sample_rate)
    try:
        sigma = _needed_sigma(config, sample_rate=sample_rate)
    except ValueError as exc:
        if "budget is too low" not in str(exc):
            raise
        raise ValueError(_unreachable_message(config, sample_rate=sample_rate, steps=steps)) from None
    plan = BudgetPlan(sample_rate=sample_rate, steps=steps, sigma=float(sigma))
    if config.sigma_max is not None and plan.sigma > config.sigma_max:
        raise ValueError(_above_sigma_max_message(config, plan))
    return plan


def _needed_sigma(config: TrainConfig, *, sample_rate: float) -> float:
    """opacus' ``get_noise_multiplier`` for the plan (raises its ValueError when no σ meets the budget)."""
    from opacus.accountants.utils import get_noise_multiplier

    with warnings.catch_warnings():  # the search visits σ's whose best order is the largest
        warnings.filterwarnings("ignore", message="Optimal order is the")
        return float(
            get_noise_multiplier(
                target_epsilon=config.target_epsilon,
                target_delta=config.delta,
                sample_rate=sample_rate,
                epochs=config.epochs,
                accountant="rdp",
                epsilon_tolerance=EPSILON_TOLERANCE,
            )
        )


def rdp_epsilon(*, sigma: float, sample_rate: float, steps: int, delta: float) -> float:
    """ε at ``delta`` of ``steps`` steps of the sampled Gaussian mechanism at ``sigma`` and ``sample_rate``
    (opacus' RDP accountant; Mironov 2017, Mironov et al. 2019)."""
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = [(float(sigma), float(sample_rate), int(steps))]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the")
        return float(accountant.get_epsilon(delta=delta))


def _affordable_steps(config: TrainConfig, *, sigma: float, sample_rate: float, steps: int) -> int:
    """The most steps (up to ``steps``) that ``sigma`` pays for within ``target_epsilon`` (bisection: ε grows
    with the number of steps)."""
    lo, hi = 0, steps
    while lo < hi:
        mid = (lo + hi + 1) // 2
        spent = rdp_epsilon(sigma=sigma, sample_rate=sample_rate, steps=mid, delta=config.delta)
        lo, hi = (mid, hi) if spent <= config.target_epsilon else (lo, mid - 1)
    return lo


def _above_sigma_max_message(config: TrainConfig, plan: BudgetPlan) -> str:
    sigma_max = float(config.sigma_max)
    spent = rdp_epsilon(sigma=sigma_max, sample_rate=plan.sample_rate, steps=plan.steps, delta=config.delta)
    affordable = _affordable_steps(config, sigma=sigma_max, sample_rate=plan.sample_rate, steps=plan.steps)
    epochs = affordable * plan.sample_rate
    if epochs >= 1:
        fewer = f", or train at most {math.floor(epochs)} epoch(s) (σ = {sigma_max:g} pays for {epochs:.2f})"
    elif affordable:
        fewer = f" (σ = {sigma_max:g} pays for {affordable} steps, not one epoch)"
    else:
        fewer = f" (σ = {sigma_max:g} cannot pay for a single step of this budget)"
    return (
        f"--target-epsilon {config.target_epsilon:g} at δ = {config.delta:g} over {config.epochs} epochs "
        f"({plan.steps} steps at q = {plan.sample_rate:.4g}) needs σ = {plan.sigma:.3f}, above --sigma-max "
        f"{sigma_max:g}: raise --sigma-max to at least {plan.sigma:.3f}, or raise --target-epsilon to "
        f"{spent:.3f} (what σ = {sigma_max:g} spends over this plan){fewer}"
    )


def _unreachable_message(config: TrainConfig, *, sample_rate: float, steps: int) -> str:
    from opacus.accountants.utils import MAX_SIGMA

    floor = rdp_epsilon(sigma=MAX_SIGMA, sample_rate=sample_rate, steps=steps, delta=config.delta)
    return (
        f"--target-epsilon {config.target_epsilon:g} at δ = {config.delta:g} cannot be met: even σ = {MAX_SIGMA:g} "
        f"spends ε = {floor:.3f} over {config.epochs} epochs ({steps} steps at q = {sample_rate:.4g}) by the RDP "
        f'accountant (opacus: "The privacy budget is too low."); raise --target-epsilon above {floor:.3f}, or '
        "raise --delta"
    )
