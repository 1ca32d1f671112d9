"""The one-run ε lower bound (Steinke, Nasr & Jagielski 2023) against the paper's published values, closed
forms, a plain re-implementation of Theorem 5.2 with a grid search, and its exact error rate on randomized
response, the mechanism the bound is tight for."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import optimize, special, stats

from adaptive_dp.auditing import epsilon_lower_bound, one_run_p_value


def naive_p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """Theorem 5.2 of arXiv:2305.08846v1 written out: f(v) + 2mδ · max_{i=1..m} (f(v - i) - f(v)) / i."""
    q = 1.0 / (1.0 + math.exp(-eps))

    pmf = []
    for w in range(r + 1):
        log_choose = math.lgamma(r + 1) - math.lgamma(w + 1) - math.lgamma(r - w + 1)
        pmf.append(
            math.exp(log_choose + w * math.log(q) + (r - w) * math.log1p(-q)) if q < 1 else float(w == r)
        )
    tails = [0.0] * (r + 2)  # tails[k] = P[Binomial(r, q) >= k]
    for k in range(r, -1, -1):
        tails[k] = tails[k + 1] + pmf[k]

    def f(k: int) -> float:
        return tails[min(max(k, 0), r + 1)]

    worst = 0.0
    for i in range(1, m + 1):  # the theorem's whole range, not only i <= v
        worst = max(worst, (f(v - i) - f(v)) / i)
    return min(f(v) + 2 * m * delta * worst, 1.0)


def naive_epsilon(m: int, r: int, v: int, delta: float, confidence: float) -> float:
    """Largest ε on a 0.01 grid, then a 1e-4 grid, whose naive p-value is still below 1 - confidence."""
    alpha = 1.0 - confidence
    if naive_p_value(m, r, v, 0.0, delta) >= alpha:
        return 0.0
    eps = 0.0
    while naive_p_value(m, r, v, eps + 0.01, delta) < alpha:
        eps += 0.01
    while naive_p_value(m, r, v, eps + 1e-4, delta) < alpha:
        eps += 1e-4
    return eps


@pytest.mark.parametrize(
    "m, r, v, delta, published",
    [
        (1000, 100, 75, 1e-4, 0.673),  # arXiv:2305.08846v1, Appendix D (p. 46)
        (100_000, 1510, 1439, 1e-5, 2.675),  # arXiv:2305.08846v1, p. 28 (printed truncated)
    ],
)
def test_reproduces_the_papers_published_values(m, r, v, delta, published):
    eps = epsilon_lower_bound(canaries=m, guesses=r, correct=v, delta=delta, confidence=0.95)
    assert abs(eps - published) < 1e-3


@pytest.mark.parametrize("r, confidence", [(10, 0.95), (20, 0.95), (300, 0.99)])
def test_all_correct_pure_dp_has_a_closed_form(r, confidence):
    # δ = 0, v = r: P[Binomial(r, q) >= r] = q^r = 1 - confidence  =>  q = (1 - confidence)^(1/r), ε = logit(q)
    q = (1.0 - confidence) ** (1.0 / r)
    expected = math.log(q / (1.0 - q))
    eps = epsilon_lower_bound(canaries=2 * r, guesses=r, correct=r, delta=0.0, confidence=confidence)
    assert eps == pytest.approx(expected, abs=1e-8)


@pytest.mark.parametrize("m, r, v", [(100, 40, 30), (1000, 500, 320), (50, 12, 11)])
def test_pure_dp_matches_the_binomial_tail_solved_in_q(m, r, v):
    # δ = 0: solve P[Binomial(r, q) >= v] = 0.05 for the coin's bias q directly, then ε = log(q / (1 - q))
    q = optimize.brentq(lambda q: stats.binom.sf(v - 1, r, q) - 0.05, 0.5, 1 - 1e-15, xtol=1e-15)
    eps = epsilon_lower_bound(canaries=m, guesses=r, correct=v, delta=0.0)
    assert eps == pytest.approx(math.log(q / (1 - q)), abs=1e-7)


@pytest.mark.parametrize(
    "m, r, v, delta",
    [
        (1000, 100, 75, 1e-4),
        (200, 60, 50, 1e-3),
        (50, 50, 45, 1e-2),  # 2mδ = 1
        (400, 120, 100, 5e-3),  # 2mδ = 4 > 1: the δ term's window weights exceed the tail's
        (300, 300, 200, 0.0),
        (100, 20, 12, 1e-5),  # too few right guesses: ε̂ = 0
    ],
)
def test_matches_a_naive_grid_search(m, r, v, delta):
    ours = epsilon_lower_bound(canaries=m, guesses=r, correct=v, delta=delta)
    naive = naive_epsilon(m, r, v, delta, 0.95)
    assert naive <= ours + 1e-9 < naive + 1e-4 + 1e-9
    if v == 12:
        assert ours == 0.0


def test_p_value_matches_the_naive_formula_and_rises_with_epsilon():
    rng = np.random.default_rng(0)
    for _ in range(30):
        m = int(rng.integers(10, 400))
        r = int(rng.integers(1, m + 1))
        v = int(rng.integers(0, r + 1))
        delta = float(rng.choice([0.0, 1e-5, 1e-3, 1e-2]))
        grid = np.linspace(0.0, 8.0, 41)
        ours = [one_run_p_value(canaries=m, guesses=r, correct=v, epsilon=e, delta=delta) for e in grid]
        naive = [naive_p_value(m, r, v, e, delta) for e in grid]
        np.testing.assert_allclose(ours, naive, rtol=1e-9, atol=1e-12)
        below_half = np.array(ours) < 0.5  # the region where the docstring proves monotonicity
        steps = np.diff(ours)
        assert np.all(steps[below_half[1:]] >= -1e-12)


@pytest.mark.parametrize("r, eps0, delta", [(200, 1.0, 0.0), (100, 2.0, 0.0), (200, 1.0, 1e-3)])
def test_error_rate_on_randomized_response_is_at_most_one_minus_confidence(r, eps0, delta):
    # Each guess of an (ε0, δ)-DP randomized response (reveal the bit w.p. δ, else ε0-RR) is right w.p.
    # δ + (1 - δ)·e^ε0/(1 + e^ε0), independently: the number right is exactly Binomial(r, that). Sum the
    # probability of every count whose ε̂ exceeds ε0: the bound's exact error rate.
    p_right = delta + (1 - delta) * special.expit(eps0)
    error = sum(
        stats.binom.pmf(v, r, p_right)
        for v in range(r + 1)
        if epsilon_lower_bound(canaries=r, guesses=r, correct=v, delta=delta) > eps0
    )
    assert error <= 0.05
    if delta == 0.0:  # pure ε-RR is the worst case the test is built on: the level is nearly used up
        assert error > 0.03


def test_no_guesses_or_chance_accuracy_give_zero():
    assert epsilon_lower_bound(canaries=10, guesses=0, correct=0, delta=0.0) == 0.0
    assert epsilon_lower_bound(canaries=1000, guesses=1000, correct=500, delta=1e-5) == 0.0


def test_more_confidence_or_more_delta_lowers_the_bound():
    base = epsilon_lower_bound(canaries=1000, guesses=400, correct=360, delta=1e-5, confidence=0.95)
    assert epsilon_lower_bound(canaries=1000, guesses=400, correct=360, delta=1e-5, confidence=0.99) < base
    assert epsilon_lower_bound(canaries=1000, guesses=400, correct=360, delta=1e-2, confidence=0.95) < base
    assert epsilon_lower_bound(canaries=1000, guesses=400, correct=360, delta=0.0, confidence=0.95) > base


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"canaries": 0, "guesses": 0, "correct": 0}, "canaries"),
        ({"canaries": 10.0, "guesses": 5, "correct": 5}, "canaries must be an int"),
        ({"canaries": True, "guesses": 1, "correct": 1}, "canaries must be an int"),
        ({"canaries": 10, "guesses": 11, "correct": 5}, "guesses"),
        ({"canaries": 10, "guesses": 5, "correct": 6}, "correct"),
        ({"canaries": 10, "guesses": 5, "correct": -1}, "correct"),
        ({"canaries": 10, "guesses": 5, "correct": 5, "delta": 1.0}, "delta"),
        ({"canaries": 10, "guesses": 5, "correct": 5, "delta": -1e-5}, "delta"),
        ({"canaries": 10, "guesses": 5, "correct": 5, "delta": math.nan}, "delta"),
        ({"canaries": 10, "guesses": 5, "correct": 5, "confidence": 1.0}, "confidence"),
        ({"canaries": 10, "guesses": 5, "correct": 5, "confidence": 0.3}, "confidence"),
    ],
)
def test_rejects_bad_input(kwargs, match):
    kwargs = {"delta": 1e-5, **kwargs}
    with pytest.raises(ValueError, match=match):
        epsilon_lower_bound(**kwargs)


def test_p_value_rejects_bad_epsilon():
    for eps in (-0.1, math.inf, math.nan):
        with pytest.raises(ValueError, match="epsilon"):
            one_run_p_value(canaries=10, guesses=5, correct=5, epsilon=eps, delta=0.0)
