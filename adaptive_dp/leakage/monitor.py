"""The leakage monitor: one audit batch + the current σ → an MI reading (nats), training step untouched.

A reading simulates what one DP-SGD step would release about each audit example: its per-sample
gradient, clipped to C (``max_grad_norm``) as the optimizer clips, plus the Gaussian noise N(0, σ²C²) the
optimizer adds — the worst case of a batch of one — and estimates the mutual information between *which*
audit example it was and that noisy gradient. Two estimators, by name (``ESTIMATORS``):

- ``"likelihood-ratio"`` — model-aware and training-free: the optimal critic for the Gaussian mechanism,
  T(x_j, g̃_i) = −‖g̃_i − g_j‖²/(2σ²C²), over all N×N audit pairs with InfoNCE
  (:func:`adaptive_dp.leakage.mine.likelihood_ratio_mi`); capped at log N. Computed from the N×N Gram matrix of the
  centred clipped audit gradients, with the noise's projections onto them drawn from their exact Gaussian law
  (:class:`LikelihoodRatioEstimator`): the same estimate as explicit noisy gradients, without N·P noise draws.
- ``"token-mine"`` — the learned privacy-token estimator (Meng et al. 2025, arXiv 2502.02913) made
  model-aware: a critic compares the privacy token of the noisy gradient with the token of each
  candidate's own clean gradient (a learned, noise-normalised distance) beside the candidate's
  intermediate-layer data features (:class:`adaptive_dp.leakage.features.FeatureExtractor`); InfoNCE-trained,
  warm-started across readings from a small replay buffer of recent audit draws, and reported on a fresh
  noise draw it never trained on (held-out pairs).

Soundness and side effects (DESIGN.md, "Opacus pitfalls"): per-sample gradients are computed with
``torch.func`` (``vmap(grad(·))`` over ``functional_call``) on a hook-free copy of the wrapped module fed
the live parameters, so nothing is written to ``p.grad_sample``/``p.grad``/``p.summed_grad`` of the
training model, opacus' hooks never fire, and all randomness comes from the monitor's own
``torch.Generator`` on the model's device — the training step is the same with the monitor on or off.
The audit examples must be public or held out (never trained on).
"""

from __future__ import annotations

import copy
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from adaptive_dp.leakage.features import FeatureExtractor
from adaptive_dp.leakage.mine import MIEstimate, mine_loss
from adaptive_dp.leakage.tokens import TOKEN_ENCODERS, TokenEncoder, build_token_encoder

__all__ = [
    "ESTIMATORS",
    "LeakageMonitor",
    "LeakageReading",
    "LikelihoodRatioEstimator",
    "MonitorError",
    "TokenCritic",
    "TokenMINEEstimator",
    "TokenNoiseModel",
    "centred_gram",
    "clip_factors",
    "clip_per_sample",
    "gaussian_cross_products",
    "hook_free_copy",
    "likelihood_ratio_scores_from_gram",
    "per_sample_gradients",
    "per_sample_norms",
]


class MonitorError(RuntimeError):
    """A leakage reading could not be taken (ghost clipping, non-finite gradients, ...).

    The engine treats it as a failed reading (fail closed: σ_max).
    """


@dataclass(frozen=True)
class LeakageReading:
    """One monitor reading.

    Attributes:
        estimator: the estimator's name (``"likelihood-ratio"`` or ``"token-mine"``).
        mi: estimated MI between the audit example and its released noisy gradient, nats.
        mi_gap: mean critic score on matched minus mismatched (shuffled) pairs.
        stderr: standard error of ``mi`` over the noise draw, nats.
        n: number of audit examples (matched pairs) in the estimate.
        seconds: wall time of the reading.
        cap: the largest value the estimator can report (log n), nats.
        noise_multiplier: the σ the reading was taken at.
    """

    estimator: str
    mi: float
    mi_gap: float
    stderr: float
    n: int
    seconds: float
    cap: float | None = None
    noise_multiplier: float | None = None


# --------------------------------------------------------------------------------------------------
# Per-sample gradients on a hook-free copy
# --------------------------------------------------------------------------------------------------

_OPACUS_MODULE_ATTRS = ("activations", "max_batch_len", "autograd_grad_sample_hooks", "ft_compute_sample_grad")


def _unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside a GradSampleModule; refuses ghost clipping."""
    kind = type(model).__name__
    if "FastGradientClipping" in kind:
        raise MonitorError(
            f"{kind} (ghost clipping) never materialises per-sample gradients, so leakage cannot be measured; "
            "call make_private(..., grad_sample_mode='hooks') (the default) to use the leakage monitor"
        )
    inner = getattr(model, "_module", None)
    if isinstance(inner, nn.Module) and hasattr(model, "hooks_enabled"):
        return inner
    return model


def hook_free_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` with every hook and opacus attribute removed, in eval mode, frozen.

    The hook dicts are emptied on the original only for the duration of the copy (so opacus' hooks, bound
    to the GradSampleModule, are not copied), then restored.
    """
    saved = []
    for m in module.modules():
        stash = {k: v for k, v in vars(m).items()
                 if (k.endswith("hooks") and isinstance(v, dict)) or k in _OPACUS_MODULE_ATTRS}
        saved.append((m, stash))
        for k, v in stash.items():
            if isinstance(v, dict):
                setattr(m, k, type(v)())
            else:
                delattr(m, k)
    try:
        shadow = copy.deepcopy(module)
    finally:
        for m, stash in saved:
            for k, v in stash.items():
                setattr(m, k, v)
    for p in shadow.parameters():
        p.requires_grad_(False)
    return shadow.eval()


