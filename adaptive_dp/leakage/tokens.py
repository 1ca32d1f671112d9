"""Privacy tokens: fixed-size embeddings of per-sample gradients.

A privacy token (Meng et al. 2025, "Real-Time Privacy Risk Measurement with Privacy Tokens for Gradient
Leakage", arXiv 2502.02913) is ``Emb(g) = GradExtractor(g)``: a vector of ``dim`` numbers standing for one
example's gradient, small enough for a critic to compare with data features. The encoders here take the
per-sample gradients as opacus leaves them in ``p.grad_sample`` — a list with one tensor ``[B, *p.shape]``
per parameter — and return tokens ``[B, dim]``:

- ``"projection"`` — a seeded Johnson–Lindenstrauss random projection of the whole gradient, generated
  layer by layer and chunk by chunk from a seeded ``torch.Generator`` so that no dense ``P × dim`` matrix
  ever exists (``P`` can be millions); training-free, deterministic for a seed on a given device type.
- ``"autoencoder"`` — per-layer chunks (each layer count-sketched to at most ``layer_dim`` numbers,
  small layers kept exactly) → MLP encoder → token, with a linear decoder; trained online as a *denoising*
  autoencoder (input: the noisy audit gradient at the current σ; target: the clean clipped gradient), so
  the token keeps what survives the noise.
- ``"transformer"`` — each layer chunk becomes one element of a short sequence (plus a learned layer
  embedding) → a small ``nn.TransformerEncoder`` → mean-pooled token; trained with the same denoising
  objective.
- ``"span"`` — a data-adaptive orthonormal projection onto the top-``dim`` principal directions of the
  current clean audit gradients (kernel PCA from their N × N Gram matrix; no P × dim matrix is formed).
  A random projection keeps about dim/P of the energy that tells examples apart while the token noise stays
  σ² per coordinate; this one keeps the leading part of it (all of it when dim ≥ N − 1), so the critic
  sees the signal-to-noise ratio of the full gradient.

Encoders register themselves by name (:func:`register_token_encoder`); ``TOKEN_ENCODERS`` is that registry,
the one list of encoder names, and :func:`build_token_encoder` builds one. The fixed first-stage reductions
live in :mod:`adaptive_dp.leakage.sketches`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adaptive_dp.leakage.sketches import (
    DEFAULT_MAX_CHUNK_ELEMENTS,
    LayerSketch,
    chunked_gaussian_gram,
    chunked_gaussian_projection,
    mixed_seed,
    validate_layer_shapes,
)

__all__ = [
    "TOKEN_ENCODERS",
    "AutoencoderTokenEncoder",
    "LayerSketch",
    "ProjectionTokenEncoder",
    "SpanTokenEncoder",
    "TokenEncoder",
    "TransformerTokenEncoder",
    "build_token_encoder",
    "chunked_gaussian_gram",
    "chunked_gaussian_projection",
    "register_token_encoder",
]


class TokenEncoder(nn.Module):
    """Base class: per-layer per-sample gradients → privacy tokens.

    Args:
        layer_shapes: the parameter shapes, in the order the gradient list will come in.
        dim: token size d, ≥ 1.
        seed: seeds every random choice (projection matrices, initial weights); the global RNG is not used.

    Subclasses implement :meth:`forward`; trainable ones also :meth:`fit`.
    """

    #: The registry name (set by :func:`register_token_encoder`).
    name: str = ""
    #: Whether :meth:`fit` changes the encoder.
    trainable: bool = False

    def __init__(self, *, layer_shapes: Sequence[Sequence[int]], dim: int = 64, seed: int = 0) -> None:
        super().__init__()
        if int(dim) < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        self.layer_shapes = validate_layer_shapes(layer_shapes)
        self.dim = int(dim)
        # a buffer, so that load_state_dict restores the projections along with the weights
        self.register_buffer("projection_seed", torch.tensor(int(seed), dtype=torch.long))

    @property
    def seed(self) -> int:
        """The seed of the encoder's fixed projections (restored by ``load_state_dict``)."""
        return int(self.projection_seed)

    def check_grads(self, grads: Sequence[Tensor]) -> int:
        """Validate a gradient list against ``layer_shapes``; return the batch size B.

        Raises:
            ValueError: wrong number of layers, wrong shapes, differing batch sizes or an empty batch.
        """
        if len(grads) != len(self.layer_shapes):
            raise ValueError(f"expected {len(self.layer_shapes)} per-layer gradients, got {len(grads)}")
        batch = grads[0].shape[0] if grads[0].dim() > 0 else -1
        for i, (g, shape) in enumerate(zip(grads, self.layer_shapes)):
            if tuple(g.shape[1:]) != shape or g.shape[0] != batch:
                raise ValueError(
                    f"gradient {i} has shape {tuple(g.shape)}, expected [B, *{shape}] with B = {batch}"
                )
        if batch < 1:
            raise ValueError("empty batch: no per-sample gradients to tokenise")
        return batch

    def reduce(self, grads: Sequence[Tensor]) -> Tensor:  # pragma: no cover - abstract
        """The fixed (never trained) first stage: per-layer gradients → [B, K] sketch."""
        raise NotImplementedError

    def encode(self, z: Tensor) -> Tensor:
        """The (possibly trained) second stage: sketch [B, K] → tokens [B, dim]. Identity by default."""
        return z

    def forward(self, grads: Sequence[Tensor]) -> Tensor:
        """Tokens [B, dim] for per-layer gradients ``[B, *shape]`` (``encode(reduce(grads))``).

        Raises:
            ValueError: if the gradient list does not match ``layer_shapes`` or the batch is empty.
        """
        return self.encode(self.reduce(grads))

    def fit(self, noisy: Sequence[Tensor], clean: Sequence[Tensor], *, steps: int = 1) -> float | None:
        """Train on (noisy, clean) per-layer gradient pairs; returns the last loss (None: fixed encoder)."""
        return self.fit_reduced(self.reduce(noisy), self.reduce(clean), steps=steps)

    def fit_reduced(self, z_noisy: Tensor, z_clean: Tensor, *, steps: int = 1) -> float | None:
        """:meth:`fit` on sketches [B, K] already passed through :meth:`reduce`."""
        return None

    def noise_covariance(self, device: torch.device | str = "cpu") -> Tensor:  # pragma: no cover - abstract
        """[K, K] covariance (float64) of ``reduce(ξ)`` for isotropic unit gradient noise ξ ~ N(0, I_P).

        :meth:`reduce` is linear, so ``reduce(g + σ·ξ) = reduce(g) + σ·reduce(ξ)``: noisy sketches can be
        drawn without materialising a P-dimensional noise vector. ``device`` must be where :meth:`reduce`
        runs (CPU and CUDA generators give different projections).
        """
        raise NotImplementedError


