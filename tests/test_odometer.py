"""Rényi privacy odometer: hand-computed values, the defining inequality (Eq. 3), never below opacus' composition,
a Monte-Carlo check of the guarantee against adaptive adversaries, overhead on realistic runs, state, validation."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opacus.accountants import RDPAccountant

from adaptive_dp.accountants.odometer import RenyiOdometer, epsilon_from_rdp_mixture, log_uniform_weights
from adaptive_dp.accountants.rdp import DEFAULT_ORDERS, IncrementalRDPAccountant

ORDERS = np.array(DEFAULT_ORDERS)


def _max_log_violation(eps: float, rdp, orders, weights, delta: float) -> float:
    """max over ℓ > ε of log(1 − e^{ε−ℓ}) − log δ − log Σ_j w_j e^{(α_j−1)(ℓ−R_j)}: ≤ 0 iff Eq. 3 holds at ε.

    A plain two-stage grid search over ℓ (independent of the module's Newton solver).
    """
    rdp, orders, weights = (np.asarray(v, dtype=np.float64) for v in (rdp, orders, weights))
    keep = np.isfinite(rdp) & (weights > 0)
    a1, log_w, r = orders[keep] - 1, np.log(weights[keep]), rdp[keep]

    def worst(gaps: np.ndarray) -> tuple[float, float]:
        ell = eps + gaps
        z = log_w[:, None] + a1[:, None] * (ell[None, :] - r[:, None])
        top = z.max(axis=0)
        log_rhs = math.log(delta) + top + np.log(np.exp(z - top).sum(axis=0))
        values = np.log(-np.expm1(-gaps)) - log_rhs
        i = int(np.argmax(values))
        return float(values[i]), float(gaps[i])

    coarse = np.geomspace(1e-5, 40.0, 4001)
    best, at = worst(coarse)
    step = at * (coarse[1] / coarse[0] - 1)
    fine = np.linspace(max(at - 2 * step, 1e-7), at + 2 * step, 4001)
    return max(best, worst(fine)[0])


# ------------------------------------------------------------------------------------------- hand-computed values


def test_single_order_hand_computed_q1():
    # q = 1: one Gaussian step costs RDP α/(2σ²) (Mironov 2017). Steps σ = 1, 1, 2, 2 at α = 10:
    # R = 2 · 10/(2·1²) + 2 · 10/(2·2²) = 10 + 2.5 = 12.5 nats.
    # One order with weight 1: Eq. 3 reduces to Balle et al. 2020 Thm 21,
    # ε = R + log(1 − 1/α) + (log(1/δ) − log α)/(α − 1) = 12.5 + log 0.9 + (log 1e5 − log 10)/9 = 13.41801…
    odometer = RenyiOdometer(orders=(10.0,))
    for sigma in (1.0, 1.0, 2.0, 2.0):
        odometer.step(noise_multiplier=sigma, sample_rate=1.0)
    assert odometer.rdp[0] == pytest.approx(12.5, rel=1e-12)
    expected = 12.5 + math.log(0.9) + (math.log(1e5) - math.log(10.0)) / 9.0
    assert expected == pytest.approx(13.418010636784, abs=1e-11)
    assert odometer.get_epsilon(1e-5) == pytest.approx(expected, rel=1e-12)


def test_two_orders_hand_bracket_and_touching():
    # Same run, orders 2 and 10 with prior ½ each: R = (2 · 1.25, 10 · 1.25) = (2.5, 12.5).
    # Per order, Balle's ε at δ = 1e-5:   α = 2: 2.5 + log ½ + (log 1e5 − log 2)/1 = 12.626631
    #                                     α = 10: 12.5 + log 0.9 + (log 1e5 − log 10)/9 = 13.418011
    # the mixture lies between the best order at δ (12.626631) and the union bound at δ/2 (12.626631 + log 2).
    odometer = RenyiOdometer(orders=(2.0, 10.0), weights=(0.5, 0.5))
    odometer.step(noise_multiplier=1.0, sample_rate=1.0, steps=2)
    odometer.step(noise_multiplier=2.0, sample_rate=1.0, steps=2)
    np.testing.assert_allclose(odometer.rdp, [2.5, 12.5], rtol=1e-12)
    eps = odometer.get_epsilon(1e-5)
    best_order = 2.5 + math.log(0.5) + (math.log(1e5) - math.log(2.0))
    assert best_order == pytest.approx(12.626631, abs=1e-6)
    assert best_order < eps < best_order + math.log(2.0)
    # Eq. 3 holds at ε and touches: any smaller ε violates it somewhere
    assert _max_log_violation(eps, odometer.rdp, odometer.orders, odometer.weights, 1e-5) <= 1e-9
    assert _max_log_violation(eps - 1e-4, odometer.rdp, odometer.orders, odometer.weights, 1e-5) > 1e-6


def test_log_uniform_weights_are_normalised_density():
    w = log_uniform_weights(ORDERS)
    assert w.sum() == pytest.approx(1.0, rel=1e-12) and np.all(w > 0)
    # density 1/(α − 1) per unit α: mass ratio of two equal-spacing orders = inverse ratio of α − 1
    i, j = list(DEFAULT_ORDERS).index(2.0), list(DEFAULT_ORDERS).index(3.0)
    assert w[i] / w[j] == pytest.approx(2.0, rel=1e-12)
    assert log_uniform_weights([5.0]).tolist() == [1.0]


# -------------------------------------------------------------------- properties over adversarial σ sequences

_blocks = st.lists(
    st.tuples(
        st.one_of(st.floats(0.3, 20.0), st.sampled_from([0.5, 1.0, 4.0])),
        st.sampled_from([1e-3, 0.01, 0.1, 1.0]),
        st.integers(1, 300),
    ),
    min_size=1,
    max_size=3,
)


@pytest.mark.filterwarnings("ignore:Optimal order is the")
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(blocks=_blocks, delta=st.sampled_from([1e-6, 1e-5, 1e-3, 0.1]))
def test_never_below_opacus_composition_and_eq3_holds(blocks, delta):
    odometer, opacus = RenyiOdometer(), RDPAccountant()
    previous = 0.0
    for sigma, rate, n in blocks:
        odometer.step(noise_multiplier=sigma, sample_rate=rate, steps=n)
        for _ in range(n):
            opacus.step(noise_multiplier=sigma, sample_rate=rate)
        eps = odometer.get_epsilon(delta)
        assert eps >= previous - 1e-12  # a reading never goes down
        assert _max_log_violation(eps, odometer.rdp, ORDERS, odometer.weights, delta) <= 1e-9
        if eps > 1e-3:  # tight: a slightly smaller ε breaks Eq. 3
            assert _max_log_violation(eps - 1e-4, odometer.rdp, ORDERS, odometer.weights, delta) > 0
        previous = eps
    assert len(odometer) == sum(n for _, _, n in blocks)
    assert odometer.get_epsilon(delta) >= opacus.get_epsilon(delta)


def test_zero_and_infinite_noise():
    odometer = RenyiOdometer()
    assert odometer.get_epsilon(1e-5) == 0.0  # nothing booked
    # σ = inf: the released gradient is pure noise, which costs nothing
    odometer.step(noise_multiplier=math.inf, sample_rate=0.5, steps=10)
    assert odometer.get_epsilon(1e-5) == 0.0 and len(odometer) == 10
    odometer.step(noise_multiplier=1.0, sample_rate=0.0)  # q = 0: no example is touched
    assert odometer.get_epsilon(1e-5) == 0.0
    odometer.step(noise_multiplier=0.0, sample_rate=0.01)  # no noise: no finite guarantee
    assert odometer.get_epsilon(1e-5) == math.inf


# ----------------------------------------------------- the guarantee itself: Monte Carlo on adaptive adversaries


def _hockey_stick_at_stopping(eps_of, mus, *, steps: int, n_paths: int, seed: int) -> float:
    """E_D[(1 − e^{ε_τ − L_τ})_+] for the Gaussian mechanism (q = 1, sensitivity 1) under an adaptive adversary.

    Under D each step releases y = 1 + σ Z, with privacy loss ℓ = μ²/2 + μ Z (μ = 1/σ). ``mus(L, t)`` picks the
    next μ from the loss so far (a function of the outputs: σ chosen adaptively); ``eps_of(counts)`` is the
    reported ε after the steps taken, indexed by how often each μ was used. The adversary stops as soon as the
    loss reaches the reported ε (or after ``steps``). (ε, δ)-DP of the stopped run needs the result ≤ δ.
    """
    rng = np.random.default_rng(seed)
    loss = np.zeros(n_paths)
    counts = np.zeros((n_paths, 2), dtype=np.int64)
    alive = np.ones(n_paths, dtype=bool)
    out = np.zeros(n_paths)
    for t in range(steps):
        choice = mus(loss, t)  # 0 or 1 per path
        mu = np.where(choice == 0, 0.2, 0.5)
        loss = np.where(alive, loss + mu**2 / 2 + mu * rng.standard_normal(n_paths), loss)
        counts[alive, choice[alive]] += 1
        eps = eps_of(counts)
        stop = alive & ((loss >= eps) | (t == steps - 1))
        out[stop] = -np.expm1(eps[stop] - loss[stop])
        alive &= ~stop
    return float(np.maximum(out, 0.0).mean())


def _table(make, steps: int, *, two_sigmas: bool) -> np.ndarray:
    """ε at δ = 0.01 after a steps with σ = 5 (μ = 0.2) and b with σ = 2 (μ = 0.5): table[a, b] (b = 0 only
    unless ``two_sigmas``)."""
    table = np.zeros((steps + 1, steps + 1 if two_sigmas else 1))
    for a in range(steps + 1):
        for b in range(table.shape[1] - a if two_sigmas else 1):
            table[a, b] = make(a, b) if a + b else 0.0
    return table


def _odometer_eps(a: int, b: int) -> float:
    odometer = RenyiOdometer()
    for sigma, n in ((5.0, a), (2.0, b)):
        if n:
            odometer.step(noise_multiplier=sigma, sample_rate=1.0, steps=n)
    return odometer.get_epsilon(0.01)


def _opacus_eps(a: int, b: int) -> float:
    accountant = RDPAccountant()
    accountant.history = [(sigma, 1.0, n) for sigma, n in ((5.0, a), (2.0, b)) if n]
    return accountant.get_epsilon(0.01)


def _always_small_mu(loss: np.ndarray, t: int) -> np.ndarray:
    return np.zeros(loss.shape, dtype=np.int64)


def _large_mu_while_loss_is_low(loss: np.ndarray, t: int) -> np.ndarray:
    return (loss < 0.02 * t + 0.3).astype(np.int64)


# Stopping as soon as the loss reaches the reported ε, the stopped run's hockey-stick divergence at that ε must
# be ≤ δ = 0.01. 200 000 paths: standard error of each estimate ≤ 2.5e-4 (values in [0, 1], mean ≈ 0.01).


def test_composition_is_not_a_guarantee_under_adaptive_stopping():
    # Opacus' composition picks the best order after the fact: at a fixed time Balle's conversion leaves slack
    # (hockey-stick 0.003 at step 50), but stopping adaptively pushes it over δ (measured 0.0126).
    table = _table(_opacus_eps, 50, two_sigmas=False)
    value = _hockey_stick_at_stopping(
        lambda c: table[c[:, 0], 0], _always_small_mu, steps=50, n_paths=200_000, seed=7
    )
    assert value > 1.1 * 0.01


def test_odometer_holds_under_adaptive_stopping():
    table = _table(_odometer_eps, 50, two_sigmas=False)
    value = _hockey_stick_at_stopping(
        lambda c: table[c[:, 0], 0], _always_small_mu, steps=50, n_paths=200_000, seed=7
    )
    assert value <= 0.01


def test_odometer_holds_under_adaptive_sigma_and_stopping():
    # σ chosen from the outputs: σ = 2 (μ = 0.5) while the loss so far is low, σ = 5 (μ = 0.2) once it is high
    table = _table(_odometer_eps, 30, two_sigmas=True)
    value = _hockey_stick_at_stopping(
        lambda c: table[c[:, 0], c[:, 1]], _large_mu_while_loss_is_low, steps=30, n_paths=200_000, seed=7
    )
    assert value <= 0.01


# ------------------------------------------------------------------------------------ overhead on realistic runs

_MNIST_Q, _MNIST_STEPS = 256 / 60000, 1170


def _linear_2_to_06() -> np.ndarray:
    return np.round(np.linspace(2.0, 0.6, _MNIST_STEPS), 2)


def _ceiling_like_decay() -> np.ndarray:
    # shape of the PID run under the 0.5-nat ceiling on MNIST (σ 1.04 → 0.405, mean 0.52, no budget)
    t = np.arange(_MNIST_STEPS)
    return np.round(0.405 + 0.635 * np.exp(-t / 218.0), 3)


@pytest.mark.parametrize(
    ("sigmas", "bound"),
    [(_linear_2_to_06, 1.40), (_ceiling_like_decay, 1.30)],
    ids=["linear-2-to-0.6", "ceiling-like-decay"],
)
def test_overhead_on_realistic_mnist_runs(sigmas, bound):
    # Overhead = odometer ε / plain composition ε (opacus' RDP of the same σ history, not valid under adaptive σ),
    # q = 256/60000, 1170 steps, δ = 1e-5. Measured: 4.040 / 2.979 = 1.356 (linear), 16.81 / 13.75 = 1.223
    # (ceiling-like); the 1.25× aim is met on the second, not on the first (docs/accounting.md: what it costs).
    odometer, composition = RenyiOdometer(), IncrementalRDPAccountant()
    for sigma in sigmas():
        odometer.step(noise_multiplier=float(sigma), sample_rate=_MNIST_Q)
        composition.step(noise_multiplier=float(sigma), sample_rate=_MNIST_Q)
    ratio = odometer.get_epsilon(1e-5) / composition.get_epsilon(1e-5)
    assert 1.0 < ratio <= bound


# --------------------------------------------------------------------------------------- state and validation


def test_state_dict_round_trip_and_resume():
    full, first = RenyiOdometer(), RenyiOdometer()
    for odometer in (full, first):
        odometer.step(noise_multiplier=1.3, sample_rate=0.02, steps=40)
    resumed = RenyiOdometer()
    resumed.load_state_dict(first.state_dict())
    for odometer in (full, resumed):
        odometer.step(noise_multiplier=0.9, sample_rate=0.02, steps=25)
    assert len(resumed) == len(full) == 65
    assert resumed.get_epsilon(1e-5) == full.get_epsilon(1e-5)
    assert resumed.state_dict() == full.state_dict()


def test_load_state_dict_refuses_other_configuration():
    saved = RenyiOdometer(orders=(2.0, 4.0, 8.0)).state_dict()
    with pytest.raises(ValueError, match="other orders or weights"):
        RenyiOdometer().load_state_dict(saved)
    with pytest.raises(ValueError, match="other orders or weights"):
        RenyiOdometer(orders=(2.0, 4.0, 8.0), weights=(0.2, 0.3, 0.5)).load_state_dict(saved)
    with pytest.raises(ValueError, match="not a RenyiOdometer state_dict"):
        RenyiOdometer().load_state_dict({"rdp": []})


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"orders": (2.0, 1.5)}, "strictly increasing"),
        ({"orders": (1.0, 2.0)}, "orders > 1"),
        ({"orders": ()}, "non-empty"),
        ({"orders": (2.0, 3.0), "weights": (0.7, 0.7)}, "sum to at most 1"),
        ({"orders": (2.0, 3.0), "weights": (1.0,)}, "one per order"),
        ({"orders": (2.0, 3.0), "weights": (-0.1, 0.5)}, ">= 0"),
    ],
)
def test_invalid_configuration_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RenyiOdometer(**kwargs)


def test_invalid_step_and_delta_raise_and_book_nothing():
    odometer = RenyiOdometer()
    for kwargs, match in (
        ({"noise_multiplier": -1.0, "sample_rate": 0.1}, "noise_multiplier"),
        ({"noise_multiplier": math.nan, "sample_rate": 0.1}, "noise_multiplier"),
        ({"noise_multiplier": 1.0, "sample_rate": 1.5}, "sample_rate"),
        ({"noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 0}, "steps"),
        ({"noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 2.5}, "steps"),
    ):
        with pytest.raises(ValueError, match=match):
            odometer.step(**kwargs)
    assert len(odometer) == 0 and not odometer.rdp.any()
    for delta in (0.0, 1.0, -1e-5):
        with pytest.raises(ValueError, match="delta"):
            odometer.get_epsilon(delta)
    with pytest.raises(ValueError, match="rdp must hold"):
        epsilon_from_rdp_mixture([1.0, -1.0], orders=(2.0, 3.0), weights=(0.5, 0.5), delta=1e-5)