def per_sample_gradients(
    shadow: nn.Module,
    params: dict[str, Tensor],
    buffers: dict[str, Tensor],
    x: Tensor,
    y: Tensor,
    *,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    batch_size: int = 64,
) -> list[Tensor]:
    """Per-sample gradients of the per-example loss, one tensor [N, *p.shape] per parameter.

    ``vmap(grad(ℓ))`` over ``functional_call(shadow, (params, buffers), x_i[None])`` — each example is its
    own batch of one, so the gradient is ∇θ ℓ(f(x_i), y_i) whatever ``loss_reduction`` the optimizer
    uses (opacus rescales ``grad_sample`` to this for "mean").

    Args:
        shadow: a hook-free module (:func:`hook_free_copy`).
        params: name → parameter tensor (the live, detached parameters to differentiate).
        buffers: name → buffer tensor.
        x: [N, ...] inputs; y: [N] targets, on the parameters' device.
        loss_fn: ``loss_fn(logits [1, K], target [1]) -> scalar`` (e.g. ``F.cross_entropy``).
        batch_size: examples per vmap call (bounds memory).

    Returns:
        List over ``params`` (insertion order) of [N, *shape] tensors.
    """
    from torch.func import functional_call, grad, vmap

    def loss_one(p: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
        out = functional_call(shadow, (p, buffers), (xi.unsqueeze(0),))
        return loss_fn(out, yi.unsqueeze(0))

    per_example = vmap(grad(loss_one), in_dims=(None, 0, 0), randomness="error")
    chunks: list[dict[str, Tensor]] = []
    for start in range(0, x.shape[0], batch_size):
        with torch.enable_grad():
            chunks.append(per_example(params, x[start:start + batch_size], y[start:start + batch_size]))
    if len(chunks) == 1:  # one vmap call: its outputs are already [N, *shape], no copy
        return [chunks[0][name] for name in params]
    return [torch.cat([c[name] for c in chunks]) for name in params]


def per_sample_norms(grads: Sequence[Tensor]) -> Tensor:
    """[N, L] norms of each example's gradient in each of the L parameter tensors (one pass over the data).

    The flat norm of example i is ``norms[i].norm()`` (opacus' ``DPOptimizer`` computes it the same way). A
    NaN or inf anywhere in ``grads[l][i]`` makes ``norms[i, l]`` non-finite, so one check of this small matrix
    replaces a finiteness check of every gradient entry.
    """
    n = grads[0].shape[0]
    return torch.stack([g.reshape(n, -1).norm(dim=1) for g in grads], dim=1)


def clip_factors(norms: Tensor, max_grad_norm: float | Sequence[float], *, per_layer: bool = False) -> Tensor:
    """[N, L] factors min(1, C / (‖g‖ + 1e-6)) that clip per-sample gradients with norms ``norms`` [N, L].

    Flat: one factor per example (‖g_i‖ over all layers), repeated over the L columns. Per layer: each
    layer l clipped to its own C_l (``max_grad_norm`` a list, or C/√L each when a float).

    Source: Abadi et al. 2016, Alg. 1; opacus ``DPOptimizer.clip_and_accumulate``.
    """
    if per_layer:
        limits = norms.new_tensor(_per_layer_norms(max_grad_norm, norms.shape[1]))
        return (limits / (norms + 1e-6)).clamp(max=1.0)
    factor = (float(max_grad_norm) / (norms.norm(dim=1) + 1e-6)).clamp(max=1.0)
    return factor.unsqueeze(1).expand_as(norms)


def clip_per_sample(grads: Sequence[Tensor], max_grad_norm: float | Sequence[float], *, per_layer: bool = False,
                    inplace: bool = False) -> list[Tensor]:
    """Clip per-sample gradients as opacus' DPOptimizer does.

    Flat: g_i ← g_i · min(1, C / (‖g_i‖ + 1e-6)) with ‖g_i‖ over all layers. Per layer: each layer l is
    clipped to its own C_l (``max_grad_norm`` a list, or C/√L each when a float).

    Args:
        grads: per-layer [N, *shape] tensors.
        max_grad_norm: C (flat) or per-layer C_l.
        per_layer: per-layer clipping (opacus ``clipping="per_layer"``).
        inplace: scale ``grads`` themselves (no copy) and return them.

    Returns:
        Clipped per-layer tensors.

    Source: Abadi et al. 2016, "Deep Learning with Differential Privacy", Alg. 1; opacus ``DPOptimizer``.
    """
    factors = clip_factors(per_sample_norms(grads), max_grad_norm, per_layer=per_layer)
    return _scale(grads, factors, inplace=inplace)


def _scale(grads: Sequence[Tensor], factors: Tensor, *, inplace: bool) -> list[Tensor]:
    """g_l[i] · factors[i, l] for every layer l (in place or as new tensors)."""
    out = []
    for layer, g in enumerate(grads):
        f = factors[:, layer].reshape(-1, *([1] * (g.dim() - 1))).to(g.dtype)
        out.append(g.mul_(f) if inplace else g * f)
    return out


def _per_layer_norms(max_grad_norm: float | Sequence[float], layers: int) -> list[float]:
    if isinstance(max_grad_norm, (int, float)):
        return [float(max_grad_norm) / math.sqrt(layers)] * layers
    norms = [float(c) for c in max_grad_norm]
    if len(norms) != layers:
        raise ValueError(f"max_grad_norm has {len(norms)} per-layer norms for {layers} trainable parameters")
    return norms


def _total_norm(max_grad_norm: float | Sequence[float]) -> float:
    """C of the whole clipped gradient: C itself, or ‖(C_l)‖ for per-layer clipping (opacus' convention)."""
    if isinstance(max_grad_norm, (int, float)):
        c = float(max_grad_norm)
    else:
        c = math.sqrt(sum(float(v) ** 2 for v in max_grad_norm))
    if not (math.isfinite(c) and c > 0):
        raise ValueError(f"max_grad_norm must be positive and finite, got {max_grad_norm!r}")
    return c


# --------------------------------------------------------------------------------------------------
# Estimators
# --------------------------------------------------------------------------------------------------


def centred_gram(grads: Sequence[Tensor], *, inplace: bool = False) -> Tensor:
    """[N, N] Gram matrix of the centred per-sample gradients, summed over layers: K = (G − ḡ)(G − ḡ)ᵀ.

    G is the [N, P] matrix of the flattened per-layer gradients (never built: K = Σ_l of one [N, P_l] ×
    [P_l, N] matmul per layer). Centring leaves every pairwise distance ‖g_i − g_j‖² = K_ii + K_jj − 2K_ij
    unchanged and removes the examples' shared component before the float32 products, so the
    cancellation in that difference stays small.

    Args:
        grads: per-layer [N, *shape] per-sample gradients (float32 or float64).
        inplace: centre ``grads`` themselves (they must own their memory) instead of copies.

    Returns:
        [N, N] symmetric positive semi-definite matrix, dtype of ``grads``.
    """
    n = grads[0].shape[0]
    gram = None
    for g in grads:
        flat = g.reshape(n, -1)
        flat = flat.sub_(flat.mean(dim=0)) if inplace else flat - flat.mean(dim=0)
        gram = flat @ flat.T if gram is None else gram.addmm_(flat, flat.T)
    return gram


def _work_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64


def likelihood_ratio_scores_from_gram(gram: Tensor, cross: Tensor, *, noise_std: float) -> Tensor:
    """The likelihood-ratio critic's [N, N] scores from the Gram matrix and the noise's cross products.

    With released gradients g̃_i = g_i + n_i, the score S_ij = −‖g̃_i − g_j‖²/(2s²) (s = σ·C) expands to
    −[‖g_i − g_j‖² + 2 n_iᵀ(g_i − g_j) + ‖n_i‖²]/(2s²). The last term is the same for the whole row i;
    InfoNCE (diagonal minus row log-sum-exp) and the MI gap (mean diagonal minus mean off-diagonal) do not
    change under per-row shifts, so it is dropped and the matched scores are exactly 0:
    S'_ij = −[D_ij + 2(M_ii − M_ij)]/(2s²) with D_ij = K_ii + K_jj − 2K_ij and M_ij = n_iᵀ(g_j − ḡ).

    Args:
        gram: [N, N] centred Gram matrix K (:func:`centred_gram`).
        cross: [N, N] M_ij = n_iᵀ(g_j − ḡ), the noise of row i against candidate j (or [D, N, N], D draws).
        noise_std: s = σ·C, > 0.

    Returns:
        [N, N] (or [D, N, N]) scores in ``cross``'s dtype, equal to :func:`adaptive_dp.leakage.mine.likelihood_ratio_scores` of
        (g + n, g) minus a constant per row.
    """
    gram = gram.to(cross.dtype)
    sq = gram.diagonal()
    dist = (sq.unsqueeze(1) + sq.unsqueeze(0) - 2.0 * gram).clamp_min(0.0)
    dist.fill_diagonal_(0.0)
    return (dist + 2.0 * (cross.diagonal(dim1=-2, dim2=-1).unsqueeze(-1) - cross)) / (-2.0 * noise_std * noise_std)


def gaussian_cross_products(gram: Tensor, *, noise_std: float, generator: torch.Generator,
                            draws: int | None = None) -> Tensor:
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


class LikelihoodRatioEstimator:
    """The closed-form Gaussian-mechanism critic over all N×N audit pairs (no training, no state).

    One reading needs only the centred Gram matrix K of the clipped audit gradients: the noise enters the
    N×N scores through its projections onto the audit gradients, drawn exactly from their Gaussian law
    (:func:`gaussian_cross_products`), and the scores are :func:`likelihood_ratio_scores_from_gram` — for one
    draw the same InfoNCE estimate and MI gap as :func:`adaptive_dp.leakage.mine.likelihood_ratio_mi` on explicit
    noisy gradients, at O(N²P) for K plus O(N³) instead of drawing N·P noise values. Because a draw is that
    cheap, a reading averages ``noise_draws`` independent draws: the same expectation, I(J; g_J + noise) for
    J uniform over the audit examples, with the noise-draw variance divided by ``noise_draws``.

    Args:
        noise_draws: noise draws averaged per reading; None (default) = ⌈4096 / N⌉ (``LR_NOISE_TERMS``).

    Source: :func:`adaptive_dp.leakage.mine.likelihood_ratio_mi` (InfoNCE with the log-likelihood-ratio critic).
    """

    name = "likelihood-ratio"

    def __init__(self, *, noise_draws: int | None = None) -> None:
        if noise_draws is not None and (isinstance(noise_draws, bool) or int(noise_draws) != noise_draws
                                        or noise_draws < 1):
            raise ValueError(f"noise_draws must be a positive integer or None, got {noise_draws!r}")
        self.noise_draws = None if noise_draws is None else int(noise_draws)

    def estimate(self, gram: Tensor, *, noise_multiplier: float, max_grad_norm: float,
                 generator: torch.Generator) -> MIEstimate:
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
        std = float(noise_multiplier) * float(max_grad_norm)
        draws = self.noise_draws or max(1, -(-LR_NOISE_TERMS // n))
        cross = gaussian_cross_products(gram, noise_std=std, generator=generator, draws=draws)
        scores = likelihood_ratio_scores_from_gram(gram, cross, noise_std=std).double()  # [D, N, N]
        diag = scores.diagonal(dim1=1, dim2=2)  # [D, N]
        terms = diag - torch.logsumexp(scores, dim=2) + math.log(n)
        off_mean = (scores.sum(dim=(1, 2)) - diag.sum(dim=1)) / (n * (n - 1))
        if draws > 1:
            stderr = float(terms.var(dim=0).sum().div(draws).sqrt() / n)
        else:
            stderr = float(terms.std() / math.sqrt(n))
        return MIEstimate(mi=float(terms.mean()), mi_gap=float((diag.mean(dim=1) - off_mean).mean()),
                          stderr=stderr, n=n, method=self.name, cap=math.log(n))

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class TokenNoiseModel:
    """Gaussian model of the token noise u − v (noisy token minus the same example's clean token).

    Given the covariance when it is known (the projection encoder: σ² times the projected noise
    covariance), else fitted on fresh noise draws of the audit pairs: shift μ = E[u − v], whitening W = L⁻¹ with
    LLᵀ = Cov[u − v] + shrinkage. Under it, −½‖W(u_i − μ − v_j)‖² is the Gaussian log-likelihood ratio
    critic in token space (exact for the projection encoder, whose token noise is Gaussian).
    """

    def __init__(self, deltas: Tensor | None = None, *, covariance: Tensor | None = None,
                 shrinkage: float = 1e-3) -> None:
        if covariance is not None:  # known exactly (a linear encoder): zero shift
            cov = covariance.double()
            self.shift = cov.new_zeros(cov.shape[0])
        else:
            deltas = deltas.double()
            self.shift = deltas.mean(0)
            centred = deltas - self.shift
            cov = centred.T @ centred / max(1, deltas.shape[0] - 1)
        ridge = shrinkage * float(cov.diagonal().mean().clamp_min(1e-30))
        chol = torch.linalg.cholesky(cov + ridge * torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device))
        eye = torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
        self.whiten = torch.linalg.solve_triangular(chol, eye, upper=False).float()
        self.shift = self.shift.float()

    def state_dict(self) -> dict[str, Tensor]:
        return {"shift": self.shift.cpu(), "whiten": self.whiten.cpu()}

    @classmethod
    def from_state(cls, state: dict[str, Tensor], device: torch.device) -> TokenNoiseModel:
        obj = cls.__new__(cls)
        obj.shift = state["shift"].to(device)
        obj.whiten = state["whiten"].to(device)
        return obj


class TokenCritic(nn.Module):
    """Critic of the token estimator: T(g̃_i, x_j) from tokens u_i = E(g̃_i), v_j = E(g_j), features f_j.

    T_ij = τ · [−½ Σ_k softplus(w_k)·(W(u_i − μ − v_j))_k²  +  (A ū_i)ᵀ h(f_j)]

    where (μ, W) is the :class:`TokenNoiseModel` of the current σ (so the distance term starts as the
    Gaussian likelihood-ratio critic in token space, whatever σ is), softplus(w_k) learns how much each
    whitened coordinate is trusted, ū are the tokens standardised over the batch, and the bilinear term
    (A, MLP h; zero at start) lets the candidate's data features speak — the privacy-token critic of
    Meng et al. 2025 on top of the model-aware distance. The temperature τ ≥ 0 is calibrated on fresh
    training draws after the updates (:meth:`TokenMINEEstimator.estimate`): where the Gaussian noise model
    is off, it shrinks an over-confident critic towards 0 instead of letting InfoNCE go negative.
    """

    def __init__(self, *, token_dim: int, feature_dim: int, hidden: int = 64) -> None:
        super().__init__()
        self.log_weight = nn.Parameter(torch.full((token_dim,), math.log(math.e - 1.0)))  # softplus = 1
        self.feature_net = nn.Sequential(nn.Linear(feature_dim, hidden), nn.Tanh(), nn.Linear(hidden, hidden))
        self.token_map = nn.Linear(token_dim, hidden, bias=False)
        nn.init.zeros_(self.token_map.weight)
        self.register_buffer("temperature", torch.ones(()))

    def forward(self, u: Tensor, v: Tensor, f: Tensor, noise: TokenNoiseModel) -> Tensor:
        """[N, N] scores: rows are noisy tokens u [N, d], columns candidates (v [N, d], f [N, F])."""
        w = F.softplus(self.log_weight).sqrt()
        su = ((u - noise.shift) @ noise.whiten.T) * w
        sv = (v @ noise.whiten.T) * w
        sq = (su * su).sum(1, keepdim=True) + (sv * sv).sum(1).unsqueeze(0) - 2.0 * su @ sv.T
        u_std = (u - u.mean(0)) / u.std(0).clamp_min(1e-12)  # O(1) input to the bilinear term at any σ
        return self.temperature * (-0.5 * sq.clamp_min(0.0) + self.token_map(u_std) @ self.feature_net(f).T)


def _infonce_terms(scores: Tensor) -> Tensor:
    n = scores.shape[0]
    return scores.diagonal() - torch.logsumexp(scores, dim=1) + math.log(n)


def _estimate_from_scores(scores: Tensor, method: str) -> MIEstimate:
    scores = scores.double()
    n = scores.shape[0]
    terms = _infonce_terms(scores)
    diag = scores.diagonal()
    off_mean = (scores.sum() - diag.sum()) / (n * (n - 1))
    return MIEstimate(mi=float(terms.mean()), mi_gap=float(diag.mean() - off_mean),
                      stderr=float(terms.std() / math.sqrt(n)), n=n, method=method, cap=math.log(n))


class TokenMINEEstimator:
    """Learned privacy-token estimator: a :class:`TokenCritic` over (noisy token, candidate token + features).

    Per reading:

    1. the audit examples' clipped gradients are reduced by the token encoder's fixed stage
       (:meth:`TokenEncoder.reduce`, linear) and pushed, with their data features and σ, into a replay
       buffer of the last ``replay_size`` readings (only readings within ``sigma_tolerance`` of the current σ
       are kept: a critic tuned to another σ is over- or under-confident);
    2. noisy training pairs are drawn *in the sketch space*: reduce(g + N(0, σ²I)) = reduce(g) + σ·L ε with
       LLᵀ = :meth:`TokenEncoder.noise_covariance` — the exact distribution, fresh every update, so the
       critic cannot memorise noise; a trainable encoder takes ``encoder_steps`` denoising steps, the critic
       ``critic_steps`` steps on replayed pairs (objective ``"infonce"``, or ``"mine"``: the DV bound with
       MINE's moving-average (EMA) gradient correction, :func:`adaptive_dp.leakage.mine.mine_loss`);
    3. the temperature τ is calibrated on fresh training draws;
    4. the reported MI is InfoNCE over the N×N scores of one fresh draw of the *real* noisy gradients, never
       trained on (held-out pairs), in nats, capped at log N — comparable with the likelihood-ratio reading.

    Args:
        layer_shapes: trainable-parameter shapes; feature_dim: data-feature size; device: where to live.
        token_encoder: a ``TOKEN_ENCODERS`` name or a :class:`TokenEncoder` instance.
        token_dim: token size d; seed: seeds the encoder/critic initialisation and the noise of the
            training draws (the global RNG is never used).
        train_draws: noise draws per encoder step; replay_size, encoder_steps, critic_steps, lr,
        sigma_tolerance: the schedule above; objective: ``"infonce"`` (default) or ``"mine"``;
        ema_decay: MINE's EMA weight.

    Source: Meng et al. 2025 (privacy tokens, MI between data and gradient embeddings); Belghazi et al.
    2018 (MINE, EMA correction); van den Oord et al. 2018 (InfoNCE).
    """

    name = "token-mine"

    def __init__(self, *, layer_shapes: Sequence[Sequence[int]], feature_dim: int, device: torch.device,
                 token_encoder: str | TokenEncoder = "span", token_dim: int = 64, seed: int = 0,
                 train_draws: int = 2, replay_size: int = 8, encoder_steps: int = 5, critic_steps: int = 10,
                 lr: float = 1e-3, sigma_tolerance: float = 0.25, objective: str = "infonce",
                 ema_decay: float = 0.99) -> None:
        if objective not in ("infonce", "mine"):
            raise ValueError(f"objective must be 'infonce' or 'mine', got {objective!r}")
        self.objective = objective
        self.ema_decay = float(ema_decay)
        self.log_ema: Tensor | None = None
        with torch.random.fork_rng(devices=[]):
            if isinstance(token_encoder, TokenEncoder):
                encoder = token_encoder
            else:
                encoder = build_token_encoder(token_encoder, layer_shapes=layer_shapes, dim=token_dim, seed=seed)
            torch.manual_seed(seed)
            self.critic = TokenCritic(token_dim=encoder.dim, feature_dim=feature_dim).to(device)
        self.encoder = encoder.to(device)
        self.device = device
        self.train_draws = int(train_draws)
        self.sigma_tolerance = float(sigma_tolerance)
        self.temperatures = [2.0 ** k for k in range(-8, 3)]
        self.encoder_steps = int(encoder_steps)
        self.critic_steps = int(critic_steps)
        self.optimizer = torch.optim.Adam(self.critic.parameters(), lr=lr)
        self.replay: deque[tuple[Tensor, Tensor, float]] = deque(maxlen=int(replay_size))
        self.noise_model: TokenNoiseModel | None = None
        self._sampler = torch.Generator().manual_seed(seed)
        self._generator = torch.Generator(device=device).manual_seed(seed + 1)
        self._chol: Tensor | None = None

    def _tokens(self, z: Tensor) -> Tensor:
        return self.encoder.encode(z)

    def _scores(self, z_noisy: Tensor, z_clean: Tensor, f: Tensor, noise_var: TokenNoiseModel) -> Tensor:
        return self.critic(self._tokens(z_noisy), self._tokens(z_clean), f, noise_var)

    def _noise_factor(self) -> Tensor:
        """Factor of the sketch-space noise covariance (unit σ), cached: a vector of standard deviations
        when the covariance is diagonal (count sketch, kept layers), else its Cholesky factor L."""
        if self._chol is None:
            cov = self.encoder.noise_covariance(self.device)
            if torch.count_nonzero(cov - torch.diag(cov.diagonal())) == 0:
                self._chol = cov.diagonal().sqrt().float()
            else:
                jitter = 1e-9 * float(cov.diagonal().mean()) * torch.eye(cov.shape[0], dtype=cov.dtype,
                                                                          device=cov.device)
                self._chol = torch.linalg.cholesky(cov + jitter).float()
        return self._chol

    def _sketch_noise(self, z_clean: Tensor, sigma: float) -> Tensor:
        """A noisy sketch: z_clean + σ·L ε, the sketch of (clean + N(0, σ²I_P)) in distribution."""
        factor = self._noise_factor()
        eps = torch.randn(z_clean.shape, generator=self._generator, device=z_clean.device, dtype=z_clean.dtype)
        return z_clean + sigma * (eps * factor if factor.dim() == 1 else eps @ factor.T)

    def _noise_model(self, z_clean: Tensor, sigma: float) -> TokenNoiseModel:
        if not self.encoder.trainable:  # encode() is the identity: the token noise is N(0, σ² cov) exactly
            factor = self._noise_factor().double()
            cov = torch.diag(factor ** 2) if factor.dim() == 1 else factor @ factor.T
            return TokenNoiseModel(covariance=(sigma * sigma) * cov)
        draws = max(1, -(-16 * self.encoder.dim // z_clean.shape[0]))  # ≥ 16·d samples of the token noise
        with torch.no_grad():
            zc = z_clean.repeat(draws, 1)
            return TokenNoiseModel(self._tokens(self._sketch_noise(zc, sigma)) - self._tokens(zc))

    def _calibrate(self, z_clean: Tensor, f: Tensor, sigma: float, draws: int = 4) -> None:
        """Pick τ ∈ {0} ∪ {2^k} maximising InfoNCE on ``draws`` fresh training draws (not the reported one).

        τ = 0 (a reading of exactly 0 nats) is kept unless the best τ beats it by more than three standard
        errors on those draws, so the floor is not lifted by chance.
        """
        with torch.no_grad():
            self.critic.temperature.fill_(1.0)
            raw = torch.stack([self._scores(self._sketch_noise(z_clean, sigma), z_clean, f, self.noise_model)
                               for _ in range(draws)])
            best, best_value = 0.0, 0.0
            for tau in self.temperatures:
                terms = torch.stack([_infonce_terms(tau * s) for s in raw]).flatten()
                value = float(terms.mean())
                if value > best_value and value > 3.0 * float(terms.std()) / math.sqrt(terms.numel()):
                    best, best_value = tau, value
            self.critic.temperature.fill_(best)

    def estimate(self, draw: Callable[[], list[Tensor]], clean: list[Tensor], features: Tensor, *,
                 noise_multiplier: float, max_grad_norm: float) -> MIEstimate:
        """Train on fresh sketch-space draws of the replayed audit pairs; report InfoNCE on a fresh draw (nats)."""
        if noise_multiplier < 0:
            raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
        if clean[0].shape[0] < 2:
            raise ValueError("the token estimator needs at least 2 audit examples")
        sigma = float(noise_multiplier)
        scale = 1.0 / max_grad_norm
        with torch.no_grad():
            scaled = [g * scale for g in clean]
            if hasattr(self.encoder, "set_basis"):  # a data-adaptive basis follows the current model
                z_clean = self.encoder.set_basis(scaled)
            else:
                z_clean = self.encoder.reduce(scaled).float()
            f = features.to(self.device).float()
            f = (f - f.mean(0)) / f.std(0).clamp_min(1e-6)
        # Replay only audit pairs read at (nearly) the current noise level: a critic tuned to another σ is
        # over- or under-confident here.
        kept = [item for item in self.replay if abs(item[2] - sigma) <= self.sigma_tolerance * max(sigma, 1e-12)]
        self.replay.clear()
        self.replay.extend(kept)
        self.replay.append((z_clean, f, sigma))
        if self.encoder.trainable:
            for _ in range(self.encoder_steps):
                zc = z_clean.repeat(self.train_draws, 1)
                self.encoder.fit_reduced(self._sketch_noise(zc, sigma), zc, steps=1)
        self.noise_model = self._noise_model(z_clean, sigma)
        self.critic.temperature.fill_(1.0)
        with torch.enable_grad():
            for _ in range(self.critic_steps):
                pick = int(torch.randint(len(self.replay), (1,), generator=self._sampler))
                zc, fb, _ = self.replay[pick]
                if zc.shape != z_clean.shape or fb.shape != f.shape:
                    zc, fb = z_clean, f
                scores = self._scores(self._sketch_noise(zc, sigma), zc, fb, self.noise_model)
                if self.objective == "mine":
                    off = scores[~torch.eye(scores.shape[0], dtype=torch.bool, device=scores.device)]
                    loss, self.log_ema = mine_loss(scores.diagonal(), off, log_ema=self.log_ema,
                                                   ema_decay=self.ema_decay)
                else:
                    loss = -_infonce_terms(scores).mean()
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
        self._calibrate(z_clean, f, sigma)
        with torch.no_grad():  # held out: a fresh draw of the real noisy gradients, never trained on
            z_eval = self.encoder.reduce([g * scale for g in draw()]).float()
            scores = self._scores(z_eval, z_clean, f, self.noise_model)
        return _estimate_from_scores(scores, self.name)

    def state_dict(self) -> dict[str, Any]:
        enc_opt = getattr(self.encoder, "_optimizer", None)
        return {
            "encoder": self.encoder.state_dict(),
            "encoder_optimizer": None if enc_opt is None else enc_opt.state_dict(),
            "critic": self.critic.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "replay": [(item[0].cpu(), item[1].cpu(), item[2]) for item in self.replay],
            "noise_model": None if self.noise_model is None else self.noise_model.state_dict(),
            "sampler": self._sampler.get_state(),
            "generator": self._generator.get_state(),
            "log_ema": None if self.log_ema is None else self.log_ema.detach().cpu(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.encoder.load_state_dict(state["encoder"])
        self._chol = None  # the projections may have changed with the encoder's seed
        if state.get("encoder_optimizer") is not None and self.encoder.trainable:
            self.encoder.optimizer().load_state_dict(state["encoder_optimizer"])
        self.critic.load_state_dict(state["critic"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.replay.clear()
        for item in state["replay"]:
            self.replay.append((item[0].to(self.device), item[1].to(self.device), float(item[2])))
        nv = state.get("noise_model")
        self.noise_model = None if nv is None else TokenNoiseModel.from_state(nv, self.device)
        self._sampler.set_state(state["sampler"])
        self._generator.set_state(state["generator"])
        ema = state.get("log_ema")
        self.log_ema = None if ema is None else ema.to(self.device)


#: Leakage estimators by name.
ESTIMATORS: dict[str, type] = {
    LikelihoodRatioEstimator.name: LikelihoodRatioEstimator,
    TokenMINEEstimator.name: TokenMINEEstimator,
}


# --------------------------------------------------------------------------------------------------
# The monitor
# --------------------------------------------------------------------------------------------------


def _audit_tensors(audit_data: Any, max_audit: int) -> tuple[Tensor, Tensor]:
    """(x [N, ...], y [N]) from a Dataset, a DataLoader or (x, y) tensors; the first ``max_audit``."""
    if isinstance(audit_data, DataLoader):
        audit_data = audit_data.dataset
    if isinstance(audit_data, (tuple, list)) and len(audit_data) == 2 and all(
        isinstance(t, Tensor) for t in audit_data
    ):
        x, y = audit_data
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"audit x and y have different lengths {x.shape[0]} and {y.shape[0]}")
        return x[:max_audit], y[:max_audit]
    if not isinstance(audit_data, Dataset) or not hasattr(audit_data, "__len__"):
        raise ValueError(
            f"audit_data must be a map-style Dataset, a DataLoader over one, or tensors (x, y); got "
            f"{type(audit_data).__name__}"
        )
    n = min(len(audit_data), max_audit)
    items = [audit_data[i] for i in range(n)]
    if not items:
        raise ValueError("audit_data is empty; pass at least 2 audit examples")
    xs = torch.stack([torch.as_tensor(item[0]) for item in items])
    ys = torch.as_tensor([int(item[1]) for item in items], dtype=torch.long)
    return xs, ys


_OWN_OPTIONS = {"likelihood-ratio": {"noise_draws"}, "token-mine": {
    "token_dim", "train_draws", "replay_size", "encoder_steps", "critic_steps", "lr", "sigma_tolerance",
    "objective", "ema_decay"}}


def _check_options(estimator: str, options: dict[str, Any]) -> None:
    unknown = sorted(set(options) - _OWN_OPTIONS[estimator])
    if unknown:
        raise ValueError(f"option(s) {unknown} do not apply to estimator {estimator!r}; its options are "
                         f"{sorted(_OWN_OPTIONS[estimator]) or 'none'}")


class LeakageMonitor:
    """Measures gradient leakage on an audit split, without touching the training step.

    Args:
        model: the ``GradSampleModule`` returned by ``PrivacyEngine.make_private`` (or a plain module).
            Ghost clipping (``GradSampleModuleFastGradientClipping``) is refused: it has no per-sample
            gradients.
        audit_data: public or held-out examples (never trained on): a map-style Dataset of (x, y), a
            DataLoader over one, or tensors ``(x [N, ...], y [N])``; the first ``max_audit`` are used.
        max_grad_norm: C, the optimizer's clipping norm (or per-layer norms with ``clipping="per_layer"``).
        estimator: an ``ESTIMATORS`` name: ``"likelihood-ratio"`` (default) or ``"token-mine"``.
        token_encoder: a ``TOKEN_ENCODERS`` name for ``"token-mine"`` (default ``"span"``).
        seed: seeds the monitor's own generator (noise draws) and learned parts.
        max_audit: cap on N (default 256).
        clipping: ``"flat"`` (default) or ``"per_layer"``, as given to ``make_private``.
        loss_fn: per-example loss ``loss_fn(logits [1, K], target [1]) -> scalar``; default cross-entropy.
        batch_size: audit examples per vmap call.
        feature_layers, pooled_size: passed to :class:`FeatureExtractor` (token-mine only).
        **estimator_options: token-mine's ``token_dim``, ``train_draws``, ``replay_size``, ``encoder_steps``,
            ``critic_steps``, ``lr``, ``sigma_tolerance``, ``objective``, ``ema_decay``
            (:class:`TokenMINEEstimator`); the likelihood-ratio estimator's ``noise_draws``
            (:class:`LikelihoodRatioEstimator`).

    Per-sample gradients (and features) are computed in eval mode on the hook-free copy, so dropout is off
    and no random number is drawn from the global generators.

    Raises:
        MonitorError: ghost clipping.
        ValueError: empty audit data, < 2 examples, unknown estimator/encoder/option, non-positive C.
    """

    def __init__(self, model: nn.Module, audit_data: Any, *, max_grad_norm: float | Sequence[float],
                 estimator: str = "likelihood-ratio", token_encoder: str | TokenEncoder = "span",
                 seed: int = 0, max_audit: int = 256, clipping: str = "flat",
                 loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None, batch_size: int = 64,
                 feature_layers: Sequence[str] | None = None, pooled_size: int = 2,
                 **estimator_options: Any) -> None:
        if estimator not in ESTIMATORS:
            raise ValueError(f"unknown estimator {estimator!r}; choose one of {sorted(ESTIMATORS)}")
        if isinstance(token_encoder, str) and token_encoder not in TOKEN_ENCODERS:
            raise ValueError(f"unknown token encoder {token_encoder!r}; choose one of {sorted(TOKEN_ENCODERS)}")
        if clipping not in ("flat", "per_layer"):
            raise ValueError(f"clipping must be 'flat' or 'per_layer', got {clipping!r}")
        if max_audit < 2:
            raise ValueError(f"max_audit must be >= 2, got {max_audit}")
        _total_norm(max_grad_norm)
        self.model = model
        self._module = _unwrap(model)
        self.max_grad_norm = max_grad_norm
        self.per_layer = clipping == "per_layer"
        self.estimator_name = estimator
        self.seed = int(seed)
        self.loss_fn = loss_fn or F.cross_entropy
        self.batch_size = int(batch_size)
        self._names = [n for n, p in self._module.named_parameters() if p.requires_grad]
        if not self._names:
            raise ValueError("the model has no trainable parameters")
        self.device = next(self._module.parameters()).device
        x, y = _audit_tensors(audit_data, int(max_audit))
        if x.shape[0] < 2:
            raise ValueError(f"audit_data has {x.shape[0]} example(s); the estimators need at least 2")
        self.x = x.to(self.device)
        self.y = y.to(self.device)
        with torch.random.fork_rng(devices=[]):
            self._shadow = hook_free_copy(self._module)
        self._generator = torch.Generator(device=self.device).manual_seed(self.seed)
        params = dict(self._module.named_parameters())
        self.layer_shapes = [tuple(params[n].shape) for n in self._names]
        self._features: Tensor | None = None
        self._extractor = None
        _check_options(estimator, estimator_options)
        if estimator == "token-mine":
            self._extractor = FeatureExtractor(self._shadow, layers=feature_layers, pooled_size=pooled_size)
            feature_dim = self._features_now().shape[1]
            self._estimator = TokenMINEEstimator(
                layer_shapes=self.layer_shapes, feature_dim=feature_dim, device=self.device,
                token_encoder=token_encoder, seed=self.seed, **estimator_options)
        else:
            self._estimator = LikelihoodRatioEstimator(**estimator_options)
        self.readings = 0

    # -- pieces ------------------------------------------------------------------------------------

    def _live_state(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        named = dict(self._module.named_parameters())
        params = {n: named[n].detach() for n in self._names}
        frozen = {n: p.detach() for n, p in named.items() if n not in params}
        buffers = {n: b.detach() for n, b in self._module.named_buffers()}
        return params, {**frozen, **buffers}

    def _features_now(self) -> Tensor:
        params, rest = self._live_state()
        from torch.func import functional_call

        def forward(x: Tensor) -> Tensor:
            return functional_call(self._shadow, (params, rest), (x,))

        return self._extractor(self.x, forward=forward)

    def clean_gradients(self, *, max_grad_norm: float | Sequence[float] | None = None) -> list[Tensor]:
        """The audit examples' clipped per-sample gradients at the current parameters.

        Returns:
            One [N, *p.shape] tensor per trainable parameter (opacus' ``grad_sample`` order), clipped like
            the optimizer clips.

        Raises:
            MonitorError: if a per-sample gradient is NaN or inf, or the audit data do not fit the model.
        """
        c = self.max_grad_norm if max_grad_norm is None else max_grad_norm
        params, rest = self._live_state()
        try:
            grads = per_sample_gradients(self._shadow, params, rest, self.x, self.y, loss_fn=self.loss_fn,
                                         batch_size=self.batch_size)
        except (RuntimeError, ValueError, IndexError) as exc:
            raise MonitorError(
                f"per-sample gradients failed on audit inputs of shape {tuple(self.x.shape)} and targets "
                f"{tuple(self.y.shape)}: {exc}; pass audit examples shaped like the training batches"
            ) from exc
        grads = [g if g.is_contiguous() else g.contiguous() for g in grads]  # own memory: clipped in place
        norms = per_sample_norms(grads)  # [N, L]: any NaN/inf entry makes its norm non-finite
        finite = torch.isfinite(norms)
        if not bool(finite.all()):
            name = self._names[int((~finite).any(dim=0).nonzero()[0, 0])]
            raise MonitorError(f"non-finite per-sample gradient for parameter {name!r} on the audit data; "
                               "the model has diverged (lower the learning rate) or the audit inputs hold NaN")
        factors = clip_factors(norms, c if self.per_layer else _total_norm(c), per_layer=self.per_layer)
        return _scale(grads, factors, inplace=True)

    def read(self, *, noise_multiplier: float, max_grad_norm: float | Sequence[float] | None = None
             ) -> LeakageReading:
        """Take one reading at noise multiplier σ (and clipping norm C, default the constructor's).

        Args:
            noise_multiplier: σ of the step being simulated; the noise std is σ·C (C the total clipping
                norm). ≥ 0; the likelihood-ratio estimator needs > 0.
            max_grad_norm: C for this reading (e.g. an adaptive-clipping optimizer's current value).

        Returns:
            :class:`LeakageReading` (nats).

        Raises:
            ValueError: σ negative or non-finite (or 0 for likelihood-ratio), bad C.
            MonitorError: non-finite gradients, or an estimator failure on valid input.
        """
        start = time.perf_counter()
        try:
            sigma = float(noise_multiplier)
        except (TypeError, ValueError):
            raise ValueError(f"noise_multiplier must be a number, got {noise_multiplier!r}") from None
        if not (math.isfinite(sigma) and sigma >= 0):
            raise ValueError(f"noise_multiplier must be finite and >= 0, got {noise_multiplier!r}")
        c_spec = self.max_grad_norm if max_grad_norm is None else max_grad_norm
        c = _total_norm(c_spec)
        if self.estimator_name == "likelihood-ratio" and sigma <= 0:
            raise ValueError(f"the likelihood-ratio critic needs noise_multiplier > 0 (it divides by σ²C²), "
                             f"got {noise_multiplier}; use estimator='token-mine' to read at σ = 0")
        clean = self.clean_gradients(max_grad_norm=c_spec)
        if isinstance(self._estimator, LikelihoodRatioEstimator):
            gram = centred_gram(clean, inplace=True)  # the LR critic needs only this [N, N] matrix
            est = self._estimator.estimate(gram, noise_multiplier=sigma, max_grad_norm=c, generator=self._generator)
        else:
            features = self._features_now()
            std = sigma * c

            def draw() -> list[Tensor]:
                return [g + std * torch.randn(g.shape, generator=self._generator, device=g.device, dtype=g.dtype)
                        for g in clean]

            est = self._estimator.estimate(draw, clean, features, noise_multiplier=sigma, max_grad_norm=c)
        if not math.isfinite(est.mi):
            raise MonitorError(f"the {self.estimator_name} estimator returned a non-finite MI ({est.mi})")
        self.readings += 1
        return LeakageReading(estimator=self.estimator_name, mi=est.mi, mi_gap=est.mi_gap, stderr=est.stderr,
                              n=est.n, seconds=time.perf_counter() - start, cap=est.cap, noise_multiplier=sigma)

    # -- state ---------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Estimator state (encoder, critic, optimisers, EMA, replay buffer) and the noise generator."""
        # deep copy: optimiser state_dicts alias live tensors (Adam's step counter), which a monitor loading
        # this state would otherwise share with this one
        return copy.deepcopy({"estimator": self.estimator_name, "readings": self.readings,
                              "generator": self._generator.get_state(), "state": self._estimator.state_dict()})

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`. Raises ValueError if it belongs to another estimator."""
        if state.get("estimator") != self.estimator_name:
            raise ValueError(f"state is for estimator {state.get('estimator')!r}, this monitor uses "
                             f"{self.estimator_name!r}")
        self.readings = int(state["readings"])
        self._generator.set_state(state["generator"])
        self._estimator.load_state_dict(state["state"])
