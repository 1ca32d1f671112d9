"""The monitor's Gram path (``gradient_path``): the same reading as materialised per-sample gradients.

Truth: the same monitor with ``gradient_path="materialised"`` (per-sample gradients by ``torch.func``, clipped
and turned into the centred Gram matrix) on the same model, audit data and seed — so both consume the same
noise draws, and MI, critic gap, stderr, audit loss and the MI(σ′) curve must agree to float rounding.
"""

from __future__ import annotations

import copy
import logging
import math

import pytest
import torch
import torch.nn.functional as F
from opacus.grad_sample import GradSampleModuleFastGradientClipping
from torch import nn

from adaptive_dp.data.datasets import audit_split, load_dataset
from adaptive_dp.leakage.gram import parameter_grams
from adaptive_dp.leakage.monitor import GRADIENT_PATHS, LeakageMonitor, MonitorError
from adaptive_dp.models import build_model

RTOL = 1e-6
SIGMAS = (0.3, 0.7, 2.0)  # σ′ of the MI curve, around the reading's σ = 1


@pytest.fixture(scope="module")
def audit():
    """32 held-out 8×8 digits (x [32, 1, 8, 8], y [32])."""
    _, held_out = audit_split(load_dataset("digits"), size=32, seed=0)
    x = torch.stack([held_out[i][0] for i in range(len(held_out))])
    y = torch.tensor([int(held_out[i][1]) for i in range(len(held_out))])
    return x, y


def _vit(lora: bool) -> nn.Module:
    pytest.importorskip("transformers")
    model = build_model("vit-tiny", in_channels=1, num_classes=10, image_size=8, seed=0)
    if lora:
        pytest.importorskip("peft")
        from adaptive_dp.models.lora import apply_lora

        model = apply_lora(model, rank=4, seed=0)
        with torch.no_grad():  # B = 0 at initialisation would leave A without gradient
            for name, param in model.named_parameters():
                if ".lora_B." in name:
                    param.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    return model


MODELS = {
    "small-cnn": lambda: build_model("small-cnn", in_channels=1, num_classes=10, image_size=8, seed=0),
    "vit-tiny": lambda: _vit(lora=False),
    "lora-vit-tiny": lambda: _vit(lora=True),
}


def _median_norm(model: nn.Module, x, y) -> float:
    """Median unclipped per-sample gradient norm: clipping C there clips about half the audit examples."""
    grams, _ = parameter_grams(model.eval(), x, y, loss_fn=F.cross_entropy)
    return float(sum(grams.values()).diagonal().sqrt().median())


def _readings(monitor: LeakageMonitor) -> list[tuple[float, ...]]:
    """Two readings (the second from the generator's later state), each with its curve at :data:`SIGMAS`."""
    out = []
    for _ in range(2):
        r = monitor.read(noise_multiplier=1.0)
        curve = monitor.mi_curve()
        out.append((r.mi, r.critic_gap, r.stderr, r.audit_loss, *(v for s in SIGMAS for v in curve(s))))
    return out


@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_gram_path_reading_equals_the_materialised_reading(audit, name, clipping):
    x, y = audit
    model = MODELS[name]()
    c = _median_norm(model, x, y)
    layers = sum(1 for p in model.parameters() if p.requires_grad)
    spec = c if clipping == "flat" else [c / math.sqrt(layers)] * layers
    got, want = {}, {}
    for path, into in (("auto", got), ("materialised", want)):
        monitor = LeakageMonitor(
            model, (x, y), max_grad_norm=spec, clipping=clipping, seed=3, gradient_path=path
        )
        into["values"] = _readings(monitor)
        into["path"] = monitor.last_path
    assert (got["path"], want["path"]) == ("gram", "materialised")
    for a, b in zip(got["values"], want["values"]):
        mi = a[0]
        assert 0.02 < mi < math.log(len(x))  # a reading that can tell the two paths apart
        for u, v in zip(a, b):
            assert abs(u - v) <= RTOL * abs(v), (name, clipping, a, b)
    assert got["values"][0][0] != got["values"][1][0]  # the second reading drew fresh noise


