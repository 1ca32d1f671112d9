"""Variational MI bounds, MINE training and the generic estimator, checked against independent truths.

Truths used: hand-computed bound values on tiny score sets; the analytic MI of correlated Gaussians,
−d/2·log(1−ρ²) nats (Cover & Thomas, Sec. 8.5 / Eq. 8.56), which invertible per-coordinate maps leave
unchanged; zero MI for independent variables.
"""

from __future__ import annotations

import math
import time

import pytest
import torch

from adaptive_dp.leakage.critics import build_critic
from adaptive_dp.leakage.mine import (
    MIEstimate,
    MINETrainer,
    dv_lower_bound,
    estimate_mi,
    estimate_mi_detailed,
    gaussianise,
    infonce_lower_bound,
    mine_loss,
    smile_lower_bound,
)

N = 20_000


def correlated_gaussians(
    d: int, rho: float, *, n: int = N, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """x ~ N(0, I_d), z = ρx + √(1−ρ²)ε: each coordinate pair has correlation ρ; MI = −d/2·log(1−ρ²)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    z = rho * x + math.sqrt(1 - rho**2) * torch.randn(n, d, generator=g)
    return x, z


def true_mi(d: int, rho: float) -> float:
    return -d / 2 * math.log(1 - rho**2)


def assert_close_to_truth(estimate: float, truth: float) -> None:
    assert abs(estimate - truth) <= max(0.1 * truth, 0.05), f"estimate {estimate:.4f} vs truth {truth:.4f}"


# ------------------------------------------------------------------------------------------------
# Bound functions against hand-computed values
# ------------------------------------------------------------------------------------------------


def test_dv_bound_hand_computed():
    t_joint = torch.tensor([1.0, 2.0, 3.0])
    t_marginal = torch.tensor([0.0, math.log(3.0)])
    # mean(t_joint) = 2; log mean(e^t) = log((1 + 3) / 2) = log 2
    assert float(dv_lower_bound(t_joint, t_marginal)) == pytest.approx(2.0 - math.log(2.0), abs=1e-6)


def test_dv_bound_stable_for_large_scores():
    value = dv_lower_bound(torch.tensor([1000.0]), torch.tensor([1000.0, 1000.0]))
    assert float(value) == pytest.approx(0.0, abs=1e-4)


def test_infonce_hand_computed_and_capped_at_log_n():
    s = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    hand = ((2 - math.log(math.e**2 + 1)) + (1 - math.log(1 + math.e))) / 2 + math.log(2)
    assert float(infonce_lower_bound(s)) == pytest.approx(hand, abs=1e-6)
    confident = 1e4 * torch.eye(5)
    assert float(infonce_lower_bound(confident)) == pytest.approx(math.log(5), abs=1e-6)
    assert float(infonce_lower_bound(torch.zeros(5, 5))) == pytest.approx(0.0, abs=1e-6)


def test_smile_hand_computed_clips_the_log_term_only():
    s = torch.tensor([[3.0, 10.0], [-10.0, 2.0]])
    hand = 2.5 - math.log((math.exp(5.0) + math.exp(-5.0)) / 2)
    assert float(smile_lower_bound(s, clip=5.0)) == pytest.approx(hand, abs=1e-5)
    # with a clip above every |score|, SMILE's value is the plain DV bound on the off-diagonal pairs
    unclipped = float(smile_lower_bound(s, clip=100.0))
    assert unclipped == pytest.approx(
        float(dv_lower_bound(s.diagonal(), torch.tensor([10.0, -10.0]))), abs=1e-5
    )


def test_mine_loss_value_and_ema_corrected_gradient():
    t_joint = torch.tensor([0.5, 1.5], requires_grad=True)
    t_marg = torch.tensor([0.0, math.log(3.0)], requires_grad=True)
    old = torch.tensor(math.log(4.0))
    loss, new = mine_loss(t_joint, t_marg, log_ema=old, ema_decay=0.75)
    # value: -(mean joint - log mean e^T) = -(1 - log 2)
    assert loss.item() == pytest.approx(-(1.0 - math.log(2.0)), abs=1e-6)
    ema = 0.75 * 4.0 + 0.25 * 2.0  # moving average of E_marg[e^T]
    assert float(new) == pytest.approx(math.log(ema), abs=1e-6)
    loss.backward()
    # d loss / d t_marg_j = e^{t_j} / (M · EMA); d loss / d t_joint_i = -1 / N
    assert t_marg.grad.tolist() == pytest.approx([1.0 / (2 * ema), 3.0 / (2 * ema)], abs=1e-6)
    assert t_joint.grad.tolist() == pytest.approx([-0.5, -0.5], abs=1e-6)


def test_mine_loss_without_ema_is_the_plain_dv_gradient():
    t_marg = torch.tensor([0.3, -0.2, 1.0], requires_grad=True)
    t_joint = torch.tensor([0.7, 0.1])
    loss, _ = mine_loss(t_joint, t_marg, log_ema=None, ema_decay=0.9)
    loss.backward()
    reference = t_marg.detach().clone().requires_grad_(True)
    (-dv_lower_bound(t_joint, reference)).backward()
    torch.testing.assert_close(t_marg.grad, reference.grad)


@pytest.mark.parametrize(
    "call",
    [
        lambda: dv_lower_bound(torch.zeros(0), torch.zeros(3)),
        lambda: dv_lower_bound(torch.zeros(2, 2), torch.zeros(3)),
        lambda: infonce_lower_bound(torch.zeros(2, 3)),
        lambda: infonce_lower_bound(torch.zeros(1, 1)),
        lambda: smile_lower_bound(torch.zeros(3, 3), clip=0.0),
        lambda: mine_loss(torch.zeros(2), torch.zeros(2), log_ema=None, ema_decay=1.0),
    ],
)
def test_bound_functions_reject_bad_input(call):
    with pytest.raises(ValueError):
        call()


# ------------------------------------------------------------------------------------------------
# Generic estimator against analytic MI
# ------------------------------------------------------------------------------------------------

GAUSSIAN_CASES = [(1, 0.45), (2, 0.8), (5, 0.7), (10, 0.5)]  # true MI 0.11, 1.02, 1.68, 1.44 nats


@pytest.mark.parametrize("d, rho", GAUSSIAN_CASES)
def test_estimate_mi_correlated_gaussians(d, rho):
    x, z = correlated_gaussians(d, rho)
    start = time.process_time()
    est = estimate_mi_detailed(x, z, seed=0)
    print(
        f"d={d} rho={rho}: true {true_mi(d, rho):.4f} est {est.mi:.4f} ± {est.stderr:.4f} "
        f"({time.process_time() - start:.2f} s CPU)"
    )
    assert_close_to_truth(est.mi, true_mi(d, rho))
    assert est.n == N // 2 and est.method == "mine" and est.critic_gap > 0 and 0 < est.stderr < 0.05


@pytest.mark.parametrize("d, rho", [(2, 0.8), pytest.param(5, 0.7, marks=pytest.mark.slow)])
def test_estimate_mi_invariant_under_nonlinear_marginal_maps(d, rho):
    x, z = correlated_gaussians(d, rho, seed=1)
    warped = estimate_mi(x + x**3, torch.sinh(z), seed=0)
    assert_close_to_truth(warped, true_mi(d, rho))
    # the Gaussian formula on the warped samples' correlation would be far off: the test is not trivial
    r = torch.corrcoef(torch.stack([(x + x**3)[:, 0], torch.sinh(z)[:, 0]]))[0, 1].item()
    assert abs(-d / 2 * math.log(1 - r**2) - true_mi(d, rho)) > 0.1 * true_mi(d, rho)


def test_estimate_mi_independent_variables_below_threshold():
    g = torch.Generator().manual_seed(2)
    x, z = torch.randn(N, 5, generator=g), torch.randn(N, 3, generator=g) ** 3
    est = estimate_mi_detailed(x, z, seed=0)
    assert est.mi < 0.05


@pytest.mark.parametrize("method", ["infonce", "smile"])
def test_estimate_mi_other_bounds(method):
    x, z = correlated_gaussians(2, 0.8, seed=3)
    est = estimate_mi_detailed(x, z, seed=0, method=method)
    assert est.method == method
    assert_close_to_truth(est.mi, true_mi(2, 0.8))
    if method == "infonce":
        assert est.cap is not None and est.mi <= est.cap


def test_estimate_mi_is_deterministic_and_seeded():
    x, z = correlated_gaussians(2, 0.6, n=2000, seed=4)
    state = torch.random.get_rng_state()
    a = estimate_mi(x, z, seed=5, steps=100)
    assert torch.equal(state, torch.random.get_rng_state())  # the global RNG is left alone
    assert a == estimate_mi(x, z, seed=5, steps=100)
    assert a != estimate_mi(x, z, seed=6, steps=100)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_estimate_mi_runs_on_the_inputs_device():
    x, z = correlated_gaussians(2, 0.8, seed=3)
    est = estimate_mi_detailed(x.cuda(), z.cuda(), seed=0)
    assert_close_to_truth(est.mi, true_mi(2, 0.8))


@pytest.mark.parametrize(
    "x, z, match",
    [
        (torch.zeros(100), torch.zeros(100, 1), "2-D"),
        (torch.zeros(100, 2), torch.zeros(99, 2), "same number of rows"),
        (torch.full((100, 2), math.nan), torch.zeros(100, 2), "NaN or inf"),
        (torch.zeros(100, 2), torch.full((100, 2), math.inf), "NaN or inf"),
        (torch.zeros(10, 2), torch.zeros(10, 2), "at least 64"),
        (torch.zeros(100, 0), torch.zeros(100, 2), "at least one column"),
    ],
)
def test_estimate_mi_rejects_bad_input(x, z, match):
    with pytest.raises(ValueError, match=match):
        estimate_mi(x, z)


def test_estimate_mi_rejects_bad_options():
    x, z = correlated_gaussians(1, 0.5, n=200)
    with pytest.raises(ValueError, match="unknown method"):
        estimate_mi(x, z, method="nwj")
    with pytest.raises(ValueError, match="unknown critic"):
        estimate_mi(x, z, critic="transformer")
    with pytest.raises(ValueError, match="train_fraction"):
        estimate_mi(x, z, train_fraction=1.0)


def test_gaussianise_is_rank_based_and_handles_ties():
    x = torch.randn(500, 3, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(gaussianise(x), gaussianise(x + x**3))  # invariant to increasing maps
    out = gaussianise(x)
    assert abs(float(out.mean())) < 0.05 and abs(float(out.std()) - 1) < 0.05
    const = gaussianise(torch.ones(10, 1))
    assert torch.all(const == 0)  # all tied: average rank, the median, Φ⁻¹(1/2) = 0
    ties = gaussianise(torch.tensor([[0.0], [1.0], [1.0], [2.0]]))
    assert ties[1, 0] == ties[2, 0] == 0


# ------------------------------------------------------------------------------------------------
# MINETrainer: warm start and state
# ------------------------------------------------------------------------------------------------


def _trainer(method: str = "mine") -> MINETrainer:
    return MINETrainer(
        build_critic("separable", 2, 2, seed=0), method=method, lr=2e-3, batch_size=128, seed=0
    )


@pytest.mark.parametrize("method", ["mine", "infonce", "smile"])
def test_trainer_warm_start_learns_and_reports_on_held_out(method):
    x, z = correlated_gaussians(2, 0.8, n=4000, seed=8)
    trainer = _trainer(method)
    before = trainer.evaluate(x[2000:], z[2000:])
    for _ in range(6):  # a few steps per reading, as the monitor does
        trainer.update(x[:2000], z[:2000], steps=25)
    after = trainer.evaluate(x[2000:], z[2000:])
    assert isinstance(after, MIEstimate) and after.n == 2000
    assert after.mi > before.mi + 0.3 and after.critic_gap > 0
    assert after.mi < true_mi(2, 0.8) + 3 * after.stderr  # held-out bound does not overshoot


def test_trainer_state_dict_round_trip_resumes_exactly():
    x, z = correlated_gaussians(2, 0.8, n=1000, seed=9)
    a = _trainer()
    a.update(x, z, steps=10)
    state = a.state_dict()
    assert state["log_ema"] is not None and state["steps_done"] == 10
    a.update(x, z, steps=5)
    b = _trainer()
    b.load_state_dict(state)
    b.update(x, z, steps=5)
    for pa, pb in zip(a.critic.parameters(), b.critic.parameters()):
        assert torch.equal(pa, pb)
    assert a.evaluate(x, z) == b.evaluate(x, z)
    with pytest.raises(ValueError, match="method"):
        _trainer("infonce").load_state_dict(state)


def test_concat_critic_works_with_the_trainer():
    x, z = correlated_gaussians(2, 0.8, n=4000, seed=10)
    critic = build_critic("concat", 2, 2, hidden=32, seed=0)
    trainer = MINETrainer(critic, method="infonce", batch_size=64, lr=3e-3, seed=0)
    trainer.update(x[:2000], z[:2000], steps=150)
    est = trainer.evaluate(x[2000:], z[2000:], block_size=256)
    assert 0.5 * true_mi(2, 0.8) < est.mi < true_mi(2, 0.8) + 3 * est.stderr


@pytest.mark.slow
@pytest.mark.parametrize("d, rho", [(1, 0.9), (5, 0.5), (5, 0.75), (20, 0.3)])
def test_estimate_mi_harder_cases(d, rho):
    x, z = correlated_gaussians(d, rho, seed=11)
    assert_close_to_truth(estimate_mi(x, z, seed=0), true_mi(d, rho))