#: Registry of privacy-token encoders by name (filled by :func:`register_token_encoder`).
TOKEN_ENCODERS: dict[str, type[TokenEncoder]] = {}

_T = TypeVar("_T", bound=type[TokenEncoder])


def register_token_encoder(name: str) -> Callable[[_T], _T]:
    """Class decorator: register a :class:`TokenEncoder` subclass under ``name`` (sets ``cls.name``).

    Raises:
        ValueError: if ``name`` is already taken by another class.
    """

    def decorate(cls: _T) -> _T:
        if TOKEN_ENCODERS.get(name, cls) is not cls:
            raise ValueError(
                f"token encoder name {name!r} is already registered to {TOKEN_ENCODERS[name].__name__}"
            )
        cls.name = name
        TOKEN_ENCODERS[name] = cls
        return cls

    return decorate


@register_token_encoder("projection")
class ProjectionTokenEncoder(TokenEncoder):
    """Seeded layer-wise Gaussian random projection to ``dim`` numbers (training-free baseline).

    token = Σ_l R_l vec(g_l), R_l [P_l, dim] with N(0, 1/dim) entries generated in chunks (see
    :func:`chunked_gaussian_projection`); E‖token‖² = ‖g‖². Peak extra memory: one chunk of
    ``max_chunk_elements`` entries plus the [B, dim] output, whatever P is.

    Source: Johnson–Lindenstrauss projection, the baseline privacy-token extractor of Meng et al. 2025.
    """

    def __init__(
        self,
        *,
        layer_shapes: Sequence[Sequence[int]],
        dim: int = 64,
        seed: int = 0,
        max_chunk_elements: int = DEFAULT_MAX_CHUNK_ELEMENTS,
    ) -> None:
        super().__init__(layer_shapes=layer_shapes, dim=dim, seed=seed)
        self.max_chunk_elements = int(max_chunk_elements)

    def reduce(self, grads: Sequence[Tensor]) -> Tensor:
        """The projection [B, dim] itself (the encoder has no trained stage)."""
        batch = self.check_grads(grads)
        out = None
        for layer, g in enumerate(grads):
            part = chunked_gaussian_projection(
                g.reshape(batch, -1),
                out_dim=self.dim,
                seed=self.seed,
                key=layer,
                max_chunk_elements=self.max_chunk_elements,
            )
            out = part if out is None else out + part
        return out

    def noise_covariance(self, device: torch.device | str = "cpu") -> Tensor:
        """Σ_l R_lᵀR_l, [dim, dim] float64 (see :meth:`TokenEncoder.noise_covariance`)."""
        total = None
        for layer, shape in enumerate(self.layer_shapes):
            gram = chunked_gaussian_gram(
                math.prod(shape),
                out_dim=self.dim,
                seed=self.seed,
                key=layer,
                device=device,
                max_chunk_elements=self.max_chunk_elements,
            )
            total = gram if total is None else total + gram
        return total


