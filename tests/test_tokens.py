"""Privacy-token encoders: shapes, determinism, Johnson–Lindenstrauss geometry, memory, denoising."""

from __future__ import annotations

import math

import pytest
import torch

from adaptive_dp.leakage.tokens import (
    TOKEN_ENCODERS,
    ProjectionTokenEncoder,
    SpanTokenEncoder,
    build_token_encoder,
    chunked_gaussian_projection,
)

SHAPES = [(16, 1, 3, 3), (16,), (32, 16, 3, 3), (32,), (64, 512), (64,), (10, 64), (10,)]


def _grads(batch: int, shapes=SHAPES, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, *s, generator=g) for s in shapes]


def _build(name: str, *, dim: int, seed: int, basis_from: list[torch.Tensor] | None = None):
    """An encoder ready to use; the span encoder gets its basis from ``basis_from`` (clean gradients)."""
    enc = build_token_encoder(name, layer_shapes=SHAPES, dim=dim, seed=seed)
    if isinstance(enc, SpanTokenEncoder):
        enc.set_basis(basis_from if basis_from is not None else _grads(40, seed=11))
    return enc


@pytest.mark.parametrize("name", sorted(TOKEN_ENCODERS))
def test_encoders_shape_determinism_and_global_rng(name):
    grads = _grads(6)
    before = torch.random.get_rng_state()
    a = _build(name, dim=24, seed=3)
    tokens = a(grads)
    assert torch.equal(before, torch.random.get_rng_state()), "building/using an encoder moved the global RNG"
    assert tokens.shape == (6, 24) and torch.isfinite(tokens).all()
    b = _build(name, dim=24, seed=3)
    assert torch.allclose(tokens, b(grads))
    if name != "span":  # the span basis is a function of the clean gradients alone (nothing random)
        c = _build(name, dim=24, seed=4)
        assert not torch.allclose(tokens, c(grads))


def test_span_keeps_every_distance_when_dim_covers_the_examples():
    # independent truth: the Euclidean distances of the flattened gradients; with dim ≥ N the basis spans
    # all N clean gradients, so tokens are an isometric image of them (and of anything in their span)
    clean = _grads(12, seed=2)
    flat = torch.cat([g.reshape(12, -1) for g in clean], dim=1).double()
    enc = SpanTokenEncoder(layer_shapes=SHAPES, dim=16)
    fitted = enc.set_basis(clean)
    tokens = enc.reduce(clean).double()
    assert torch.allclose(fitted.double(), tokens, rtol=1e-4, atol=1e-4)  # set_basis returns reduce(clean)
    assert torch.allclose(torch.cdist(tokens, tokens), torch.cdist(flat, flat), rtol=1e-4, atol=1e-3)
    mix = [0.3 * a[0:1] - 1.2 * a[5:6] for a in clean]  # a vector inside the span: its norm is kept too
    mix_flat = 0.3 * flat[0] - 1.2 * flat[5]
    assert float(enc.reduce(mix).double().norm()) == pytest.approx(float(mix_flat.norm()), rel=1e-4)
    # fewer directions than examples: the leading ones (kernel PCA), capturing most of the energy
    small = SpanTokenEncoder(layer_shapes=SHAPES, dim=4)
    small.set_basis(clean)
    kept = float(small.reduce(clean).double().pow(2).sum())
    eig = torch.linalg.eigvalsh(flat @ flat.T).flip(0)
    assert kept == pytest.approx(float(eig[:4].sum()), rel=1e-4)


def test_span_needs_a_basis_and_two_examples():
    enc = SpanTokenEncoder(layer_shapes=SHAPES, dim=8)
    with pytest.raises(RuntimeError, match="set_basis"):
        enc.reduce(_grads(2))
    with pytest.raises(ValueError, match="at least 2"):
        enc.set_basis(_grads(1))
    with pytest.raises(ValueError, match="rel_eps"):
        SpanTokenEncoder(layer_shapes=SHAPES, dim=8, rel_eps=1.0)


def test_projection_preserves_geometry_on_average():
    # JL: E‖Rg‖² = ‖g‖² and E⟨Rg, Rh⟩ = ⟨g, h⟩; averaged over 64 independent seeds.
    grads = _grads(2, shapes=SHAPES[:4])
    flat = torch.cat([g.reshape(2, -1) for g in grads], dim=1)
    norms, inner = [], []
    for seed in range(64):
        t = ProjectionTokenEncoder(layer_shapes=SHAPES[:4], dim=32, seed=seed)(grads)
        norms.append(t.pow(2).sum(1))
        inner.append((t[0] * t[1]).sum())
    mean_norm = torch.stack(norms).mean(0)
    assert torch.allclose(mean_norm, flat.pow(2).sum(1), rtol=0.1)
    # the inner product's estimate has std ≈ ‖g‖‖h‖/√(32·64); the true one is ≈ 0 for independent g, h
    tol = 4 * flat[0].norm() * flat[1].norm() / math.sqrt(32 * 64)
    assert abs(float(torch.stack(inner).mean() - flat[0] @ flat[1])) < tol


