"""Intermediate-layer data features: default layers, values against a manual forward pass, hook hygiene."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from adaptive_dp.leakage.features import FeatureExtractor, default_feature_layers
from adaptive_dp.models.cnn import build_model


def _hook_count(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


def test_small_cnn_features_match_a_manual_forward_pass():
    model = build_model("small-cnn", in_channels=1, num_classes=10, image_size=28, seed=0).eval()
    x = torch.randn(5, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    fx = FeatureExtractor(model, pooled_size=2, input_size=4)
    features = fx(x)
    # default: after each conv block's activation, the conv stack's output, the penultimate layer
    assert fx.layers == ["features.1", "features.4", "features", "classifier.2"]
    with torch.no_grad():
        a1 = torch.tanh(model.features[0](x))
        a2 = torch.tanh(model.features[3](model.features[2](a1)))
        stack = model.features(x)
        hidden = torch.tanh(model.classifier[1](stack.flatten(1)))
    expected = torch.cat(
        [
            F.adaptive_avg_pool2d(x, 4).flatten(1),
            F.adaptive_avg_pool2d(a1, 2).flatten(1),
            F.adaptive_avg_pool2d(a2, 2).flatten(1),
            F.adaptive_avg_pool2d(stack, 2).flatten(1),
            hidden,
        ],
        dim=1,
    )
    assert features.shape == (5, 16 + 16 * 4 + 32 * 4 + 32 * 4 + 64)
    assert torch.allclose(features, expected, atol=1e-5)
    assert _hook_count(model) == 0


@pytest.mark.parametrize(
    "name,channels,size", [("resnet20", 3, 32), ("tanh-cnn", 3, 32), ("lenet", 1, 28), ("small-cnn", 1, 8)]
)
def test_default_layers_for_project_models(name, channels, size):
    model = build_model(name, in_channels=channels, num_classes=10, image_size=size, seed=0)
    layers = default_feature_layers(model, torch.zeros(1, channels, size, size))
    assert 1 <= len(layers) <= 4
    features = FeatureExtractor(model)(torch.randn(3, channels, size, size))
    assert features.shape[0] == 3 and torch.isfinite(features).all()
    assert _hook_count(model) == 0


def test_context_manager_keeps_hooks_only_inside_and_accepts_custom_forward():
    model = build_model("small-cnn", in_channels=1, num_classes=10, image_size=8, seed=0)
    x = torch.randn(4, 1, 8, 8)
    with FeatureExtractor(model, layers=["features.1"], input_size=0) as fx:
        assert _hook_count(model) == 1
        doubled = {n: 2 * p for n, p in model.named_parameters()}
        out = fx(x, forward=lambda inp: torch.func.functional_call(model, doubled, (inp,)))
    assert _hook_count(model) == 0
    with torch.no_grad():
        expected = torch.tanh(
            F.conv2d(x, 2 * model.features[0].weight, 2 * model.features[0].bias, padding=1)
        )
    assert torch.allclose(out, F.adaptive_avg_pool2d(expected, 2).flatten(1), atol=1e-5)


def test_bad_input():
    model = build_model("small-cnn", in_channels=1, num_classes=10, image_size=8, seed=0)
    with pytest.raises(ValueError, match="unknown layer"):
        FeatureExtractor(model, layers=["features.99"])
    with pytest.raises(ValueError, match="pooled_size"):
        FeatureExtractor(model, pooled_size=0)
    with pytest.raises(ValueError, match="empty batch"):
        FeatureExtractor(model)(torch.zeros(0, 1, 8, 8))
    fx = FeatureExtractor(model, layers=["features.1"])
    with pytest.raises(ValueError, match="produced no tensor"):
        fx(torch.zeros(2, 1, 8, 8), forward=lambda inp: inp)
    assert _hook_count(model) == 0
