"""Canary audits: an empirical ε lower bound from the training run itself (one-run privacy auditing).

Steinke, Nasr & Jagielski ("Privacy Auditing with One (1) Training Run", NeurIPS 2023, arXiv:2305.08846)
insert m canaries, include each in the run with probability 1/2, guess afterwards which were included and turn
the number of right guesses into a statistically valid lower bound ε̂ on the ε of that very run. It is an
attack on the run the user actually ran, independent of the accountant's arithmetic and of the MI meter.

* :mod:`adaptive_dp.auditing.bound` — :func:`epsilon_lower_bound` (Theorem 5.2 / Corollary 5.4) and
  :func:`one_run_p_value`; numpy/scipy only;
* :mod:`adaptive_dp.auditing.canaries` — gradient canaries (white box), mislabelled input canaries (black
  box), the coin flips;
* :mod:`adaptive_dp.auditing.scoring` — :class:`CanaryScorer`, streaming white-box scores from consecutive
  models (plain SGD and SGD with momentum), and its batch form :func:`canary_scores`;
* :mod:`adaptive_dp.auditing.audit` — :func:`audit_from_scores` (top-k / bottom-k guesses, Bonferroni over
  a small k set) returning a :class:`CanaryAudit`;
* :mod:`adaptive_dp.auditing.gradient_run` — :class:`GradientCanaryRun`, white-box gradient canaries inside
  a real DP-SGD run (hooks on the adaptive DP optimizer);
* :mod:`adaptive_dp.auditing.input_run` — :class:`InputCanaryRun`, mislabelled input canaries put into the
  training loader and audited on the final model.
"""

from adaptive_dp.auditing.audit import DEFAULT_K_FRACTIONS, CanaryAudit, audit_from_scores, default_k_values
from adaptive_dp.auditing.bound import epsilon_lower_bound, one_run_p_value
from adaptive_dp.auditing.canaries import (
    canary_seeds,
    draw_inclusion,
    input_canary_scores,
    make_gradient_canaries,
    make_input_canaries,
    mislabel,
)
from adaptive_dp.auditing.gradient_run import MAX_DENSE_CANARY_FLOATS, GradientCanaryRun, sgd_momentum
from adaptive_dp.auditing.input_run import InputCanaryRun
from adaptive_dp.auditing.scoring import CanaryScorer, canary_scores

__all__ = [
    "DEFAULT_K_FRACTIONS",
    "MAX_DENSE_CANARY_FLOATS",
    "CanaryAudit",
    "CanaryScorer",
    "GradientCanaryRun",
    "InputCanaryRun",
    "audit_from_scores",
    "canary_scores",
    "canary_seeds",
    "default_k_values",
    "draw_inclusion",
    "epsilon_lower_bound",
    "input_canary_scores",
    "make_gradient_canaries",
    "make_input_canaries",
    "mislabel",
    "one_run_p_value",
    "sgd_momentum",
]
