"""Per-sample gradients and clipping (adaptive_dp.leakage.gradients), shared by the monitor and the attacks.

Truths used: opacus' clipping formula min(1, C / (‖g‖ + 1e-6)) evaluated by hand in float64, opacus'
DPOptimizer on the same gradients, the per-example cross-entropy of a plain forward pass, and the two public
paths (monitor, attacks) agreeing on the same release.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from opacus.optimizers import DPOptimizer

from adaptive_dp.attacks.inversion import clipped_per_sample_gradients, gradient_function
from adaptive_dp.leakage.gradients import (
    CLIP_EPS,
    clip_factor,
    clip_per_sample,
    hook_free_copy,
    per_sample_gradients,
    total_clipping_norm,
)
from adaptive_dp.leakage.monitor import LeakageMonitor
from adaptive_dp.models.cnn import build_model


def _model():
    return build_model("small-cnn", in_channels=1, num_classes=10, image_size=8, seed=0)


def _batch(n: int = 12, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


def test_clip_factor_is_opacus_formula_by_hand():
    norms = torch.tensor([0.5, 1.0, 2.0, 0.0], dtype=torch.float64)
    expected = torch.tensor([1.0, 1.0 / (1.0 + 1e-6), 1.0 / (2.0 + 1e-6), 1.0], dtype=torch.float64)
    assert CLIP_EPS == 1e-6
    assert torch.allclose(clip_factor(norms, 1.0), expected, rtol=1e-15, atol=0)
    # per-layer limits broadcast: C_l / (‖g_l‖ + 1e-6), capped at 1
    per_layer = clip_factor(norms.reshape(2, 2), torch.tensor([0.25, 4.0], dtype=torch.float64))
    assert torch.allclose(
        per_layer,
        torch.tensor([[0.25 / (0.5 + 1e-6), 1.0], [0.25 / (2 + 1e-6), 1.0]], dtype=torch.float64),
        rtol=1e-15,
        atol=0,
    )


def test_flat_clipping_equals_opacus_to_float_precision():
    # gradients whose norm is exactly C: only the 1e-6 separates factor 1 from opacus' factor
    params = [
        torch.nn.Parameter(torch.zeros(3, dtype=torch.float64)),
        torch.nn.Parameter(torch.zeros(4, dtype=torch.float64)),
    ]
    grads = [
        torch.tensor([[0.6, 0.0, 0.0]] * 2, dtype=torch.float64),
        torch.tensor([[0.8, 0.0, 0.0, 0.0]] * 2, dtype=torch.float64),
    ]
    opt = DPOptimizer(
        torch.optim.SGD(params, lr=0.1), noise_multiplier=0.0, max_grad_norm=1.0, expected_batch_size=2
    )
    for p, g in zip(params, grads):
        p.grad_sample = g.clone()
    opt.clip_and_accumulate()
    ours = clip_per_sample(grads, 1.0)
    for p, c in zip(params, ours):
        assert torch.allclose(p.summed_grad, c.sum(0), rtol=1e-15, atol=0)
    assert float(ours[0][0, 0]) == pytest.approx(0.6 / (1 + 1e-6), rel=1e-15)


def test_total_clipping_norm():
    assert total_clipping_norm(2.0) == 2.0
    assert total_clipping_norm([3.0, 4.0]) == pytest.approx(5.0)  # opacus: ‖(C_l)‖ for per-layer clipping
    for bad in (0.0, -1.0, math.nan, math.inf, [1.0, -1.0], []):
        with pytest.raises(ValueError, match="max_grad_norm"):
            total_clipping_norm(bad)


def test_chunked_per_sample_gradients_and_losses():
    model = _model()
    x, y = _batch(10)
    shadow = hook_free_copy(model)
    params = {n: p.detach() for n, p in model.named_parameters()}
    whole, loss_whole = per_sample_gradients(shadow, params, {}, x, y, loss_fn=F.cross_entropy, batch_size=64)
    chunked, loss_chunked = per_sample_gradients(
        shadow, params, {}, x, y, loss_fn=F.cross_entropy, batch_size=3
    )
    assert all(torch.allclose(a, b, atol=1e-7) for a, b in zip(whole, chunked))
    with torch.no_grad():
        reference = F.cross_entropy(model.eval()(x), y, reduction="none")
    assert torch.allclose(loss_whole, reference, atol=1e-6) and torch.allclose(
        loss_chunked, reference, atol=1e-6
    )


@pytest.mark.parametrize("max_grad_norm", [0.05, 1.0])
def test_monitor_and_attacks_see_the_same_clipped_gradients(max_grad_norm):
    model = _model()
    x, y = _batch(12)
    monitor = LeakageMonitor(model, (x, y), max_grad_norm=max_grad_norm)
    from_monitor = torch.cat([g.reshape(12, -1) for g in monitor.clean_gradients()], dim=1)
    from_attacks = clipped_per_sample_gradients(model, x, y, max_grad_norm=max_grad_norm)
    assert torch.allclose(from_monitor, from_attacks, rtol=1e-5, atol=1e-7)
    assert float(from_attacks.norm(dim=1).max()) <= max_grad_norm * (1 + 1e-6)  # float32 rounding
    if max_grad_norm == 0.05:  # every example clipped: all norms C·‖g‖/(‖g‖ + 1e-6) ≈ C
        assert torch.allclose(from_attacks.norm(dim=1), torch.full((12,), 0.05), rtol=1e-4)


def test_attack_gradient_map_is_differentiable_in_the_images():
    model = _model()
    x, y = _batch(2)
    x.requires_grad_(True)
    fn = gradient_function(model, max_grad_norm=1.0)
    fn(x, F.one_hot(y, 10).float()).sum().backward()
    assert x.grad is not None and bool(torch.isfinite(x.grad).all()) and float(x.grad.abs().sum()) > 0
