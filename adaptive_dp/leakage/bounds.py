"""Variational bounds on mutual information from critic scores, in nats: DV, MINE's loss, InfoNCE, SMILE.

A critic T scores pairs; matched pairs (x[i], z[i]) are samples of the joint, mismatched (shuffled) pairs
(x[i], z[j]), j ≠ i, of the product of the marginals. Each bound turns the scores into a lower bound on
I(X; Z); :class:`MIEstimate` is what every estimator in :mod:`adaptive_dp.leakage` reports. The critic gap is
the mean critic score on matched pairs minus the mean on mismatched pairs (in the critic's units, not nats).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "MIEstimate",
    "dv_lower_bound",
    "infonce_lower_bound",
    "mine_loss",
    "smile_lower_bound",
]


@dataclass(frozen=True)
class MIEstimate:
    """One MI estimate.

    Attributes:
        mi: the estimate, nats (a lower bound on the MI up to sampling error; may dip below 0 by noise).
        critic_gap: mean critic score on matched pairs minus on mismatched (shuffled) pairs (critic units).
        stderr: standard error of ``mi`` (nats), from the per-pair terms of the bound (delta method).
        n: number of matched (held-out) pairs the estimate was computed on.
        method: ``"mine"`` (DV), ``"infonce"``, ``"smile"``, ``"likelihood-ratio"`` or ``"token-mine"``.
        cap: the largest value the bound can take (log of the number of candidates for InfoNCE), or None.
    """

    mi: float
    critic_gap: float
    stderr: float
    n: int
    method: str
    cap: float | None = None

    @property
    def mi_gap(self) -> float:
        """Deprecated name of :attr:`critic_gap` (it is a difference of critic scores, not an MI)."""
        warnings.warn(
            "MIEstimate.mi_gap is deprecated; use critic_gap (a difference of critic scores, not nats)",
            DeprecationWarning,
            stacklevel=2,
        )
        return self.critic_gap


# --------------------------------------------------------------------------------------------------
# Bound functions
# --------------------------------------------------------------------------------------------------


def _check_vector(t: Tensor, name: str) -> None:
    if not isinstance(t, Tensor) or t.dim() != 1 or t.numel() == 0:
        got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
        raise ValueError(f"{name} must be a non-empty 1-D tensor of critic scores, got {got}")


def _check_square(scores: Tensor) -> None:
    if not isinstance(scores, Tensor) or scores.dim() != 2 or scores.shape[0] != scores.shape[1]:
        got = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
        raise ValueError(
            f"scores must be a square [N, N] tensor with matched pairs on the diagonal, got {got}"
        )
    if scores.shape[0] < 2:
        raise ValueError("scores need N >= 2 (at least one mismatched pair per row)")


def _log_mean_exp(t: Tensor) -> Tensor:
    return torch.logsumexp(t, dim=0) - math.log(t.numel())


def log_mean_exp_off_diagonal(scores: Tensor) -> Tensor:
    """log of the mean of exp over the N(N-1) off-diagonal entries (no boolean indexing: it is slow)."""
    n = scores.shape[0]
    eye = torch.eye(n, dtype=torch.bool, device=scores.device)
    return torch.logsumexp(scores.masked_fill(eye, -math.inf).flatten(), dim=0) - math.log(n * (n - 1))


def mean_off_diagonal(values: Tensor) -> Tensor:
    """Mean of the N(N-1) off-diagonal entries of an [N, N] matrix (the mismatched pairs' scores)."""
    n = values.shape[0]
    return (values.sum() - values.diagonal().sum()) / (n * (n - 1))


def dv_lower_bound(t_joint: Tensor, t_marginal: Tensor) -> Tensor:
    """Donsker–Varadhan lower bound on the MI from critic scores.

    I(X; Z) ≥ E_joint[T] − log E_marg[e^T], estimated as mean(t_joint) − log mean(exp(t_marginal))
    (logsumexp for stability).

    Args:
        t_joint: [N] critic scores on matched pairs (samples of the joint).
        t_marginal: [M] critic scores on mismatched pairs (samples of the product of marginals).

    Returns:
        Scalar tensor, nats; differentiable (plain DV gradient, biased in minibatches — see :func:`mine_loss`).

    Raises:
        ValueError: if either input is not a non-empty 1-D tensor.

    Source: Donsker & Varadhan (1983); Belghazi et al. 2018, "MINE", Eq. (10).
    """
    _check_vector(t_joint, "t_joint")
    _check_vector(t_marginal, "t_marginal")
    return t_joint.mean() - _log_mean_exp(t_marginal)


def mine_loss(
    t_joint: Tensor, t_marginal: Tensor, *, log_ema: Tensor | None, ema_decay: float = 0.99
) -> tuple[Tensor, Tensor]:
    """MINE training loss: −DV bound, with the log term's gradient bias-corrected by a moving average.

    The minibatch gradient of log mean(e^T) is E_B[e^T ∇T] / E_B[e^T], biased because the denominator is
    a minibatch mean. MINE replaces the denominator by an exponential moving average (EMA) of E[e^T].
    Here the EMA is kept in log space (``log_ema``) and the standard surrogate is used: the loss *value*
    is −DV, its *gradient* is −(E_B[∇T_joint] − E_B[e^T ∇T_marg] / EMA).

    Args:
        t_joint: [N] critic scores on matched pairs.
        t_marginal: [M] critic scores on mismatched pairs.
        log_ema: scalar tensor, log of the running average of E_marg[e^T]; None on the first step.
        ema_decay: weight of the old average, in [0, 1); 0 gives the plain (biased) DV gradient.

    Returns:
        (loss, new_log_ema): scalar loss to minimise (nats) and the updated log EMA (detached).

    Raises:
        ValueError: on bad score shapes or ``ema_decay`` outside [0, 1).

    Source: Belghazi et al. 2018, "Mutual Information Neural Estimation", Sec. 3.2 (bias correction).
    """
    _check_vector(t_joint, "t_joint")
    _check_vector(t_marginal, "t_marginal")
    return mine_loss_from_means(
        t_joint.mean(), _log_mean_exp(t_marginal), log_ema=log_ema, ema_decay=ema_decay
    )


def mine_loss_from_means(
    joint_mean: Tensor, log_mean: Tensor, *, log_ema: Tensor | None, ema_decay: float
) -> tuple[Tensor, Tensor]:
    """:func:`mine_loss` from mean(t_joint) and log mean(exp(t_marginal))."""
    if not 0.0 <= ema_decay < 1.0:
        raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")
    batch = log_mean.detach()
    if log_ema is None or ema_decay == 0.0:
        new_log_ema = batch
    else:
        new_log_ema = torch.logaddexp(math.log(ema_decay) + log_ema.to(batch), math.log1p(-ema_decay) + batch)
    ratio = torch.exp(log_mean - new_log_ema)  # value E_B[e^T]/EMA; gradient E_B[e^T ∇T]/EMA
    corrected_log_term = batch + ratio - ratio.detach()
    loss = -(joint_mean - corrected_log_term)
    return loss, new_log_ema


def infonce_lower_bound(scores: Tensor) -> Tensor:
    """InfoNCE lower bound on the MI from an all-pairs score matrix.

    I(X; Z) ≥ mean_i (S_ii − logsumexp_j S_ij) + log N, which can never exceed log N.

    Args:
        scores: [N, N] critic scores, ``scores[i, j] = T(x_i, z_j)``; the diagonal holds matched pairs.

    Returns:
        Scalar tensor, nats, ≤ log N; differentiable.

    Raises:
        ValueError: if ``scores`` is not square with N ≥ 2.

    Source: van den Oord et al. 2018, "Representation Learning with Contrastive Predictive Coding";
    Poole et al. 2019, "On Variational Bounds of Mutual Information", Eq. (12).
    """
    _check_square(scores)
    n = scores.shape[0]
    return (scores.diagonal() - torch.logsumexp(scores, dim=1)).mean() + math.log(n)


def smile_lower_bound(scores: Tensor, *, clip: float = 5.0) -> Tensor:
    """SMILE estimate of the MI from an all-pairs score matrix.

    Value: the DV bound with the mismatched scores clipped to [−clip, clip] inside the log term,
    mean_i S_ii − log mean_{i≠j} exp(clamp(S_ij)). Gradient: that of the Jensen–Shannon (f-GAN) bound
    E_joint[−softplus(−T)] − E_marg[softplus(T)], which trains the critic with low variance.

    Args:
        scores: [N, N] critic scores with matched pairs on the diagonal.
        clip: τ > 0, the clipping threshold of the log-ratio (the paper's τ; 5 is its usual choice).

    Returns:
        Scalar tensor, nats.

    Raises:
        ValueError: if ``scores`` is not square with N ≥ 2 or ``clip`` is not positive.

    Source: Song & Ermon 2020, "Understanding the Limitations of Variational Mutual Information
    Estimators", Eq. (17) and their reference code (JS gradient, clipped-DV value).
    """
    _check_square(scores)
    if not clip > 0:
        raise ValueError(f"clip must be positive, got {clip}")
    joint = scores.diagonal()
    dv = joint.mean() - log_mean_exp_off_diagonal(scores.clamp(-clip, clip))
    js = (-F.softplus(-joint)).mean() - mean_off_diagonal(F.softplus(scores))
    return js + (dv - js).detach()
