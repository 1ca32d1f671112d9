"""Tests for adaptive_dp.models.cnn: shapes, opacus per-sample gradients, architectures, DLG init, validation."""

from __future__ import annotations

import pytest
import torch
from opacus import GradSampleModule
from scipy import stats
from torch import nn

from adaptive_dp.models.cnn import MODELS, DLGLeNet, build_model, validate_model

SHAPES = [(1, 8), (1, 28), (3, 32)]  # digits, MNIST, CIFAR-10


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize(("channels", "size"), SHAPES)
def test_forward_shape(name, channels, size):
    model = build_model(name, in_channels=channels, num_classes=7, image_size=size, seed=0)
    out = model(torch.randn(2, channels, size, size))
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_per_sample_gradients_match_loop(name):
    """opacus' hooks must give exactly the gradients of each example's own loss (the DP-SGD premise)."""
    channels, size, batch = (3, 32, 3) if name == "lenet" else (1, 8, 3)
    model = build_model(name, in_channels=channels, num_classes=5, image_size=size, seed=1)
    x = torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 3, 4])

    expected = []
    for i in range(batch):
        model.zero_grad()
        nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        expected.append({n: p.grad.detach().clone() for n, p in model.named_parameters()})

    gsm = GradSampleModule(model, loss_reduction="sum")
    gsm.zero_grad()
    nn.functional.cross_entropy(gsm(x), y, reduction="sum").backward()
    for n, p in model.named_parameters():
        want = torch.stack([e[n] for e in expected])
        assert p.grad_sample.shape == want.shape, n
        scale = want.abs().max().clamp_min(1e-8)
        assert torch.allclose(p.grad_sample, want, atol=1e-5 * scale, rtol=1e-4), n
    gsm._close()


def test_build_model_seed_is_deterministic_and_leaves_global_rng():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = build_model("small-cnn", in_channels=1, num_classes=10, image_size=28, seed=5)
    after = torch.rand(1)
    b = build_model("small-cnn", in_channels=1, num_classes=10, image_size=28, seed=5)
    c = build_model("small-cnn", in_channels=1, num_classes=10, image_size=28, seed=6)
    assert torch.equal(before, after)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    assert not all(torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters()))


def test_lenet_dlg_init_is_uniform_half():
    model = build_model("lenet", in_channels=3, num_classes=10, image_size=32, seed=0)
    assert isinstance(model, DLGLeNet)
    values = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert values.min() >= -0.5 and values.max() <= 0.5
    for name, p in model.named_parameters():  # biases too, not just weights (DLG's weights_init)
        assert p.detach().abs().max() <= 0.5, name
    # all parameters together follow U(-0.5, 0.5): Kolmogorov-Smirnov against the exact CDF
    assert stats.kstest(values.numpy(), stats.uniform(loc=-0.5, scale=1.0).cdf).pvalue > 1e-3
    biases = torch.cat([m.bias.detach() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))])
    assert biases.abs().max() > 0.2  # PyTorch's default bias init would give |b| <= 1/sqrt(fan_in) < 0.13


def test_lenet_matches_dlg_architecture():
    model = build_model("lenet", in_channels=3, num_classes=100, image_size=32)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size, c.stride, c.padding) for c in convs] == [
        (12, (5, 5), (2, 2), (2, 2)),
        (12, (5, 5), (2, 2), (2, 2)),
        (12, (5, 5), (1, 1), (2, 2)),
    ]
    assert model.fc.in_features == 768  # DLG's nn.Linear(768, 100) for 32x32 inputs
    assert sum(isinstance(m, nn.Sigmoid) for m in model.modules()) == 3
    assert build_model("lenet", in_channels=1, num_classes=10, image_size=28).fc.in_features == 12 * 7 * 7


def test_tanh_cnn_matches_papernot_architecture():
    model = build_model("tanh-cnn", in_channels=3, num_classes=10, image_size=32)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [c.out_channels for c in convs] == [32, 32, 64, 64, 128, 128]
    assert all(c.kernel_size == (3, 3) for c in convs)
    assert [(lin.in_features, lin.out_features) for lin in linears] == [(128 * 4 * 4, 128), (128, 10)]
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == 3
    assert sum(isinstance(m, nn.Tanh) for m in model.modules()) == 7
    assert not any(isinstance(m, (nn.ReLU, nn.Sigmoid)) for m in model.modules())


def test_resnet20_has_20_weighted_layers_and_groupnorm():
    model = build_model("resnet20", in_channels=3, num_classes=10, image_size=32)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(convs) + len(linears) == 20
    assert sorted({c.out_channels for c in convs}) == [16, 32, 64]
    assert sum(isinstance(m, nn.GroupNorm) for m in model.modules()) == len(convs)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def test_batchnorm_model_is_rejected_with_fix():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))
    with pytest.raises(ValueError, match="BatchNorm") as info:
        validate_model(model)
    assert "GroupNorm" in str(info.value) and "ModuleValidator.fix" in str(info.value)
    validate_model(nn.Sequential(nn.Conv2d(1, 4, 3), nn.GroupNorm(2, 4)))  # the fix passes


def test_unknown_model_and_bad_sizes():
    with pytest.raises(ValueError, match="small-cnn") as info:
        build_model("vgg", in_channels=1, num_classes=10, image_size=28)
    assert all(name in str(info.value) for name in MODELS)
    with pytest.raises(ValueError, match="in_channels"):
        build_model("small-cnn", in_channels=0, num_classes=10, image_size=28)
    with pytest.raises(ValueError, match="image_size"):
        build_model("tanh-cnn", in_channels=1, num_classes=10, image_size=4)


def test_register_model_adds_a_buildable_name(monkeypatch):
    from adaptive_dp.models import cnn

    monkeypatch.setattr(cnn, "MODELS", dict(cnn.MODELS))  # registering is global: restore afterwards

    @cnn.register_model("toy-linear")
    class ToyLinear(nn.Module):
        def __init__(self, *, in_channels, num_classes, image_size):
            super().__init__()
            self.fc = nn.Linear(in_channels * image_size * image_size, num_classes)

        def forward(self, x):
            return self.fc(x.flatten(1))

    assert cnn.MODELS["toy-linear"] is ToyLinear
    model = cnn.build_model("toy-linear", in_channels=1, num_classes=3, image_size=4, seed=0)
    assert isinstance(model, ToyLinear) and model(torch.zeros(2, 1, 4, 4)).shape == (2, 3)
    with pytest.raises(ValueError, match="already registered"):
        cnn.register_model("small-cnn")(ToyLinear)

    @cnn.register_model("toy-batchnorm")
    class ToyBatchNorm(ToyLinear):
        def __init__(self, **sizes):
            super().__init__(**sizes)
            self.norm = nn.BatchNorm1d(sizes["num_classes"])

    with pytest.raises(ValueError, match="BatchNorm"):  # registered, but opacus cannot train it
        cnn.build_model("toy-batchnorm", in_channels=1, num_classes=3, image_size=4)
