"""Feedback controllers and open-loop schedules for the DP-SGD noise multiplier.

Scalar in (a leakage reading in nats, or None / NaN; optionally the estimator's curve σ ↦ (MI, stderr)), σ out.
Pure Python + numpy: no torch, no opacus.

Every controller follows :class:`Controller`: ``update(measurement, step, *, sigma_floor=None, mi_curve=None)
-> σ`` once per optimizer step, ``reset()``, ``state_dict()`` / ``load_state_dict()``, ``sigma_min`` /
``sigma_max``, and the read-only ``sigma`` (current σ before the floor) and ``last_error`` (measurement −
setpoint, or None). σ₀ is ``noise_multiplier`` in every constructor.

* feedback: :class:`PIDController`, :class:`ThresholdController`, :class:`PredictiveController` (solves the MI
  curve :data:`MICurve` for σ; falls back to the PID without one);
* open loop (Wei & Liu 2021): :class:`LinearDecay`, :class:`StaircaseDecay`, :class:`ExponentialDecay`,
  :class:`CyclicDecay`, :class:`ConstantNoise`;
* by name: :data:`CONTROLLERS` (:data:`FEEDBACK`, :data:`SCHEDULES`), filled by :func:`register_controller`,
  and :func:`build_controller`;
* :mod:`controllers.simulation`: numpy leakage plants and the closed-loop ``simulate`` used to tune and test.

The opacus ``_NoiseScheduler`` adapters of the schedules live in ``adaptive_dp.schedulers`` (this package
stays free of torch and opacus).
"""

from controllers.base import Controller, MICurve
from controllers.feedback import FeedbackController
from controllers.pid import PIDController
from controllers.predictive import PredictiveController
from controllers.registry import CONTROLLERS, FEEDBACK, SCHEDULES, build_controller, register_controller
from controllers.schedules import (
    ConstantNoise,
    CyclicDecay,
    ExponentialDecay,
    LinearDecay,
    Schedule,
    StaircaseDecay,
    default_sigma_end,
)
from controllers.threshold import ThresholdController

__all__ = [
    "CONTROLLERS",
    "FEEDBACK",
    "SCHEDULES",
    "ConstantNoise",
    "Controller",
    "CyclicDecay",
    "ExponentialDecay",
    "FeedbackController",
    "LinearDecay",
    "MICurve",
    "PIDController",
    "PredictiveController",
    "Schedule",
    "StaircaseDecay",
    "ThresholdController",
    "build_controller",
    "default_sigma_end",
    "register_controller",
]
