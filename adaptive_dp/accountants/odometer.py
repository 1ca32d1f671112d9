"""A Rényi privacy odometer: a valid (ε, δ) at every step for an adaptively chosen noise multiplier.

When σ_t is chosen from earlier outputs (a controller reading leakage after each update) and no budget is
fixed in advance, the plain composition ε (opacus' RDP of the σ history, ``IncrementalRDPAccountant``) is not a
guarantee: it picks the best RDP order *after* seeing the run, and an adaptive stopping rule makes the real
hockey-stick divergence exceed δ (``tests/test_odometer.py`` shows it: 0.0127 > δ = 0.01). An odometer gives an
ε_t at every step that is valid whatever σ sequence and stopping rule were used (Rogers, Roth, Ullman, Vadhan
2016, "Privacy Odometers and Filters").

Construction (docs/accounting.md, "A guarantee without a budget: the odometer", Eqs. (1)–(5)). Notation: L_t is
the privacy loss of the run's first t outputs (log-likelihood ratio between neighbouring datasets D, D'),
R_t(α) = Σ_{s≤t} ρ_s(α) the RDP of the realised σ history at order α (ρ_s known before step s runs).

1. For each order α, M_t(α) = exp((α−1)(L_t − R_t(α))) is a nonnegative supermartingale under D, so
   E_D[M_τ(α)] ≤ 1 at every stopping time τ (Eq. 1) — the argument behind the Rényi filter (Feldman & Zrnic 2021,
   Thm 3.1) and the supermartingale odometers of Whitehouse, Ramdas, Rogers & Wu 2023 ("Fully-Adaptive
   Composition in Differential Privacy", ICML).
2. A prior w over the orders (Σ w_j = 1, fixed before the run) gives the mixture M_t = Σ_j w_j M_t(α_j), again
   with E_D[M_τ] ≤ 1 (Eq. 2; Whitehouse et al.'s method of mixtures, here over the Rényi order).
3. The odometer reads ε_t = the smallest ε ≥ 0 with (1 − e^{ε−ℓ})_+ ≤ δ Σ_j w_j e^{(α_j−1)(ℓ − R_t(α_j))} for every
   real ℓ (Eq. 3). Then, at any stopping time τ, E_D[(1 − e^{ε_τ − L_τ})_+] ≤ δ (Eq. 4): for every event S of the
   run so far, P_D(S) ≤ E_{D'}[e^{ε_τ} 1_S] + δ — on runs that read ε_τ ≤ ε, the usual (ε, δ) inequality.
4. With a single order and w = 1, Eq. 3 is exactly Balle et al. 2020 Thm 21 (opacus' conversion): at a fixed
   order the plain composition is already an odometer. Choosing the order after the fact is what the mixture
   pays for; the reading is never below the plain composition (w_j ≤ 1).

No grid of budgets is needed: Lécuyer 2021's odometer (a sequence of Rényi filters on a geometric budget grid,
δ split across levels by a union bound) is valid too, but costs 1.8–2.3× the composition on a realistic MNIST run
against 1.36× here (docs/accounting.md, table), because optional stopping (Eq. 1) applies at the realised
R_t(α) directly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from adaptive_dp.accountants.rdp import DEFAULT_ORDERS, rdp_sampled_gaussian

__all__ = ["RenyiOdometer", "epsilon_from_rdp_mixture", "log_uniform_weights"]

_TOLERANCE = 1e-12  # relative width of the final bracket on ℓ (ε is then exact to ~1e-12 nats)
_MAX_ITERATIONS = 200  # safeguarded Newton; bisection alone would need ~45


def log_uniform_weights(orders: Sequence[float] | np.ndarray) -> np.ndarray:
    """The default prior over RDP orders: uniform in log(α − 1), w_j ∝ Δα_j / (α_j − 1).

    Δα_j is the local spacing of the orders (``np.gradient``), so the prior approximates the continuous density
    1/(α − 1) on [α_1, α_K] whatever the spacing (opacus' orders: 0.1 apart below 11, 1 apart above). It is
    scale-free: every factor of (α − 1) gets the same mass, so no range of ε is favoured.

    Args:
        orders: [K] strictly increasing, finite RDP orders > 1.

    Returns:
        [K] weights > 0 summing to 1 (``[1.0]`` for a single order).

    Raises:
        ValueError: if the orders are not a strictly increasing sequence of finite numbers > 1.
    """
    a = _check_orders(orders)
    if a.size == 1:
        return np.ones(1)
    w = np.gradient(a) / (a - 1.0)
    return w / w.sum()


def epsilon_from_rdp_mixture(
    rdp: Sequence[float] | np.ndarray,
    *,
    orders: Sequence[float] | np.ndarray,
    weights: Sequence[float] | np.ndarray,
    delta: float,
) -> float:
    """ε at δ of the Rényi odometer for an RDP curve: the smallest ε satisfying Eq. 3 (docs/accounting.md).

    Solves min{ε ≥ 0 : (1 − e^{ε−ℓ})_+ ≤ δ · Σ_j w_j e^{(α_j−1)(ℓ − R_j)} for all ℓ}. With
    g(ℓ) = log Σ_j w_j e^{(α_j−1)(ℓ − R_j)} (convex; g' a weighted mean of α_j − 1), the two sides touch at the
    root ℓ* of the decreasing function φ(ℓ) = −log(1 + g'(ℓ)) − g(ℓ) = log δ, and ε = ℓ* − log(1 + 1/g'(ℓ*))
    (Eq. 5). The root is found by safeguarded Newton to 1e-12 relative and rounded up, so the result errs on
    the safe side (ε is increasing in ℓ*). Cost: O(K) per iteration, ~10 iterations (≈ 0.2 ms for K = 151).

    With one order and weight 1 this is Balle et al. 2020 Thm 21 (opacus' ``get_privacy_spent``):
    ε = R + log(1 − 1/α) + (log(1/δ) − log α)/(α − 1).

    Args:
        rdp: [K] R_j, the RDP (nats) of the run at each order; ``inf`` entries are dropped (their term is 0).
        orders: [K] strictly increasing finite orders α_j > 1.
        weights: [K] prior w_j ≥ 0 with Σ w_j ≤ 1 (fixed before the run; :func:`log_uniform_weights`).
        delta: δ in (0, 1), fixed independently of the run's outputs (e.g. 1 / dataset size).

    Returns:
        ε ≥ 0 (nats); 0 when R_j = 0 at every order (nothing released); ``inf`` when every R_j is inf.

    Raises:
        ValueError: on mismatched lengths, NaN or negative R, invalid orders, weights outside [0, 1] or summing
            above 1, or δ outside (0, 1).

    Source: docs/accounting.md Eqs. (3)–(5); Balle et al. 2020, "Hypothesis Testing Interpretations and Rényi
    Differential Privacy", Thm 21 (the pointwise bound behind Eq. 3).
    """
    a, w, r = _check_curve(rdp, orders, weights)
    if not (0.0 < delta < 1.0):
        raise ValueError(
            f"delta must lie in (0, 1), got {delta}; a common choice is 1 / dataset size or 1e-5."
        )
    keep = np.isfinite(r) & (w > 0)
    if not keep.any():
        return math.inf
    if np.all(r[keep] == 0.0):
        return 0.0
    a1, log_w, r = a[keep] - 1.0, np.log(w[keep]), r[keep]
    log_delta = math.log(delta)
    # start from the union bound of the best single order: φ_j(ℓ_j) = log δ for the term j alone
    start = float(np.min(r + (-log_delta - log_w - np.log1p(a1)) / a1))
    level = _solve_touching_level(lambda x: _phi(x, a1, log_w, r), start, log_delta)
    return max(level - math.log1p(1.0 / _phi(level, a1, log_w, r)[1]), 0.0)


def _phi(level: float, a1: np.ndarray, log_w: np.ndarray, r: np.ndarray) -> tuple[float, float, float]:
    """(φ(ℓ), g'(ℓ), φ'(ℓ)) for g(ℓ) = log Σ_j w_j e^{(α_j−1)(ℓ − R_j)} and φ = −log(1 + g') − g (Eq. 5)."""
    z = log_w + a1 * (level - r)
    top = float(z.max())
    p = np.exp(z - top)
    total = float(p.sum())
    p /= total
    slope = float(p @ a1)
    curvature = float(p @ (a1 - slope) ** 2)
    value = -math.log1p(slope) - (top + math.log(total))
    return value, slope, -curvature / (1.0 + slope) - slope


def _solve_touching_level(phi, start: float, log_delta: float) -> float:
    """The root ℓ* of the decreasing φ(ℓ) = log δ, rounded up (φ(result) ≤ log δ): safeguarded Newton.

    A bracket [low, high] with φ(low) > log δ ≥ φ(high) is kept; a Newton step that leaves it is replaced by
    bisection, and once Newton has converged the other side of the root is probed, so the loop ends with a
    bracket narrower than 1e-12 relative whose upper end is returned.
    """
    low, high = _bracket(phi, start, log_delta)
    x = high
    for _ in range(_MAX_ITERATIONS):
        value, _, derivative = phi(x)
        if value > log_delta:
            low = x
        else:
            high = x
        scale = _TOLERANCE * max(1.0, abs(high))
        if high - low <= scale:
            break
        nxt = x - (value - log_delta) / derivative
        if not low < nxt < high:
            nxt = 0.5 * (low + high)
        elif abs(nxt - x) < scale / 2:  # converged from one side: step just across the root
            nxt = min(max(nxt + (scale / 2 if value > log_delta else -scale / 2), low), high)
        x = nxt
    return high


def _bracket(phi, start: float, log_delta: float) -> tuple[float, float]:
    """[low, high] with φ(low) > log δ ≥ φ(high), found by doubling steps from ``start`` (φ is decreasing)."""
    step = 1.0
    low, high = start - step, start
    while phi(high)[0] > log_delta:
        low, high, step = high, high + step, 2 * step
    while phi(low)[0] <= log_delta:
        high, low, step = low, low - step, 2 * step
    return low, high


def _check_orders(orders: Sequence[float] | np.ndarray) -> np.ndarray:
    a = np.atleast_1d(np.asarray(orders, dtype=np.float64))
    if (
        a.ndim != 1
        or a.size == 0
        or not np.all(np.isfinite(a))
        or np.any(a <= 1.0)
        or np.any(np.diff(a) <= 0)
    ):
        raise ValueError(
            f"orders must be a non-empty, strictly increasing sequence of finite RDP orders > 1, got {orders!r}; "
            "e.g. opacus' DEFAULT_ORDERS."
        )
    return a


def _check_weights(weights: Sequence[float] | np.ndarray, size: int) -> np.ndarray:
    w = np.atleast_1d(np.asarray(weights, dtype=np.float64))
    if w.shape != (size,) or not np.all(np.isfinite(w)) or np.any(w < 0) or not w.sum() > 0:
        raise ValueError(
            f"weights must be {size} finite numbers >= 0, not all 0 (one per order), got {weights!r}."
        )
    if w.sum() > 1.0 + 1e-12:
        raise ValueError(
            f"weights must sum to at most 1 (a prior over orders), got sum {w.sum()!r}; normalise them."
        )
    return w


def _check_curve(rdp, orders, weights) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    a = _check_orders(orders)
    w = _check_weights(weights, a.size)
    r = np.atleast_1d(np.asarray(rdp, dtype=np.float64))
    if r.shape != a.shape or np.any(~(r >= 0.0)):
        raise ValueError(
            f"rdp must hold {a.size} values >= 0 (nats, one per order; inf allowed), got {rdp!r}."
        )
    return a, w, r


class RenyiOdometer:
    """Rényi privacy odometer: an (ε, δ) guarantee at every step, whatever the adaptively chosen σ sequence.

    ``step`` books the RDP of each sampled Gaussian step at every order (O(#orders), cached per (q, σ)); it must
    be called with the σ and q of the step that runs, chosen before it runs from public data and earlier
    outputs only. ``get_epsilon(δ)`` solves Eq. 3 on the running RDP vector (O(#orders) per iteration, no pass
    over the history). Its reading ε_t is non-decreasing in t and never below the plain composition at the same
    orders and δ; the guarantee (Eq. 4): for every stopping time τ (any rule for when to stop or publish),
    every event S of the outputs up to τ, and neighbouring datasets D, D',
    P_D(S) ≤ E_{D'}[e^{ε_τ} 1_S] + δ — so (ε, δ)-DP for the runs that read ε_τ ≤ ε, and stopping before the
    reading would pass ε gives an (ε, δ)-DP run (a filter for every ε at once).

    Design: no budget grid and δ is not needed in advance (the prior over orders does not depend on δ, and
    Eq. 4 holds for each δ fixed independently of the run's outputs). The default prior is uniform in
    log(α − 1) over opacus' orders 1.1 … 63 (:func:`log_uniform_weights`); its cost on a realistic MNIST run
    (q = 256/60000, 1170 steps, σ from 2 to 0.6, δ = 1e-5) is 1.36× the plain composition (2.98 → 4.04); a
    PID-like ceiling run (ε ≈ 14) costs 1.22× (docs/accounting.md has the table). A narrower prior is cheaper
    while the best order stays inside it and unboundedly worse outside it.

    Args:
        orders: [K] strictly increasing finite RDP orders > 1 (default: opacus' ``DEFAULT_ALPHAS``). Keep them a
            subset of the composition's orders for the "never below the composition" property.
        weights: [K] prior over the orders, ≥ 0 and summing to ≤ 1, fixed before the run; None = log-uniform.

    Raises:
        ValueError: on invalid orders or weights.

    Source: docs/accounting.md Eqs. (1)–(5); Feldman & Zrnic 2021 Thm 3.1 and Whitehouse, Ramdas, Rogers & Wu
    2023 (privacy-loss supermartingale, optional stopping, mixtures); Balle et al. 2020 Thm 21 (Eq. 3 with one
    order); Mironov, Talwar, Zhang 2019 (RDP of the sampled Gaussian).

    Example:
        >>> from adaptive_dp.accountants.rdp import IncrementalRDPAccountant
        >>> odometer, composition = RenyiOdometer(), IncrementalRDPAccountant()
        >>> for sigma in (2.0, 1.2, 0.8):            # σ chosen adaptively, e.g. by a controller
        ...     odometer.step(noise_multiplier=sigma, sample_rate=0.01, steps=100)
        ...     for _ in range(100):
        ...         composition.step(noise_multiplier=sigma, sample_rate=0.01)
        >>> len(odometer), round(composition.get_epsilon(1e-5), 2), round(odometer.get_epsilon(1e-5), 2)
        (300, 2.22, 2.99)
    """

    def __init__(
        self, *, orders: Sequence[float] | np.ndarray = DEFAULT_ORDERS, weights: Sequence[float] | None = None
    ) -> None:
        self._orders = _check_orders(orders)
        self._orders_tuple = tuple(self._orders.tolist())
        self._weights = (
            log_uniform_weights(self._orders)
            if weights is None
            else _check_weights(weights, self._orders.size)
        )
        self._rdp = np.zeros(self._orders.size)
        self._steps = 0

    @property
    def orders(self) -> np.ndarray:
        """[K] the RDP orders α_j (a copy)."""
        return self._orders.copy()

    @property
    def weights(self) -> np.ndarray:
        """[K] the prior w_j over the orders, fixed at construction (a copy)."""
        return self._weights.copy()

    @property
    def rdp(self) -> np.ndarray:
        """[K] R(α_j), the RDP (nats) of the σ history booked so far (a copy)."""
        return self._rdp.copy()

    def __len__(self) -> int:
        """Number of steps booked (as opacus' ``IAccountant.__len__``)."""
        return self._steps

    def step(self, *, noise_multiplier: float, sample_rate: float, steps: int = 1) -> None:
        """Book ``steps`` steps of the Poisson-sampled Gaussian mechanism with noise multiplier σ and sample rate q.

        Args:
            noise_multiplier: σ (noise std / clipping norm C) ≥ 0; 0 makes every later reading inf; inf costs 0.
            sample_rate: q in [0, 1].
            steps: number of identical steps (≥ 1).

        Raises:
            ValueError: if σ < 0 or NaN, q outside [0, 1], or ``steps`` is not a positive integer; nothing is booked.
        """
        if isinstance(steps, bool) or int(steps) != steps or steps < 1:
            raise ValueError(f"steps must be a positive integer, got {steps!r}.")
        sigma, rate = float(noise_multiplier), float(sample_rate)
        if not (0.0 <= rate <= 1.0):
            raise ValueError(
                f"sample_rate must lie in [0, 1], got {sample_rate}; pass batch_size / dataset size."
            )
        if not sigma >= 0.0:
            raise ValueError(f"noise_multiplier must be >= 0 (and not NaN), got {noise_multiplier}.")
        if math.isinf(sigma):
            rho = np.zeros(self._orders.size)
        else:
            rho = rdp_sampled_gaussian(sample_rate=rate, noise_multiplier=sigma, orders=self._orders_tuple)
        # ρ ≥ 0 exactly; the series can return -1e-16 for σ ≫ 1, rounded up here (the safe side)
        self._rdp = self._rdp + int(steps) * np.maximum(rho, 0.0)
        self._steps += int(steps)

    def get_epsilon(self, delta: float) -> float:
        """ε at δ for everything booked so far: a valid guarantee for the adaptive run (Eq. 4); 0 before any step.

        Args:
            delta: δ in (0, 1), fixed independently of the run's outputs (e.g. 1 / dataset size).

        Raises:
            ValueError: if δ is not in (0, 1).
        """
        if not (0.0 < delta < 1.0):
            raise ValueError(
                f"delta must lie in (0, 1), got {delta}; a common choice is 1 / dataset size or 1e-5."
            )
        if self._steps == 0:
            return 0.0
        return epsilon_from_rdp_mixture(self._rdp, orders=self._orders, weights=self._weights, delta=delta)

    def state_dict(self) -> dict:
        """Orders, prior, running RDP and step count as plain Python values (torch-saveable; exact round trip)."""
        return {
            "orders": list(self._orders_tuple),
            "weights": self._weights.tolist(),
            "rdp": self._rdp.tolist(),
            "steps": self._steps,
        }

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore the running RDP of an odometer with the same orders and prior.

        Raises:
            ValueError: if the state is malformed or was saved by an odometer with other orders or weights (build
                it with the saved ``orders=`` and ``weights=`` before loading).
        """
        try:
            orders, weights = state_dict["orders"], state_dict["weights"]
            rdp, steps = np.asarray(state_dict["rdp"], dtype=np.float64), int(state_dict["steps"])
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"not a RenyiOdometer state_dict ({err!r}); save it with state_dict().") from err
        if list(orders) != list(self._orders_tuple) or list(weights) != self._weights.tolist():
            raise ValueError(
                "state_dict was saved by an odometer with other orders or weights; build it with the saved "
                "orders= and weights= before loading."
            )
        if rdp.shape != self._orders.shape or np.any(~(rdp >= 0.0)) or steps < 0:
            raise ValueError(
                "state_dict rdp/steps do not fit this odometer's orders (need one value >= 0 per order)."
            )
        self._rdp, self._steps = rdp, steps

    def __repr__(self) -> str:
        return f"RenyiOdometer(orders={self._orders.size} in [{self._orders[0]:g}, {self._orders[-1]:g}], steps={self._steps})"
