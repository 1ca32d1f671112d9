"""Engine v2's refusals: every way to get a guarantee printed that does not hold raises (or warns) once.

Each test here failed on the milestone-1 engine (which accepted these inputs silently) and names the input
that triggers the refusal. Truths used: opacus' own PrivacyEngine at σ = 0 (clipping only), the identity of
the training examples, and opacus' checkpoint semantics.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from opacus import PrivacyEngine
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader, Subset, TensorDataset

from adaptive_dp import AdaptivePrivacyEngine
from adaptive_dp.control import AdaptiveOptions
from adaptive_dp.leakage.overlap import AuditOverlapError

pytestmark = pytest.mark.filterwarnings("ignore:target_mi without a privacy budget:UserWarning")


def _data(n: int = 64, d: int = 8, classes: int = 3, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, d, generator=g), torch.randint(0, classes, (n,), generator=g))


def _model_and_optimizer(d: int = 8, classes: int = 3, seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(d, 16), nn.Tanh(), nn.Linear(16, classes))
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def _make_private(loader, **kwargs):
    model, optimizer = _model_and_optimizer()
    engine = AdaptivePrivacyEngine()
    out = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        **kwargs,
    )
    return engine, out


# ------------------------------------------------------------------------------ audit data vs training data
@pytest.mark.parametrize("what", ["dataset", "loader", "loader-over-dataset"])
def test_refuses_the_training_data_itself_as_audit_data(what):
    train = _data()
    loader = DataLoader(train, batch_size=16)
    audit = {"dataset": train, "loader": loader, "loader-over-dataset": DataLoader(train, batch_size=4)}[what]
    with pytest.raises(AuditOverlapError, match="training data itself.*no DP protection"):
        _make_private(loader, target_mi=0.5, audit_data=audit)


def test_refuses_a_subset_overlapping_the_training_indices():
    full = _data()
    loader = DataLoader(Subset(full, list(range(0, 48))), batch_size=16)
    with pytest.raises(AuditOverlapError, match="2 audit example"):
        _make_private(loader, target_mi=0.5, audit_data=Subset(full, [46, 47, 48, 49]))


def test_refuses_a_part_of_a_concatenated_training_set():
    a, b = _data(seed=0), _data(seed=1)
    loader = DataLoader(ConcatDataset([a, b]), batch_size=16)
    with pytest.raises(AuditOverlapError, match="also training examples"):
        _make_private(loader, audit_data=Subset(b, [3, 4, 5]))


def test_refuses_audit_examples_byte_identical_to_training_examples():
    train = _data()
    x, y = train.tensors
    audit = (torch.cat([torch.randn(10, 8), x[17:18].clone()]), torch.zeros(11, dtype=torch.long))
    with pytest.raises(AuditOverlapError, match="audit example 10 is byte-identical to training example 17"):
        _make_private(DataLoader(train, batch_size=16), target_mi=0.5, audit_data=audit)


def test_accepts_disjoint_audit_data_and_a_held_out_split_of_one_dataset():
    full = _data()
    loader = DataLoader(Subset(full, list(range(48))), batch_size=16)
    engine, _ = _make_private(loader, target_mi=0.5, audit_data=Subset(full, list(range(48, 64))))
    assert engine.monitor is not None
    engine, _ = _make_private(
        DataLoader(_data(), batch_size=16), target_mi=0.5, audit_data=_data(n=16, seed=9)
    )
    assert engine.monitor is not None


# ------------------------------------------------------------------------------ Poisson sampling
def test_refuses_shuffled_batches_under_a_budget():
    model, optimizer = _model_and_optimizer()
    with pytest.raises(ValueError, match="poisson_sampling=False with a hard ε budget"):
        AdaptivePrivacyEngine().make_private_with_epsilon(
            module=model,
            optimizer=optimizer,
            data_loader=DataLoader(_data(), batch_size=16),
            target_epsilon=3.0,
            target_delta=1e-5,
            epochs=1,
            max_grad_norm=1.0,
            poisson_sampling=False,
        )


def test_warns_on_shuffled_batches_with_a_controller_but_not_in_plain_mode():
    with pytest.warns(UserWarning, match="poisson_sampling=False.*does not hold"):
        _make_private(
            DataLoader(_data(), batch_size=16), poisson_sampling=False, controller="linear", total_steps=10
        )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _make_private(DataLoader(_data(), batch_size=16), poisson_sampling=False)  # opacus' own behaviour
    assert not [w for w in caught if "poisson_sampling" in str(w.message)]


# ------------------------------------------------------------------------------ one engine, one model
def test_a_second_make_private_raises_but_a_failed_first_call_does_not_count():
    engine = AdaptivePrivacyEngine()
    model, optimizer = _model_and_optimizer()
    with pytest.raises(ValueError, match="Module parameters are different"):
        engine.make_private(
            module=nn.Linear(8, 3),
            optimizer=optimizer,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            data_loader=DataLoader(_data(), batch_size=16),
        )
    engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=DataLoader(_data(), batch_size=16),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
    )
    model2, optimizer2 = _model_and_optimizer(seed=1)
    with pytest.raises(RuntimeError, match="one engine, one private model"):
        engine.make_private_with_epsilon(
            module=model2,
            optimizer=optimizer2,
            data_loader=DataLoader(_data(), batch_size=16),
            target_epsilon=3.0,
            target_delta=1e-5,
            epochs=1,
            max_grad_norm=1.0,
        )


# ------------------------------------------------------------------------------ plain opacus semantics
def _one_step_update(engine_cls, **kwargs) -> list[torch.Tensor]:
    model, optimizer = _model_and_optimizer()
    before = [p.detach().clone() for p in model.parameters()]
    engine = engine_cls()
    model, optimizer, loader = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=DataLoader(_data(), batch_size=16),
        noise_multiplier=0.0,
        max_grad_norm=0.5,
        poisson_sampling=False,
        **kwargs,
    )
    x, y = next(iter(loader))
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
    return [p.detach() - b for p, b in zip(model.parameters(), before)], engine


def test_noise_multiplier_zero_is_clipping_only_as_in_opacus():
    ours, engine = _one_step_update(AdaptivePrivacyEngine)
    reference, _ = _one_step_update(PrivacyEngine)
    for a, b in zip(ours, reference):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # no noise at all: bit-identical clipped updates
    assert engine.history[-1]["noise_multiplier"] == 0.0
    assert math.isinf(engine.get_epsilon(1e-5))


def test_options_object_equals_keywords():
    engine_a, _ = _make_private(
        DataLoader(_data(), batch_size=16), target_mi=0.5, audit_data=_data(n=16, seed=9)
    )
    options = AdaptiveOptions(target_mi=0.5, audit_data=_data(n=16, seed=9))
    engine_b, _ = _make_private(DataLoader(_data(), batch_size=16), adaptive=options)
    assert engine_a.options.target_mi == engine_b.options.target_mi == 0.5
    assert type(engine_a.controller) is type(engine_b.controller)
    with pytest.raises(ValueError, match="monitor_every must be an integer"):
        AdaptiveOptions(monitor_every=0)


def _checkpoint_roundtrip(tmp_path, **kwargs):
    engine, (model, optimizer, loader) = _make_private(DataLoader(_data(), batch_size=16), **kwargs)
    for x, y in loader:
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    saved_sigma = optimizer.noise_multiplier
    engine.save_checkpoint(path=tmp_path / "ckpt.pt", module=model, optimizer=optimizer)
    engine2, (model2, optimizer2, _) = _make_private(DataLoader(_data(), batch_size=16), **kwargs)
    optimizer2.noise_multiplier = 2.5  # the user's new σ
    engine2.load_checkpoint(path=tmp_path / "ckpt.pt", module=model2, optimizer=optimizer2)
    return saved_sigma, optimizer2.noise_multiplier, engine2


def test_load_checkpoint_keeps_the_users_sigma_without_a_controller(tmp_path):
    _, restored, engine = _checkpoint_roundtrip(tmp_path)
    assert restored == 2.5  # opacus keeps optimizer.noise_multiplier: it is not checkpoint state there
    assert len(engine.history) == 4


def test_load_checkpoint_restores_sigma_as_controller_state(tmp_path):
    saved, restored, engine = _checkpoint_roundtrip(
        tmp_path, target_mi=0.05, audit_data=_data(n=16, seed=9), controller_options={"kp": 2.0}
    )
    assert restored == saved != 1.0  # the controller moved σ, and the restored engine goes on from there


def test_history_key_mi_gap_still_reads_with_a_deprecation_warning():
    engine, (model, optimizer, loader) = _make_private(
        DataLoader(_data(), batch_size=16), target_mi=0.5, audit_data=_data(n=16, seed=9)
    )
    x, y = next(iter(loader))
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
    record = engine.history[0]
    assert record["critic_gap"] is not None and "mi_gap" not in record
    with pytest.warns(DeprecationWarning, match="critic_gap"):
        assert record["mi_gap"] == record["critic_gap"]


# ------------------------------------------------------------------------------ canaries through the engine
def test_engine_gradient_canaries_power_at_sigma_zero_and_checkpoint_state(tmp_path):
    from adaptive_dp.data import load_dataset

    train = load_dataset("digits", split="train")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    engine = AdaptivePrivacyEngine()
    model, optimizer, loader = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=DataLoader(train, batch_size=64),
        noise_multiplier=0.0,
        max_grad_norm=10.0,
        canaries=1000,
    )
    for _ in range(10):  # 230 steps (helper measurement: 500/500 right guesses at σ = 0)
        for x, y in loader:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
    audit = engine.canary_audit(confidence=0.95)
    assert audit.canaries == 1000 and audit.mode == "gradient"
    assert audit.epsilon_lower_bound >= 3.0  # no noise: the canaries are found (power)
    state = engine.adaptive_state_dict()
    assert state["canaries"] is not None
    with pytest.raises(RuntimeError, match="no canaries"):
        _make_private(DataLoader(_data(), batch_size=16))[0].canary_audit()


def test_a_budget_whose_plan_needs_more_noise_than_sigma_max_is_refused_up_front():
    model, optimizer = _model_and_optimizer()
    with pytest.raises(ValueError, match=r"needs σ = .* above sigma_max = 2"):
        AdaptivePrivacyEngine().make_private_with_epsilon(
            module=model,
            optimizer=optimizer,
            data_loader=DataLoader(_data(), batch_size=16),
            target_epsilon=0.3,
            target_delta=1e-5,
            epochs=2,
            max_grad_norm=1.0,
            sigma_max=2.0,
        )