@pytest.mark.parametrize("name", sorted(TOKEN_ENCODERS))
def test_noise_covariance_matches_sketched_noise(name):
    # reduce() is linear: reduce(ξ) for ξ ~ N(0, I_P) must have exactly noise_covariance() as covariance.
    enc = _build(name, dim=16, seed=1)
    cov = enc.noise_covariance()
    n = 3000
    z = enc.reduce(_grads(n, seed=5)).double()
    empirical = z.T @ z / n
    scale = cov.diagonal().sqrt()
    empty = scale == 0  # a count-sketch bucket no coordinate hashes to: always exactly 0
    assert torch.all(z[:, empty] == 0)
    keep = ~empty
    relative = (empirical - cov)[keep][:, keep] / torch.outer(scale[keep], scale[keep])
    # entries are ~N(0, 1/n) off the diagonal, N(0, 2/n) on it; the max over up to 10⁶ entries stays < 7σ
    assert float(relative.abs().max()) < 7 * math.sqrt(2 / n)


def test_projection_never_materialises_p_by_d(monkeypatch):
    # A 4-million-parameter layer and d = 64: a dense P×d matrix would be 256 M entries (1 GiB).
    shapes = [(4_000_000,), (3,)]
    grads = [torch.zeros(1, *s) for s in shapes]
    grads[0][0, ::1000] = 1.0
    largest = []
    real_randn = torch.randn

    def spy(*args, **kwargs):
        out = real_randn(*args, **kwargs)
        largest.append(out.numel())
        return out

    monkeypatch.setattr(torch, "randn", spy)
    enc = ProjectionTokenEncoder(layer_shapes=shapes, dim=64, seed=0, max_chunk_elements=1 << 20)
    token = enc(grads)
    assert token.shape == (1, 64)
    assert max(largest) <= 1 << 20 < 4_000_000 * 64
    # still the JL projection: ‖token‖² ≈ ‖g‖² = 4000 (χ²₆₄/64 has relative std 0.18)
    assert 0.4 < float(token.pow(2).sum()) / 4000 < 1.8


def test_chunking_is_a_projection_of_the_whole_vector():
    # the chunked product is linear in the input: sum of parts equals the projection of the sum
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 10_000, generator=g), torch.randn(3, 10_000, generator=g)
    pa = chunked_gaussian_projection(a, out_dim=8, seed=2, max_chunk_elements=4096)
    pb = chunked_gaussian_projection(b, out_dim=8, seed=2, max_chunk_elements=4096)
    pab = chunked_gaussian_projection(a + b, out_dim=8, seed=2, max_chunk_elements=4096)
    assert torch.allclose(pa + pb, pab, atol=1e-3)


@pytest.mark.parametrize("name", ["autoencoder", "transformer"])
def test_denoising_encoder_learns_to_denoise(name):
    # Clean gradients live on a rank-3 subspace of the sketch; with noise at σ the best linear
    # denoiser removes most of the noise. After training, reconstructing the clean sketch from the noisy
    # one must beat the trivial estimate (the noisy sketch itself) by a wide margin on held-out draws.
    torch.manual_seed(0)
    shapes = [(40,), (30,), (20,)]
    enc = build_token_encoder(name, layer_shapes=shapes, dim=8, seed=0, layer_dim=64, lr=3e-3)
    g = torch.Generator().manual_seed(1)
    basis = [torch.randn(3, *s, generator=g) for s in shapes]

    def sample(n):
        coef = torch.randn(n, 3, generator=g)
        clean = [coef @ b for b in basis]
        noisy = [c + 0.5 * torch.randn(c.shape, generator=g) for c in clean]
        return noisy, clean

    losses = [enc.fit(*sample(128), steps=1) for _ in range(150)]
    assert losses[-1] < 0.5 * losses[0]
    noisy, clean = sample(512)
    with torch.no_grad():
        z_noisy, z_clean = enc.reduce(noisy), enc.reduce(clean)
        recon = enc.decoder(enc.encode(z_noisy)) * enc.input_scale
    trivial = (z_noisy - z_clean).pow(2).mean()
    assert float((recon - z_clean).pow(2).mean()) < 0.3 * float(trivial)


def test_bad_input():
    enc = build_token_encoder("projection", layer_shapes=SHAPES, dim=8)
    with pytest.raises(ValueError, match="unknown token encoder"):
        build_token_encoder("pca", layer_shapes=SHAPES)
    with pytest.raises(ValueError, match="layer_shapes is empty"):
        build_token_encoder("projection", layer_shapes=[])
    with pytest.raises(ValueError, match="dim must be"):
        build_token_encoder("autoencoder", layer_shapes=SHAPES, dim=0)
    with pytest.raises(ValueError, match="expected 8 per-layer gradients"):
        enc(_grads(2)[:3])
    bad = _grads(2)
    bad[2] = torch.zeros(2, 3, 3)
    with pytest.raises(ValueError, match="has shape"):
        enc(bad)
    with pytest.raises(ValueError, match="empty batch"):
        enc([torch.zeros(0, *s) for s in SHAPES])
