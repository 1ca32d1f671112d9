"""The estimator and token-encoder registries, LeakageReading (rename, audit loss, checkpoint round trip) and
the audit-input checks the monitor shares with the engine.

Truths used: a hand-computed statistic of the clipped audit gradients (through the attacks' own gradient
path), the mean cross-entropy of a plain eval-mode forward pass, and dataclasses' own asdict.
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, IterableDataset, TensorDataset

from adaptive_dp.attacks.inversion import clipped_per_sample_gradients
from adaptive_dp.leakage import ESTIMATORS, LeakageMonitor, LeakageReading
from adaptive_dp.leakage.audit import audit_tensors
from adaptive_dp.leakage.bounds import MIEstimate
from adaptive_dp.leakage.estimators import LeakageEstimator, register_estimator
from adaptive_dp.leakage.likelihood_ratio import LikelihoodRatioEstimator
from adaptive_dp.leakage.token_mine import TokenMINEEstimator
from adaptive_dp.leakage.tokens import TOKEN_ENCODERS, TokenEncoder, register_token_encoder
from adaptive_dp.models.cnn import build_model


def _model():
    return build_model("small-cnn", in_channels=1, num_classes=10, image_size=8, seed=0)


def _batch(n: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


# --------------------------------------------------------------------------------------------------
# Registries
# --------------------------------------------------------------------------------------------------


def test_builtin_registries():
    assert ESTIMATORS == {"likelihood-ratio": LikelihoodRatioEstimator, "token-mine": TokenMINEEstimator}
    assert LikelihoodRatioEstimator.option_names() == {"noise_draws"}
    assert TokenMINEEstimator.option_names() == {
        "token_dim",
        "train_draws",
        "replay_size",
        "encoder_steps",
        "critic_steps",
        "lr",
        "sigma_tolerance",
        "objective",
        "ema_decay",
    }
    assert set(TOKEN_ENCODERS) == {"projection", "span", "autoencoder", "transformer"}
    assert all(cls.name == name and issubclass(cls, TokenEncoder) for name, cls in TOKEN_ENCODERS.items())
    with pytest.raises(ValueError, match="already registered"):
        register_estimator("token-mine")(type("Other", (LeakageEstimator,), {}))
    with pytest.raises(ValueError, match="already registered"):
        register_token_encoder("span")(type("Other", (TokenEncoder,), {}))


class _SquaredNorm(LeakageEstimator):
    """Test estimator: 'MI' = mean ‖clip(g_i)‖² of the clipped audit gradients it is handed."""

    built: list[_SquaredNorm] = []

    def __init__(self, *, seed: int, scale: float = 1.0) -> None:
        self.seed, self.scale, self.calls = seed, scale, []
        self.built.append(self)

    def estimate(self, clean, *, noise_multiplier, max_grad_norm, generator, features=None):
        self.calls.append((noise_multiplier, max_grad_norm, features, generator.device.type))
        n = clean[0].shape[0]
        sq = sum(g.reshape(n, -1).pow(2).sum(1) for g in clean)
        return MIEstimate(mi=self.scale * float(sq.mean()), critic_gap=0.0, stderr=0.0, n=n, method=self.name)


@pytest.fixture
def squared_norm():
    cls = register_estimator("squared-norm")(_SquaredNorm)
    try:
        yield cls
    finally:
        ESTIMATORS.pop("squared-norm")


def test_a_registered_estimator_plugs_into_the_monitor(squared_norm):
    model = _model()
    x, y = _batch(16)
    monitor = LeakageMonitor(model, (x, y), max_grad_norm=0.1, estimator="squared-norm", seed=7, scale=2.0)
    reading = monitor.read(noise_multiplier=0.0)  # this estimator does not need noise
    truth = clipped_per_sample_gradients(model, x, y, max_grad_norm=0.1).pow(2).sum(1).mean()
    assert reading.estimator == "squared-norm" and reading.mi == pytest.approx(2.0 * float(truth), rel=1e-5)
    built = squared_norm.built[-1]  # the monitor passed its seed, C, no features, its own generator
    assert built.seed == 7 and built.calls == [(0.0, 0.1, None, "cpu")]
    with pytest.raises(ValueError, match=r"\['noise_draws'\] do not apply to estimator 'squared-norm'"):
        LeakageMonitor(model, (x, y), max_grad_norm=0.1, estimator="squared-norm", noise_draws=3)
    with pytest.raises(ValueError, match="unknown estimator 'nope'; choose one of"):
        LeakageMonitor(model, (x, y), max_grad_norm=0.1, estimator="nope")


# --------------------------------------------------------------------------------------------------
# LeakageReading
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("estimator", ["likelihood-ratio", "token-mine"])
def test_reading_carries_the_audit_loss(estimator):
    model = _model()
    x, y = _batch(20)
    model.train()  # the monitor evaluates in eval mode on its own copy, whatever the model's mode
    reading = LeakageMonitor(model, (x, y), max_grad_norm=1.0, estimator=estimator, batch_size=7).read(
        noise_multiplier=0.5
    )
    with torch.no_grad():
        truth = F.cross_entropy(model.eval()(x), y)  # mean over the 20 audit examples, nats
    assert reading.audit_loss == pytest.approx(float(truth), rel=1e-5)
    assert reading.n == 20 and reading.noise_multiplier == 0.5


def test_reading_round_trips_and_old_name_still_works():
    reading = LeakageReading(
        estimator="likelihood-ratio",
        mi=0.7,
        critic_gap=3.5,
        stderr=0.01,
        n=64,
        seconds=0.2,
        cap=math.log(64),
        noise_multiplier=1.0,
        audit_loss=2.3,
    )
    state = dataclasses.asdict(reading)
    assert "mi_gap" not in state and LeakageReading(**state) == reading == LeakageReading.from_dict(state)
    old = {k: v for k, v in state.items() if k not in ("critic_gap", "audit_loss")} | {"mi_gap": 3.5}
    restored = LeakageReading.from_dict(old)  # a checkpoint saved before the rename
    assert restored.critic_gap == 3.5 and restored.audit_loss is None and restored.mi == 0.7
    with pytest.warns(DeprecationWarning, match="critic_gap"):
        assert reading.mi_gap == 3.5
    with pytest.raises(ValueError, match="not both"):
        LeakageReading.from_dict(state | {"mi_gap": 1.0})
    with pytest.raises(ValueError, match=r"unknown keys \['bogus'\], missing keys \['mi'\]"):
        LeakageReading.from_dict({k: v for k, v in state.items() if k != "mi"} | {"bogus": 1})
    with pytest.raises(dataclasses.FrozenInstanceError):
        reading.critic_gap = 0.0  # type: ignore[misc]
    estimate = MIEstimate(mi=0.1, critic_gap=0.2, stderr=0.0, n=2, method="infonce")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert estimate.mi_gap == 0.2
    assert [w.category for w in caught] == [DeprecationWarning]


# --------------------------------------------------------------------------------------------------
# Audit inputs (one validation, adaptive_dp.leakage.audit, for the engine and the monitor)
# --------------------------------------------------------------------------------------------------


class _Pairs(Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


class _Stream(IterableDataset):
    def __iter__(self):
        yield torch.zeros(1, 8, 8), 0


def test_audit_tensors():
    x, y = _batch(10)
    for data in ((x, y), TensorDataset(x, y), _Pairs(x, y)):
        xs, ys = audit_tensors(data, max_examples=6)
        assert torch.equal(xs, x[:6]) and torch.equal(ys, y[:6]) and ys.dtype == torch.long
    xs, ys = audit_tensors(x)  # inputs alone: labels 0
    assert torch.equal(xs, x) and torch.equal(ys, torch.zeros(10, dtype=torch.long))
    with pytest.raises(ValueError, match="map-style Dataset"):
        audit_tensors(_Stream())
    with pytest.raises(ValueError, match="different lengths"):
        audit_tensors((x, y[:3]))
    with pytest.raises(ValueError, match="empty"):
        audit_tensors(TensorDataset(x[:0], y[:0]))
