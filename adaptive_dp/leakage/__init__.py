"""Leakage measurement: from audit examples to a mutual-information reading (nats).

* :mod:`~adaptive_dp.leakage.audit` — the audit split (carving, validation);
* :mod:`~adaptive_dp.leakage.monitor` — :class:`LeakageMonitor`, per-sample gradients of the audit split and
  the estimators (likelihood-ratio, token-MINE);
* :mod:`~adaptive_dp.leakage.mine` — MI bounds (DV, MINE, InfoNCE, SMILE) and ``estimate_mi``;
* :mod:`~adaptive_dp.leakage.tokens` — privacy tokens (gradient embeddings);
* :mod:`~adaptive_dp.leakage.features` — intermediate-layer data features;
* :mod:`~adaptive_dp.leakage.critics` — statistics networks T for MINE.
"""

from adaptive_dp.leakage.monitor import ESTIMATORS, LeakageMonitor, LeakageReading, MonitorError

__all__ = ["ESTIMATORS", "LeakageMonitor", "LeakageReading", "MonitorError"]
