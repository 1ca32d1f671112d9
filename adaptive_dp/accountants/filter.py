"""A hard ε budget for an adaptively chosen noise multiplier: the Rényi filter.

Why the accounting stays sound (docs/accounting.md). Composition theorems that add up per-step privacy costs assume the
costs are fixed in advance. When the noise multiplier σ_t of step t is chosen from earlier outputs (a
controller reading leakage measured on the public audit split after the model update θ_t), the sum of the
realised per-step RDP is only an *odometer* reading, not a guarantee. What is valid for such fully adaptive
composition is a **Rényi filter** (Feldman & Zrnic 2021, "Individual Privacy Accounting via a Rényi Filter",
NeurIPS 2021, §3, the Rényi filter theorem): fix a budget B(α) before training and never let the running sum
Σ_t ρ_t(α) exceed B(α); then the whole adaptively composed run is (α, B(α))-RDP, for every order α the filter
enforces, and the (ε, δ) guarantee is the one B gives (the usual RDP → (ε, δ) conversion minimised over α).
Here ρ_t(α) is the RDP of one step of the Poisson-sampled Gaussian mechanism with sample rate q and noise
multiplier σ_t (Mironov 2017; Mironov, Talwar, Zhang 2019), fixed once σ_t is chosen and before the step runs,
as the filter requires. A step that would push any order over its budget is refused (nothing is booked and
:class:`PrivacyBudgetExhausted` is raised): no option lets an order exceed its budget. Two conditions
remain the caller's: σ_t may depend only on public data and past outputs (hence the audit split), and the
step must not run when :meth:`RenyiFilter.charge` raised.

The budget is the RDP curve of the uniform plan that spends exactly ``target_epsilon`` over the planned steps:
B(α) = T · ρ(σ_u, α), so the guarantee is ``target_epsilon`` (at most; within 1e-7 relative below). The floor for the
next step is the smallest σ that, used for every remaining planned step, keeps every order within budget (the
even share of what is left). A controller that adds noise above the floor saves budget and lowers later
floors: a leakage-aware allocation of a fixed budget.

Per-step sample rates (``spend_budget="sample-rate"``, docs/accounting.md). Each step may also use its own Poisson
rate q_t (chosen, like σ_t, from earlier outputs before the step's batch is drawn): :meth:`RenyiFilter.charge` and
:meth:`RenyiFilter.floor` take the step's q, and :meth:`RenyiFilter.max_sample_rate` solves for the largest q on
the geometric grid q_base · 1.01^k that n more steps at a given σ can pay. The theorem is unchanged: the filter
needs ρ_t to be fixed before step t runs, not the same mechanism at every step (Feldman & Zrnic 2021, §3; Lécuyer
2021, arXiv:2103.01379, adapts the batch size under a Rényi filter).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence

import numpy as np
from opacus.accountants.utils import get_noise_multiplier

from adaptive_dp.accountants.rdp import DEFAULT_ORDERS, epsilon_from_rdp, rdp_sampled_gaussian

__all__ = ["PrivacyBudgetExhausted", "RenyiFilter"]

#: Relative slack in the floor's test, so that any σ ≥ floor passes :meth:`RenyiFilter.charge` despite
#: rounding in the RDP routine (ρ is decreasing in σ; 1e-12 covers its numerical noise).
_FLOOR_SLACK = 1e-12
_GRID_RATIO = 1.001  # ratio between neighbouring σ's of the floor's lazily tabulated log-σ grid
_BLOCK = 16  # grid rows computed together (one vectorised call) when the floor needs a new one
_SIGMA_LOWEST = 0.01  # floors below this are reported as this (a valid, slightly conservative floor)
_SIGMA_HIGHEST = 1e6  # opacus' MAX_SIGMA: beyond it the budget cannot pay for any step
_EPS_TOLERANCE = 1e-7  # ε(B) lies in [target - tolerance · max(1, target), target] (≤ 1e-6 below for ε ≤ 10)
RATE_GRID_RATIO = (
    1.01  #: ratio between neighbouring sample rates of :meth:`RenyiFilter.max_sample_rate`'s grid
)


class PrivacyBudgetExhausted(RuntimeError):
    """Raised when the ε budget cannot pay for another step (the Rényi filter refuses it).

    Nothing was booked for the refused step: the state saved after it is the state after the last step taken.
    """


class RenyiFilter:
    """Rényi filter over RDP orders: a hard (target_epsilon, target_delta) budget for adaptively chosen σ.

    Soundness (Feldman & Zrnic 2021, "Individual Privacy Accounting via a Rényi Filter", §3): the per-order
    budget B(α) is fixed at construction; every step's RDP ρ_t(α) (sampled Gaussian with this filter's sample
    rate and that step's σ_t — Mironov 2017; Mironov, Talwar, Zhang 2019) is known before the step runs, and
    :meth:`charge` books the step only if Σ_t ρ_t(α) ≤ B(α) at every order, else raises
    :class:`PrivacyBudgetExhausted` and books nothing. So the run is (α, B(α))-RDP at every order however σ_t
    was chosen from earlier outputs, and (``guarantee_epsilon``, ``target_delta``)-DP with
    ``guarantee_epsilon`` ≤ ``target_epsilon``. The sum of the realised ρ_t (``odometer_epsilon``) is only a
    report; the guarantee is B's. σ_t itself must depend only on public data and past outputs (audit split).

    The budget: B(α) = T · ρ(σ_u, α), the uniform plan over T = ``planned_steps`` steps whose ε at
    ``target_delta`` is ``target_epsilon`` (σ_u from opacus' ``get_noise_multiplier``, refined by bisection so
    that ε(B) ∈ [target_epsilon − 1e-7 · max(1, target_epsilon), target_epsilon]).

    Args:
        target_epsilon: ε of the budget (> 0).
        target_delta: δ of the budget, in (0, 1).
        sample_rate: q, the Poisson sample rate of every step, in (0, 1].
        planned_steps: T, the number of steps the budget is planned for (≥ 1).
        orders: RDP orders α > 1 the filter enforces (default: opacus' ``RDPAccountant.DEFAULT_ALPHAS``).

    Raises:
        ValueError: on an out-of-range argument, or if even σ = 1e6 cannot meet ``target_epsilon``.

    Example:
        >>> f = RenyiFilter(target_epsilon=3.0, target_delta=1e-5, sample_rate=0.01, planned_steps=1000)
        >>> round(f.floor(sigma_max=10.0), 3)      # the even share of the budget: opacus' uniform σ
        0.865
        >>> controller_sigma = 1.5
        >>> for step in range(500):                # half the plan at the controller's higher σ
        ...     sigma = max(controller_sigma, f.floor(sigma_max=10.0))   # the budget's floor wins when higher
        ...     f.charge(sigma)                    # book the step, then run it with this σ
        >>> round(f.floor(sigma_max=10.0), 3)      # the budget saved lowers the floor of the other 500 steps
        0.854
        >>> round(f.guarantee_epsilon, 6) <= 3.0   # whatever σ the controller picks within the floor
        True
    """

    def __init__(
        self,
        *,
        target_epsilon: float,
        target_delta: float,
        sample_rate: float,
        planned_steps: int,
        orders: Sequence[float] | None = None,
    ) -> None:
        if not (target_epsilon > 0 and math.isfinite(target_epsilon)):
            raise ValueError(f"target_epsilon must be a finite number > 0, got {target_epsilon}.")
        if not (0.0 < target_delta < 1.0):
            raise ValueError(f"target_delta must lie in (0, 1), got {target_delta}; e.g. 1 / dataset size.")
        if not (0.0 < sample_rate <= 1.0):
            raise ValueError(
                f"sample_rate must lie in (0, 1], got {sample_rate}; pass batch_size / dataset size."
            )
        if int(planned_steps) != planned_steps or planned_steps < 1:
            raise ValueError(f"planned_steps must be a positive integer, got {planned_steps}.")
        self.target_epsilon = float(target_epsilon)
        self.target_delta = float(target_delta)
        self.sample_rate = float(sample_rate)
        self.planned_steps = int(planned_steps)
        self.orders = np.array(DEFAULT_ORDERS if orders is None else orders, dtype=np.float64)
        if self.orders.ndim != 1 or self.orders.size == 0 or np.any(~(self.orders > 1.0)):
            raise ValueError(f"orders must be a non-empty 1-D sequence of RDP orders > 1, got {orders!r}.")
        self._orders_tuple = tuple(self.orders.tolist())
        self.sigma_uniform = self._solve_uniform_sigma()
        self._budget = self.planned_steps * self._rho(self.sigma_uniform)
        self._spent = np.zeros(self.orders.size)
        self._steps = 0
        self.history: list[tuple[float, float, int]] = []  # (σ, q, steps), consecutive repeats merged
        self._rows: dict[
            tuple[float, int], np.ndarray
        ] = {}  # (q, grid index g) -> ρ(σ_u · r^g, q), every order
        self._hints: dict[float, int] = {}  # q -> grid index of the last floor at q
        self._rate_hint = 0  # grid index k of the last max_sample_rate
        self._row(-1), self._row(0)  # the first floors lie near σ_u

    # ----------------------------------------------------------------------------------------------- budget

    def _rho(self, sigma: float, sample_rate: float | None = None) -> np.ndarray:
        rate = self.sample_rate if sample_rate is None else sample_rate
        return rdp_sampled_gaussian(sample_rate=rate, noise_multiplier=sigma, orders=self._orders_tuple)

    def _rate(self, sample_rate: float | None) -> float:
        """The step's q (default: the filter's base q), checked to lie in (0, 1]."""
        if sample_rate is None:
            return self.sample_rate
        rate = float(sample_rate)
        if not 0.0 < rate <= 1.0:
            raise ValueError(f"sample_rate must lie in (0, 1], got {sample_rate}.")
        return rate

    def _epsilon_of(self, rdp: np.ndarray, delta: float) -> float:
        return epsilon_from_rdp(rdp, orders=self.orders, delta=delta)[0]

    def _solve_uniform_sigma(self) -> float:
        """σ_u with ε(T · ρ(σ_u)) ∈ [target − 1e-7 · max(1, target), target] at target_delta (opacus' search,
        then bisection)."""
        steps, eps_of = self.planned_steps, self._epsilon_of
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Optimal order is the")
                high = get_noise_multiplier(
                    target_epsilon=self.target_epsilon,
                    target_delta=self.target_delta,
                    sample_rate=self.sample_rate,
                    steps=steps,
                    accountant="rdp_incremental",
                    alphas=list(self._orders_tuple),
                )
        except ValueError as err:
            raise ValueError(
                f"target_epsilon={self.target_epsilon} at target_delta={self.target_delta} cannot be met over "
                f"{steps} steps at sample_rate={self.sample_rate} with σ ≤ 1e6: raise the budget or plan fewer "
                "steps."
            ) from err
        tolerance = _EPS_TOLERANCE * max(1.0, self.target_epsilon)
        low = high / 2
        while eps_of(steps * self._rho(low), self.target_delta) <= self.target_epsilon and low > 1e-6:
            high, low = low, low / 2
        for _ in range(200):
            if self.target_epsilon - eps_of(steps * self._rho(high), self.target_delta) <= tolerance:
                break
            mid = 0.5 * (low + high)
            if eps_of(steps * self._rho(mid), self.target_delta) <= self.target_epsilon:
                high = mid
            else:
                low = mid
        return float(high)

    @property
    def budget(self) -> np.ndarray:
        """[K] B(α), the per-order RDP budget (nats), fixed at construction (a copy)."""
        return self._budget.copy()

    @property
    def spent(self) -> np.ndarray:
        """[K] Σ_t ρ_t(α) booked so far (nats); ≤ ``budget`` at every order, always (a copy)."""
        return self._spent.copy()

    @property
    def steps(self) -> int:
        """Number of steps booked."""
        return self._steps

    @property
    def remaining_steps(self) -> int:
        """Planned steps not yet taken (0 past the plan; steps past the plan are taken while the budget pays)."""
        return max(self.planned_steps - self._steps, 0)

    @property
    def guarantee_epsilon(self) -> float:
        """ε at ``target_delta`` of the budget B: the formal guarantee of the whole run (≤ ``target_epsilon``)."""
        return self._epsilon_of(self._budget, self.target_delta)

    def odometer_epsilon(self, delta: float | None = None) -> float:
        """ε at δ of what was spent so far (a report of the realised σ history, not the guarantee); 0 at start.

        Args:
            delta: δ in (0, 1); default ``target_delta``.
        """
        if self._steps == 0:
            return 0.0
        return self._epsilon_of(self._spent, self.target_delta if delta is None else delta)

    # ------------------------------------------------------------------------------------------------ floor

    def _sigma_at(self, g: int) -> float:
        return self.sigma_uniform * _GRID_RATIO**g

    def _row(self, g: int, sample_rate: float | None = None) -> np.ndarray:
        """ρ(σ_g, q) at every order; on a miss the whole block of ``_BLOCK`` neighbouring rows is computed at once."""
        rate = self.sample_rate if sample_rate is None else sample_rate
        row = self._rows.get((rate, g))
        if row is None:
            block = range(_BLOCK * (g // _BLOCK), _BLOCK * (g // _BLOCK + 1))
            sigma = np.array([self._sigma_at(k) for k in block])
            rows = rdp_sampled_gaussian(sample_rate=rate, noise_multiplier=sigma, orders=self.orders)
            self._rows.update(((rate, k), r) for k, r in zip(block, rows))
            row = self._rows[(rate, g)]
        return row

    def _pays(self, rho: np.ndarray, n: int, orders: np.ndarray | slice = slice(None)) -> np.ndarray:
        """Per order: would n more steps of RDP ρ (times 1 + slack) stay within budget? (bool [K'])."""
        return self._spent[orders] + n * rho * (1.0 + _FLOOR_SLACK) <= self._budget[orders]

    def floor(self, *, sigma_max: float | None = None, sample_rate: float | None = None) -> float:
        """The smallest σ that, used for every remaining planned step, keeps every order within its budget.

        n = max(remaining_steps, 1) steps (at least one step past the plan); the returned σ satisfies
        spent(α) + n · ρ(σ, α) ≤ B(α) at every order (checked on exact RDP values, with a 1e-12 relative
        margin for rounding), so :meth:`charge` accepts any σ ≥ floor (ρ is decreasing in σ). Solved by a
        galloping search from the previous floor on a lazily tabulated log-σ grid (σ_u · 1.001^g, all orders
        at once): the result is rounded UP to the grid, at most 0.1 % above the exact floor, never below it.
        Cost: ≈ 0.1 ms when the grid rows are cached; a block of 16 new rows costs a few ms.

        Args:
            sigma_max: the largest σ the caller would use; None = no limit (up to 1e6).
            sample_rate: q of the next step and, for the even share, of the remaining planned steps (default:
                the filter's base q); in (0, 1].

        Returns:
            σ, or ``inf`` when no σ ≤ ``sigma_max`` can pay for the next step. Floors below 0.01 are reported
            as the grid point just below 0.01 (still a valid floor).

        Raises:
            ValueError: if ``sigma_max`` is not positive or ``sample_rate`` is outside (0, 1].
        """
        if sigma_max is not None and not sigma_max > 0:
            raise ValueError(f"sigma_max must be > 0, got {sigma_max}.")
        rate = self._rate(sample_rate)
        n = max(self.planned_steps - self._steps, 1)
        cap = _SIGMA_HIGHEST if sigma_max is None else min(float(sigma_max), _SIGMA_HIGHEST)
        if not self._pays(self._rho(cap, rate), n).all():
            return math.inf
        if cap <= _SIGMA_LOWEST:
            return cap
        log_r = math.log(_GRID_RATIO)
        g_lo = math.floor(math.log(_SIGMA_LOWEST / self.sigma_uniform) / log_r)
        g_hi = math.floor(math.log(cap / self.sigma_uniform) / log_r)
        while self._sigma_at(g_hi) > cap:
            g_hi -= 1
        g = self._first_paying_index(n, g_lo, g_hi, rate)
        if g is None:  # the cap pays but no grid point ≤ cap does
            return cap
        return self._sigma_at(max(g, g_lo))

    def _first_paying_index(self, n: int, g_lo: int, g_hi: int, rate: float) -> int | None:
        """Smallest grid index in [g_lo, g_hi] whose σ pays at every order (ρ is decreasing in σ); None if none."""
        g = _first_true(
            lambda g: bool(self._pays(self._row(g, rate), n).all()), g_lo, g_hi, hint=self._hints.get(rate, 0)
        )
        if g is not None:
            self._hints[rate] = g
        return g

    # ----------------------------------------------------------------------------------------------- charge

    def max_sample_rate(self, noise_multiplier: float, *, max_rate: float, steps: int | None = None) -> float:
        """The largest sample rate on the grid q_base · 1.01^k (k ≥ 0, q ≤ ``max_rate``) that ``steps`` more
        steps at σ can pay: spent(α) + n · ρ(σ, q, α) ≤ B(α) at every order (with the floor's 1e-12 margin).

        ρ of the sampled Gaussian increases in q (Mironov, Talwar, Zhang 2019), so the grid is searched by
        galloping from the last answer and bisecting. Never below the base q: when even q_base does not pay at σ,
        q_base is returned (the floor then raises σ, :meth:`floor`).

        Args:
            noise_multiplier: σ the next steps are expected to use (> 0).
            max_rate: the cap on q (≥ base q; values above 1 count as 1).
            steps: n, the steps to pay for (default: max(remaining planned steps, 1)).

        Returns:
            q in [base q, min(max_rate, 1)], on the grid (the base q itself for k = 0).

        Raises:
            ValueError: σ not > 0, ``max_rate`` below the base q, or ``steps`` < 1.
        """
        sigma = float(noise_multiplier)
        if not sigma > 0:
            raise ValueError(f"noise_multiplier must be > 0, got {noise_multiplier}.")
        if not max_rate >= self.sample_rate:
            raise ValueError(f"max_rate must be >= the base sample rate {self.sample_rate}, got {max_rate}.")
        n = max(self.planned_steps - self._steps, 1) if steps is None else int(steps)
        if n < 1:
            raise ValueError(f"steps must be >= 1, got {steps}.")
        top = min(float(max_rate), 1.0)
        k_max = math.floor(math.log(top / self.sample_rate) / math.log(RATE_GRID_RATIO) + 1e-9)
        while k_max > 0 and self.rate_at(k_max) > top:
            k_max -= 1

        def pays(k: int) -> bool:
            return bool(self._pays(self._rho(sigma, self.rate_at(k)), n).all())

        if k_max == 0 or not pays(1):
            return self.sample_rate
        # ρ increases in q: the first grid index that does not pay, minus one (k_max when all of them pay)
        unpaid = _first_true(lambda k: not pays(k), 1, k_max, hint=self._rate_hint + 1)
        k = k_max if unpaid is None else unpaid - 1
        self._rate_hint = k
        return self.rate_at(k)

    def rate_at(self, k: int) -> float:
        """The k-th sample rate of :meth:`max_sample_rate`'s grid: q_base · 1.01^k (k = 0: exactly the base q)."""
        return self.sample_rate if k == 0 else self.sample_rate * RATE_GRID_RATIO**k

    # ----------------------------------------------------------------------------------------------- charge

    def charge(self, noise_multiplier: float, sample_rate: float | None = None) -> None:
        """Book one step with noise multiplier σ and Poisson rate q, or refuse it.

        Args:
            noise_multiplier: σ of the step about to run (≥ 0; ``inf`` costs nothing).
            sample_rate: q of the step's batch (default: the filter's base q), in (0, 1].

        Raises:
            PrivacyBudgetExhausted: if spent(α) + ρ(σ, q, α) would exceed B(α) at any order; nothing is booked
                and the step must not run.
            ValueError: if σ is negative or NaN, or q is outside (0, 1].
        """
        sigma = float(noise_multiplier)
        if not sigma >= 0:
            raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}.")
        rate = self._rate(sample_rate)
        rho = np.zeros(self.orders.size) if math.isinf(sigma) else self._rho(sigma, rate)
        new = self._spent + rho
        over = np.flatnonzero(~(new <= self._budget))
        if over.size:
            k = over[0]
            raise PrivacyBudgetExhausted(
                f"the ε budget ({self.target_epsilon} at δ={self.target_delta}) cannot pay for step "
                f"{self._steps + 1} at noise_multiplier={sigma:.6g}, sample_rate={rate:.6g}: RDP at order "
                f"{self.orders[k]:g} would be {new[k]:.6g} > budget {self._budget[k]:.6g}. Use σ ≥ floor() "
                "(inf = budget spent) or stop."
            )
        self._spent = new
        self._steps += 1
        if self.history and self.history[-1][:2] == (sigma, rate):
            self.history[-1] = (sigma, rate, self.history[-1][2] + 1)
        else:
            self.history.append((sigma, rate, 1))

    def spent_fraction(self) -> float:
        """The share of the budget spent at the order where it is largest: max_α spent(α) / B(α), in [0, 1]."""
        return float(np.max(self._spent / self._budget))

    # ------------------------------------------------------------------------------------------ checkpoints

    def _config(self) -> dict:
        return {
            "target_epsilon": self.target_epsilon,
            "target_delta": self.target_delta,
            "sample_rate": self.sample_rate,
            "planned_steps": self.planned_steps,
            "orders": list(self._orders_tuple),
        }

    def state_dict(self) -> dict:
        """Configuration, budget and spend as plain Python values (torch-saveable; exact round trip)."""
        return {
            "config": self._config(),
            "sigma_uniform": self.sigma_uniform,
            "budget": self._budget.tolist(),
            "spent": self._spent.tolist(),
            "steps": self._steps,
            "history": [tuple(h) for h in self.history],  # (σ, q, steps)
        }

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore the spend of a filter with the same configuration.

        Raises:
            ValueError: if the state is malformed or was saved by a filter with another budget configuration
                (build the filter with the same target_epsilon, target_delta, sample_rate, planned_steps, orders).
        """
        try:
            config, budget, spent = state_dict["config"], state_dict["budget"], state_dict["spent"]
            steps, history, sigma_u = (
                int(state_dict["steps"]),
                state_dict["history"],
                state_dict["sigma_uniform"],
            )
        except (KeyError, TypeError) as err:
            raise ValueError(
                f"not a RenyiFilter state_dict (missing {err}); save it with state_dict()."
            ) from err
        if config != self._config():
            raise ValueError(
                f"state_dict was saved by a filter configured as {config}, this one is {self._config()}; "
                "build the filter with the saved configuration before loading."
            )
        if len(budget) != self.orders.size or len(spent) != self.orders.size:
            raise ValueError("state_dict budget/spent do not match the filter's orders.")
        self.sigma_uniform = float(sigma_u)
        self._budget = np.array(budget, dtype=np.float64)
        self._spent = np.array(spent, dtype=np.float64)
        self._steps = steps
        base = self.sample_rate  # states saved before per-step rates hold (σ, steps) pairs
        self.history = [
            (float(h[0]), base, int(h[1])) if len(h) == 2 else (float(h[0]), float(h[1]), int(h[2]))
            for h in history
        ]
        self._rows, self._hints, self._rate_hint = {}, {}, 0

    def __repr__(self) -> str:
        return (
            f"RenyiFilter(target_epsilon={self.target_epsilon}, target_delta={self.target_delta}, "
            f"sample_rate={self.sample_rate}, planned_steps={self.planned_steps}, steps={self._steps}, "
            f"sigma_uniform={self.sigma_uniform:.6g})"
        )


def _first_true(pred: Callable[[int], bool], lo: int, hi: int, *, hint: int) -> int | None:
    """Smallest i in [lo, hi] with ``pred(i)`` for a predicate monotone on [lo, hi] (False … False True … True);
    None when ``pred(hi)`` is False.

    Gallops from ``hint`` (clamped to [lo, hi]) with doubling steps until the change is bracketed, then bisects:
    O(log |answer − hint|) calls of ``pred``, so a search that starts at the previous answer is cheap.
    """
    h = min(max(hint, lo), hi)
    step = 1
    if pred(h):  # gallop down until pred fails; lo - 1 stands for "below the range" (never evaluated)
        left, right = max(h - 1, lo - 1), h
        while left >= lo and pred(left):
            right, step = left, step * 2
            left = max(right - step, lo - 1)
    else:  # gallop up until pred holds
        if h == hi:
            return None
        left, right = h, h + 1
        while not pred(right):
            if right == hi:
                return None
            left, step = right, step * 2
            right = min(left + step, hi)
    while right - left > 1:  # invariant: pred(left) is False (or left = lo - 1), pred(right) is True
        mid = (left + right) // 2
        if pred(mid):
            right = mid
        else:
            left = mid
    return right
