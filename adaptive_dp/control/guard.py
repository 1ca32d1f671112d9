"""The blind-meter guard: a leakage meter that cannot see must never lower the noise.

A learned estimator can read ≈ 0 nats where leakage is large (e.g. privacy tokens that lose the gradient's
signal: measured, the autoencoder/projection/transformer encoders read 0.002 nats where the likelihood-ratio
reference reads 0.5), and a feedback controller then drops σ to its minimum — failing open. The guard compares
the meter with the model-aware likelihood-ratio reference (closed form, training-free: the reference the learned
estimator is held against) on the same audit split and σ, at the first reading and every ``every``-th after:

    blind  ⇔  reference.mi > min_leak  and  reading.mi < tolerance · reference.mi − 2·√(se² + se_ref²)

While the meter is blind, σ may not go below the guard's floor: the last σ set while the meter passed, or, if it
never passed, the capacity σ of the ceiling (I ≤ 1/(2σ²) nats for clipped gradients, so σ = 1/√(2·target_mi)
keeps any MI under the ceiling), or the initial σ without a ceiling.
"""

from __future__ import annotations

import logging
import math
import warnings
from typing import Any

__all__ = ["MeterGuard"]

logger = logging.getLogger(__name__)


class MeterGuard:
    """Checks a leakage meter against the likelihood-ratio reference and floors σ while it is blind.

    Args:
        reference: a likelihood-ratio :class:`~adaptive_dp.leakage.LeakageMonitor` on the same model and audit split.
        noise_multiplier: the initial σ (the floor without a ceiling before any check passed).
        target_mi: the ceiling (nats), or None.
        every: check at the first reading and every ``every``-th reading after.
        tolerance: the fraction of the reference reading the meter must reach (up to 2 standard errors).
        min_leak: below this reference reading (nats) there is too little leakage to judge; the check passes.
    """

    def __init__(
        self,
        *,
        reference: Any,
        noise_multiplier: float,
        target_mi: float | None,
        every: int = 10,
        tolerance: float = 0.5,
        min_leak: float = 0.05,
    ):
        self.reference = reference
        self.every, self.tolerance, self.min_leak = int(every), float(tolerance), float(min_leak)
        self.blind = False
        self.passed_once = False
        self.floor_sigma = 1.0 / math.sqrt(2.0 * target_mi) if target_mi else float(noise_multiplier)
        self.readings = 0
        self.events = 0
        self._warned = False

    def observe(self, reading: Any, *, noise_multiplier: float, max_grad_norm: float | list[float]) -> None:
        """Check a valid reading when one is due (the first, then every ``every``-th)."""
        self.readings += 1
        if (self.readings - 1) % self.every:
            return
        ref = self.reference.read(noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm)
        slack = 2.0 * math.sqrt(float(reading.stderr) ** 2 + float(ref.stderr) ** 2)
        blind = ref.mi > self.min_leak and reading.mi < self.tolerance * ref.mi - slack
        if blind:
            self.events += 1
            logger.warning(
                "blind leakage meter at σ = %.4g: it reads %.4g nats where the likelihood-ratio reference reads %.4g; "
                "σ is held at ≥ %.4g until it agrees again",
                noise_multiplier,
                reading.mi,
                ref.mi,
                self.floor_sigma,
            )
            if not self._warned:
                self._warned = True
                warnings.warn(
                    f"the leakage estimator reads {reading.mi:.3g} nats where the likelihood-ratio reference reads "
                    f"{ref.mi:.3g}: it cannot see the leakage, so it may not lower σ below {self.floor_sigma:.3g} "
                    "(fail closed); use estimator='likelihood-ratio' or a token encoder that keeps the gradient's "
                    "signal (token_encoder='span')",
                    UserWarning,
                    stacklevel=2,
                )
        self.blind = blind
        self.passed_once = self.passed_once or not blind

    def floor(self) -> float | None:
        """The σ floor while blind, else None."""
        return self.floor_sigma if self.blind else None

    def note_sigma(self, sigma: float) -> None:
        """The σ set for a step: while the meter passes, it becomes the floor of a later blind spell."""
        if not self.blind and self.passed_once:
            self.floor_sigma = float(sigma)

    def state_dict(self) -> dict[str, Any]:
        """The guard's counters, floor and the reference monitor's state."""
        return {
            "blind": self.blind,
            "passed_once": self.passed_once,
            "floor_sigma": self.floor_sigma,
            "readings": self.readings,
            "events": self.events,
            "warned": self._warned,
            "reference": self.reference.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.blind, self.passed_once = bool(state["blind"]), bool(state["passed_once"])
        self.floor_sigma, self.readings = float(state["floor_sigma"]), int(state["readings"])
        self.events, self._warned = int(state["events"]), bool(state["warned"])
        self.reference.load_state_dict(state["reference"])
