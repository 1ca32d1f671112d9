"""Incremental RDP accountant and PRV helper, checked against opacus' own accountants and exact Gaussian DP."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from opacus.accountants import RDPAccountant, create_accountant
from opacus.accountants.analysis.rdp import _compute_rdp, compute_rdp
from opacus.accountants.utils import get_noise_multiplier
from scipy import optimize, stats

from adaptive_dp.accountants.rdp import (
    DEFAULT_ORDERS,
    IncrementalRDPAccountant,
    epsilon_from_rdp,
    prv_epsilon,
    rdp_sampled_gaussian,
)

ORDERS = np.array(DEFAULT_ORDERS)


def gaussian_dp_epsilon(sigmas: list[float], *, delta: float) -> float:
    """Exact ε at δ of composed full-batch Gaussian mechanisms: μ-GDP with μ = √Σ 1/σᵢ² (Dong, Roth, Su 2019)."""
    mu = math.sqrt(sum(1.0 / s**2 for s in sigmas))

    def delta_of(eps: float) -> float:
        return stats.norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * stats.norm.cdf(-eps / mu - mu / 2)

    return optimize.brentq(lambda e: delta_of(e) - delta, 0.0, 200.0, xtol=1e-12)


@pytest.mark.parametrize(
    "q, sigma",
    [(0.01, 1.0), (0.004, 0.6), (0.04, 1.5), (0.1, 0.8), (0.25, 3.0), (0.002, 5.0), (0.5, 2.0), (1.0, 1.3)],
)
def test_rdp_matches_opacus_compute_rdp(q, sigma):
    ours = rdp_sampled_gaussian(sample_rate=q, noise_multiplier=sigma, orders=ORDERS)
    ref = np.array(compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=list(DEFAULT_ORDERS)))
    # both compute log A_α = (α - 1) · ρ with A ≈ 1 in float64, summing up to ~10³ series terms in a different
    # order: they agree to 1e-12 relative on A (≤ 1e-10 relative on ρ wherever ρ ≥ 0.01 nats)
    tol = 1e-12 * np.maximum(1.0, np.abs(ref) * (ORDERS - 1))
    assert np.all(np.abs(ours - ref) * (ORDERS - 1) <= tol)
    big = ref > 1e-2
    np.testing.assert_allclose(ours[big], ref[big], rtol=1e-10, atol=0)


def test_rdp_vectorised_over_sigma_equals_scalar_calls():
    sigmas = np.array([0.7, 1.0, 2.5, 9.0])
    matrix = rdp_sampled_gaussian(sample_rate=0.02, noise_multiplier=sigmas, orders=ORDERS)
    assert matrix.shape == (4, ORDERS.size)
    for row, s in zip(matrix, sigmas):
        np.testing.assert_allclose(
            row, rdp_sampled_gaussian(sample_rate=0.02, noise_multiplier=float(s)), rtol=1e-13
        )


@pytest.mark.parametrize("q, sigma, alpha", [(0.01, 20.0, 1.5), (0.001, 50.0, 1.1), (1e-4, 1.0, 1.1)])
def test_rdp_no_less_accurate_than_opacus_against_exact_integral(q, sigma, alpha):
    """Where ρ is tiny both lose digits to float cancellation; ours is at least as close to the truth."""
    mp = pytest.importorskip("mpmath")
    mp.mp.dps = 40
    qm, sm, am = mp.mpf(q), mp.mpf(sigma), mp.mpf(alpha)

    def integrand(z):  # A_α = E_{z~N(0,σ²)}[((1-q) + q e^{(2z-1)/(2σ²)})^α]  (Mironov et al. 2019, eq. 3)
        return mp.npdf(z, 0, sm) * ((1 - qm) + qm * mp.exp((2 * z - 1) / (2 * sm**2))) ** am

    exact = float(mp.log(mp.quad(integrand, [-mp.inf, -10 * sm, 0, 10 * sm, mp.inf])) / (am - 1))
    ours = float(rdp_sampled_gaussian(sample_rate=q, noise_multiplier=sigma, orders=[alpha])[0])
    theirs = _compute_rdp(q, sigma, alpha)
    assert abs(ours - exact) <= abs(theirs - exact) + 1e-15
    assert abs(ours - exact) / exact < 1e-5


def test_rdp_special_cases_and_errors():
    assert np.all(rdp_sampled_gaussian(sample_rate=0.0, noise_multiplier=1.0) == 0)
    assert np.all(np.isinf(rdp_sampled_gaussian(sample_rate=0.1, noise_multiplier=0.0)))
    np.testing.assert_allclose(
        rdp_sampled_gaussian(sample_rate=1.0, noise_multiplier=2.0), ORDERS / 8, rtol=1e-15
    )
    with pytest.raises(ValueError, match="sample_rate"):
        rdp_sampled_gaussian(sample_rate=1.5, noise_multiplier=1.0)
    with pytest.raises(ValueError, match="noise_multiplier"):
        rdp_sampled_gaussian(sample_rate=0.1, noise_multiplier=-1.0)
    with pytest.raises(ValueError, match="orders"):
        rdp_sampled_gaussian(sample_rate=0.1, noise_multiplier=1.0, orders=[0.5, 2])


def test_epsilon_equals_opacus_rdp_accountant_on_random_sigma_histories():
    rng = np.random.default_rng(0)
    for q in (0.01, 0.05):
        ours, theirs = IncrementalRDPAccountant(), RDPAccountant()
        for sigma in rng.uniform(0.6, 3.0, size=25):
            for acc in (ours, theirs):
                acc.step(noise_multiplier=float(sigma), sample_rate=q)
        ours.step(noise_multiplier=1.0, sample_rate=q)  # repeated σ: merged history entry, as opacus
        ours.step(noise_multiplier=1.0, sample_rate=q)
        theirs.step(noise_multiplier=1.0, sample_rate=q)
        theirs.step(noise_multiplier=1.0, sample_rate=q)
        assert ours.history == theirs.history and len(ours) == len(theirs) == 26
        for delta in (1e-5, 1e-3):
            eps, alpha = ours.get_privacy_spent(delta=delta)
            ref_eps, ref_alpha = theirs.get_privacy_spent(delta=delta)
            assert abs(eps - ref_eps) <= 1e-9 * ref_eps and alpha == ref_alpha
        custom = [2, 4.5, 8, 16, 32]  # other orders: recomputed from the history
        assert ours.get_epsilon(1e-5, alphas=custom) == pytest.approx(
            theirs.get_epsilon(1e-5, alphas=custom), rel=1e-9
        )


def test_opacus_pinned_value():
    """opacus' own test value: σ 1.5, q 0.04, 2250 steps, δ 1e-5 → RDP ε 7.32911."""
    acc = IncrementalRDPAccountant()
    for _ in range(2250):
        acc.step(noise_multiplier=1.5, sample_rate=0.04)
    assert acc.history == [(1.5, 0.04, 2250)]
    assert acc.get_epsilon(delta=1e-5) == pytest.approx(7.32911, abs=5e-6)


