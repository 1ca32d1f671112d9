"""LeakageMonitor: per-sample gradients and clipping against opacus, the capacity bound, the MI(σ) curve on a
trained model, the training step left untouched, state round trip and bad input."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from opacus import PrivacyEngine
from opacus.grad_sample import GradSampleModule, GradSampleModuleFastGradientClipping
from opacus.optimizers import DPOptimizer, DPPerLayerOptimizer
from torch.utils.data import DataLoader, TensorDataset

from adaptive_dp.data.datasets import audit_split, load_dataset
from adaptive_dp.leakage.gradients import clip_per_sample, hook_free_copy, per_sample_gradients
from adaptive_dp.leakage.mine import gaussian_capacity_bound
from adaptive_dp.leakage.monitor import LeakageMonitor, LeakageReading, MonitorError
from adaptive_dp.models.cnn import build_model

ESTIMATORS = [
    ("likelihood-ratio", "autoencoder"),
    ("token-mine", "projection"),
    ("token-mine", "autoencoder"),
    ("token-mine", "span"),
]


@pytest.fixture(scope="module")
def digits():
    """(train subset, audit subset) of scikit-learn's 8×8 digits, audit = 128 held-out examples."""
    dataset = load_dataset("digits")
    return audit_split(dataset, size=128, seed=0)


def _model(seed: int = 0) -> torch.nn.Module:
    return build_model("small-cnn", in_channels=1, num_classes=10, image_size=8, seed=seed)


@pytest.fixture(scope="module")
def trained(digits):
    """small-cnn trained 300 SGD steps on the digits training part (most audit gradients fall below C = 1)."""
    train, _ = digits
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loader = DataLoader(train, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0))
    step = 0
    while step < 300:
        for x, y in loader:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            step += 1
            if step == 300:
                break
    return model


def _flat(grads):
    return torch.cat([g.reshape(g.shape[0], -1) for g in grads], dim=1)


def _audit_tensors(audit, n):
    xs, ys = zip(*[audit[i] for i in range(n)])
    return torch.stack(xs), torch.tensor(ys)


# --------------------------------------------------------------------------------------------------
# Against opacus: per-sample gradients and clipping
# --------------------------------------------------------------------------------------------------


def test_per_sample_gradients_match_opacus_grad_sample(digits):
    x, y = _audit_tensors(digits[1], 16)
    gsm = GradSampleModule(_model(), loss_reduction="mean")
    F.cross_entropy(gsm(x), y).backward()  # opacus rescales grad_sample by B for a mean loss
    expected = [p.grad_sample for p in gsm.parameters()]
    shadow = hook_free_copy(gsm._module)
    params = {n: p.detach() for n, p in gsm._module.named_parameters()}
    ours, losses = per_sample_gradients(shadow, params, {}, x, y, loss_fn=F.cross_entropy, batch_size=5)
    for a, b in zip(ours, expected):
        assert a.shape == b.shape
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)
    # the losses of the same forward passes: the per-example cross-entropy (nats)
    with torch.no_grad():
        assert torch.allclose(losses, F.cross_entropy(gsm._module(x), y, reduction="none"), atol=1e-6)


@pytest.mark.parametrize("per_layer", [False, True])
def test_clipping_matches_opacus_optimizer(per_layer):
    model = _model()
    params = list(model.parameters())
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(8, *p.shape, generator=g) * (0.05 if i % 2 else 0.5) for i, p in enumerate(params)]
    norms = [0.3 + 0.1 * i for i in range(len(params))]
    if per_layer:
        opt = DPPerLayerOptimizer(
            torch.optim.SGD(params, lr=0.1), noise_multiplier=0.0, max_grad_norm=norms, expected_batch_size=8
        )
        ours = clip_per_sample(grads, norms, per_layer=True)
    else:
        opt = DPOptimizer(
            torch.optim.SGD(params, lr=0.1), noise_multiplier=0.0, max_grad_norm=1.0, expected_batch_size=8
        )
        ours = clip_per_sample(grads, 1.0)
    for p, gs in zip(params, grads):
        p.grad_sample = gs.clone()
    opt.clip_and_accumulate()
    for p, c in zip(params, ours):
        assert torch.allclose(p.summed_grad, c.sum(0), atol=1e-5)


# --------------------------------------------------------------------------------------------------
# Independent truth: the Gaussian channel capacity of the clipped audit gradients
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("estimator,encoder", ESTIMATORS + [("token-mine", "transformer")])
def test_readings_stay_under_the_capacity_bound(digits, estimator, encoder):
    # An untrained model: gradients are large, clipped at C = 1, and the bound is informative.
    x, y = _audit_tensors(digits[1], 64)
    monitor = LeakageMonitor(
        _model(), (x, y), max_grad_norm=1.0, estimator=estimator, token_encoder=encoder, seed=1
    )
    clean = _flat(monitor.clean_gradients())
    for sigma in (0.5, 2.0):
        cap = min(gaussian_capacity_bound(clean, noise_std=sigma), math.log(64))
        readings = [monitor.read(noise_multiplier=sigma) for _ in range(4)]
        mis = torch.tensor([r.mi for r in readings])
        stderr = math.sqrt(sum(r.stderr**2 for r in readings)) / len(readings)
        assert float(mis.mean()) < cap + 3 * stderr, (sigma, mis, cap)
        if estimator == "likelihood-ratio" and sigma == 2.0:
            # unbiased for I(J; Y), which the bound matches to first order at low SNR
            assert abs(float(mis.mean()) - cap) < 3 * stderr + 0.2 * cap, (mis, cap)


