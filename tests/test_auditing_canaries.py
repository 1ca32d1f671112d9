"""Canaries, white-box scores and the top-k audit: scores checked against torch.optim.SGD's own updates (plain
and with momentum, with a changing learning rate), the audit against the bound computed by hand."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from adaptive_dp.auditing import (
    CanaryAudit,
    CanaryScorer,
    audit_from_scores,
    canary_scores,
    default_k_values,
    draw_inclusion,
    epsilon_lower_bound,
    input_canary_scores,
    make_gradient_canaries,
    make_input_canaries,
    mislabel,
)


@pytest.mark.parametrize("kind", ["random", "dirac"])
def test_gradient_canaries_have_norm_c_and_depend_only_on_the_seed(kind):
    canaries = make_gradient_canaries(count=40, dim=300, max_grad_norm=2.5, kind=kind, seed=3)
    assert canaries.shape == (40, 300)
    torch.testing.assert_close(canaries.norm(dim=1), torch.full((40,), 2.5))
    assert torch.equal(
        canaries, make_gradient_canaries(count=40, dim=300, max_grad_norm=2.5, kind=kind, seed=3)
    )
    assert not torch.equal(
        canaries, make_gradient_canaries(count=40, dim=300, max_grad_norm=2.5, kind=kind, seed=4)
    )


def test_dirac_canaries_sit_on_distinct_coordinates():
    canaries = make_gradient_canaries(count=50, dim=50, max_grad_norm=1.0, kind="dirac", seed=0)
    assert torch.equal((canaries != 0).sum(dim=1), torch.ones(50, dtype=torch.long))
    assert torch.equal(canaries.abs().sum(dim=0), torch.ones(50))  # every coordinate used exactly once


def test_random_canaries_are_nearly_orthogonal():
    # independent uniform directions in dimension P: cosines have mean 0 and standard deviation 1/√P
    canaries = make_gradient_canaries(count=200, dim=4000, max_grad_norm=1.0, seed=1)
    cosines = (canaries @ canaries.T)[~torch.eye(200, dtype=torch.bool)]
    assert abs(cosines.mean().item()) < 3 / math.sqrt(4000) / 100
    assert cosines.std().item() == pytest.approx(1 / math.sqrt(4000), rel=0.05)


def test_inclusion_is_a_fair_coin_per_canary():
    included = draw_inclusion(count=20_000, seed=0)
    assert included.dtype == torch.bool and included.shape == (20_000,)
    assert abs(included.float().mean().item() - 0.5) < 4 * 0.5 / math.sqrt(20_000)
    assert torch.equal(included, draw_inclusion(count=20_000, seed=0))


def test_input_canaries_are_distinct_examples_with_a_wrong_label():
    indices, shifts = make_input_canaries(dataset_size=500, count=100, num_classes=10, seed=2)
    assert len(set(indices.tolist())) == 100 and 0 <= indices.min() and indices.max() < 500
    assert 1 <= shifts.min() and shifts.max() <= 9
    targets = torch.randint(0, 10, (500,), generator=torch.Generator().manual_seed(0))[indices]
    wrong = mislabel(targets=targets, shifts=shifts, num_classes=10)
    assert bool((wrong != targets).all()) and 0 <= wrong.min() and wrong.max() < 10
    losses = torch.tensor([0.1, 2.0], dtype=torch.float64)
    assert input_canary_scores(losses=losses).tolist() == [-0.1, -2.0]


def _sgd_trajectory(*, momentum: float, steps: int = 12, dim: int = 30):
    """Run torch.optim.SGD on one flat parameter with known gradients and a changing learning rate."""
    generator = torch.Generator().manual_seed(0)
    param = torch.nn.Parameter(torch.randn(dim, generator=generator))
    optimizer = torch.optim.SGD([param], lr=0.1, momentum=momentum)
    gradients, rates, models = [], [], [param.detach().clone()]
    for t in range(steps):
        lr = 0.1 * (0.8**t)  # a decaying schedule: the buffer must not be divided by the wrong lr
        optimizer.param_groups[0]["lr"] = lr
        param.grad = torch.randn(dim, generator=generator)
        gradients.append(param.grad.clone())
        optimizer.step()
        rates.append(lr)
        models.append(param.detach().clone())
    return torch.stack(gradients), rates, models


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_scores_recover_the_gradients_torch_sgd_applied(momentum):
    gradients, rates, models = _sgd_trajectory(momentum=momentum)
    directions = make_gradient_canaries(count=5, dim=30, max_grad_norm=1.0, seed=0)
    truth = (gradients.double() @ directions.double().T).sum(dim=0)  # Σ_t ⟨g_t, d_i⟩

    scorer = CanaryScorer(directions=directions, momentum=momentum)
    for before, after, lr in zip(models[:-1], models[1:], rates):
        scorer.observe(before=before, after=after, lr=lr)
    torch.testing.assert_close(scorer.scores(), truth, rtol=1e-4, atol=1e-4)
    assert scorer.steps == len(rates)

    updates = torch.stack([b - a for b, a in zip(models[:-1], models[1:])])
    batch = canary_scores(updates=updates, directions=directions, learning_rates=rates, momentum=momentum)
    torch.testing.assert_close(batch, scorer.scores(), rtol=1e-6, atol=1e-6)


def test_ignoring_momentum_gives_different_scores():
    gradients, rates, models = _sgd_trajectory(momentum=0.9)
    directions = make_gradient_canaries(count=5, dim=30, max_grad_norm=1.0, seed=0)
    truth = (gradients.double() @ directions.double().T).sum(dim=0)
    updates = torch.stack([b - a for b, a in zip(models[:-1], models[1:])])
    naive = canary_scores(updates=updates, directions=directions, learning_rates=rates, momentum=0.0)
    assert (naive - truth).abs().max() > 1.0


def test_scorer_state_round_trip_continues_the_same_sum():
    gradients, rates, models = _sgd_trajectory(momentum=0.5)
    directions = make_gradient_canaries(count=4, dim=30, max_grad_norm=1.0, seed=0)
    whole = CanaryScorer(directions=directions, momentum=0.5)
    first = CanaryScorer(directions=directions, momentum=0.5)
    for t, (before, after, lr) in enumerate(zip(models[:-1], models[1:], rates)):
        whole.observe(before=before, after=after, lr=lr)
        if t < 6:
            first.observe(before=before, after=after, lr=lr)
    resumed = CanaryScorer(directions=directions, momentum=0.5)
    resumed.load_state_dict(first.state_dict())
    for before, after, lr in list(zip(models[:-1], models[1:], rates))[6:]:
        resumed.observe(before=before, after=after, lr=lr)
    torch.testing.assert_close(resumed.scores(), whole.scores(), rtol=0, atol=1e-12)
    assert resumed.steps == whole.steps
    with pytest.raises(ValueError, match="momentum"):
        CanaryScorer(directions=directions, momentum=0.0).load_state_dict(first.state_dict())
    with pytest.raises(ValueError, match="scores"):
        CanaryScorer(directions=directions[:3], momentum=0.5).load_state_dict(first.state_dict())


def test_scorer_rejects_bad_input():
    directions = torch.eye(3)
    with pytest.raises(ValueError, match="directions"):
        CanaryScorer(directions=torch.ones(3))
    with pytest.raises(ValueError, match="momentum"):
        CanaryScorer(directions=directions, momentum=1.0)
    scorer = CanaryScorer(directions=directions)
    with pytest.raises(ValueError, match="flat"):
        scorer.observe(before=torch.zeros(4), after=torch.zeros(4), lr=0.1)
    with pytest.raises(ValueError, match="lr"):
        scorer.observe(before=torch.zeros(3), after=torch.zeros(3), lr=0.0)
    with pytest.raises(ValueError, match="non-finite"):
        scorer.observe(before=torch.zeros(3), after=torch.tensor([0.0, math.nan, 0.0]), lr=0.1)
    assert scorer.steps == 0 and scorer.scores().abs().sum() == 0
    with pytest.raises(ValueError, match="learning rate"):
        canary_scores(updates=torch.zeros(2, 3), directions=directions, learning_rates=[0.1])


def test_canary_constructors_reject_bad_input():
    with pytest.raises(ValueError, match="count <= dim"):
        make_gradient_canaries(count=5, dim=4, max_grad_norm=1.0, kind="dirac", seed=0)
    with pytest.raises(ValueError, match="kind"):
        make_gradient_canaries(count=5, dim=4, max_grad_norm=1.0, kind="gauss", seed=0)
    with pytest.raises(ValueError, match="max_grad_norm"):
        make_gradient_canaries(count=5, dim=4, max_grad_norm=0.0, seed=0)
    with pytest.raises(ValueError, match="seed"):
        draw_inclusion(count=5, seed=-1)
    with pytest.raises(ValueError, match="dataset_size"):
        make_input_canaries(dataset_size=5, count=10, num_classes=10, seed=0)
    with pytest.raises(ValueError, match="num_classes"):
        make_input_canaries(dataset_size=50, count=10, num_classes=1, seed=0)
    with pytest.raises(ValueError, match="shifts"):
        mislabel(targets=torch.tensor([1, 2]), shifts=torch.tensor([0, 1]), num_classes=3)
    with pytest.raises(ValueError, match="losses"):
        input_canary_scores(losses=torch.tensor([1.0, math.inf]))


def test_audit_counts_top_and_bottom_guesses_and_applies_bonferroni():
    # 10 canaries; scores rank them 0..9 from highest to lowest
    scores = torch.arange(10, 0, -1, dtype=torch.float64)
    included = torch.tensor([1, 1, 0, 1, 0, 1, 0, 1, 0, 0], dtype=torch.bool)
    audit = audit_from_scores(scores=scores, included=included, delta=0.0, k_values=(1, 2, 4))
    # k = 1: top {0} in, bottom {9} out: 2/2. k = 2: {0,1} in, {8,9} out: 4/4. k = 4: {0,1,3} of {0..3}
    # included, {6,8,9} of {6..9} excluded: 6/8.
    per_k = {
        k: epsilon_lower_bound(canaries=10, guesses=2 * k, correct=c, delta=0.0, confidence=1 - 0.05 / 3)
        for k, c in ((1, 2), (2, 4), (4, 6))
    }
    best_k = max(per_k, key=per_k.get)
    assert audit == CanaryAudit(
        per_k[best_k], 10, 2 * best_k, {1: 2, 2: 4, 4: 6}[best_k], 0.95, 0.0, "gradient", best_k
    )
    assert audit.as_dict()["k"] == best_k and set(audit.as_dict()) == {
        "epsilon_lower_bound",
        "canaries",
        "guesses",
        "correct",
        "confidence",
        "delta",
        "mode",
        "k",
    }
    with pytest.raises(dataclasses.FrozenInstanceError):
        audit.k = 3  # type: ignore[misc]


def test_audit_with_uninformative_scores_finds_nothing():
    included = draw_inclusion(count=1000, seed=5)
    scores = torch.randn(1000, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    assert audit_from_scores(scores=scores, included=included, delta=1e-5).epsilon_lower_bound < 0.3


def test_default_k_values_depend_on_m_only():
    assert default_k_values(1000) == (10, 25, 50, 100, 250, 500)
    assert default_k_values(2) == (1,)
    assert all(1 <= k <= m // 2 for m in (3, 17, 101) for k in default_k_values(m))


def test_audit_rejects_bad_input():
    scores, included = torch.zeros(10), torch.zeros(10, dtype=torch.bool)
    with pytest.raises(ValueError, match="included"):
        audit_from_scores(scores=scores, included=torch.zeros(10), delta=0.0)
    with pytest.raises(ValueError, match="finite"):
        audit_from_scores(scores=torch.full((10,), math.nan), included=included, delta=0.0)
    with pytest.raises(ValueError, match="k"):
        audit_from_scores(scores=scores, included=included, delta=0.0, k_values=(6,))
    with pytest.raises(ValueError, match="distinct"):
        audit_from_scores(scores=scores, included=included, delta=0.0, k_values=(2, 2))
    with pytest.raises(ValueError, match="mode"):
        audit_from_scores(scores=scores, included=included, delta=0.0, mode="white")
    with pytest.raises(ValueError, match="confidence"):
        audit_from_scores(scores=scores, included=included, delta=0.0, confidence=1.5)
    with pytest.raises(ValueError, match="delta"):
        audit_from_scores(scores=scores, included=included, delta=2.0)
