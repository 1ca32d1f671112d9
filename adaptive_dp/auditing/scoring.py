"""White-box canary scores: how far the training updates moved along each gradient canary.

The auditor of the white-box one-run audit sees every intermediate model θ_1, θ_2, …. From two consecutive
models and the learning rate it recovers the (noisy) gradient g_t the optimizer applied and adds
⟨g_t, c_i⟩ to canary i's score. An included canary c_i is added to the clipped gradient sum at the steps it
is sampled, so its score drifts up by ‖c_i‖² / B per such step (B: the divisor the optimizer applies to the
noisy sum, opacus' expected batch size); the noise N(0, σ²C²) / B moves it by about σ·C·‖c_i‖ / B per step
either way. Scores are a post-processing of the released models, so any optimizer keeps the audit sound;
inverting the optimizer exactly is what gives it power.

Supported optimizers (PyTorch's ``torch.optim.SGD`` conventions, and so opacus' ``DPOptimizer`` wrapping it,
which hands SGD the noisy gradient as ``p.grad``):

* plain SGD: θ_{t+1} = θ_t - lr_t · g_t, so g_t = Δ_t / lr_t with Δ_t = θ_t - θ_{t+1};
* SGD with momentum μ (``dampening=0``, ``nesterov=False``, ``weight_decay=0``): torch keeps the buffer
  b_1 = g_1, b_t = μ · b_{t-1} + g_t and steps θ_{t+1} = θ_t - lr_t · b_t, so b_t = Δ_t / lr_t and
  g_t = Δ_t / lr_t - μ · Δ_{t-1} / lr_{t-1} (the buffer holds no learning rate, so a schedule changing lr_t
  is handled exactly).

With dampening, Nesterov momentum, weight decay or adaptive optimizers (Adam) the scores stay sound but lose
power: the engine should refuse gradient canaries there or say so.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["CanaryScorer", "canary_scores"]


def _check_momentum(momentum: object) -> float:
    if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real) or not (0.0 <= momentum < 1.0):
        raise ValueError(f"momentum must be a real number in [0, 1) (torch.optim.SGD's), got {momentum!r}.")
    return float(momentum)


def _check_lr(lr: object) -> float:
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not (0.0 < float(lr) < math.inf):
        raise ValueError(
            f"lr must be a positive finite learning rate (the one used for the step), got {lr!r}."
        )
    return float(lr)


class CanaryScorer:
    """Streaming white-box canary scores, one optimizer step at a time, without storing the trajectory.

    ``observe(before=θ_t, after=θ_{t+1}, lr=lr_t)`` after every optimizer step adds ⟨g_t, d_i⟩ for every
    canary direction d_i, where g_t is the gradient the optimizer applied, recovered from the two models (see
    the module docstring for plain SGD and SGD with momentum). State: the [m] scores and the last step's [m]
    projections, in float64; memory beyond ``directions`` is O(m).

    Args:
        directions: [m, P] canary directions (usually the canary gradients of
            :func:`~adaptive_dp.auditing.canaries.make_gradient_canaries`, norm C each), on the device and
            in the dtype the projections should run in; dense, or sparse COO (Dirac canaries: O(m) per step).
        momentum: μ of ``torch.optim.SGD`` (``dampening=0``, ``nesterov=False``); 0 for plain SGD.

    Raises:
        ValueError: if ``directions`` is not a 2-D tensor of finite values or ``momentum`` is outside [0, 1).

    Example:
        >>> scorer = CanaryScorer(directions=torch.eye(2))
        >>> scorer.observe(before=torch.zeros(2), after=torch.tensor([-0.1, 0.2]), lr=0.1)
        >>> scorer.scores().tolist()
        [1.0, -2.0]
    """

    def __init__(self, *, directions: Tensor, momentum: float = 0.0) -> None:
        if not isinstance(directions, Tensor) or directions.ndim != 2 or directions.shape[0] < 1:
            raise ValueError("directions must be a [m, P] tensor with m >= 1 (one row per canary).")
        values = directions.coalesce().values() if directions.is_sparse else directions
        if not bool(torch.isfinite(values).all()):
            raise ValueError("directions must hold finite values only.")
        self.momentum = _check_momentum(momentum)
        self._directions = directions.detach()
        count = directions.shape[0]
        self._scores = torch.zeros(count, dtype=torch.float64, device=directions.device)
        self._previous = torch.zeros_like(self._scores)
        self._steps = 0

    @property
    def canaries(self) -> int:
        """m, the number of canaries scored."""
        return int(self._directions.shape[0])

    @property
    def steps(self) -> int:
        """Number of optimizer steps observed so far."""
        return self._steps

    def observe(self, *, before: Tensor, after: Tensor, lr: float) -> None:
        """Add one optimizer step: θ_t = ``before``, θ_{t+1} = ``after``, learning rate ``lr``.

        Args:
            before: [P] flat trainable parameters before the step.
            after: [P] flat trainable parameters after the step, same order.
            lr: learning rate the step used (> 0).

        Raises:
            ValueError: if the shapes are not both [P], ``lr`` is not positive and finite, or the update holds a
                non-finite value (the scores are left unchanged).
        """
        dim = self._directions.shape[1]
        if before.shape != (dim,) or after.shape != (dim,):
            raise ValueError(
                f"before and after must be flat [P] = [{dim}] parameter vectors, got {tuple(before.shape)} and "
                f"{tuple(after.shape)}."
            )
        self._add(before.detach().double() - after.detach().double(), _check_lr(lr))

    def _add(self, update: Tensor, lr: float) -> None:
        if not bool(torch.isfinite(update).all()):
            raise ValueError(
                "the update θ_t - θ_{t+1} holds a non-finite value; the scores are left unchanged."
            )
        step = (update / lr).to(dtype=self._directions.dtype, device=self._directions.device)
        projection = (self._directions @ step).double()  # ⟨Δ_t / lr_t, d_i⟩ = ⟨b_t, d_i⟩
        self._scores += projection - self.momentum * self._previous  # ⟨g_t, d_i⟩
        self._previous = projection
        self._steps += 1

    def scores(self) -> Tensor:
        """[m] float64 scores Σ_t ⟨g_t, d_i⟩ (a copy); higher means "more likely included"."""
        return self._scores.clone()

    def state_dict(self) -> dict[str, Any]:
        """The scorer's state (CPU tensors; the directions are not included: regenerate them from their seed)."""
        return {
            "scores": self._scores.cpu().clone(),
            "previous": self._previous.cpu().clone(),
            "steps": self._steps,
            "momentum": self.momentum,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state from :meth:`state_dict` of a scorer with the same m and momentum.

        Raises:
            ValueError: if a key is missing, or the state's m or momentum differ from this scorer's.
        """
        missing = {"scores", "previous", "steps", "momentum"} - set(state)
        if missing:
            raise ValueError(f"canary scorer state is missing {sorted(missing)}.")
        if tuple(state["scores"].shape) != (self.canaries,) or tuple(state["previous"].shape) != (
            self.canaries,
        ):
            raise ValueError(
                f"canary scorer state has {tuple(state['scores'].shape)} scores, this scorer {self.canaries}."
            )
        if float(state["momentum"]) != self.momentum:
            raise ValueError(
                f"canary scorer state has momentum {state['momentum']}, this scorer {self.momentum}."
            )
        device = self._directions.device
        self._scores = state["scores"].to(dtype=torch.float64, device=device).clone()
        self._previous = state["previous"].to(dtype=torch.float64, device=device).clone()
        self._steps = int(state["steps"])


def canary_scores(
    *, updates: Tensor, directions: Tensor, learning_rates: Sequence[float] | Tensor, momentum: float = 0.0
) -> Tensor:
    """White-box canary scores from a stored trajectory: Σ_t ⟨g_t, d_i⟩ for every canary i.

    The batch form of :class:`CanaryScorer` (same arithmetic): for plain SGD, g_t = Δ_t / lr_t; for SGD with
    momentum μ, g_t = Δ_t / lr_t - μ · Δ_{t-1} / lr_{t-1} (see the module docstring).

    Args:
        updates: [T, P] model updates Δ_t = θ_t - θ_{t+1}, in step order.
        directions: [m, P] canary directions.
        learning_rates: [T] learning rate of each step (> 0).
        momentum: μ of ``torch.optim.SGD`` (``dampening=0``, ``nesterov=False``); 0 for plain SGD.

    Returns:
        [m] float64 scores.

    Raises:
        ValueError: if ``updates`` is not [T, P] with the directions' P, there is not one learning rate per
            step, or an input is out of range (see :class:`CanaryScorer`).
    """
    scorer = CanaryScorer(directions=directions, momentum=momentum)
    rates = [float(lr) for lr in learning_rates]
    if updates.ndim != 2 or updates.shape[1] != directions.shape[1] or updates.shape[0] != len(rates):
        raise ValueError(
            f"updates must be [T, P] with P = {directions.shape[1]} and one learning rate per row, got "
            f"{tuple(updates.shape)} and {len(rates)} learning rates."
        )
    for update, lr in zip(updates.detach().double(), rates):
        scorer._add(update, _check_lr(lr))
    return scorer.scores()