# --------------------------------------------------------------------------------------------------
# The MI(σ) curve on a trained model
# --------------------------------------------------------------------------------------------------

SIGMAS = [1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 0.7, 1.5, 4.0]


def _check_curve(readings, cap):
    mis = [r.mi for r in readings]
    for a, b in zip(readings, readings[1:]):
        assert b.mi <= a.mi + math.hypot(a.stderr, b.stderr), ("rises with σ", mis)
        if 0.05 < b.mi and a.mi < cap - 0.05:
            assert b.mi < a.mi, ("does not fall strictly", mis)
    assert sum(0.05 < m < cap - 0.05 for m in mis) >= 3, ("too few points between floor and cap", mis)
    assert readings[0].critic_gap > 0
    assert mis[-1] < 0.05


@pytest.mark.parametrize("estimator,encoder", ESTIMATORS)
def test_mi_falls_with_sigma_on_a_trained_model(trained, digits, estimator, encoder):
    monitor = LeakageMonitor(
        trained, digits[1], max_grad_norm=1.0, estimator=estimator, token_encoder=encoder, seed=0
    )
    clean = _flat(monitor.clean_gradients())
    assert float((clean.norm(dim=1) < 0.99).float().mean()) > 0.5  # most audit gradients are below C
    readings = [monitor.read(noise_multiplier=s) for s in SIGMAS]
    assert all(isinstance(r, LeakageReading) and r.n == 128 and r.estimator == estimator for r in readings)
    _check_curve(readings, cap=math.log(128))


def test_span_tokens_read_what_the_reference_critic_reads(trained, digits):
    # the learned estimator on span tokens against the model-aware likelihood-ratio critic (the reference):
    # the span basis keeps the signal-to-noise ratio of the whole gradient, so the two agree where the
    # random projection reads (nearly) nothing
    kwargs = dict(max_grad_norm=1.0, seed=0)
    reference = LeakageMonitor(trained, digits[1], estimator="likelihood-ratio", **kwargs)
    span = LeakageMonitor(trained, digits[1], estimator="token-mine", token_encoder="span", **kwargs)
    projection = LeakageMonitor(
        trained, digits[1], estimator="token-mine", token_encoder="projection", **kwargs
    )
    for sigma in (0.1, 0.3, 1.0):
        ref = reference.read(noise_multiplier=sigma)
        got = [span.read(noise_multiplier=sigma) for _ in range(2)][-1]  # the critic warm-starts
        assert abs(got.mi - ref.mi) < 0.15 * ref.mi + 3 * math.hypot(got.stderr, ref.stderr), (
            sigma,
            got,
            ref,
        )
        if (
            ref.mi > 0.3
        ):  # measured: the random projection reads 0 at σ = 0.1 and 0.3, the reference 1.1 / 0.56
            assert projection.read(noise_multiplier=sigma).mi < 0.5 * got.mi, sigma


@pytest.mark.slow
def test_transformer_tokens_fall_with_sigma(trained, digits):
    monitor = LeakageMonitor(
        trained, digits[1], max_grad_norm=1.0, estimator="token-mine", token_encoder="transformer", seed=0
    )
    _check_curve([monitor.read(noise_multiplier=s) for s in SIGMAS], cap=math.log(128))


# --------------------------------------------------------------------------------------------------
# The training step is untouched
# --------------------------------------------------------------------------------------------------


