"""The Gram path of the likelihood-ratio reading (adaptive_dp.leakage.gram).

Truth: the Gram matrix of materialised per-sample gradients (``per_sample_gradients``: vmap(grad) over each
example as a batch of one, flattened, G = g gᵀ in float64), their clipping by opacus' formula
(``clip_per_sample``), their centred Gram matrix (``centred_gram``) and the likelihood-ratio estimator run on
them (``LikelihoodRatioEstimator.estimate``).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from opacus import GradSampleModule
from torch import nn

from adaptive_dp.leakage.gradients import clip_per_sample, per_sample_gradients
from adaptive_dp.leakage.gram import (
    LAYER_MODES,
    centre_gram,
    clipped_gram,
    gram_matrix,
    parameter_grams,
    row_gram,
)
from adaptive_dp.leakage.likelihood_ratio import LikelihoodRatioEstimator, centred_gram
from adaptive_dp.models import build_model

RTOL = 1e-5


def _materialised(model: nn.Module, x, y) -> tuple[list[torch.Tensor], torch.Tensor]:
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    rest = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
    rest.update(dict(model.named_buffers()))
    return per_sample_gradients(model, params, rest, x, y, loss_fn=F.cross_entropy)


def _flat_gram(grads: list[torch.Tensor]) -> torch.Tensor:
    flat = torch.cat([g.reshape(g.shape[0], -1) for g in grads], dim=1).double()
    return flat @ flat.T


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm())


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.LayerNorm(16), nn.Linear(16, 3)).eval()


def _vit(lora: bool = False) -> nn.Module:
    model = build_model("vit-tiny", in_channels=1, num_classes=10, image_size=8, seed=0)
    if lora:
        from adaptive_dp.models.lora import apply_lora

        model = apply_lora(model, rank=4)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if ".lora_B." in name:
                    param.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    return model.eval()


def _images(n: int = 6, channels: int = 1, size: int = 8):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, channels, size, size, generator=g), torch.randint(0, 10, (n,), generator=g)


CASES = {
    "mlp": lambda: (_mlp(), torch.randn(10, 12), torch.randint(0, 3, (10,))),
    "cnn": lambda: (
        build_model("small-cnn", in_channels=1, num_classes=10, image_size=8, seed=0).eval(),
        *_images(),
    ),
    "vit": lambda: (_vit(), *_images()),
    "lora-vit": lambda: (_vit(lora=True), *_images()),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("layer_mode", LAYER_MODES)
def test_gram_equals_materialised_per_sample_gradients(case, layer_mode):
    if case in ("vit", "lora-vit"):
        pytest.importorskip("transformers")
    model, x, y = CASES[case]()
    grads, losses = _materialised(model, x, y)
    grams, gram_losses = parameter_grams(model, x, y, loss_fn=F.cross_entropy, layer_mode=layer_mode)
    assert _relative_error(torch.stack(list(grams.values())).sum(0), _flat_gram(grads)) < RTOL
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert list(grams) == trainable and all(g.dtype == torch.float64 for g in grams.values())
    for name, g in zip(trainable, grads):  # per parameter too (what per-layer clipping needs)
        want = _flat_gram([g])
        assert float((grams[name] - want).norm()) <= RTOL * max(float(want.norm()), 1e-12 * len(x)), name
    assert torch.allclose(gram_losses, losses, rtol=1e-5)


def test_live_parameters_are_used_not_the_modules_own():
    """The monitor differentiates a stale hook-free copy fed the live parameters (including frozen ones)."""
    pytest.importorskip("transformers")
    live, x, y = _vit(lora=True), *_images()
    stale = _vit(lora=True)
    with torch.no_grad():
        for p in stale.parameters():
            p.mul_(0.5)
    params = {n: p for n, p in live.named_parameters() if p.requires_grad}
    frozen = {n: p for n, p in live.named_parameters() if not p.requires_grad}
    got = gram_matrix(stale, x, y, loss_fn=F.cross_entropy, params=params, buffers=frozen)
    assert _relative_error(got, gram_matrix(live, x, y, loss_fn=F.cross_entropy)) < 1e-12


def test_module_called_twice_and_unused_parameter():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Linear(4, 4)
            self.norm = nn.LayerNorm(4)
            self.head = nn.Linear(4, 3)
            self.unused = nn.Linear(4, 4)

        def forward(self, x):
            return self.head(self.norm(self.inner(torch.tanh(self.inner(x)))) + self.norm(x))

    torch.manual_seed(0)
    model, x, y = Twice().eval(), torch.randn(7, 2, 4), torch.randint(0, 3, (7, 2))

    def loss_fn(out, target):
        return F.cross_entropy(out.reshape(-1, 3), target.reshape(-1))

    params = {n: p.detach() for n, p in model.named_parameters()}
    grads, _ = per_sample_gradients(model, params, {}, x, y, loss_fn=loss_fn)
    for layer_mode in LAYER_MODES:
        grams, _ = parameter_grams(model, x, y, loss_fn=loss_fn, layer_mode=layer_mode)
        assert _relative_error(sum(grams.values()), _flat_gram(grads)) < RTOL
        assert torch.count_nonzero(grams["unused.weight"]) == 0


@pytest.mark.parametrize("per_layer", [False, True])
def test_clipped_and_centred_gram_equal_clipping_the_gradients(per_layer):
    model, x, y = _mlp(), torch.randn(10, 12), torch.randint(0, 3, (10,))
    grads, _ = _materialised(model, x, y)
    c = [0.05, 0.01, 0.3, 0.2, 1.0, 0.02] if per_layer else 0.5
    clipped = clip_per_sample(grads, c, per_layer=per_layer)
    grams, _ = parameter_grams(model, x, y, loss_fn=F.cross_entropy)
    got = clipped_gram(grams, c, per_layer=per_layer)
    assert _relative_error(got, _flat_gram(clipped)) < RTOL
    norms = got.diagonal().sqrt()
    assert (norms <= (sum(v * v for v in c) ** 0.5 if per_layer else c) + 1e-6).all()
    assert (norms < _flat_gram(grads).diagonal().sqrt() - 1e-6).any()  # some rows were clipped
    want = centred_gram([g.double() for g in clipped])
    assert _relative_error(centre_gram(got), want) < RTOL


def test_likelihood_ratio_reading_from_the_gram_path_equals_todays_path():
    pytest.importorskip("transformers")
    model, x, y = _vit(lora=True), *_images(n=12)
    grads, _ = _materialised(model, x, y)
    estimator = LikelihoodRatioEstimator(noise_draws=8)
    today = estimator.estimate(
        clip_per_sample([g.double() for g in grads], 1.0),
        noise_multiplier=0.5,
        max_grad_norm=1.0,
        generator=torch.Generator().manual_seed(0),
    )
    kernel = centre_gram(clipped_gram(gram_matrix(model, x, y, loss_fn=F.cross_entropy), 1.0))
    gram_path = estimator.estimate_from_gram(
        kernel, noise_multiplier=0.5, max_grad_norm=1.0, generator=torch.Generator().manual_seed(0)
    )
    assert gram_path.mi == pytest.approx(today.mi, rel=1e-4)
    assert gram_path.critic_gap == pytest.approx(today.critic_gap, rel=1e-4)
    assert 0.0 < gram_path.mi <= gram_path.cap


def test_bad_input_is_refused_with_one_clear_error():
    model, x, y = _mlp(), torch.randn(4, 12), torch.randint(0, 3, (4,))
    with pytest.raises(ValueError, match="hook_free_copy"):
        gram_matrix(GradSampleModule(copy.deepcopy(model)), x, y, loss_fn=F.cross_entropy)
    with pytest.raises(ValueError, match="rows of x"):
        gram_matrix(model, x, y[:3], loss_fn=F.cross_entropy)
    with pytest.raises(ValueError, match="layer_mode"):
        gram_matrix(model, x, y, loss_fn=F.cross_entropy, layer_mode="fast")
    with pytest.raises(ValueError, match="not parameters"):
        gram_matrix(model, x, y, loss_fn=F.cross_entropy, params={"9.weight": torch.zeros(3, 16)})
    tied = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    tied[1].weight = tied[0].weight
    with pytest.raises(ValueError, match="tied"):
        gram_matrix(tied, torch.randn(4, 3), torch.randint(0, 3, (4,)), loss_fn=F.cross_entropy)

    class Flattens(nn.Module):  # rows are example × position: not batch-first at the linear layer
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(12, 3)

        def forward(self, x):
            return self.fc(x.reshape(-1, 12)).reshape(x.shape[0], -1, 3).mean(1)

    with pytest.raises(ValueError, match="batch-first"):
        gram_matrix(Flattens(), torch.randn(4, 2, 12), y, loss_fn=F.cross_entropy)
    with pytest.raises(ValueError, match="NaN"):
        clipped_gram(torch.full((3, 3), float("nan")), 1.0)


def test_row_gram_sums_float32_blocks_in_float64():
    """Over 3·10⁵ columns one float32 matmul is off by ~1e-5 relative (measured with this CPU's BLAS); float32
    blocks summed in float64 by ~1e-8."""
    rows = torch.randn(6, 300_000, generator=torch.Generator().manual_seed(0)) + 0.5
    want = rows.double() @ rows.double().T
    got = row_gram(rows, torch.float64)
    assert got.dtype == torch.float64 and _relative_error(got, want) < 1e-7
    assert torch.equal(row_gram(rows[:, :100], torch.float64), (rows[:, :100] @ rows[:, :100].T).double())
