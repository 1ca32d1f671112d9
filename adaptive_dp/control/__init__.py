"""The noise-control loop and its value types: where each step's noise multiplier is decided.

* :class:`NoiseControlLoop` (:mod:`~adaptive_dp.control.loop`) — reading → controller → budget floor → σ → record;
* :class:`StepRecord`, :class:`FailedReading` (:mod:`~adaptive_dp.control.records`);
* :class:`AdaptiveOptions` (:mod:`~adaptive_dp.control.options`) — the engine's adaptive settings;
* :class:`BudgetSpender`, :class:`SpendLimitReached` (:mod:`~adaptive_dp.control.spend`) — ``spend_budget``.
"""

from adaptive_dp.control.loop import NoiseControlLoop
from adaptive_dp.control.options import AdaptiveOptions
from adaptive_dp.control.records import FailedReading, HistoryRecord, StepRecord
from adaptive_dp.control.spend import BudgetSpender, SpendLimitReached

__all__ = [
    "AdaptiveOptions",
    "BudgetSpender",
    "FailedReading",
    "HistoryRecord",
    "NoiseControlLoop",
    "SpendLimitReached",
    "StepRecord",
]
