"""Critic (statistics) networks T(x, z) for the variational MI bounds in :mod:`adaptive_dp.leakage.mine`.

Every critic offers two views of the same function:

* ``critic(x, z) -> [N]`` scores the matched pairs ``(x[i], z[i])``;
* ``critic.pairwise(x, z) -> [N, M]`` scores every pair, ``S[i, j] = T(x[i], z[j])``; the diagonal
  (when N = M) holds the matched pairs, the rest are mismatched (shuffled) pairs.

Two architectures (Poole et al. 2019, "On Variational Bounds of Mutual Information", Sec. 4):

* :class:`SeparableCritic` — ``T(x, z) = f(x)ᵀ g(z) + xᵀWz + xᵀAx + zᵀBz``: all N×M scores in one
  matmul, so a bound can use every mismatched pair of a batch. The default.
* :class:`ConcatCritic` — ``T(x, z) = MLP([x, z])``: the original MINE statistics network
  (Belghazi et al. 2018); N·M forward passes for the pairwise view.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

CRITICS = ("separable", "concat")


def _mlp(in_dim: int, hidden: int, out_dim: int, layers: int) -> nn.Sequential:
    """``layers`` hidden layers of width ``hidden`` with ELU, then a linear map to ``out_dim``."""
    modules: list[nn.Module] = []
    width = in_dim
    for _ in range(layers):
        modules += [nn.Linear(width, hidden), nn.ELU()]
        width = hidden
    modules.append(nn.Linear(width, out_dim))
    return nn.Sequential(*modules)


class SeparableCritic(nn.Module):
    """Separable critic ``T(x, z) = f(x)ᵀ g(z) + xᵀWz + xᵀAx + zᵀBz``: two MLP encoders plus a quadratic skip.

    The quadratic part (W, A, B initialised at zero) spans the exact log density ratio of any jointly
    Gaussian pair — the case of rank-Gaussianised inputs with a Gaussian copula — so the MLPs only learn
    what is left; on 10–20-dimensional inputs it cut the held-out underestimate by about half
    (e.g. d = 20, ρ = 0.3: −12 % → −7 %). Still separable: S = F Gᵀ + X W Zᵀ + q(x)1ᵀ + 1 r(z)ᵀ.

    Args:
        dx: width of x.
        dz: width of z.
        hidden: hidden width of each encoder.
        embed_dim: width of the embeddings f(x), g(z).
        layers: hidden layers per encoder.
    """

    def __init__(self, dx: int, dz: int, *, hidden: int = 64, embed_dim: int = 32, layers: int = 2) -> None:
        super().__init__()
        self.f = _mlp(dx, hidden, embed_dim, layers)
        self.g = _mlp(dz, hidden, embed_dim, layers)
        self.bilinear = nn.Parameter(torch.zeros(dx, dz))
        self.quad_x = nn.Parameter(torch.zeros(dx, dx))
        self.quad_z = nn.Parameter(torch.zeros(dz, dz))

    def _marginal_terms(self, x: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
        return ((x @ self.quad_x) * x).sum(dim=1), ((z @ self.quad_z) * z).sum(dim=1)

    def forward(self, x: Tensor, z: Tensor) -> Tensor:
        """Matched-pair scores: x [N, dx], z [N, dz] -> [N]."""
        qx, qz = self._marginal_terms(x, z)
        return (self.f(x) * self.g(z)).sum(dim=1) + ((x @ self.bilinear) * z).sum(dim=1) + qx + qz

    def pairwise(self, x: Tensor, z: Tensor) -> Tensor:
        """All-pairs scores: x [N, dx], z [M, dz] -> [N, M], ``S[i, j] = T(x[i], z[j])``."""
        qx, qz = self._marginal_terms(x, z)
        return self.f(x) @ self.g(z).T + (x @ self.bilinear) @ z.T + qx[:, None] + qz[None, :]


class ConcatCritic(nn.Module):
    """Concatenation critic ``T(x, z) = MLP([x, z])`` (the MINE statistics network).

    Args:
        dx: width of x.
        dz: width of z.
        hidden: hidden width.
        layers: hidden layers.
    """

    def __init__(self, dx: int, dz: int, *, hidden: int = 64, layers: int = 2) -> None:
        super().__init__()
        self.net = _mlp(dx + dz, hidden, 1, layers)

    def forward(self, x: Tensor, z: Tensor) -> Tensor:
        """Matched-pair scores: x [N, dx], z [N, dz] -> [N]."""
        return self.net(torch.cat([x, z], dim=1)).squeeze(1)

    def pairwise(self, x: Tensor, z: Tensor) -> Tensor:
        """All-pairs scores: x [N, dx], z [M, dz] -> [N, M] (materialises N·M concatenated pairs)."""
        n, m = x.shape[0], z.shape[0]
        pairs = torch.cat([x.unsqueeze(1).expand(n, m, -1), z.unsqueeze(0).expand(n, m, -1)], dim=2)
        return self.net(pairs).squeeze(2)


def build_critic(
    kind: str,
    dx: int,
    dz: int,
    *,
    hidden: int = 64,
    embed_dim: int = 32,
    layers: int = 2,
    seed: int | None = 0,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """Build a critic by name with seeded initialisation that leaves the global RNG untouched.

    Args:
        kind: ``"separable"`` (f(x)ᵀg(z)) or ``"concat"`` (MLP on [x, z]).
        dx: width of x; dz: width of z (both ≥ 1).
        hidden: hidden width; embed_dim: embedding width (separable only); layers: hidden layers.
        seed: seed of the initial weights (None: draw from the global RNG).
        device, dtype: where the critic lives (the inputs' device and dtype).

    Returns:
        An ``nn.Module`` with ``forward(x, z) -> [N]`` and ``pairwise(x, z) -> [N, M]``.

    Raises:
        ValueError: for an unknown ``kind`` or non-positive sizes.
    """
    if kind not in CRITICS:
        raise ValueError(f"unknown critic {kind!r}; use one of {CRITICS}")
    if min(dx, dz, hidden, embed_dim) < 1 or layers < 0:
        raise ValueError(
            f"critic sizes must be positive (dx={dx}, dz={dz}, hidden={hidden}, embed_dim={embed_dim}, "
            f"layers={layers})"
        )

    def make() -> nn.Module:
        if kind == "separable":
            return SeparableCritic(dx, dz, hidden=hidden, embed_dim=embed_dim, layers=layers)
        return ConcatCritic(dx, dz, hidden=hidden, layers=layers)

    if seed is None:
        critic = make()
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            critic = make()
    return critic.to(device=device, dtype=dtype)
