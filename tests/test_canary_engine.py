"""Canary audits inside real DP-SGD runs through AdaptivePrivacyEngine (scikit-learn digits, small MLPs).

Truths: with σ = 0 nothing hides the canaries, so 1 000 gradient canaries must give ε̂ >= 3 (power); with
σ fixed, ε̂ may never exceed the accountant's ε (soundness of the bound and of the canary insertion); a
mechanism that adds 10× less noise than its accountant books must be caught (ε̂ > the printed ε); the
canaries added to the clipped sum are exactly the included ones selected at rate q.

Settings: C = 10 (larger than the digits per-sample gradients, so the data's own gradient moves a canary's
score little relative to the canary's C² per step; C only scales the run, the accountant does not see it),
10 epochs at q = 1/23 (each included canary joins ≈ 10 steps).
"""

from __future__ import annotations

import math

import pytest
import torch
from opacus.optimizers import DPOptimizer
from torch import nn
from torch.utils.data import DataLoader

from adaptive_dp.auditing import (
    CanaryScorer,
    GradientCanaryRun,
    InputCanaryRun,
    canary_seeds,
    make_gradient_canaries,
    sgd_momentum,
)
from adaptive_dp.data.datasets import load_dataset
from adaptive_dp.optimizers.adaptive import ADAPTIVE_OPTIMIZERS, AdaptiveNoiseMixin
from adaptive_dp.privacy_engine import AdaptivePrivacyEngine

# σ = 0 runs ask the odometer for ε at every step
pytestmark = pytest.mark.filterwarnings("ignore:Optimal order is the smallest alpha:UserWarning")

