"""The one-run ε lower bound of Steinke, Nasr & Jagielski (NeurIPS 2023).

An auditor inserts ``m`` canaries, each included in the training run independently with probability 1/2,
then guesses "included" or "excluded" for ``r`` of them (abstaining on the rest) and gets ``v`` right. If the
training run is (ε, δ)-DP, ``v`` cannot be much larger than the number of heads in ``r`` tosses of a coin
with bias ``e^ε / (1 + e^ε)`` (the accuracy of ε-randomized response). :func:`one_run_p_value` is that tail
bound, :func:`epsilon_lower_bound` inverts it: the largest ε that the observed ``v`` still rejects at the
requested confidence. Only numpy and scipy; no torch.

Source: T. Steinke, M. Nasr, M. Jagielski, "Privacy Auditing with One (1) Training Run", NeurIPS 2023,
arXiv:2305.08846v1 — Theorem 5.2 (the bound for (ε, δ)-DP), Corollary 5.4 (its form with abstentions, the
one used in the paper's experiments) and Appendix D (the p-value and the search for ε; numbering of arXiv v1).
"""

from __future__ import annotations

import math
import numbers

import numpy as np
from scipy import optimize, special, stats

__all__ = ["epsilon_lower_bound", "one_run_p_value"]

_XTOL = 1e-10  # ε resolution of the root finder (nats)


