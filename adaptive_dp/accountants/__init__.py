"""Privacy accounting: RDP maths, the incremental RDP accountant and the Rényi filter.

* :mod:`adaptive_dp.accountants.rdp` — RDP of the sampled Gaussian mechanism, ε from an RDP curve, and
  :class:`IncrementalRDPAccountant` (opacus' RDP ε at O(#orders) per step, registered with opacus as
  ``"rdp_incremental"``);
* :mod:`adaptive_dp.accountants.filter` — :class:`RenyiFilter`, the hard ε budget that stays sound when σ
  is chosen adaptively (Feldman & Zrnic 2021), and :class:`PrivacyBudgetExhausted`.
"""

from adaptive_dp.accountants.filter import PrivacyBudgetExhausted, RenyiFilter
from adaptive_dp.accountants.rdp import (
    DEFAULT_ORDERS,
    IncrementalRDPAccountant,
    epsilon_from_rdp,
    prv_epsilon,
    rdp_sampled_gaussian,
)

__all__ = [
    "DEFAULT_ORDERS",
    "IncrementalRDPAccountant",
    "PrivacyBudgetExhausted",
    "RenyiFilter",
    "epsilon_from_rdp",
    "prv_epsilon",
    "rdp_sampled_gaussian",
]