class _NotBatchFirst(nn.Module):
    """Its linear layer sees examples × positions as rows: the Gram path refuses it, per-sample gradients do not."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(12, 3)

    def forward(self, x):
        return self.fc(x.reshape(-1, 12)).reshape(x.shape[0], -1, 3).mean(1)


def test_a_model_the_gram_path_refuses_falls_back_once_and_logs_it(caplog):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(10, 2, 12, generator=g), torch.randint(0, 3, (10,), generator=g)
    model = _NotBatchFirst()
    auto = LeakageMonitor(model, (x, y), max_grad_norm=0.5)
    materialised = LeakageMonitor(model, (x, y), max_grad_norm=0.5, gradient_path="materialised")
    with caplog.at_level(logging.WARNING, logger="adaptive_dp.leakage.monitor"):
        readings = [auto.read(noise_multiplier=0.5) for _ in range(2)]
    assert auto.last_path == "materialised"
    fallbacks = [r for r in caplog.records if "Gram path failed" in r.getMessage()]
    assert len(fallbacks) == 1 and "batch-first" in fallbacks[0].getMessage()  # refused once, then remembered
    for got in readings:
        want = materialised.read(noise_multiplier=0.5)
        assert (got.mi, got.critic_gap, got.stderr) == (want.mi, want.critic_gap, want.stderr)
    forced = LeakageMonitor(model, (x, y), max_grad_norm=0.5, gradient_path="gram")
    with pytest.raises(MonitorError, match="batch-first"):  # forced: no fallback, a failed reading
        forced.read(noise_multiplier=0.5)


def test_gradient_path_is_checked_and_token_mine_keeps_per_sample_gradients(audit):
    x, y = audit
    model = MODELS["small-cnn"]()
    assert GRADIENT_PATHS == ("auto", "gram", "materialised")
    with pytest.raises(ValueError, match="gradient_path"):
        LeakageMonitor(model, (x, y), max_grad_norm=1.0, gradient_path="layerwise")
    with pytest.raises(ValueError, match="needs per-sample gradients"):
        LeakageMonitor(model, (x, y), max_grad_norm=1.0, estimator="token-mine", gradient_path="gram")
    monitor = LeakageMonitor(model, (x[:8], y[:8]), max_grad_norm=1.0, estimator="token-mine", train_draws=2)
    monitor.read(noise_multiplier=1.0)
    assert monitor.last_path == "materialised"


def test_non_finite_gradients_fail_on_the_gram_path_naming_the_parameter(audit):
    x, y = audit
    model = MODELS["small-cnn"]()
    with torch.no_grad():
        model.features[0].weight[0, 0, 0, 0] = float("nan")
    monitor = LeakageMonitor(model, (x, y), max_grad_norm=1.0, gradient_path="gram")
    with pytest.raises(
        MonitorError, match="non-finite per-sample gradient for parameter 'features.0.weight'"
    ):
        monitor.read(noise_multiplier=1.0)


def test_ghost_clipping_module_is_read_like_the_plain_model(audit):
    x, y = audit
    model = MODELS["small-cnn"]()
    ghost = GradSampleModuleFastGradientClipping(copy.deepcopy(model), max_grad_norm=1.0)
    plain = LeakageMonitor(model, (x, y), max_grad_norm=1.0).read(noise_multiplier=1.0)
    wrapped = LeakageMonitor(ghost, (x, y), max_grad_norm=1.0).read(noise_multiplier=1.0)
    assert wrapped.mi == pytest.approx(plain.mi, rel=1e-9) and wrapped.mi > 0.05
    assert all(p.grad is None and getattr(p, "grad_sample", None) is None for p in ghost.parameters())