def _check_count(name: str, value: object, *, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an int, got {value!r} ({type(value).__name__}).")
    value = int(value)
    if value < low or (high is not None and value > high):
        upper = "" if high is None else f" and <= {high}"
        raise ValueError(f"{name} must be >= {low}{upper}, got {value}.")
    return value


def _check_probability(name: str, value: object, *, open_low: bool, open_high: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise ValueError(f"{name} must be a finite real number, got {value!r}.")
    value = float(value)
    too_low = value <= 0.0 if open_low else value < 0.0
    too_high = value >= 1.0 if open_high else value > 1.0
    if too_low or too_high:
        interval = ("(" if open_low else "[") + "0, 1" + (")" if open_high else "]")
        raise ValueError(f"{name} must lie in {interval}, got {value}.")
    return value


def _check_counts(canaries: object, guesses: object, correct: object) -> tuple[int, int, int]:
    m = _check_count("canaries", canaries, low=1)
    r = _check_count("guesses", guesses, low=0, high=m)
    v = _check_count("correct", correct, low=0, high=r)
    return m, r, v


def _p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """Theorem 5.2's bound on P[W >= v] for counts already validated (see :func:`one_run_p_value`)."""
    q = float(special.expit(epsilon))  # e^ε / (1 + e^ε): accuracy of ε-randomized response
    tail = float(stats.binom.sf(v - 1, r, q))  # P[Binomial(r, q) >= v]
    if delta == 0.0 or v == 0:
        return min(tail, 1.0)
    # window[i-1] = P[v - i <= Binomial(r, q) < v] for i = 1..v, a running sum of positive terms (no
    # cancellation); for i > v the window is P[W < v], constant, so its mean per i is largest at i = v.
    window = np.cumsum(stats.binom.pmf(np.arange(v - 1, -1, -1), r, q))
    worst = float(np.max(window / np.arange(1, v + 1)))
    return min(tail + 2.0 * m * delta * worst, 1.0)


def one_run_p_value(*, canaries: int, guesses: int, correct: int, epsilon: float, delta: float) -> float:
    """Upper bound on the chance of ``correct`` or more right guesses if the run is (ε, δ)-DP.

    With W' ~ Binomial(r, q), q = e^ε / (1 + e^ε) and f(v) = P[W' >= v], the bound is
    ``f(v) + 2 · m · δ · max_{i = 1..m} (f(v - i) - f(v)) / i`` (Theorem 5.2 / Corollary 5.4 of
    arXiv:2305.08846v1), capped at 1. It is the p-value of the null hypothesis "the run is (ε, δ)-DP" given
    the auditor's score: a small value rejects the hypothesis.

    Args:
        canaries: m, the number of canaries, each included independently with probability 1/2; >= 1.
        guesses: r, the number of canaries the auditor guessed on (the rest abstained); 0 <= r <= m.
        correct: v, the number of right guesses; 0 <= v <= r.
        epsilon: ε of the null hypothesis (nats); >= 0 and finite.
        delta: δ of the null hypothesis; in [0, 1].

    Returns:
        The p-value, in [0, 1].

    Raises:
        ValueError: if a count is not an int in its range, ``epsilon`` is negative or not finite, or ``delta``
            is outside [0, 1].

    Example:
        >>> round(one_run_p_value(canaries=10, guesses=10, correct=10, epsilon=0.0, delta=0.0), 6)
        0.000977
    """
    m, r, v = _check_counts(canaries, guesses, correct)
    if isinstance(epsilon, bool) or not isinstance(epsilon, numbers.Real) or not (0.0 <= epsilon < math.inf):
        raise ValueError(f"epsilon must be a finite real number >= 0, got {epsilon!r}.")
    delta = _check_probability("delta", delta, open_low=False, open_high=False)
    return _p_value(m, r, v, float(epsilon), delta)


def epsilon_lower_bound(
    *, canaries: int, guesses: int, correct: int, delta: float, confidence: float = 0.95
) -> float:
    """Empirical ε at δ: the largest ε that the audit's score rejects at ``confidence``.

    Solves ``p(ε) = 1 - confidence`` for ε with a bracketing root finder (doubling bracket, then
    :func:`scipy.optimize.brentq`), where p is :func:`one_run_p_value`. With probability at least
    ``confidence`` over the canaries' coin flips and the run's randomness, a run that is (ε, δ)-DP returns
    at most ε (the test of Theorem 5.2, arXiv:2305.08846v1; the procedure of its Appendix D). ``delta = 0``
    audits pure ε-DP (the binomial tail alone).

    Why one root: p is the largest of the terms E[h_i(W')] with h_i = 1 on [v, r] and 2mδ/i on
    [v - i, v); its derivative in q is r · [(1 - 2mδ/i) · b(v - 1) + (2mδ/i) · b(v - i - 1)] with b the
    Binomial(r - 1, q) pmf, negative only if 2mδ > i and b(v - 1) > b(v - i - 1), i.e. b's mode ⌊rq⌋ >= v - i;
    then W''s median is >= v - i too, and the term is already >= P[W' >= v - i] >= 1/2. Below 1/2, p is
    therefore nondecreasing in ε, the rejected εs form an interval starting at 0 and the root is its end;
    hence ``confidence >= 0.5``.

    Args:
        canaries: m, the number of canaries, each included independently with probability 1/2; >= 1.
        guesses: r, the number of canaries the auditor guessed on (the rest abstained); 0 <= r <= m.
        correct: v, the number of right guesses; 0 <= v <= r.
        delta: δ at which ε is audited; in [0, 1). Use the δ the run's guarantee is stated at.
        confidence: probability that the bound is valid; in [0.5, 1).

    Returns:
        ε̂ >= 0 (nats); 0.0 when even ε = 0 is not rejected (too few or too inaccurate guesses).

    Raises:
        ValueError: if a count is not an int in its range, ``delta`` is outside [0, 1) or ``confidence``
            outside [0.5, 1).

    Example:
        >>> round(epsilon_lower_bound(canaries=1000, guesses=100, correct=75, delta=1e-4), 3)  # paper, App. D
        0.673
    """
    m, r, v = _check_counts(canaries, guesses, correct)
    delta = _check_probability("delta", delta, open_low=False, open_high=True)
    confidence = _check_probability("confidence", confidence, open_low=True, open_high=True)
    if confidence < 0.5:
        raise ValueError(
            f"confidence must lie in [0.5, 1) for a lower bound, got {confidence}; use e.g. 0.95."
        )
    significance = 1.0 - confidence

    def excess(epsilon: float) -> float:  # < 0 exactly where ε is rejected
        return _p_value(m, r, v, epsilon, delta) - significance

    if excess(0.0) >= 0.0:
        return 0.0
    low, high = 0.0, 1.0
    while excess(high) < 0.0:  # p -> 1 as ε -> ∞ (q -> 1 and v <= r), so this ends
        low, high = high, 2.0 * high
    return float(optimize.brentq(excess, low, high, xtol=_XTOL))
