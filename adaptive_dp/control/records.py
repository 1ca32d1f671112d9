"""The value types of the noise-control loop: one step's record and a failed leakage reading.

Defined once here; the engine's :attr:`~adaptive_dp.AdaptivePrivacyEngine.history`, the trainer's
``history.jsonl`` and the distributed broadcast all carry :class:`StepRecord` fields.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from typing import Any

__all__ = ["DEPRECATED_KEYS", "FailedReading", "HistoryRecord", "StepRecord"]

#: history keys renamed in 0.2 -> their new name (the old name still reads, with a DeprecationWarning).
DEPRECATED_KEYS = {"mi_gap": "critic_gap"}


@dataclass(frozen=True)
class FailedReading:
    """A leakage reading that failed (an exception or a non-finite value inside the monitor).

    It reaches the controller as NaN, which every controller answers with ``sigma_max`` until the next valid
    reading (fail closed: a meter that cannot see never lowers the noise).

    Attributes:
        message: ``"<ExceptionType>: <message>"`` of the failure, kept in the step record's ``monitor_error``.
    """

    message: str


@dataclass(frozen=True)
class StepRecord:
    """What the engine decided and booked for one optimizer step.

    Attributes:
        step: 1-based index of the optimizer step (virtual steps of gradient accumulation are not steps).
        noise_multiplier: σ used for the step's noise (std σ·C per coordinate) and booked by the accountant.
        mi: the leakage reading handed to the controller for this step, nats of MI per audit example; None
            without a reading at this step, NaN for a failed reading.
        critic_gap: mean critic score on matched minus mismatched (shuffled) audit pairs of that reading (a
            difference of critic scores, not MI); None without a reading.
        sigma_floor: the ε budget's floor for the step (the smallest σ the Rényi filter lets it use); None
            without a budget.
        controller_error: the controller's own error at a reading step (reading − its setpoint, nats); None
            otherwise.
        epsilon: the odometer ε at the engine's δ after the step (the accountant's composition of the σ
            history, not a guarantee under adaptive σ); None for accountants too slow to query every step (PRV).
        monitor_error: message of a failed reading, else None.
        audit_loss: mean loss on the audit split at the reading (public/held-out data), else None.
        meter_blind: True when the blind-meter guard held σ up at this step (the estimator read far below the
            likelihood-ratio reference at its last check; :mod:`adaptive_dp.control.guard`).
        sample_rate: q the step's Poisson batch was drawn at and booked with (changes per step only with
            ``spend_budget="sample-rate"``).
        guarantee_epsilon: the engine's formal ε at its δ after the step (``engine.guarantee_epsilon``: the
            filter's target under a budget, the Rényi odometer without one, else the composition); None where
            the accountant is too slow to query every step (PRV).
    """

    step: int
    noise_multiplier: float
    mi: float | None = None
    critic_gap: float | None = None
    sigma_floor: float | None = None
    controller_error: float | None = None
    epsilon: float | None = None
    monitor_error: str | None = None
    audit_loss: float | None = None
    meter_blind: bool = False
    sample_rate: float | None = None
    guarantee_epsilon: float | None = None

    def with_epsilon(self, epsilon: float | None, **booked: Any) -> StepRecord:
        """A copy with ``epsilon`` set (the odometer is known only after the accountant booked the step), and
        any other fields known only then (``sample_rate``, ``guarantee_epsilon``)."""
        return dataclasses.replace(self, epsilon=epsilon, **booked)

    def as_dict(self) -> HistoryRecord:
        """The record as a :class:`HistoryRecord` (a plain dict for JSON and the trainer)."""
        return HistoryRecord(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StepRecord:
        """Rebuild from :meth:`as_dict` output (also from checkpoints that still use ``mi_gap``).

        Unknown keys (e.g. the trainer's ``epoch`` or ``loss``) are ignored.
        """
        data = dict(data)
        for old, new in DEPRECATED_KEYS.items():
            if old in data and new not in data:
                data[new] = data.pop(old)
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    @property
    def failed(self) -> bool:
        """True when the step's reading failed (``mi`` is NaN)."""
        return self.mi is not None and math.isnan(self.mi)


class HistoryRecord(dict):
    """One entry of ``engine.history``: a dict of :class:`StepRecord` fields (plus what a trainer adds).

    Reading a key renamed in 0.2 (``record["mi_gap"]``, now ``critic_gap``) still works for one release and warns
    with a DeprecationWarning.
    """

    def __missing__(self, key: str) -> Any:
        new = DEPRECATED_KEYS.get(key)
        if new is None or new not in self:
            raise KeyError(key)
        warnings.warn(
            f"history key {key!r} is deprecated (it is not MI); use {new!r}", DeprecationWarning, stacklevel=2
        )
        return self[new]
