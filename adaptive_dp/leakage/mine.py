"""Mutual-information estimators, in nats: variational bounds, MINE, and the likelihood-ratio critic.

Three layers:

* bound functions on critic scores — :func:`dv_lower_bound` (Donsker–Varadhan), :func:`infonce_lower_bound`
  (InfoNCE), :func:`smile_lower_bound` (SMILE) and :func:`mine_loss` (the DV bound with MINE's
  moving-average gradient correction);
* learned critics — :class:`MINETrainer` trains a critic T(x, z) (see :mod:`adaptive_dp.leakage.critics`) and
  evaluates the bound on held-out pairs; :func:`estimate_mi` / :func:`estimate_mi_detailed` wrap it for
  any two tensors [N, dx], [N, dz];
* the model-aware, training-free critic for the Gaussian mechanism — :func:`likelihood_ratio_scores`,
  :func:`likelihood_ratio_mi` — and the independent truth it is checked against,
  :func:`gaussian_capacity_bound`.

Matched pairs are (x[i], z[i]); mismatched (shuffled) pairs are (x[i], z[j]), j ≠ i. The MI gap is the mean
critic score on matched pairs minus the mean on mismatched pairs.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adaptive_dp.leakage.critics import build_critic

__all__ = [
    "MIEstimate",
    "MINETrainer",
    "dv_lower_bound",
    "estimate_mi",
    "estimate_mi_detailed",
    "gaussian_capacity_bound",
    "gaussianise",
    "infonce_lower_bound",
    "likelihood_ratio_mi",
    "likelihood_ratio_scores",
    "mine_loss",
    "smile_lower_bound",
]

METHODS = ("mine", "infonce", "smile")
MIN_SAMPLES = 64


@dataclass(frozen=True)
class MIEstimate:
    """One MI estimate.

    Attributes:
        mi: the estimate, nats (a lower bound on the MI up to sampling error; may dip below 0 by noise).
        mi_gap: mean critic score on matched pairs minus on mismatched (shuffled) pairs.
        stderr: standard error of ``mi`` (nats), from the per-pair terms of the bound (delta method).
        n: number of matched (held-out) pairs the estimate was computed on.
        method: ``"mine"`` (DV), ``"infonce"``, ``"smile"`` or ``"likelihood-ratio"``.
        cap: the largest value the bound can take (log of the number of candidates for InfoNCE), or None.
    """

    mi: float
    mi_gap: float
    stderr: float
    n: int
    method: str
    cap: float | None = None


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
        raise ValueError(f"scores must be a square [N, N] tensor with matched pairs on the diagonal, got {got}")
    if scores.shape[0] < 2:
        raise ValueError("scores need N >= 2 (at least one mismatched pair per row)")


def _log_mean_exp(t: Tensor) -> Tensor:
    return torch.logsumexp(t, dim=0) - math.log(t.numel())


def _log_mean_exp_off_diagonal(scores: Tensor) -> Tensor:
    """log of the mean of exp over the N(N-1) off-diagonal entries (no boolean indexing: it is slow)."""
    n = scores.shape[0]
    eye = torch.eye(n, dtype=torch.bool, device=scores.device)
    return torch.logsumexp(scores.masked_fill(eye, -math.inf).flatten(), dim=0) - math.log(n * (n - 1))


def _mean_off_diagonal(values: Tensor) -> Tensor:
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
    return _mine_loss(t_joint.mean(), _log_mean_exp(t_marginal), log_ema=log_ema, ema_decay=ema_decay)


def _mine_loss(
    joint_mean: Tensor, log_mean: Tensor, *, log_ema: Tensor | None, ema_decay: float
) -> tuple[Tensor, Tensor]:
    """:func:`mine_loss` from mean(t_joint) and log mean(exp(t_marginal))."""
    if not 0.0 <= ema_decay < 1.0:
        raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")
    batch = log_mean.detach()
    if log_ema is None or ema_decay == 0.0:
        new_log_ema = batch
    else:
        new_log_ema = torch.logaddexp(
            math.log(ema_decay) + log_ema.to(batch), math.log1p(-ema_decay) + batch
        )
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
    dv = joint.mean() - _log_mean_exp_off_diagonal(scores.clamp(-clip, clip))
    js = (-F.softplus(-joint)).mean() - _mean_off_diagonal(F.softplus(scores))
    return js + (dv - js).detach()


# --------------------------------------------------------------------------------------------------
# Likelihood-ratio critic (Gaussian mechanism) and the capacity bound
# --------------------------------------------------------------------------------------------------


def _check_noise_std(noise_std: float) -> float:
    try:
        value = float(noise_std)
    except (TypeError, ValueError):
        raise ValueError(f"noise_std must be a positive finite number (σ·C), got {noise_std!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"noise_std must be a positive finite number (σ·C), got {noise_std!r}")
    return value


def _check_matrix(t: Tensor, name: str) -> None:
    if not isinstance(t, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 2 or t.shape[0] == 0 or t.shape[1] == 0:
        raise ValueError(f"{name} must be a non-empty 2-D tensor [N, P], got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or inf; check the gradients/noise that produced it")


def likelihood_ratio_scores(noisy: Tensor, clean: Tensor, *, noise_std: float) -> Tensor:
    """Scores of the Gaussian-mechanism critic for every (released, candidate) pair.

    S[i, j] = -||noisy[i] - clean[j]||² / (2 · noise_std²), the log density of observing
    ``noisy[i]`` if candidate ``j`` had produced it, up to a constant shared by the row. Computed with
    the Gram trick (‖a‖² + ‖b‖² − 2 aᵀb, one [N, P] × [P, N] matmul; no [N, N, P] tensor).

    Args:
        noisy: [N, P] released per-example gradients (clipped, plus noise of std ``noise_std``).
        clean: [N, P] the candidates' own clipped gradients, same order.
        noise_std: σ·C, the per-coordinate standard deviation of the added noise; > 0.

    Returns:
        [N, N] scores (nats, up to a per-row constant); the diagonal holds matched pairs. Same device and
        dtype as the inputs.

    Raises:
        ValueError: if shapes differ, a tensor is empty or non-finite, or ``noise_std`` is not positive
        and finite.

    Source: InfoNCE (van den Oord et al. 2018; Poole et al. 2019, "On Variational Bounds of MI"), whose optimal
    critic is the log likelihood ratio; here it is in closed form for the Gaussian mechanism.
    """
    std = _check_noise_std(noise_std)
    _check_matrix(noisy, "noisy")
    _check_matrix(clean, "clean")
    if noisy.shape != clean.shape:
        raise ValueError(
            f"noisy and clean must have the same shape [N, P], got {tuple(noisy.shape)} and {tuple(clean.shape)}"
        )
    clean = clean.to(noisy)
    sq_noisy = (noisy * noisy).sum(dim=1, keepdim=True)  # [N, 1]
    sq_clean = (clean * clean).sum(dim=1).unsqueeze(0)  # [1, N]
    sq_dist = (sq_noisy + sq_clean - 2.0 * (noisy @ clean.T)).clamp_min(0.0)
    return sq_dist / (-2.0 * std * std)


def likelihood_ratio_mi(noisy: Tensor, clean: Tensor, *, noise_std: float) -> MIEstimate:
    """MI between the audit example and its released noisy gradient, by the likelihood-ratio critic.

    The model-aware, training-free critic: the monitor knows the model, so it can compute every audit
    example's own clipped gradient g_j; for the Gaussian mechanism the optimal critic is closed-form,
    T(x_j, g̃_i) = −‖g̃_i − g_j‖² / (2σ²C²). Scored on all N×N audit pairs
    (:func:`likelihood_ratio_scores`), InfoNCE over the scores (:func:`infonce_lower_bound`) is a tight
    lower bound on I(X; G̃), capped at log N. For an audit example J drawn uniformly from the N
    candidates it is an unbiased estimate of I(J; g_J + noise) (the N candidates are the whole support),
    so it stays under :func:`gaussian_capacity_bound` up to sampling error.

    Args:
        noisy: [N, P] released per-example gradients: clipped, plus N(0, noise_std²) per coordinate.
        clean: [N, P] the same examples' clipped gradients, same order.
        noise_std: σ·C, the per-coordinate standard deviation of the noise; > 0.

    Returns:
        :class:`MIEstimate` with method ``"likelihood-ratio"``, ``cap = log N``, ``stderr`` the standard
        error of the mean of the N per-row InfoNCE terms (over the noise draw), ``mi_gap`` the mean
        diagonal minus the mean off-diagonal score.

    Raises:
        ValueError: on empty, mismatched or non-finite inputs, N < 2, or ``noise_std`` ≤ 0.

    Source: InfoNCE (van den Oord et al. 2018; Poole et al. 2019), optimal critic = log likelihood ratio
    (Gaussian mechanism, Dwork & Roth 2014, Sec. 3.5).
    """
    scores = likelihood_ratio_scores(noisy, clean, noise_std=noise_std)
    n = scores.shape[0]
    if n < 2:
        raise ValueError("likelihood_ratio_mi needs at least 2 audit examples (N >= 2)")
    scores = scores.double()
    diag = scores.diagonal()
    terms = diag - torch.logsumexp(scores, dim=1) + math.log(n)
    return MIEstimate(
        mi=float(terms.mean()),
        mi_gap=float(diag.mean() - _mean_off_diagonal(scores)),
        stderr=float(terms.std() / math.sqrt(n)),
        n=n,
        method="likelihood-ratio",
        cap=math.log(n),
    )


def gaussian_capacity_bound(clean: Tensor, *, noise_std: float) -> float:
    """Upper bound on the information one noisy gradient carries about which audit example made it.

    For J uniform over the N candidates and Y = clean[J] + N(0, noise_std² I):
    I(J; Y) ≤ I(clean[J]; Y) ≤ ½ Σᵢ log(1 + λᵢ / noise_std²), λᵢ the eigenvalues of the centred
    covariance of the rows (1/N normalisation) — the Gaussian channel capacity under that covariance.
    With rows of norm ≤ C and noise_std = σ·C this is ≤ Σλᵢ/(2σ²C²) ≤ 1/(2σ²).
    The eigenvalues come from the N×N Gram matrix when P > N (same non-zero spectrum), in float64.

    Args:
        clean: [N, P] candidates' clipped per-example gradients.
        noise_std: σ·C, per-coordinate noise standard deviation; > 0.

    Returns:
        The bound, nats (float).

    Raises:
        ValueError: on an empty or non-finite ``clean`` or ``noise_std`` ≤ 0.

    Source: Cover & Thomas, "Elements of Information Theory", Thm. 9.4.1 / Sec. 9.5 (parallel Gaussian
    channels; Gaussian input maximises I for a given covariance).

    Example:
        >>> import torch
        >>> clean = torch.eye(4)                 # 4 candidates, unit-norm gradients (C = 1)
        >>> round(gaussian_capacity_bound(clean, noise_std=1.0), 4)   # ≤ 1/(2σ²) = 0.5 nats at σ = 1
        0.3347
    """
    std = _check_noise_std(noise_std)
    _check_matrix(clean, "clean")
    n, p = clean.shape
    centred = clean.double() - clean.double().mean(dim=0, keepdim=True)
    gram = centred @ centred.T if p > n else centred.T @ centred
    eigenvalues = torch.linalg.eigvalsh(gram / n).clamp_min(0.0)
    return float(0.5 * torch.log1p(eigenvalues / (std * std)).sum())


# --------------------------------------------------------------------------------------------------
# Learned critics: training and held-out evaluation
# --------------------------------------------------------------------------------------------------


def _check_pair(x: Any, z: Any, *, min_samples: int = 2) -> tuple[Tensor, Tensor]:
    """Validate two paired sample matrices; returns them as floating tensors on x's device."""
    tensors = []
    for name, t in (("x", x), ("z", z)):
        if not isinstance(t, Tensor):
            t = torch.as_tensor(t)
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D [N, d] (one row per sample), got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            t = t.float()
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} contains NaN or inf; drop or impute those samples first")
        tensors.append(t)
    x, z = tensors
    if x.shape[0] != z.shape[0]:
        raise ValueError(f"x and z must have the same number of rows (paired samples), got {x.shape[0]} and {z.shape[0]}")
    if x.shape[0] < min_samples:
        raise ValueError(f"need at least {min_samples} paired samples, got {x.shape[0]}; collect more data")
    if x.shape[1] == 0 or z.shape[1] == 0:
        raise ValueError("x and z need at least one column each")
    return x, z.to(device=x.device, dtype=x.dtype)