def test_q1_oracle_rdp_above_exact_and_prv_close():
    """σ = 2 for 50 steps then σ = 4 for 50 steps at q = 1: exact ε 23.9954 at δ 1e-5 (Gaussian DP)."""
    sigmas = [2.0] * 50 + [4.0] * 50
    exact = gaussian_dp_epsilon(sigmas, delta=1e-5)
    assert exact == pytest.approx(23.9954, abs=1e-4)
    acc = IncrementalRDPAccountant()
    for s in sigmas:
        acc.step(noise_multiplier=s, sample_rate=1.0)
    assert acc.get_epsilon(1e-5) > exact
    prv = prv_epsilon(acc.history, delta=1e-5)
    assert abs(prv - exact) < 0.05 and prv >= exact - 1e-3


def test_prv_grouping_never_under_reports():
    """Grouping σ on the grid charges each cell at its smallest σ: ε stays above the exact value (q = 1 oracle)."""
    rng = np.random.default_rng(1)
    sigmas = rng.uniform(3.0, 6.0, size=60)
    history = [(float(s), 1.0, 1) for s in sigmas]
    exact = gaussian_dp_epsilon(list(sigmas), delta=1e-5)
    coarse = prv_epsilon(history, delta=1e-5, grid_ratio=1.2)
    log_r = math.log(1.2)
    cell_min: dict[int, float] = {}
    for s in sigmas:
        k = math.floor(math.log(s) / log_r)
        cell_min[k] = min(cell_min.get(k, math.inf), s)
    grouped = gaussian_dp_epsilon([cell_min[math.floor(math.log(s) / log_r)] for s in sigmas], delta=1e-5)
    assert grouped > exact
    assert exact - 1e-3 <= coarse <= grouped + 0.05
    assert abs(coarse - grouped) < 0.05


