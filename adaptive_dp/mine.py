"""Stable import path of the MI estimators: ``from adaptive_dp.mine import estimate_mi``.

The implementation lives in :mod:`adaptive_dp.leakage.mine`; this module re-exports its public names.
"""

from adaptive_dp.leakage.mine import *  # noqa: F403
from adaptive_dp.leakage.mine import __all__  # noqa: F401
