"""The likelihood-ratio critic for the Gaussian mechanism: MI (nats) of a noisy gradient, training-free.

The monitor knows the model, so it can compute every audit example's own clipped gradient g_j; for the
Gaussian mechanism the optimal critic is closed-form, T(x_j, g̃_i) = −‖g̃_i − g_j‖²/(2σ²C²), and InfoNCE over
all N×N audit pairs is a tight lower bound on I(X; G̃), capped at log N. Three layers:

- on explicit [N, P] gradients: :func:`likelihood_ratio_scores`, :func:`likelihood_ratio_mi`, and the
  independent truth they are checked against, :func:`gaussian_capacity_bound`;
- the fast path from the [N, N] centred Gram matrix (:func:`centred_gram`), the noise entering only through
  its projections onto the audit gradients, drawn exactly (:func:`gaussian_cross_products`,
  :func:`likelihood_ratio_scores_from_gram`);
- :class:`LikelihoodRatioEstimator`, the monitor's ``"likelihood-ratio"`` estimator built on that fast path.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from adaptive_dp.leakage.bounds import MIEstimate, mean_off_diagonal
from adaptive_dp.leakage.estimators import LeakageEstimator, register_estimator
from adaptive_dp.leakage.gram import row_gram

__all__ = [
    "LR_NOISE_TERMS",
    "LikelihoodRatioEstimator",
    "centred_gram",
    "gaussian_capacity_bound",
    "gaussian_cross_products",
    "likelihood_ratio_mi",
    "likelihood_ratio_scores",
    "likelihood_ratio_scores_from_gram",
]

# --------------------------------------------------------------------------------------------------
# On explicit gradients: scores, InfoNCE, and the capacity bound
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
        error of the mean of the N per-row InfoNCE terms (over the noise draw), ``critic_gap`` the mean
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
        critic_gap=float(diag.mean() - mean_off_diagonal(scores)),
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
# From the Gram matrix: the fast path and the estimator
# --------------------------------------------------------------------------------------------------


def centred_gram(
    grads: Sequence[Tensor], *, inplace: bool = False, dtype: torch.dtype | None = None
) -> Tensor:
    """[N, N] Gram matrix of the centred per-sample gradients, summed over layers: K = (G − ḡ)(G − ḡ)ᵀ.

    G is the [N, P] matrix of the flattened per-layer gradients (never built: K = Σ_l of one [N, P_l] ×
    [P_l, N] matmul per layer). Centring leaves every pairwise distance ‖g_i − g_j‖² = K_ii + K_jj − 2K_ij
    unchanged and removes the examples' shared component before the float32 products, so the
    cancellation in that difference stays small.

    Args:
        grads: per-layer [N, *shape] per-sample gradients (float32 or float64).
        inplace: centre ``grads`` themselves (they must own their memory) instead of copies.
        dtype: dtype of the result and of the sums over blocks of columns
            (:func:`~adaptive_dp.leakage.gram.row_gram`); default the dtype of ``grads``. float64 takes the
            sums over P out of float32's rounding (≈1e-6 relative for P ~ 10⁶, ≈1e-8 in blocks), at the
            float32 matmul's cost.

    Returns:
        [N, N] symmetric positive semi-definite matrix, ``dtype`` (default: that of ``grads``).
    """
    n = grads[0].shape[0]
    gram = None
    for g in grads:
        flat = g.reshape(n, -1)
        flat = flat.sub_(flat.mean(dim=0)) if inplace else flat - flat.mean(dim=0)
        part = row_gram(flat, dtype or flat.dtype)
        gram = part if gram is None else gram.add_(part)
    return gram


def _work_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64


def likelihood_ratio_scores_from_gram(gram: Tensor, cross: Tensor, *, noise_std: float) -> Tensor:
    """The likelihood-ratio critic's [N, N] scores from the Gram matrix and the noise's cross products.

    With released gradients g̃_i = g_i + n_i, the score S_ij = −‖g̃_i − g_j‖²/(2s²) (s = σ·C) expands to
    −[‖g_i − g_j‖² + 2 n_iᵀ(g_i − g_j) + ‖n_i‖²]/(2s²). The last term is the same for the whole row i;
    InfoNCE (diagonal minus row log-sum-exp) and the critic gap (mean diagonal minus mean off-diagonal) do not
    change under per-row shifts, so it is dropped and the matched scores are exactly 0:
    S'_ij = −[D_ij + 2(M_ii − M_ij)]/(2s²) with D_ij = K_ii + K_jj − 2K_ij and M_ij = n_iᵀ(g_j − ḡ).

    Args:
        gram: [N, N] centred Gram matrix K (:func:`centred_gram`).
        cross: [N, N] M_ij = n_iᵀ(g_j − ḡ), the noise of row i against candidate j (or [D, N, N], D draws).
        noise_std: s = σ·C, > 0.

    Returns:
        [N, N] (or [D, N, N]) scores in ``cross``'s dtype, equal to :func:`likelihood_ratio_scores` of
        (g + n, g) minus a constant per row.
    """
    gram = gram.to(cross.dtype)
    sq = gram.diagonal()
    dist = (sq.unsqueeze(1) + sq.unsqueeze(0) - 2.0 * gram).clamp_min(0.0)
    dist.fill_diagonal_(0.0)
    return (dist + 2.0 * (cross.diagonal(dim1=-2, dim2=-1).unsqueeze(-1) - cross)) / (
        -2.0 * noise_std * noise_std
    )


def gaussian_cross_products(
    gram: Tensor, *, noise_std: float, generator: torch.Generator, draws: int | None = None
) -> Tensor:
    """Draws of M_ij = n_iᵀ(g_j − ḡ) for n_i ~ N(0, s² I_P) independent, without drawing n_i.

    Each row (n_iᵀ(g_j − ḡ))_j is a linear map of a Gaussian vector, hence N(0, s² K) exactly (K the centred
    Gram matrix), independently over i: M = s · Z Lᵀ with Z [N, N] standard normal and LLᵀ = K
    (L = V·diag(√λ₊) from the eigendecomposition of K, which may be singular). This draws N² numbers instead
    of N·P and costs O(N³) instead of O(N²P).

    Args:
        gram: [N, N] centred Gram matrix K; noise_std: s = σ·C; generator: the source of Z (on K's device).
        draws: number of independent draws; None = one.

    Returns:
        [N, N] (or [draws, N, N]) float64 (float32 on MPS) cross products.
    """
    n = gram.shape[0]
    work = gram.to(_work_dtype(gram.device))
    eigenvalues, eigenvectors = torch.linalg.eigh(work)
    factor = eigenvectors * eigenvalues.clamp_min(0.0).sqrt()
    shape = (n, n) if draws is None else (int(draws), n, n)
    z = torch.randn(shape, generator=generator, device=gram.device, dtype=torch.float32).to(work.dtype)
    return noise_std * (z @ factor.T)


#: Noise draws per likelihood-ratio reading: enough that draws × N ≥ this many InfoNCE terms.
LR_NOISE_TERMS = 4096


@register_estimator("likelihood-ratio")
class LikelihoodRatioEstimator(LeakageEstimator):
    """The closed-form Gaussian-mechanism critic over all N×N audit pairs (no training, no state).

    One reading needs only the centred Gram matrix K of the clipped audit gradients: the noise enters the
    N×N scores through its projections onto the audit gradients, drawn exactly from their Gaussian law
    (:func:`gaussian_cross_products`), and the scores are :func:`likelihood_ratio_scores_from_gram` — for one
    draw the same InfoNCE estimate and critic gap as :func:`likelihood_ratio_mi` on explicit noisy gradients,
    at O(N²P) for K plus O(N³) instead of drawing N·P noise values. Because a draw is that cheap, a reading
    averages ``noise_draws`` independent draws: the same expectation, I(J; g_J + noise) for J uniform over the
    audit examples, with the noise-draw variance divided by ``noise_draws``.

    Args:
        noise_draws: noise draws averaged per reading; None (default) = ⌈4096 / N⌉ (:data:`LR_NOISE_TERMS`).

    Raises:
        ValueError: ``noise_draws`` not a positive integer.

    Source: :func:`likelihood_ratio_mi` (InfoNCE with the log-likelihood-ratio critic).
    """

    requires_noise = True
    reads_gram = True
    last_curve: LikelihoodRatioCurve | None = None

    def __init__(self, *, noise_draws: int | None = None) -> None:
        if noise_draws is not None and (
            isinstance(noise_draws, bool) or int(noise_draws) != noise_draws or noise_draws < 1
        ):
            raise ValueError(f"noise_draws must be a positive integer or None, got {noise_draws!r}")
        self.noise_draws = None if noise_draws is None else int(noise_draws)

    def estimate(
        self,
        clean: list[Tensor],
        *,
        noise_multiplier: float,
        max_grad_norm: float,
        generator: torch.Generator,
        features: Tensor | None = None,
    ) -> MIEstimate:
        """MI (nats) from the clipped audit gradients (one [N, *p.shape] per parameter; centred in place).

        :meth:`estimate_from_gram` of their :func:`centred_gram`, computed in float64 (float32 on MPS) like
        the monitor's Gram path (:mod:`adaptive_dp.leakage.gram`); ``features`` are not used.
        """
        work = _work_dtype(clean[0].device)
        gram = centred_gram(clean, inplace=True, dtype=work)  # the critic needs only this [N, N] matrix
        return self.estimate_from_gram(
            gram, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm, generator=generator
        )

    def estimate_from_gram(
        self, gram: Tensor, *, noise_multiplier: float, max_grad_norm: float, generator: torch.Generator
    ) -> MIEstimate:
        """MI (nats) averaged over noise draws, from the [N, N] centred Gram matrix of the clipped audit gradients.

        ``stderr`` is the standard error over the noise draws: √(Σ_i s_i² / D) / N with s_i² the variance of
        row i's InfoNCE term over the D draws (with D = 1, the spread over the rows / √N).

        Raises:
            ValueError: if ``noise_multiplier`` ≤ 0 (the critic divides by σ²C²) or N < 2.
        """
        if not noise_multiplier > 0:
            raise ValueError(
                f"the likelihood-ratio critic needs noise_multiplier > 0 (it divides by σ²C²), got "
                f"{noise_multiplier}; use estimator='token-mine' to read at σ = 0"
            )
        n = gram.shape[0]
        if n < 2:
            raise ValueError("the likelihood-ratio critic needs at least 2 audit examples (N >= 2)")
        draws = self.noise_draws or max(1, -(-LR_NOISE_TERMS // n))
        self.last_curve = LikelihoodRatioCurve(
            gram, max_grad_norm=max_grad_norm, generator=generator, draws=draws
        )
        return self.last_curve.estimate(noise_multiplier)

    def mi_curve(self) -> LikelihoodRatioCurve | None:
        """σ′ ↦ (MI, stderr) on the audit gradients of the last reading (None before the first)."""
        return self.last_curve


class LikelihoodRatioCurve:
    """MI(σ′) of the likelihood-ratio reading for any noise multiplier σ′, on one reading's audit gradients.

    The Gaussian draws Z of :func:`gaussian_cross_products` are drawn once and rescaled for each σ′ (common random
    numbers), so ``curve(σ)`` at the reading's own σ is that reading, and the curve is smooth and decreasing in σ′
    up to the noise-draw error its ``stderr`` states. A controller can solve for the σ that meets a ceiling instead
    of searching for it by feedback (``controllers.PredictiveController``). Cost per evaluation: O(D·N²) after an
    O(N³) set-up (D noise draws, N audit examples).

    Args:
        gram: [N, N] centred Gram matrix of the clipped audit gradients.
        max_grad_norm: C, the total clipping norm (the noise std is σ′·C).
        generator: the source of the standard normal draws.
        draws: D, noise draws averaged per evaluation.
    """

    def __init__(self, gram: Tensor, *, max_grad_norm: float, generator: torch.Generator, draws: int) -> None:
        n = gram.shape[0]
        work = gram.to(_work_dtype(gram.device))
        eigenvalues, eigenvectors = torch.linalg.eigh(work)
        factor = eigenvectors * eigenvalues.clamp_min(0.0).sqrt()
        z = torch.randn((int(draws), n, n), generator=generator, device=gram.device, dtype=torch.float32)
        self._unit_cross = z.to(work.dtype) @ factor.T  # cross products at noise std 1
        self._gram = gram
        self._c = float(max_grad_norm)
        self.draws, self.n = int(draws), n

    def estimate(self, noise_multiplier: float) -> MIEstimate:
        """The reading at noise multiplier σ′ > 0 (InfoNCE with the likelihood-ratio critic, nats)."""
        std = float(noise_multiplier) * self._c
        scores = likelihood_ratio_scores_from_gram(self._gram, std * self._unit_cross, noise_std=std).double()
        diag = scores.diagonal(dim1=1, dim2=2)  # [D, N]
        n = self.n
        terms = diag - torch.logsumexp(scores, dim=2) + math.log(n)
        off_mean = (scores.sum(dim=(1, 2)) - diag.sum(dim=1)) / (n * (n - 1))
        if self.draws > 1:
            stderr = float(terms.var(dim=0).sum().div(self.draws).sqrt() / n)
        else:
            stderr = float(terms.std() / math.sqrt(n))
        return MIEstimate(
            mi=float(terms.mean()),
            critic_gap=float((diag.mean(dim=1) - off_mean).mean()),
            stderr=stderr,
            n=n,
            method=LikelihoodRatioEstimator.name,
            cap=math.log(n),
        )

    def __call__(self, noise_multiplier: float) -> tuple[float, float]:
        """(MI nats, stderr nats) at σ′ — the ``controllers.base.MICurve`` protocol."""
        est = self.estimate(noise_multiplier)
        return est.mi, est.stderr
