"""The noise-control loop and its value types: where each step's noise multiplier is decided.

* :class:`NoiseControlLoop` (:mod:`~adaptive_dp.control.loop`) — reading → controller → budget floor → σ → record;
* :class:`StepRecord`, :class:`FailedReading` (:mod:`~adaptive_dp.control.records`);
* :class:`AdaptiveOptions` (:mod:`~adaptive_dp.control.options`) — the engine's adaptive settings.
"""

from adaptive_dp.control.loop import NoiseControlLoop
from adaptive_dp.control.options import AdaptiveOptions
from adaptive_dp.control.records import FailedReading, HistoryRecord, StepRecord

__all__ = ["AdaptiveOptions", "FailedReading", "HistoryRecord", "NoiseControlLoop", "StepRecord"]