DELTA = 1e-5
C = 10.0
BATCH = 64  # digits: 1 437 examples, 23 batches, q = 1/23


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def mlp(hidden: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def private(dataset, *, sigma, hidden=64, seed=0, lr=0.5, momentum=0.0, loader=None, noise_generator=None):
    """(engine, model, optimizer, loader) of a plain-mode engine (fixed σ) over ``dataset``."""
    model = mlp(hidden, seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    engine = AdaptivePrivacyEngine()
    model, optimizer, loader = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader or DataLoader(dataset, batch_size=BATCH),
        noise_multiplier=sigma,
        max_grad_norm=C,
        noise_generator=noise_generator,
    )
    return engine, model, optimizer, loader


def attach_run(engine, model, optimizer, *, count=1000, kind="dirac", seed=0, momentum=0.0):
    run = GradientCanaryRun(
        count=count,
        params=[p for p in model.parameters() if p.requires_grad],
        max_grad_norm=C,
        sample_rate=engine.sample_rate,
        seed=seed,
        kind=kind,
        momentum=momentum,
    )
    run.attach(optimizer)
    return run


def train(model, optimizer, loader, *, epochs):
    criterion = nn.CrossEntropyLoss()
    for _ in range(epochs):
        for x, y in loader:
            optimizer.zero_grad()
            criterion(model(x), y).backward()
            optimizer.step()


def gradient_audit(dataset, *, sigma, kind="dirac", hidden=64, seed=0, epochs=10):
    """ε̂ of a gradient-canary run, the engine's ε at δ (inf for σ = 0) and the engine."""
    engine, model, optimizer, loader = private(dataset, sigma=sigma, hidden=hidden, seed=seed)
    run = attach_run(engine, model, optimizer, kind=kind, seed=seed)
    train(model, optimizer, loader, epochs=epochs)
    assert run.steps == len(engine.history) == epochs * len(loader)
    epsilon = math.inf if sigma == 0 else engine.get_epsilon(DELTA)
    return run.audit(delta=DELTA, confidence=0.95), epsilon, engine


# ---------------------------------------------------------------------------------------------- power


@pytest.mark.parametrize("kind, hidden", [("dirac", 64), ("random", 128)])
def test_power_without_noise(digits, kind, hidden):
    audit, _, _ = gradient_audit(digits, sigma=0.0, kind=kind, hidden=hidden)
    assert audit.canaries == 1000 and audit.mode == "gradient"
    assert audit.epsilon_lower_bound >= 3.0, audit


# ---------------------------------------------------------------------------------------------- soundness


@pytest.mark.parametrize("seed", [0, 1, 2, *(pytest.param(s, marks=pytest.mark.slow) for s in range(3, 10))])
def test_soundness_at_fixed_sigma(digits, seed):
    # the same strong audit (dirac canaries, C = 10) that reaches ε̂ ≈ 4.6 at σ = 0
    audit, epsilon, _ = gradient_audit(digits, sigma=1.0, seed=seed)
    assert 0.0 <= audit.epsilon_lower_bound <= epsilon


# ---------------------------------------------------------------------------------------------- bug detector


class _TooLittleNoise(DPOptimizer):
    """A broken mechanism: draws noise with 0.1·σ while σ stays what the control loop decided and the
    accountant's step hook (run after add_noise) books."""

    def add_noise(self) -> None:
        booked = self.noise_multiplier
        self.noise_multiplier = 0.1 * booked
        try:
            super().add_noise()
        finally:
            self.noise_multiplier = booked


class _BrokenAdaptiveDPOptimizer(AdaptiveNoiseMixin, _TooLittleNoise):
    pass


def test_bug_detector_catches_ten_times_too_little_noise(digits, monkeypatch):
    monkeypatch.setitem(ADAPTIVE_OPTIMIZERS, DPOptimizer, _BrokenAdaptiveDPOptimizer)
    audit, epsilon, engine = gradient_audit(digits, sigma=2.0)
    assert {record["noise_multiplier"] for record in engine.history} == {2.0}  # booked: σ = 2
    assert audit.epsilon_lower_bound > epsilon, (audit, epsilon)


# ---------------------------------------------------------------------------------------------- insertion


def test_only_included_canaries_are_added_at_rate_q(digits):
    engine, model, optimizer, loader = private(digits, sigma=0.0)
    sums = {}

    def snapshot(key):
        def hook(opt):
            sums.setdefault(key, []).append(
                torch.cat([p.summed_grad.reshape(-1).clone() for p in opt.params])
            )

        return hook

    optimizer.attach_pre_noise_hook(snapshot("before"))
    run = attach_run(engine, model, optimizer, count=200)
    optimizer.attach_post_step_hook(lambda opt: None)
    optimizer.attach_pre_noise_hook(snapshot("after"))
    train(model, optimizer, loader, epochs=4)

    canaries = make_gradient_canaries(
        count=200,
        dim=sum(p.numel() for p in optimizer.params),
        max_grad_norm=C,
        kind="dirac",
        seed=canary_seeds(seed=0, streams=3)[0],
    )
    coordinates = canaries.nonzero()[:, 1]  # row order: canary i sits on coordinates[i]
    added = torch.stack(sums["after"]) - torch.stack(sums["before"])  # [T, P]: what the run added
    per_canary = added[:, coordinates]  # [T, m]
    torch.testing.assert_close(added.abs().sum(), per_canary.abs().sum())  # nothing off the canaries
    assert set(per_canary.unique().tolist()) <= {0.0, C}
    assert per_canary[:, ~run.included].abs().sum() == 0  # excluded canaries never join
    joins = (per_canary[:, run.included] == C).double()
    trials, q = joins.numel(), engine.sample_rate
    assert abs(joins.mean().item() - q) < 4 * math.sqrt(q * (1 - q) / trials)


# ---------------------------------------------------------------------------------------------- resume


def _fixed_batches(dataset, *, count, seed):
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        index = torch.randperm(len(dataset), generator=generator)[:BATCH].tolist()
        x = torch.stack([dataset[i][0] for i in index])
        batches.append((x, torch.tensor([dataset[i][1] for i in index])))
    return batches


def test_gradient_run_resumes_mid_run_with_the_same_scores(digits):
    batches = _fixed_batches(digits, count=12, seed=3)
    # the whole run: 12 steps, SGD with momentum, σ = 0.5 from a seeded noise generator
    engine, model, optimizer, _ = private(
        digits, sigma=0.5, lr=0.1, momentum=0.9, noise_generator=torch.Generator().manual_seed(7)
    )
    whole = attach_run(engine, model, optimizer, count=300, kind="random", momentum=0.9)
    train(model, optimizer, batches, epochs=1)

    # the same run interrupted after 6 steps and resumed into fresh objects
    noise = torch.Generator().manual_seed(7)
    engine, model, optimizer, _ = private(digits, sigma=0.5, lr=0.1, momentum=0.9, noise_generator=noise)
    first = attach_run(engine, model, optimizer, count=300, kind="random", momentum=0.9)
    train(model, optimizer, batches[:6], epochs=1)
    saved = (model.state_dict(), optimizer.state_dict(), noise.get_state(), first.state_dict())

    noise = torch.Generator()
    engine, model, optimizer, _ = private(digits, sigma=0.5, lr=0.1, momentum=0.9, noise_generator=noise)
    model.load_state_dict(saved[0])
    optimizer.load_state_dict(saved[1])
    noise.set_state(saved[2])
    resumed = attach_run(engine, model, optimizer, count=300, kind="random", momentum=0.9)
    resumed.load_state_dict(saved[3])
    train(model, optimizer, batches[6:], epochs=1)

    assert resumed.steps == whole.steps == 12
    torch.testing.assert_close(resumed.scores(), whole.scores(), rtol=1e-6, atol=1e-9)
    assert torch.equal(resumed.included, whole.included)
    other = GradientCanaryRun(
        count=300,
        params=list(optimizer.params),
        max_grad_norm=C,
        sample_rate=engine.sample_rate,
        seed=1,
        momentum=0.9,
    )
    with pytest.raises(ValueError, match="seed"):
        other.load_state_dict(saved[3])


# ---------------------------------------------------------------------------------------------- building blocks


def test_sparse_dirac_canaries_score_like_dense_ones():
    dense = make_gradient_canaries(count=50, dim=400, max_grad_norm=C, kind="dirac", seed=4)
    sparse = make_gradient_canaries(count=50, dim=400, max_grad_norm=C, kind="dirac", seed=4, sparse=True)
    assert sparse.is_sparse and sparse.values().numel() == 50
    assert torch.equal(sparse.to_dense(), dense)
    generator = torch.Generator().manual_seed(0)
    models = [torch.randn(400, generator=generator) for _ in range(6)]
    scorers = [CanaryScorer(directions=d, momentum=0.5) for d in (dense, sparse)]
    for scorer in scorers:
        for t, (before, after) in enumerate(zip(models[:-1], models[1:])):
            scorer.observe(before=before, after=after, lr=0.1 * (t + 1))
    torch.testing.assert_close(scorers[1].scores(), scorers[0].scores(), rtol=1e-6, atol=1e-9)
    with pytest.raises(ValueError, match="sparse=True needs kind='dirac'"):
        make_gradient_canaries(count=5, dim=10, max_grad_norm=C, seed=0, sparse=True)


def test_canary_seeds_are_fixed_distinct_streams():
    seeds = canary_seeds(seed=0, streams=3)
    assert seeds == canary_seeds(seed=0, streams=3) and len(set(seeds)) == 3
    assert all(0 <= s < 2**63 for s in seeds) and canary_seeds(seed=1, streams=3) != seeds
    with pytest.raises(ValueError, match="seed"):
        canary_seeds(seed=-1, streams=2)


# ---------------------------------------------------------------------------------------------- refusals


def test_unsupported_optimizers_and_settings_are_refused(digits):
    params = [nn.Parameter(torch.zeros(3))]
    assert sgd_momentum(torch.optim.SGD(params, lr=0.1, momentum=0.9)) == 0.9
    with pytest.raises(ValueError, match="SGD"):
        sgd_momentum(torch.optim.Adam(params, lr=0.1))
    for setting, match in (
        ({"momentum": 0.9, "nesterov": True}, "nesterov"),
        ({"momentum": 0.9, "dampening": 0.1}, "dampening"),
        ({"weight_decay": 1e-4}, "weight_decay"),
    ):
        with pytest.raises(ValueError, match=match):
            sgd_momentum(torch.optim.SGD(params, lr=0.1, **setting))
    groups = [{"params": [nn.Parameter(torch.zeros(2))], "lr": 0.1}, {"params": params, "lr": 0.2}]
    with pytest.raises(ValueError, match="one lr"):
        sgd_momentum(torch.optim.SGD(groups, lr=0.1))

    engine, model, optimizer, _ = private(digits, sigma=0.0, momentum=0.9)
    with pytest.raises(ValueError, match="momentum"):
        attach_run(engine, model, optimizer, momentum=0.0)
    with pytest.raises(ValueError, match="optimizer.params order"):
        GradientCanaryRun(
            count=10,
            params=list(optimizer.params)[::-1],
            max_grad_norm=C,
            sample_rate=0.1,
            seed=0,
            momentum=0.9,
        ).attach(optimizer)
    with pytest.raises(ValueError, match="canary hooks"):
        GradientCanaryRun(count=10, params=params, max_grad_norm=C, sample_rate=0.1, seed=0).attach(
            torch.optim.SGD(params, lr=0.1)
        )
    big = [nn.Parameter(torch.zeros(60_000))]
    with pytest.raises(ValueError, match="kind='dirac'"):
        GradientCanaryRun(count=1000, params=big, max_grad_norm=C, sample_rate=0.1, seed=0)
    sparse = GradientCanaryRun(count=1000, params=big, max_grad_norm=C, sample_rate=0.1, seed=0, kind="dirac")
    assert sparse.included.shape == (1000,)
    with pytest.raises(RuntimeError, match="no optimizer step"):
        sparse.audit(delta=DELTA)


# ---------------------------------------------------------------------------------------------- input canaries


def test_input_canaries_are_mislabelled_copies_replacing_their_originals(digits):
    loader, run = InputCanaryRun.insert(
        DataLoader(digits, batch_size=BATCH), count=200, num_classes=None, seed=0
    )
    kept = int(run.included.sum())
    assert len(loader.dataset) == len(digits) - 200 + kept and loader.batch_size == BATCH
    assert bool((run.labels != digits.targets[run.indices]).all())
    canaries = loader.dataset.datasets[1]
    assert [canaries[i][1] for i in range(kept)] == run.labels[run.included].tolist()
    assert torch.equal(canaries[0][0], digits[int(run.indices[run.included][0])][0])
    others = set(loader.dataset.datasets[0].indices)
    assert others.isdisjoint(run.indices.tolist()) and len(others) == len(digits) - 200

    _, again = InputCanaryRun.insert(DataLoader(digits, batch_size=BATCH), count=200, num_classes=10, seed=0)
    again.load_state_dict(run.state_dict())  # same seed, same canaries: accepted
    _, other = InputCanaryRun.insert(DataLoader(digits, batch_size=BATCH), count=200, num_classes=10, seed=1)
    with pytest.raises(ValueError, match="differs"):
        other.load_state_dict(run.state_dict())
    with pytest.raises(ValueError, match="num_classes"):
        InputCanaryRun.insert(
            DataLoader(list(zip(digits.images.float(), digits.targets)), batch_size=8),
            count=4,
            num_classes=None,
            seed=0,
        )


def test_input_canaries_are_detected_without_noise(digits):
    # measured ε̂ (seeds 0, 1, 2): 2.63, 3.00, 2.20 at 95 % — black box, final model only
    loader, run = InputCanaryRun.insert(
        DataLoader(digits, batch_size=BATCH), count=200, num_classes=None, seed=0
    )
    engine, model, optimizer, loader = private(digits, sigma=0.0, hidden=128, lr=1.0, loader=loader)
    assert engine.sample_rate == pytest.approx(1 / math.ceil(len(loader.dataset) / BATCH))
    train(model, optimizer, loader, epochs=20)
    losses = run.losses(model=model)
    assert losses[run.included].mean() < losses[~run.included].mean() - 3.0  # memorised wrong labels
    audit = run.audit(model=model, delta=DELTA)
    assert audit.mode == "input" and audit.canaries == 200
    assert audit.epsilon_lower_bound >= 1.5, audit
