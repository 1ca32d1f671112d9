"""adaptive_dp: closed-loop DP-SGD for Opacus.

Replace ``opacus.PrivacyEngine`` with :class:`AdaptivePrivacyEngine` and training measures gradient
leakage (mutual information between data and released gradients, in nats) on an audit split as it
goes; a feedback controller turns that reading into the next step's noise multiplier, and a Rényi
filter keeps a hard ε budget sound although σ adapts. See ``README.md`` and ``docs/``.

Heavy submodules are imported lazily so that ``import adaptive_dp`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "AdaptivePrivacyEngine": "adaptive_dp.privacy_engine",
    "PrivacyBudgetExhausted": "adaptive_dp.accountants.filter",
    "LeakageMonitor": "adaptive_dp.leakage.monitor",
    "estimate_mi": "adaptive_dp.leakage.mine",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'adaptive_dp' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
