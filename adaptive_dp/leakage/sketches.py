"""Fixed, seeded linear reductions of per-sample gradients: the first stage of the privacy-token encoders.

Gradients can have millions of coordinates, so every reduction here is generated piece by piece from seeded
``torch.Generator``s and never holds a dense P × d matrix:

- :func:`chunked_gaussian_projection` — a Johnson–Lindenstrauss Gaussian projection generated in chunks, and
  :func:`chunked_gaussian_gram`, the covariance it gives isotropic noise;
- :class:`LayerSketch` — each layer reduced to at most ``layer_dim`` numbers (count sketch or Gaussian).

Being linear, each maps gradient noise N(0, σ²I) to noise of a known covariance, so noisy sketches can be drawn
without a P-dimensional noise vector (:mod:`adaptive_dp.leakage.token_mine`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

__all__ = [
    "DEFAULT_MAX_CHUNK_ELEMENTS",
    "LayerSketch",
    "chunked_gaussian_gram",
    "chunked_gaussian_projection",
    "mixed_seed",
    "validate_layer_shapes",
]


#: Largest number of projection-matrix entries generated at once (16 MiB of float32).
DEFAULT_MAX_CHUNK_ELEMENTS = 1 << 22


def mixed_seed(*keys: int) -> int:
    """A 63-bit seed derived from integer keys (numpy SeedSequence; touches no global RNG)."""
    return int(
        np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in keys]).generate_state(2, np.uint64)[0] >> 1
    )


def chunked_gaussian_projection(
    flat: Tensor,
    *,
    out_dim: int,
    seed: int,
    key: int = 0,
    max_chunk_elements: int = DEFAULT_MAX_CHUNK_ELEMENTS,
) -> Tensor:
    """``flat @ R`` for a seeded Gaussian ``R`` [P, out_dim] with N(0, 1/out_dim) entries, never held whole.

    ``R`` is generated ``max_chunk_elements // out_dim`` rows at a time from a ``torch.Generator`` on
    ``flat``'s device seeded by ``(seed, key, first row)``, so peak extra memory is one chunk and the result
    is deterministic for a seed on a given device type (CPU and CUDA generators give different streams).
    E‖flat @ R‖² = ‖flat‖² (Johnson & Lindenstrauss 1984; Achlioptas 2003).

    Args:
        flat: [B, P] float tensor.
        out_dim: number of output coordinates, ≥ 1.
        seed: the encoder's seed.
        key: distinguishes independent matrices under one seed (e.g. the layer index).
        max_chunk_elements: cap on the entries of ``R`` generated at once.

    Returns:
        [B, out_dim] tensor on ``flat``'s device and dtype.

    Raises:
        ValueError: if ``flat`` is not 2-D or ``out_dim`` < 1.
    """
    if flat.dim() != 2:
        raise ValueError(f"flat must be [B, P], got shape {tuple(flat.shape)}")
    if out_dim < 1:
        raise ValueError(f"out_dim must be >= 1, got {out_dim}")
    rows = max(1, max_chunk_elements // out_dim)
    out = flat.new_zeros(flat.shape[0], out_dim)
    generator = torch.Generator(device=flat.device)
    for start in range(0, flat.shape[1], rows):
        stop = min(start + rows, flat.shape[1])
        generator.manual_seed(mixed_seed(seed, key, start))
        block = torch.randn(stop - start, out_dim, generator=generator, device=flat.device, dtype=flat.dtype)
        out.addmm_(flat[:, start:stop], block)
    return out / math.sqrt(out_dim)


def chunked_gaussian_gram(
    rows: int,
    *,
    out_dim: int,
    seed: int,
    key: int = 0,
    device: torch.device | str = "cpu",
    max_chunk_elements: int = DEFAULT_MAX_CHUNK_ELEMENTS,
) -> Tensor:
    """RᵀR for the ``R`` [rows, out_dim] of :func:`chunked_gaussian_projection` (same seed, key, device).

    The covariance of ``ξ @ R`` for ξ ~ N(0, I_rows) — what isotropic gradient noise becomes after the
    projection — so noise can be sampled directly in the projected space. Built chunk by chunk in float64.

    Returns:
        [out_dim, out_dim] float64 tensor on ``device``.
    """
    device = torch.device(device)
    chunk = max(1, max_chunk_elements // out_dim)
    gram = torch.zeros(out_dim, out_dim, dtype=torch.float64, device=device)
    generator = torch.Generator(device=device)
    for start in range(0, rows, chunk):
        stop = min(start + chunk, rows)
        generator.manual_seed(mixed_seed(seed, key, start))
        block = torch.randn(stop - start, out_dim, generator=generator, device=device).double()
        gram += block.T @ block
    return gram / out_dim


def validate_layer_shapes(layer_shapes: Sequence[Sequence[int]]) -> list[tuple[int, ...]]:
    """The shapes as tuples of ints.

    Raises:
        ValueError: no shapes, or a non-positive size.
    """
    shapes = [tuple(int(s) for s in shape) for shape in layer_shapes]
    if not shapes:
        raise ValueError(
            "layer_shapes is empty: pass the shapes of the trainable parameters, e.g. "
            "[p.shape for p in model.parameters() if p.requires_grad]"
        )
    for shape in shapes:
        if any(s < 1 for s in shape):
            raise ValueError(f"layer shape {shape} has a non-positive size")
    return shapes


class LayerSketch(nn.Module):
    """Fixed per-layer reduction: each layer → at most ``layer_dim`` numbers (exact when it is smaller).

    Layers with P_l ≤ ``layer_dim`` are kept as they are. Larger ones are sketched to ``layer_dim`` numbers:

    - ``method="countsketch"`` (default): coordinate i goes to bucket h(i) with sign s(i), both seeded
      (Charikar et al. 2002; the sparse Johnson–Lindenstrauss transform): O(P) time, P integers of state,
      and the sketch of N(0, I) noise has the exact diagonal covariance diag(bucket sizes);
    - ``method="gaussian"``: :func:`chunked_gaussian_projection` (dense JL, regenerated chunk by chunk).

    Both preserve squared norms in expectation.

    Args:
        layer_shapes: parameter shapes.
        layer_dim: the largest chunk size kept per layer.
        seed: seed of the sketches.
        method: ``"countsketch"`` or ``"gaussian"``.

    Attributes:
        sizes: the number of outputs per layer.
    """

    def __init__(
        self,
        *,
        layer_shapes: Sequence[Sequence[int]],
        layer_dim: int = 64,
        seed: int = 0,
        method: str = "countsketch",
        max_chunk_elements: int = DEFAULT_MAX_CHUNK_ELEMENTS,
    ) -> None:
        super().__init__()
        if method not in ("countsketch", "gaussian"):
            raise ValueError(f"method must be 'countsketch' or 'gaussian', got {method!r}")
        if layer_dim < 1:
            raise ValueError(f"layer_dim must be >= 1, got {layer_dim}")
        self.layer_shapes = validate_layer_shapes(layer_shapes)
        self.layer_dim = int(layer_dim)
        self.method = method
        self.register_buffer("projection_seed", torch.tensor(int(seed), dtype=torch.long))
        self.max_chunk_elements = int(max_chunk_elements)
        self.sizes = [min(math.prod(s), self.layer_dim) for s in self.layer_shapes]
        self._hashes: dict[tuple, tuple[Tensor, Tensor]] = {}

    @property
    def seed(self) -> int:
        """The seed of the per-layer projections (restored by ``load_state_dict``)."""
        return int(self.projection_seed)

    def _hash(self, layer: int, size: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """(bucket [P_l] long, sign [P_l] float) of one layer; generated on the CPU (same on every device)."""
        key = (layer, self.seed, str(device))
        if key not in self._hashes:
            g = torch.Generator().manual_seed(mixed_seed(self.seed, 2_000 + layer))
            bucket = torch.randint(self.layer_dim, (size,), generator=g)
            sign = torch.randint(2, (size,), generator=g).float().mul_(2).sub_(1)
            self._hashes[key] = (bucket.to(device), sign.to(device))
        return self._hashes[key]

    def forward(self, grads: Sequence[Tensor]) -> list[Tensor]:
        """Per-layer sketches, a list of [B, sizes[l]] tensors."""
        out = []
        for layer, g in enumerate(grads):
            flat = g.reshape(g.shape[0], -1)
            if flat.shape[1] <= self.layer_dim:
                out.append(flat)
            elif self.method == "countsketch":
                bucket, sign = self._hash(layer, flat.shape[1], flat.device)
                sketch = flat.new_zeros(flat.shape[0], self.layer_dim)
                out.append(sketch.index_add_(1, bucket, flat * sign.to(flat.dtype)))
            else:
                out.append(
                    chunked_gaussian_projection(
                        flat,
                        out_dim=self.layer_dim,
                        seed=self.seed,
                        key=1_000 + layer,
                        max_chunk_elements=self.max_chunk_elements,
                    )
                )
        return out

    def noise_covariance(self, device: torch.device | str = "cpu") -> Tensor:
        """Block-diagonal [K, K] float64 covariance of the sketch of N(0, I_P) noise."""
        device = torch.device(device)
        blocks = []
        for layer, shape in enumerate(self.layer_shapes):
            size = math.prod(shape)
            if size <= self.layer_dim:
                blocks.append(torch.eye(size, dtype=torch.float64, device=device))
            elif self.method == "countsketch":
                bucket, _ = self._hash(layer, size, device)
                counts = torch.bincount(bucket, minlength=self.layer_dim).double()
                blocks.append(torch.diag(counts))
            else:
                blocks.append(
                    chunked_gaussian_gram(
                        size,
                        out_dim=self.layer_dim,
                        seed=self.seed,
                        key=1_000 + layer,
                        device=device,
                        max_chunk_elements=self.max_chunk_elements,
                    )
                )
        return torch.block_diag(*blocks)