class _DenoisingEncoder(TokenEncoder):
    """Shared machinery of the learned encoders: layer sketch, input scaling, denoising fit."""

    trainable = True

    def __init__(self, *, layer_shapes, dim, seed, layer_dim, lr, sketch) -> None:
        super().__init__(layer_shapes=layer_shapes, dim=dim, seed=seed)
        self.sketch = LayerSketch(
            layer_shapes=self.layer_shapes, layer_dim=layer_dim, seed=seed, method=sketch
        )
        total = sum(self.sketch.sizes)
        # Running RMS of the noisy input per coordinate: keeps the network's input O(1) whatever σ is.
        self.register_buffer("input_scale", torch.ones(total))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.long))
        self.lr = float(lr)
        self._optimizer: torch.optim.Optimizer | None = None

    def _init_weights(self) -> None:
        generator = torch.Generator().manual_seed(mixed_seed(self.seed, 7))
        for p in self.parameters():
            if p.dim() >= 2:
                bound = 1.0 / math.sqrt(p.shape[1])
                with torch.no_grad():
                    p.copy_((torch.rand(p.shape, generator=generator) * 2 - 1) * bound)
            else:
                with torch.no_grad():
                    p.zero_()

    def reduce(self, grads: Sequence[Tensor]) -> Tensor:
        """Per-layer sketches concatenated, [B, sum(sketch.sizes)]."""
        self.check_grads(grads)
        return torch.cat(self.sketch(grads), dim=1)

    def _encode(self, z: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def noise_covariance(self, device: torch.device | str = "cpu") -> Tensor:
        """See :meth:`LayerSketch.noise_covariance`."""
        return self.sketch.noise_covariance(device)

    def encode(self, z: Tensor) -> Tensor:
        """Tokens [B, dim] from sketches [B, K], scaled by the RMS of the last noisy training input."""
        return self._encode(z / self.input_scale.to(z))

    def optimizer(self) -> torch.optim.Optimizer:
        """The encoder's Adam optimiser (created on first use, after the module is on its device)."""
        if self._optimizer is None:
            self._optimizer = torch.optim.Adam(self.parameters(), lr=self.lr)
        return self._optimizer

    def fit_reduced(self, z_noisy: Tensor, z_clean: Tensor, *, steps: int = 1) -> float | None:
        """Denoising updates: reconstruct the clean sketch from the noisy one (MSE, ``steps`` Adam steps).

        The input scale is reset to the per-coordinate RMS of ``z_noisy`` first, so the network's input
        stays O(1) whatever σ is.

        Args:
            z_noisy: [B, K] sketches of noisy gradients (clipped gradient + N(0, σ²C²)).
            z_clean: [B, K] sketches of the matching clean clipped gradients.
            steps: full-batch Adam steps.

        Returns:
            The last reconstruction loss (mean squared error per coordinate, in units of the input scale).
        """
        with torch.no_grad():
            z_noisy = z_noisy.detach()
            z_clean = z_clean.detach()
            self.input_scale.copy_(z_noisy.pow(2).mean(0).sqrt().clamp_min(1e-12))
            self.fitted += 1
        x = z_noisy / self.input_scale
        target = z_clean / self.input_scale
        opt = self.optimizer()
        loss = None
        with torch.enable_grad():
            for _ in range(int(steps)):
                opt.zero_grad(set_to_none=True)
                loss = F.mse_loss(self.decoder(self._encode(x)), target)
                loss.backward()
                opt.step()
        return None if loss is None else float(loss.detach())


@register_token_encoder("autoencoder")
class AutoencoderTokenEncoder(_DenoisingEncoder):
    """Denoising autoencoder over per-layer chunks (the privacy-token extractor of Meng et al. 2025).

    Each layer is sketched to ≤ ``layer_dim`` numbers (:class:`LayerSketch`), scaled by the running RMS
    of the noisy input, then encoder MLP (→ ``hidden`` → ``dim``) gives the token and a linear decoder
    maps it back to the sketch. :meth:`fit` trains encoder + decoder to reconstruct the clean clipped
    gradient's sketch from the noisy one (Vincent et al. 2008, denoising autoencoders), so the token keeps
    the directions where the signal survives the noise.

    Args:
        layer_shapes, dim, seed: see :class:`TokenEncoder`.
        layer_dim: chunk size per layer (default 256).
        sketch: per-layer reduction, ``"countsketch"`` (default) or ``"gaussian"`` (:class:`LayerSketch`).
        hidden: width of the encoder's hidden layer (default 128).
        lr: Adam learning rate of :meth:`fit`.
    """

    def __init__(
        self,
        *,
        layer_shapes: Sequence[Sequence[int]],
        dim: int = 64,
        seed: int = 0,
        layer_dim: int = 256,
        hidden: int = 128,
        lr: float = 1e-3,
        sketch: str = "countsketch",
    ) -> None:
        super().__init__(
            layer_shapes=layer_shapes, dim=dim, seed=seed, layer_dim=layer_dim, lr=lr, sketch=sketch
        )
        total = sum(self.sketch.sizes)
        self.encoder = nn.Sequential(nn.Linear(total, hidden), nn.GELU(), nn.Linear(hidden, self.dim))
        self.decoder = nn.Linear(self.dim, total)
        self._init_weights()

    def _encode(self, z: Tensor) -> Tensor:
        return self.encoder(z)


@register_token_encoder("transformer")
class TransformerTokenEncoder(_DenoisingEncoder):
    """Layers as a sequence: per-layer chunks + layer embeddings → small transformer → pooled token.

    Each layer's sketch (≤ ``layer_dim`` numbers, zero-padded to ``layer_dim``) is one sequence element,
    linearly embedded to ``width`` with a learned per-layer embedding added; a ``depth``-layer
    ``nn.TransformerEncoder`` (``heads`` heads) mixes them and the mean over the sequence, projected to
    ``dim``, is the token. Trained with the same denoising objective as :class:`AutoencoderTokenEncoder`
    (linear decoder from the token to the sketch).

    Source: the transformer variant of the privacy-token extractor (Meng et al. 2025); Vaswani et al. 2017.
    """

    def __init__(
        self,
        *,
        layer_shapes: Sequence[Sequence[int]],
        dim: int = 64,
        seed: int = 0,
        layer_dim: int = 256,
        width: int = 32,
        heads: int = 4,
        depth: int = 2,
        lr: float = 1e-3,
        sketch: str = "countsketch",
    ) -> None:
        super().__init__(
            layer_shapes=layer_shapes, dim=dim, seed=seed, layer_dim=layer_dim, lr=lr, sketch=sketch
        )
        if width % heads:
            raise ValueError(f"width ({width}) must be divisible by heads ({heads})")
        layers = len(self.layer_shapes)
        self.embed = nn.Linear(layer_dim, width)
        self.layer_embedding = nn.Parameter(torch.zeros(layers, width))
        block = nn.TransformerEncoderLayer(
            d_model=width, nhead=heads, dim_feedforward=2 * width, dropout=0.0, batch_first=True
        )
        self.transformer = nn.TransformerEncoder(block, num_layers=depth, enable_nested_tensor=False)
        self.head = nn.Linear(width, self.dim)
        self.decoder = nn.Linear(self.dim, sum(self.sketch.sizes))
        self._init_weights()
        with torch.no_grad():  # LayerNorm weights back to 1 after the generic init
            for m in self.modules():
                if isinstance(m, nn.LayerNorm):
                    m.weight.fill_(1.0)
            g = torch.Generator().manual_seed(mixed_seed(self.seed, 11))
            self.layer_embedding.copy_(torch.randn(layers, width, generator=g) * 0.1)

    def _encode(self, z: Tensor) -> Tensor:
        pieces = torch.split(z, self.sketch.sizes, dim=1)
        seq = torch.stack([F.pad(p, (0, self.sketch.layer_dim - p.shape[1])) for p in pieces], dim=1)
        h = self.transformer(self.embed(seq) + self.layer_embedding)
        return self.head(h.mean(dim=1))


@register_token_encoder("span")
class SpanTokenEncoder(TokenEncoder):
    """Orthonormal projection onto the leading principal directions of the clean audit gradients.

    :meth:`set_basis` takes the N clean (clipped, scaled) audit gradients G [N, P] (per layer), forms
    the Gram matrix K = G Gᵀ (float64) and its top eigenpairs K = U Λ Uᵀ; the basis is V = Gᵀ U_d Λ_d^{-1/2}
    [P, d] (orthonormal: Vᵀ V = I), never formed. :meth:`reduce` returns Vᵀ g = Λ_d^{-1/2} U_dᵀ (G g) from the
    N inner products G g. So the clean tokens are the kernel-PCA coordinates U_d Λ_d^{1/2}, and isotropic
    gradient noise N(0, σ² I_P) becomes N(0, σ² I_d) in token space exactly (:meth:`noise_covariance` = I),
    whatever the basis. Directions with eigenvalue under ``rel_eps``·λ_max are dropped (their token
    coordinates are 0, their noise is kept: the covariance stays I).

    A post-processing of the noisy gradient (the basis depends on the clean audit gradients only), so MI
    read from the tokens never exceeds MI read from the gradients.

    Args:
        layer_shapes, dim, seed: see :class:`TokenEncoder` (``seed`` is unused: nothing is random).
        rel_eps: relative eigenvalue cut-off, in [0, 1).

    Raises:
        ValueError: on ``rel_eps`` outside [0, 1); :meth:`reduce` before :meth:`set_basis` (RuntimeError).

    Source: Schölkopf, Smola & Müller 1998 (kernel PCA); the random-projection baseline it replaces is the
    privacy-token extractor of Meng et al. 2025.

    Example:
        >>> import torch
        >>> enc = SpanTokenEncoder(layer_shapes=[(3,)], dim=2)
        >>> clean = [torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])]
        >>> tokens = enc.set_basis(clean)           # fit the basis; returns the clean tokens
        >>> enc.reduce(clean).abs().round(decimals=4)   # distances between examples are kept exactly
        tensor([[0., 1.],
                [2., 0.]])
    """

    def __init__(
        self, *, layer_shapes: Sequence[Sequence[int]], dim: int = 64, seed: int = 0, rel_eps: float = 1e-9
    ) -> None:
        super().__init__(layer_shapes=layer_shapes, dim=dim, seed=seed)
        if not 0.0 <= float(rel_eps) < 1.0:
            raise ValueError(f"rel_eps must lie in [0, 1), got {rel_eps}")
        self.rel_eps = float(rel_eps)
        self._clean: list[Tensor] | None = None
        self._coef: Tensor | None = None  # [N, dim]: U_d Λ_d^{-1/2}, zero columns past the rank

    def _inner(self, grads: Sequence[Tensor]) -> Tensor:
        """[B, N] inner products of each gradient with each basis-defining clean gradient, summed over layers
        in float64 (each layer's product in the gradients' dtype: no float64 copy of an [N, P] matrix)."""
        assert self._clean is not None
        batch = grads[0].shape[0]
        total = None
        for g, c in zip(grads, self._clean):
            part = (g.reshape(batch, -1) @ c.to(g.dtype).T).double()
            total = part if total is None else total + part
        return total

    def set_basis(self, clean: Sequence[Tensor]) -> Tensor:
        """Fit the basis to the clean audit gradients (per layer ``[N, *shape]``), N ≥ 2.

        Returns:
            Their tokens, [N, dim] float32 (= ``reduce(clean)``, from the Gram matrix already formed here).

        Raises:
            ValueError: if the gradient list does not match ``layer_shapes``, N < 2, or the gradients are
                non-finite.
        """
        n = self.check_grads(clean)
        if n < 2:
            raise ValueError("the span encoder needs at least 2 clean gradients to fit its basis")
        self._clean = [c.detach().reshape(n, -1) for c in clean]  # views: no copy of the gradients
        gram = self._inner(clean)
        if not torch.isfinite(gram).all():
            raise ValueError("non-finite clean gradients: cannot fit the span basis")
        evals, evecs = torch.linalg.eigh(0.5 * (gram + gram.T))
        evals, evecs = evals.flip(0)[: self.dim], evecs.flip(1)[:, : self.dim]
        keep = (evals > 0) & (evals > self.rel_eps * evals[0])
        scale = torch.where(keep, evals.clamp_min(1e-300).rsqrt(), torch.zeros_like(evals))
        coef = evecs * scale
        if coef.shape[1] < self.dim:  # fewer examples than dim: pad with zero directions
            coef = torch.cat([coef, coef.new_zeros(n, self.dim - coef.shape[1])], dim=1)
        self._coef = coef
        return (gram @ coef).float()

    def reduce(self, grads: Sequence[Tensor]) -> Tensor:
        """Tokens Vᵀ g, [B, dim] (float32; computed in float64).

        Raises:
            RuntimeError: before :meth:`set_basis`.
        """
        if self._coef is None:
            raise RuntimeError(
                "SpanTokenEncoder.reduce before set_basis: fit the basis to the clean audit gradients first"
            )
        self.check_grads(grads)
        device = grads[0].device
        self._clean = [c.to(device) for c in self._clean]  # type: ignore[union-attr]
        return (self._inner(grads) @ self._coef.to(device)).float()

    def noise_covariance(self, device: torch.device | str = "cpu") -> Tensor:
        """I_dim (float64): the basis is orthonormal, so unit isotropic noise stays unit isotropic."""
        return torch.eye(self.dim, dtype=torch.float64, device=device)


def build_token_encoder(
    name: str, *, layer_shapes: Sequence[Sequence[int]], dim: int = 64, seed: int = 0, **options
) -> TokenEncoder:
    """Build a privacy-token encoder by name.

    Args:
        name: one of ``TOKEN_ENCODERS`` ("projection", "span", "autoencoder", "transformer").
        layer_shapes: shapes of the trainable parameters, in gradient-list order.
        dim: token size d.
        seed: seed of all its random choices.
        **options: encoder-specific keyword options (e.g. ``layer_dim``, ``hidden``, ``lr``).

    Returns:
        The encoder (an ``nn.Module``) on the CPU; move it with ``.to(device)``.

    Raises:
        ValueError: unknown name, empty ``layer_shapes`` or ``dim`` < 1.
    """
    try:
        cls = TOKEN_ENCODERS[name]
    except KeyError:
        raise ValueError(f"unknown token encoder {name!r}; choose one of {sorted(TOKEN_ENCODERS)}") from None
    with torch.random.fork_rng(devices=[]):  # module constructors must not move the training RNG
        return cls(layer_shapes=layer_shapes, dim=dim, seed=seed, **options)