def test_prv_epsilon_errors():
    with pytest.raises(ValueError, match="grid_ratio"):
        prv_epsilon([(1.0, 0.1, 1)], delta=1e-5, grid_ratio=1.0)
    with pytest.raises(ValueError, match="delta"):
        prv_epsilon([(1.0, 0.1, 1)], delta=0.0)
    assert prv_epsilon([], delta=1e-5) == 0.0


def test_registered_in_opacus_registry_without_replacing_rdp():
    assert isinstance(create_accountant("rdp_incremental"), IncrementalRDPAccountant)
    assert type(create_accountant("rdp")) is RDPAccountant
    assert IncrementalRDPAccountant.mechanism() == "rdp_incremental"


@pytest.mark.filterwarnings("ignore:Optimal order is the")
def test_history_set_from_outside_is_followed():
    """opacus' get_noise_multiplier sets ``accountant.history`` directly; the running vector follows it."""
    kwargs = dict(target_epsilon=3.0, target_delta=1e-5, sample_rate=0.02, steps=500)
    assert get_noise_multiplier(**kwargs, accountant="rdp_incremental") == get_noise_multiplier(
        **kwargs, accountant="rdp"
    )
    acc = IncrementalRDPAccountant()
    acc.step(noise_multiplier=1.0, sample_rate=0.1)
    acc.history = [(2.0, 0.1, 7)]
    ref = RDPAccountant()
    ref.history = [(2.0, 0.1, 7)]
    assert acc.get_epsilon(1e-5) == pytest.approx(ref.get_epsilon(1e-5), rel=1e-9) and acc.steps == 7


def test_state_dict_round_trip_is_exact(tmp_path):
    rng = np.random.default_rng(2)
    acc = IncrementalRDPAccountant()
    for s in rng.uniform(0.8, 2.0, size=25):
        acc.step(noise_multiplier=float(s), sample_rate=0.03)
    torch.save(acc.state_dict(), tmp_path / "acc.pt")
    loaded = IncrementalRDPAccountant()
    loaded.load_state_dict(torch.load(tmp_path / "acc.pt", weights_only=True))
    assert loaded.history == acc.history and loaded.steps == acc.steps
    assert np.array_equal(loaded.rdp, acc.rdp)
    for a in (acc, loaded):
        a.step(noise_multiplier=1.1, sample_rate=0.03)
    assert loaded.get_epsilon(1e-5) == acc.get_epsilon(1e-5)
    with pytest.raises(ValueError, match="mechanism"):
        loaded.load_state_dict(RDPAccountant().state_dict())


def test_works_inside_opacus_privacy_engine():
    from opacus import PrivacyEngine

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    data = torch.utils.data.TensorDataset(torch.randn(64, 4), torch.randint(0, 2, (64,)))
    loader = torch.utils.data.DataLoader(data, batch_size=16)
    engine = PrivacyEngine(accountant="rdp_incremental")
    model, opt, loader = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=loader,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
    )
    for i, (x, y) in enumerate(loader):
        opt.noise_multiplier = 1.0 + 0.1 * i  # a different σ every step
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    ref = RDPAccountant()
    ref.history = list(engine.accountant.history)
    assert len(engine.accountant.history) == 4
    assert engine.get_epsilon(1e-5) == pytest.approx(ref.get_epsilon(1e-5), rel=1e-9)


def test_epsilon_from_rdp_matches_opacus_conversion():
    rdp = rdp_sampled_gaussian(sample_rate=0.02, noise_multiplier=1.1) * 800
    ref = RDPAccountant()
    ref.history = [(1.1, 0.02, 800)]
    assert epsilon_from_rdp(rdp, delta=1e-5)[0] == pytest.approx(ref.get_epsilon(1e-5), rel=1e-9)
    with pytest.raises(ValueError, match="delta"):
        epsilon_from_rdp(rdp, delta=2.0)
