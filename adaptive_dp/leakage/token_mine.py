"""The learned privacy-token estimator (``"token-mine"``): a critic over privacy tokens, trained online.

Meng et al. 2025 (arXiv 2502.02913) measure leakage as the MI between data and privacy tokens (embeddings
of per-sample gradients, :mod:`adaptive_dp.leakage.tokens`). Made model-aware here: the critic
(:class:`TokenCritic`) compares the token of the noisy gradient with the token of each candidate's own clean
gradient (a learned, noise-normalised distance, :class:`TokenNoiseModel`) beside the candidate's
intermediate-layer data features (:class:`adaptive_dp.leakage.features.FeatureExtractor`); InfoNCE-trained,
warm-started across readings from a small replay buffer of recent audit draws, and reported on a fresh noise
draw it never trained on (held-out pairs).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adaptive_dp.leakage.bounds import MIEstimate, mine_loss
from adaptive_dp.leakage.estimators import LeakageEstimator, register_estimator
from adaptive_dp.leakage.tokens import TokenEncoder, build_token_encoder

__all__ = ["TokenCritic", "TokenMINEEstimator", "TokenNoiseModel"]


class TokenNoiseModel:
    """Gaussian model of the token noise u − v (noisy token minus the same example's clean token).

    Given the covariance when it is known (the projection encoder: σ² times the projected noise
    covariance), else fitted on fresh noise draws of the audit pairs: shift μ = E[u − v], whitening W = L⁻¹ with
    LLᵀ = Cov[u − v] + shrinkage. Under it, −½‖W(u_i − μ − v_j)‖² is the Gaussian log-likelihood ratio
    critic in token space (exact for the projection encoder, whose token noise is Gaussian).
    """

    def __init__(
        self, deltas: Tensor | None = None, *, covariance: Tensor | None = None, shrinkage: float = 1e-3
    ) -> None:
        if covariance is not None:  # known exactly (a linear encoder): zero shift
            cov = covariance.double()
            self.shift = cov.new_zeros(cov.shape[0])
        else:
            deltas = deltas.double()
            self.shift = deltas.mean(0)
            centred = deltas - self.shift
            cov = centred.T @ centred / max(1, deltas.shape[0] - 1)
        ridge = shrinkage * float(cov.diagonal().mean().clamp_min(1e-30))
        chol = torch.linalg.cholesky(
            cov + ridge * torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
        )
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
    return MIEstimate(
        mi=float(terms.mean()),
        critic_gap=float(diag.mean() - off_mean),
        stderr=float(terms.std() / math.sqrt(n)),
        n=n,
        method=method,
        cap=math.log(n),
    )


@register_estimator("token-mine")
class TokenMINEEstimator(LeakageEstimator):
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

    needs_features = True

    def __init__(
        self,
        *,
        layer_shapes: Sequence[Sequence[int]],
        feature_dim: int,
        device: torch.device,
        token_encoder: str | TokenEncoder = "span",
        token_dim: int = 64,
        seed: int = 0,
        train_draws: int = 2,
        replay_size: int = 8,
        encoder_steps: int = 5,
        critic_steps: int = 10,
        lr: float = 1e-3,
        sigma_tolerance: float = 0.25,
        objective: str = "infonce",
        ema_decay: float = 0.99,
    ) -> None:
        if objective not in ("infonce", "mine"):
            raise ValueError(f"objective must be 'infonce' or 'mine', got {objective!r}")
        self.objective = objective
        self.ema_decay = float(ema_decay)
        self.log_ema: Tensor | None = None
        with torch.random.fork_rng(devices=[]):
            if isinstance(token_encoder, TokenEncoder):
                encoder = token_encoder
            else:
                encoder = build_token_encoder(
                    token_encoder, layer_shapes=layer_shapes, dim=token_dim, seed=seed
                )
            torch.manual_seed(seed)
            self.critic = TokenCritic(token_dim=encoder.dim, feature_dim=feature_dim).to(device)
        self.encoder = encoder.to(device)
        self.device = device
        self.train_draws = int(train_draws)
        self.sigma_tolerance = float(sigma_tolerance)
        self.temperatures = [2.0**k for k in range(-8, 3)]
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
                jitter = (
                    1e-9
                    * float(cov.diagonal().mean())
                    * torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
                )
                self._chol = torch.linalg.cholesky(cov + jitter).float()
        return self._chol

    def _sketch_noise(self, z_clean: Tensor, sigma: float) -> Tensor:
        """A noisy sketch: z_clean + σ·L ε, the sketch of (clean + N(0, σ²I_P)) in distribution."""
        factor = self._noise_factor()
        eps = torch.randn(
            z_clean.shape, generator=self._generator, device=z_clean.device, dtype=z_clean.dtype
        )
        return z_clean + sigma * (eps * factor if factor.dim() == 1 else eps @ factor.T)

    def _noise_model(self, z_clean: Tensor, sigma: float) -> TokenNoiseModel:
        if not self.encoder.trainable:  # encode() is the identity: the token noise is N(0, σ² cov) exactly
            factor = self._noise_factor().double()
            cov = torch.diag(factor**2) if factor.dim() == 1 else factor @ factor.T
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
            raw = torch.stack(
                [
                    self._scores(self._sketch_noise(z_clean, sigma), z_clean, f, self.noise_model)
                    for _ in range(draws)
                ]
            )
            best, best_value = 0.0, 0.0
            for tau in self.temperatures:
                terms = torch.stack([_infonce_terms(tau * s) for s in raw]).flatten()
                value = float(terms.mean())
                if value > best_value and value > 3.0 * float(terms.std()) / math.sqrt(terms.numel()):
                    best, best_value = tau, value
            self.critic.temperature.fill_(best)

    def estimate(
        self,
        clean: list[Tensor],
        *,
        noise_multiplier: float,
        max_grad_norm: float,
        generator: torch.Generator,
        features: Tensor | None = None,
    ) -> MIEstimate:
        """Train on fresh sketch-space draws of the replayed audit pairs; report InfoNCE on a fresh draw (nats).

        Args:
            clean: the audit examples' clipped gradients, one [N, *p.shape] per parameter (not modified).
            noise_multiplier: σ ≥ 0; max_grad_norm: C (the released noise std is σ·C).
            generator: draws the held-out release clean + N(0, σ²C²I) (the monitor's generator).
            features: [N, F] data features of the audit examples.

        Raises:
            ValueError: σ < 0, N < 2, or no features.
        """
        if noise_multiplier < 0:
            raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
        if clean[0].shape[0] < 2:
            raise ValueError("the token estimator needs at least 2 audit examples")
        if features is None:
            raise ValueError("the token estimator needs the audit examples' data features [N, F]")
        sigma, scale = float(noise_multiplier), 1.0 / max_grad_norm
        z_clean, f = self._clean_sketch(clean, features, scale=scale)
        self._remember(z_clean, f, sigma)
        if self.encoder.trainable:
            for _ in range(self.encoder_steps):
                zc = z_clean.repeat(self.train_draws, 1)
                self.encoder.fit_reduced(self._sketch_noise(zc, sigma), zc, steps=1)
        self.noise_model = self._noise_model(z_clean, sigma)
        self._train_critic(z_clean, f, sigma)
        self._calibrate(z_clean, f, sigma)
        std = sigma * max_grad_norm
        with torch.no_grad():  # held out: a fresh draw of the real noisy gradients, never trained on
            noisy = [
                g + std * torch.randn(g.shape, generator=generator, device=g.device, dtype=g.dtype)
                for g in clean
            ]
            z_eval = self.encoder.reduce([g * scale for g in noisy]).float()
            scores = self._scores(z_eval, z_clean, f, self.noise_model)
        return _estimate_from_scores(scores, self.name)

    def _clean_sketch(self, clean: list[Tensor], features: Tensor, *, scale: float) -> tuple[Tensor, Tensor]:
        """(clean sketches [N, K], standardised features [N, F]); a data-adaptive basis is refitted first."""
        with torch.no_grad():
            scaled = [g * scale for g in clean]
            if hasattr(self.encoder, "set_basis"):  # a data-adaptive basis follows the current model
                z_clean = self.encoder.set_basis(scaled)
            else:
                z_clean = self.encoder.reduce(scaled).float()
            f = features.to(self.device).float()
            return z_clean, (f - f.mean(0)) / f.std(0).clamp_min(1e-6)

    def _remember(self, z_clean: Tensor, f: Tensor, sigma: float) -> None:
        """Add this reading's audit pairs to the replay buffer, dropping those read at another σ.

        Replay only audit pairs read at (nearly) the current noise level: a critic tuned to another σ is
        over- or under-confident here.
        """
        kept = [
            item for item in self.replay if abs(item[2] - sigma) <= self.sigma_tolerance * max(sigma, 1e-12)
        ]
        self.replay.clear()
        self.replay.extend(kept)
        self.replay.append((z_clean, f, sigma))

    def _train_critic(self, z_clean: Tensor, f: Tensor, sigma: float) -> None:
        """``critic_steps`` steps of the objective on fresh sketch-space draws of replayed audit pairs."""
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
                    loss, self.log_ema = mine_loss(
                        scores.diagonal(), off, log_ema=self.log_ema, ema_decay=self.ema_decay
                    )
                else:
                    loss = -_infonce_terms(scores).mean()
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()

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