class MINETrainer:
    """Trains a critic T(x, z) by a variational MI bound and evaluates it on held-out pairs.

    Warm-startable: call :meth:`update` a few steps at a time as new pairs arrive and :meth:`evaluate` on
    pairs not used for training. Each step samples a minibatch of ``batch_size`` matched pairs; all other
    pairings within the batch are the mismatched (shuffled) pairs.

    Args:
        critic: module with ``forward(x, z) -> [N]`` and ``pairwise(x, z) -> [N, M]``
            (see :func:`adaptive_dp.leakage.critics.build_critic`), on the data's device.
        method: ``"mine"`` (DV bound, MINE's EMA-corrected gradient), ``"infonce"`` or ``"smile"``.
        lr: Adam learning rate.
        ema_decay: MINE's moving-average decay for E_marg[e^T], in [0, 1).
        smile_clip: SMILE's τ.
        batch_size: pairs per training step (≥ 2).
        weight_decay: Adam weight decay.
        seed: seed of the minibatch sampler and of the evaluation order (global RNG untouched).

    Raises:
        ValueError: for an unknown method or bad hyper-parameters.

    Source: Belghazi et al. 2018 (MINE); van den Oord et al. 2018 (InfoNCE); Song & Ermon 2020 (SMILE).
    """

    def __init__(
        self,
        critic: nn.Module,
        *,
        method: str = "mine",
        lr: float = 1e-3,
        ema_decay: float = 0.99,
        smile_clip: float = 5.0,
        batch_size: int = 512,
        weight_decay: float = 0.0,
        seed: int = 0,
    ) -> None:
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; use one of {METHODS}")
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")
        if batch_size < 2:
            raise ValueError(f"batch_size must be >= 2 (mismatched pairs come from the batch), got {batch_size}")
        if not lr > 0:
            raise ValueError(f"lr must be positive, got {lr}")
        if not smile_clip > 0:
            raise ValueError(f"smile_clip must be positive, got {smile_clip}")
        self.critic = critic
        self.method = method
        self.ema_decay = float(ema_decay)
        self.smile_clip = float(smile_clip)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.optimizer = torch.optim.Adam(critic.parameters(), lr=lr, weight_decay=weight_decay)
        self.log_ema: Tensor | None = None
        self.steps_done = 0
        self._generator = torch.Generator().manual_seed(self.seed)

    # -- training ---------------------------------------------------------------------------------

    def _loss(self, scores: Tensor) -> tuple[Tensor, Tensor]:
        """(loss to minimise, bound value) for one [B, B] score matrix."""
        if self.method == "infonce":
            bound = infonce_lower_bound(scores)
            return -bound, bound.detach()
        if self.method == "smile":
            bound = smile_lower_bound(scores, clip=self.smile_clip)
            return -bound, bound.detach()
        loss, self.log_ema = _mine_loss(
            scores.diagonal().mean(), _log_mean_exp_off_diagonal(scores), log_ema=self.log_ema,
            ema_decay=self.ema_decay,
        )
        return loss, -loss.detach()

    def update(self, x: Tensor, z: Tensor, *, steps: int = 1) -> float:
        """Take ``steps`` optimiser steps on minibatches drawn from the pairs (x[i], z[i]).

        Args:
            x: [N, dx] and z: [N, dz] matched samples (N ≥ 2), on the critic's device.
            steps: number of minibatch steps (≥ 0).

        Returns:
            The training bound (nats) of the last step's minibatch (nan when ``steps`` = 0). It is measured
            on training pairs, so it is optimistic: report :meth:`evaluate` on held-out pairs instead.

        Raises:
            ValueError: on invalid inputs or negative ``steps``.
        """
        x, z = _check_pair(x, z)
        if steps < 0:
            raise ValueError(f"steps must be >= 0, got {steps}")
        n = x.shape[0]
        batch = min(self.batch_size, n)
        self.critic.train()
        value = float("nan")
        for _ in range(steps):
            idx = torch.randperm(n, generator=self._generator)[:batch].to(x.device)
            scores = self.critic.pairwise(x[idx], z[idx])
            loss, bound = self._loss(scores)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.steps_done += 1
            value = float(bound)
        return value

    # -- evaluation -------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, x: Tensor, z: Tensor, *, block_size: int = 2048) -> MIEstimate:
        """The bound on held-out pairs, with the MI gap and a standard error.

        The pairs are put in a seeded random order and split into blocks of at most ``block_size``; in each
        block every (x_i, z_j), j ≠ i, is a mismatched pair. ``"mine"`` reports the DV bound over all
        blocks' pairs; ``"infonce"`` the mean per-row InfoNCE term (cap log block size); ``"smile"`` the
        clipped DV value. Standard errors come from per-row terms (delta method for the log term).

        Args:
            x: [N, dx] and z: [N, dz] held-out matched pairs, N ≥ 2 — not pairs the critic trained on.
            block_size: candidates per block (≥ 2); memory is O(block_size²).

        Returns:
            :class:`MIEstimate` (nats).

        Raises:
            ValueError: on invalid inputs.
        """
        x, z = _check_pair(x, z)
        if block_size < 2:
            raise ValueError(f"block_size must be >= 2, got {block_size}")
        n = x.shape[0]
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + 1)).to(x.device)
        blocks = torch.tensor_split(order, math.ceil(n / block_size))
        was_training = self.critic.training
        self.critic.eval()
        joint, row_lse, off_sum, sizes = [], [], [], []
        for idx in blocks:
            scores = self.critic.pairwise(x[idx], z[idx])
            b = scores.shape[0]
            diag = scores.diagonal()
            joint.append(diag.double())
            off_sum.append((scores.sum(dim=1) - diag).double())
            sizes.append(torch.full((b,), float(b), dtype=torch.float64, device=scores.device))
            if self.method == "infonce":
                row_lse.append(torch.logsumexp(scores, dim=1).double())
                continue
            eye = torch.eye(b, dtype=torch.bool, device=scores.device)
            src = scores.clamp(-self.smile_clip, self.smile_clip) if self.method == "smile" else scores.clone()
            row_lse.append(torch.logsumexp(src.masked_fill_(eye, -math.inf), dim=1).double())
        self.critic.train(was_training)
        joint_t, size_t, lse_t = torch.cat(joint), torch.cat(sizes), torch.cat(row_lse)
        n_off = float((size_t - 1).sum())
        mi_gap = float(joint_t.mean() - torch.cat(off_sum).sum() / n_off)
        cap = None
        if self.method == "infonce":
            terms = joint_t - lse_t + torch.log(size_t)
            cap = float(torch.log(size_t).mean())
        else:
            log_marg = torch.logsumexp(lse_t, dim=0) - math.log(n_off)
            # influence of row i on mean(T_joint) - log mean(e^T_marg): T_ii - rowmean_i(e^T) / mean(e^T)
            terms = joint_t - torch.exp(lse_t - torch.log(size_t - 1) - log_marg)
            terms = terms - terms.mean() + (joint_t.mean() - log_marg)
        stderr = float(terms.std() / math.sqrt(n)) if n > 1 else float("nan")
        return MIEstimate(
            mi=float(terms.mean()), mi_gap=mi_gap, stderr=stderr, n=n, method=self.method, cap=cap
        )

    # -- state ------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Critic weights, optimiser state, MINE's EMA, step count and sampler RNG state (a deep copy)."""
        return {
            "critic": copy.deepcopy(self.critic.state_dict()),
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),
            "log_ema": None if self.log_ema is None else float(self.log_ema),
            "steps_done": self.steps_done,
            "generator": self._generator.get_state(),
            "method": self.method,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; the method must match.

        Raises:
            ValueError: if the state was saved by a trainer with another method.
        """
        if state.get("method", self.method) != self.method:
            raise ValueError(f"state was saved for method {state['method']!r}, this trainer uses {self.method!r}")
        self.critic.load_state_dict(state["critic"])
        self.optimizer.load_state_dict(state["optimizer"])
        log_ema = state.get("log_ema")
        device = next(self.critic.parameters()).device
        self.log_ema = None if log_ema is None else torch.tensor(log_ema, dtype=torch.float64, device=device)
        self.steps_done = int(state.get("steps_done", 0))
        if "generator" in state:
            self._generator.set_state(state["generator"])


# --------------------------------------------------------------------------------------------------
# Generic estimator
# --------------------------------------------------------------------------------------------------


def gaussianise(t: Tensor) -> Tensor:
    """Rank-Gaussianise each column: empirical CDF (average ranks for ties) → standard-normal quantiles.

    u = (rank + 1) / (N + 1) with 0-based average ranks, output Φ⁻¹(u). An invertible increasing map per
    coordinate on the sample (up to ties), so the MI is unchanged. A constant column maps to zeros.

    Args:
        t: [N, d] floating tensor.

    Returns:
        [N, d] tensor, same device and dtype.
    """
    n = t.shape[0]
    cols = t.T.contiguous()  # [d, N]
    sorted_cols, _ = torch.sort(cols, dim=1)
    below = torch.searchsorted(sorted_cols, cols, right=False)
    upto = torch.searchsorted(sorted_cols, cols, right=True)
    rank = (below + upto - 1).to(torch.float64) / 2.0
    u = (rank + 1.0) / (n + 1.0)
    return torch.special.ndtri(u).to(t.dtype).T.contiguous()


def _standardise(t: Tensor) -> Tensor:
    std = t.std(dim=0, keepdim=True)
    return (t - t.mean(dim=0, keepdim=True)) / torch.where(std > 0, std, torch.ones_like(std))


def estimate_mi_detailed(
    x: Tensor,
    z: Tensor,
    *,
    seed: int = 0,
    method: str = "mine",
    critic: str = "separable",
    hidden: int = 64,
    embed_dim: int = 32,
    layers: int = 2,
    steps: int = 1000,
    batch_size: int = 512,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    ema_decay: float = 0.99,
    smile_clip: float = 5.0,
    train_fraction: float = 0.5,
    validation_fraction: float = 0.2,
    eval_every: int = 50,
    patience: int = 4,
    gaussianise_inputs: bool = True,
    block_size: int = 2048,
) -> MIEstimate:
    """Estimate I(X; Z) in nats from paired samples with a learned critic, reported on held-out pairs.

    Steps: (1) preprocess each coordinate — by default rank-Gaussianisation (empirical copula, then
    standard-normal quantiles; see :func:`gaussianise`); MI is invariant under invertible per-coordinate
    maps, so this loses nothing and turns heavy-tailed or warped marginals (x ↦ x + x³, z ↦ sinh z) into
    the easy Gaussian-marginal case; with ``gaussianise_inputs=False`` columns are only standardised.
    (2) Split the pairs at random: ``train_fraction`` for the critic (of which ``validation_fraction`` is
    kept aside for early stopping) and the rest held out. (3) Train a critic with :class:`MINETrainer` for up
    to ``steps`` minibatch steps; every ``eval_every`` steps score the validation pairs, keep the best
    weights, stop after ``patience`` checks without improvement (a critic that keeps training overfits its
    pairs and its held-out bound falls). (4) Report the bound on the held-out pairs only
    (:meth:`MINETrainer.evaluate`), never used for training or for the early stop, so a critic that
    memorised its pairs cannot inflate it.

    Defaults, chosen on correlated Gaussians with N = 20 000 (true MI 0.1–2 nats, d = 1…20: within 10 %,
    typically 0–6 % under — DV is a lower bound), about 2–5 s of one CPU core per call: separable critic
    f(x)ᵀg(z) + xᵀWz, two hidden layers of 64, embeddings of 32, Adam at 1e-3, minibatches of 512 pairs,
    ≤ 1000 steps, half the pairs held out.

    Args:
        x: [N, dx] samples of X; z: [N, dz] paired samples of Z (row i of each is one draw of the joint).
            Any device; computation stays there.
        seed: seeds the split, the critic's initial weights and the minibatches (global RNG untouched).
        method: ``"mine"`` (DV bound, EMA-corrected gradients), ``"infonce"`` (≤ log block size) or
            ``"smile"``.
        critic: ``"separable"`` or ``"concat"`` (see :mod:`adaptive_dp.leakage.critics`).
        hidden, embed_dim, layers: critic size.
        steps, batch_size, lr, weight_decay, ema_decay, smile_clip: training options (see :class:`MINETrainer`).
        train_fraction: share of pairs used for training, in (0, 1).
        validation_fraction: share of the training pairs kept for early stopping, in (0, 1).
        eval_every, patience: early-stopping schedule (steps between checks; checks without improvement).
        gaussianise_inputs: rank-Gaussianise each coordinate first (default True).
        block_size: candidates per evaluation block.

    Returns:
        :class:`MIEstimate` (nats) on the held-out pairs.

    Raises:
        ValueError: if x or z is not 2-D, rows differ, values are non-finite, N < 64, or an option is
        out of range.

    Source: Belghazi et al. 2018 (MINE); Poole et al. 2019 (bounds, separable critics); Song & Ermon
    2020 (SMILE); Kraskov et al. 2004 (MI invariance under invertible per-coordinate maps).
    """
    x, z = _check_pair(x, z, min_samples=MIN_SAMPLES)
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; use one of {METHODS}")
    if not 0.0 < train_fraction < 1.0:
        raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction}")
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction}")
    if steps < 0 or eval_every < 1 or patience < 1:
        raise ValueError(f"need steps >= 0, eval_every >= 1, patience >= 1; got {steps}, {eval_every}, {patience}")
    n = x.shape[0]
    n_train = int(round(n * train_fraction))
    if n_train < 4 or n - n_train < 2:
        raise ValueError(f"train_fraction={train_fraction} leaves too few pairs on one side of the split (N={n})")
    prep = gaussianise if gaussianise_inputs else _standardise
    x, z = prep(x), prep(z)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).to(x.device)
    n_val = max(2, int(round(n_train * validation_fraction)))
    fit, val, held = perm[: n_train - n_val], perm[n_train - n_val : n_train], perm[n_train:]
    net = build_critic(
        critic, x.shape[1], z.shape[1], hidden=hidden, embed_dim=embed_dim, layers=layers,
        seed=seed, device=x.device, dtype=x.dtype,
    )
    trainer = MINETrainer(
        net, method=method, lr=lr, ema_decay=ema_decay, smile_clip=smile_clip, batch_size=batch_size,
        weight_decay=weight_decay, seed=seed,
    )
    _train_with_early_stopping(
        trainer, (x[fit], z[fit]), (x[val], z[val]), steps=steps, eval_every=eval_every, patience=patience,
        block_size=block_size,
    )
    return trainer.evaluate(x[held], z[held], block_size=block_size)


def _train_with_early_stopping(
    trainer: MINETrainer,
    fit: tuple[Tensor, Tensor],
    val: tuple[Tensor, Tensor],
    *,
    steps: int,
    eval_every: int,
    patience: int,
    block_size: int,
) -> None:
    """Train up to ``steps`` steps; every ``eval_every`` steps score the validation pairs and keep the
    critic weights with the best validation bound; stop after ``patience`` checks without improvement."""
    best_value, best_state, since_best, done = -math.inf, None, 0, 0
    while done < steps and since_best < patience:
        chunk = min(eval_every, steps - done)
        trainer.update(*fit, steps=chunk)
        done += chunk
        value = trainer.evaluate(*val, block_size=min(block_size, 512)).mi  # cheap check, many pairs
        if value > best_value:
            best_value, since_best = value, 0
            best_state = {k: v.detach().clone() for k, v in trainer.critic.state_dict().items()}
        else:
            since_best += 1
    if best_state is not None:
        trainer.critic.load_state_dict(best_state)


def estimate_mi(x: Tensor, z: Tensor, *, seed: int = 0, **options: Any) -> float:
    """Estimate I(X; Z) in nats from paired samples [N, dx], [N, dz]; held-out DV/MINE by default.

    Thin wrapper of :func:`estimate_mi_detailed` (same options and errors) returning only the estimate.
    """
    return estimate_mi_detailed(x, z, seed=seed, **options).mi
