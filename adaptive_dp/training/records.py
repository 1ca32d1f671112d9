"""Step and epoch records of a training run: what goes into ``history.jsonl``, W&B and the checkpoint.

Privacy first: by default a record holds only what ε covers or what is computed on public / held-out data —
σ, ε, the budget floor, the monitor's readings (MI, critic gap, the loss on the audit split), the
controller's error and test metrics. The training-batch loss and the Poisson batch size are computed on the
private batch without noise (the batch size alone leaks membership, cf. opacus issue #571); they are
recorded (``loss`` and ``batch_size`` per step, ``train_loss`` per epoch) only with ``log_private_metrics``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

#: fields of a step record that the adaptive engine fills in (None when it has nothing for the step).
ADAPTIVE_FIELDS = ("mi", "critic_gap", "audit_loss", "sigma_floor", "controller_error")


def critic_gap(record: Mapping[str, Any]) -> float | None:
    """The critic gap of an engine (or history) record: mean critic score on matched minus mismatched
    (shuffled) audit pairs — a difference of critic scores, not an MI in nats. None on steps without a
    reading.

    Reads ``critic_gap``, or ``mi_gap``, the name engines (and history files) before the rename used.
    """
    return record.get("critic_gap", record.get("mi_gap"))


def adaptive_fields(engine) -> dict[str, Any]:
    """The leakage / controller fields (:data:`ADAPTIVE_FIELDS`, ``monitor_error`` and ``meter_blind``: whether
    the blind-meter guard held σ up at the step) of the step just taken: from ``engine.history[-1]`` when the
    engine keeps one (the adaptive engine does), else all None (``meter_blind`` False)."""
    history = getattr(engine, "history", None)
    last = history[-1] if history else {}
    fields = {field: last.get(field) for field in ADAPTIVE_FIELDS}
    fields["critic_gap"] = critic_gap(last)
    fields["monitor_error"] = last.get("monitor_error")
    fields["meter_blind"] = bool(last.get("meter_blind", False))
    return fields


def step_epsilon(engine, delta: float) -> float | None:
    """The odometer after the step just taken: the engine's history records it (cheap incremental RDP),
    else the accountant's ``get_epsilon(delta)``; None without an engine (a non-private run, ε = ∞)."""
    if engine is None:
        return None
    last = engine.history[-1] if getattr(engine, "history", None) else {}
    epsilon = last.get("epsilon")
    return float(engine.get_epsilon(delta)) if epsilon is None else float(epsilon)


def make_step_record(
    *,
    step: int,
    epoch: int,
    noise_multiplier: float,
    epsilon: float | None,
    sample_rate: float,
    lr: float,
    mi: float | None = None,
    critic_gap: float | None = None,
    audit_loss: float | None = None,
    sigma_floor: float | None = None,
    controller_error: float | None = None,
    loss: float | None = None,
    batch_size: int | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """One line of ``history.jsonl``: the optimizer step's numbers.

    Args:
        step: 1-based optimizer step.
        epoch: 1-based epoch.
        noise_multiplier: σ used for this step (noise std = σ · max_grad_norm).
        epsilon: accountant's ε at the run's δ after this step (odometer); None for a non-private run (ε = ∞).
        sample_rate: q.
        lr: learning rate used.
        mi: leakage reading taken at this step (nats), None when none was taken, NaN for a failed one.
        critic_gap: the reading's critic gap (matched minus mismatched critic score), None without a reading.
        audit_loss: mean cross-entropy (nats) of the model on the audit split at the reading, None without one.
        sigma_floor: the ε-budget floor on σ for this step, None without a budget filter.
        controller_error: the controller's error (reading − target), None without a controller.
        loss: mean training loss of the step's batch (NaN for an empty Poisson batch); a private metric:
            give it only with ``log_private_metrics`` (None leaves the field out).
        batch_size: size of the Poisson batch; a private metric like ``loss``.
        extra: further fields, written as given.

    Returns:
        The record; ``loss`` / ``batch_size`` are keys only when given.
    """
    record: dict[str, Any] = {
        "step": int(step),
        "epoch": int(epoch),
        "noise_multiplier": float(noise_multiplier),
        "epsilon": None if epsilon is None else float(epsilon),
        "sample_rate": float(sample_rate),
        "lr": float(lr),
        "mi": mi,
        "critic_gap": critic_gap,
        "audit_loss": audit_loss,
        "sigma_floor": sigma_floor,
        "controller_error": controller_error,
    }
    if loss is not None:
        record["loss"] = float(loss)
    if batch_size is not None:
        record["batch_size"] = int(batch_size)
    record.update(extra)
    return record


def make_epoch_record(
    *,
    epoch: int,
    step: int,
    history: Sequence[Mapping[str, Any]],
    test: Mapping[str, float],
    noise_multiplier: float,
    last_mi: float | None,
    epoch_time_s: float,
    batch_losses: Sequence[float] | None = None,
) -> dict[str, Any]:
    """One epoch's record (``summary.json`` ``per_epoch``, the W&B epoch table).

    Args:
        epoch: 1-based epoch; step: the last optimizer step of the epoch.
        history: the run's step records so far (this epoch's are those with ``epoch`` == ``epoch``).
        test: :func:`adaptive_dp.training.loop.evaluate` on the test split.
        noise_multiplier: σ of the optimizer now (used when no step was taken).
        last_mi: the latest valid MI reading (nats), None without one.
        epoch_time_s: wall time of the epoch, seconds.
        batch_losses: the epoch's finite training-batch losses; a private metric: give them only with
            ``log_private_metrics`` (their mean becomes ``train_loss``).

    Returns:
        ``epoch``, ``step``, ``epsilon``, ``mi``, ``test_accuracy``, ``test_loss``, ``noise_multiplier``,
        ``audit_loss`` (mean of the epoch's audit-split losses, None without one), ``epoch_time_s``, and
        ``train_loss`` only when ``batch_losses`` is given.
    """
    last = history[-1] if history else {}
    audit = [r["audit_loss"] for r in history if r.get("epoch") == epoch and _finite(r.get("audit_loss"))]
    record = {
        "epoch": epoch,
        "step": step,
        "epsilon": last.get("epsilon", 0.0),
        "mi": last_mi,
        "test_accuracy": test["accuracy"],
        "test_loss": test["loss"],
        "noise_multiplier": last.get("noise_multiplier", noise_multiplier),
        "audit_loss": sum(audit) / len(audit) if audit else None,
        "epoch_time_s": epoch_time_s,
    }
    if batch_losses is not None:
        record["train_loss"] = sum(batch_losses) / len(batch_losses) if batch_losses else None
    return record


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
