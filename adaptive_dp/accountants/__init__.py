"""Privacy accounting: RDP maths, the incremental RDP accountant and the Rényi filter.

* :mod:`adaptive_dp.accountants.rdp` — RDP of the sampled Gaussian mechanism, ε from an RDP curve, and
  :class:`IncrementalRDPAccountant` (opacus' RDP ε at O(#orders) per step, registered with opacus as
  ``"rdp_incremental"``);
* :mod:`adaptive_dp.accountants.filter` — :class:`RenyiFilter`, the hard ε budget that stays sound when σ
  is chosen adaptively (Feldman & Zrnic 2021), and :class:`PrivacyBudgetExhausted`;
* :mod:`adaptive_dp.accountants.odometer` — :class:`RenyiOdometer`, a valid ε at every step for adaptively
  chosen σ without a budget (a supermartingale mixture over RDP orders; docs/accounting.md).
"""

from adaptive_dp.accountants.filter import PrivacyBudgetExhausted, RenyiFilter
from adaptive_dp.accountants.odometer import RenyiOdometer, epsilon_from_rdp_mixture, log_uniform_weights
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
    "RenyiOdometer",
    "epsilon_from_rdp",
    "epsilon_from_rdp_mixture",
    "log_uniform_weights",
    "prv_epsilon",
    "rdp_sampled_gaussian",
]
