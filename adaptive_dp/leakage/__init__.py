"""Leakage measurement: from audit examples to a mutual-information reading (nats).

* :mod:`~adaptive_dp.leakage.audit` — the audit split (carving, validation);
* :mod:`~adaptive_dp.leakage.gradients` — per-sample gradients and DP-SGD clipping (shared with the attacks);
* :mod:`~adaptive_dp.leakage.monitor` — :class:`LeakageMonitor`: the audit split's clipped gradients at the
  current σ → an estimator → :class:`LeakageReading`;
* :mod:`~adaptive_dp.leakage.estimators` — the estimator interface and registry (``ESTIMATORS``);
* :mod:`~adaptive_dp.leakage.likelihood_ratio` — the closed-form Gaussian-mechanism critic (``"likelihood-ratio"``);
* :mod:`~adaptive_dp.leakage.token_mine` — the learned privacy-token estimator (``"token-mine"``);
* :mod:`~adaptive_dp.leakage.mine` — MI bounds (DV, MINE, InfoNCE, SMILE) and ``estimate_mi``
  (:mod:`~adaptive_dp.leakage.bounds`, :mod:`~adaptive_dp.leakage.mine_trainer`);
* :mod:`~adaptive_dp.leakage.tokens` — privacy tokens (gradient embeddings), on the fixed reductions of
  :mod:`~adaptive_dp.leakage.sketches`;
* :mod:`~adaptive_dp.leakage.features` — intermediate-layer data features;
* :mod:`~adaptive_dp.leakage.critics` — statistics networks T for MINE.
"""

from adaptive_dp.leakage.monitor import ESTIMATORS, LeakageMonitor, LeakageReading, MonitorError

__all__ = ["ESTIMATORS", "LeakageMonitor", "LeakageReading", "MonitorError"]