def _dp_training(digits, *, estimator: str | None, steps: int = 4):
    torch.manual_seed(0)
    train, audit = digits
    model = _model(seed=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    loader = DataLoader(train, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gsm, opt, loader = PrivacyEngine().make_private(
            module=model, optimizer=opt, data_loader=loader, noise_multiplier=0.8, max_grad_norm=1.0
        )
    monitor = None
    if estimator is not None:
        monitor = LeakageMonitor(gsm, audit, max_grad_norm=1.0, estimator=estimator, max_audit=32, seed=5)
    for step, (x, y) in enumerate(loader):
        if step == steps:
            break
        opt.zero_grad()
        F.cross_entropy(gsm(x), y).backward()
        if monitor is not None:  # between backward and step: grad_sample is live
            before = [
                (p.grad_sample.clone(), p.grad.clone(), hasattr(p, "summed_grad")) for p in gsm.parameters()
            ]
            monitor.read(noise_multiplier=0.8)
            for p, (grad_sample, grad, summed) in zip(gsm.parameters(), before):
                assert torch.equal(p.grad_sample, grad_sample) and torch.equal(p.grad, grad)
                assert hasattr(p, "summed_grad") == summed
        opt.step()
        if monitor is not None:
            monitor.read(noise_multiplier=0.8)
    return [p.detach().clone() for p in gsm.parameters()], torch.random.get_rng_state()


@pytest.mark.parametrize("estimator", ["likelihood-ratio", "token-mine"])
def test_monitor_on_or_off_gives_identical_training(digits, estimator):
    off, rng_off = _dp_training(digits, estimator=None)
    on, rng_on = _dp_training(digits, estimator=estimator)
    assert all(torch.equal(a, b) for a, b in zip(off, on))
    assert torch.equal(rng_off, rng_on)


# --------------------------------------------------------------------------------------------------
# State, inputs and errors
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("objective", ["infonce", "mine"])
def test_state_dict_round_trip_reproduces_readings(digits, objective):
    # encoder (seeded projections included), critic, optimisers, MINE's EMA, replay buffer and generators
    x, y = _audit_tensors(digits[1], 48)
    model = _model()
    a = LeakageMonitor(model, (x, y), max_grad_norm=1.0, estimator="token-mine", seed=2, objective=objective)
    b = LeakageMonitor(model, (x, y), max_grad_norm=1.0, estimator="token-mine", seed=9, objective=objective)
    a.read(noise_multiplier=0.1)
    b.load_state_dict(a.state_dict())
    ra, rb = a.read(noise_multiplier=0.1), b.read(noise_multiplier=0.1)
    assert ra.mi == pytest.approx(rb.mi, abs=1e-6) and ra.critic_gap == pytest.approx(rb.critic_gap, abs=1e-5)
    with pytest.raises(ValueError, match="estimator"):
        LeakageMonitor(model, (x, y), max_grad_norm=1.0).load_state_dict(a.state_dict())


def test_audit_data_as_dataset_loader_or_tensors_agree(digits):
    x, y = _audit_tensors(digits[1], 40)
    dataset = TensorDataset(x, y)
    model = _model()
    readings = [
        LeakageMonitor(model, data, max_grad_norm=1.0, seed=4).read(noise_multiplier=0.5).mi
        for data in (dataset, DataLoader(dataset, batch_size=7), (x, y))
    ]
    assert readings[0] == readings[1] == readings[2]
    capped = LeakageMonitor(model, dataset, max_grad_norm=1.0, max_audit=16).read(noise_multiplier=0.5)
    assert capped.n == 16 and capped.cap == pytest.approx(math.log(16))


def test_bad_input(digits):
    x, y = _audit_tensors(digits[1], 8)
    model = _model()
    with pytest.raises(ValueError, match="empty"):
        LeakageMonitor(model, TensorDataset(x[:0], y[:0]), max_grad_norm=1.0)
    with pytest.raises(ValueError, match="at least 2"):
        LeakageMonitor(model, (x[:1], y[:1]), max_grad_norm=1.0)
    with pytest.raises(ValueError, match="different lengths"):
        LeakageMonitor(model, (x, y[:5]), max_grad_norm=1.0)
    with pytest.raises(ValueError, match="unknown estimator"):
        LeakageMonitor(model, (x, y), max_grad_norm=1.0, estimator="dv")
    with pytest.raises(ValueError, match="do not apply"):
        LeakageMonitor(model, (x, y), max_grad_norm=1.0, critic_steps=3)
    with pytest.raises(ValueError, match="max_grad_norm"):
        LeakageMonitor(model, (x, y), max_grad_norm=0.0)
    monitor = LeakageMonitor(model, (x, y), max_grad_norm=1.0)
    for sigma in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="noise_multiplier"):
            monitor.read(noise_multiplier=sigma)
    with pytest.raises(MonitorError, match="shape"):
        LeakageMonitor(model, (torch.zeros(8, 3, 8, 8), y), max_grad_norm=1.0).read(noise_multiplier=1.0)
    broken = _model()
    with torch.no_grad():
        broken.features[0].weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(MonitorError, match="non-finite"):
        LeakageMonitor(broken, (x, y), max_grad_norm=1.0).read(noise_multiplier=1.0)
    # ghost clipping: the monitor reads the hook-free copy of the wrapped model, like any other mode
    ghost = LeakageMonitor(GradSampleModuleFastGradientClipping(_model()), (x, y), max_grad_norm=1.0)
    assert ghost.read(noise_multiplier=1.0).mi == pytest.approx(
        monitor.read(noise_multiplier=1.0).mi, rel=1e-9
    )
    # token-mine reads at σ = 0 (noiseless release): at most log N
    zero = LeakageMonitor(model, (x, y), max_grad_norm=1.0, estimator="token-mine").read(noise_multiplier=0.0)
    assert math.isfinite(zero.mi) and zero.mi <= math.log(8) + 1e-6
