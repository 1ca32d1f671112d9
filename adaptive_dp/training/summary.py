"""``summary.json`` of a training run: accuracy, ε (odometer and guarantee), σ, leakage, sizes, outputs."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any

from adaptive_dp.training.config import FEEDBACK_CONTROLLERS, TrainConfig
from adaptive_dp.training.spend import spend_summary
from adaptive_dp.training.state import TrainingRun


def leakage_summary(history: list[Mapping[str, Any]], *, target_mi: float | None = None) -> dict[str, Any]:
    """Summary of the MI readings (nats) in a run's step records.

    Args:
        history: step records; ``mi`` is a reading (nats), None on steps without one, NaN for a failed one.
        target_mi: the MI ceiling (nats), if any.

    Returns:
        ``{"mi_readings": count of valid readings, "failed_readings": count of NaN readings, "max_mi",
        "mean_mi", "final_mi" (None without readings), "target_mi", "readings_over_ceiling",
        "fraction_over_ceiling", "meter_blind_steps"}`` — the count and the share of valid readings above
        ``target_mi`` (None without a ceiling or readings), and the steps at which the blind-meter guard held σ
        up (the estimator could not see leakage the likelihood-ratio reference saw).
    """
    values = [r.get("mi") for r in history if r.get("mi") is not None]
    valid = [float(v) for v in values if math.isfinite(float(v))]
    over = count = None
    if target_mi is not None and valid:
        count = sum(v > target_mi for v in valid)
        over = count / len(valid)
    return {
        "mi_readings": len(valid),
        "failed_readings": len(values) - len(valid),
        "max_mi": max(valid) if valid else None,
        "mean_mi": sum(valid) / len(valid) if valid else None,
        "final_mi": valid[-1] if valid else None,
        "target_mi": target_mi,
        "readings_over_ceiling": count,
        "fraction_over_ceiling": over,
        "meter_blind_steps": sum(bool(r.get("meter_blind")) for r in history),
    }


#: what stands behind ``guarantee_epsilon``, by the engine's ``guarantee_kind`` (docs/accounting.md).
GUARANTEE_LABELS = {
    "renyi-filter": "budget",
    "renyi-odometer": "Rényi odometer, no budget",
    "composition": "composition, σ fixed in advance",
}


def epsilon_meaning(config: TrainConfig, *, kind: str | None) -> str:
    """What the summary's ε values mean for this run, by the engine's ``guarantee_kind`` (None: none given)."""
    if config.non_private:
        return (
            "non-private run (plain SGD: no clipping, no noise, no accountant): ε = ∞, written as null "
            "with non_private: true"
        )
    odometer = "epsilon = odometer_epsilon: the RDP accountant's composition of the σ history used"
    if kind == "renyi-filter":
        return f"guarantee_epsilon: the Rényi filter's formal ε at δ = {config.delta:g} (target_epsilon); {odometer}"
    if kind == "renyi-odometer":
        return (
            f"guarantee_epsilon: the Rényi odometer's formal ε at δ = {config.delta:g} (σ was chosen from audit "
            f"readings without a budget; valid whenever the run stopped); {odometer}, not a guarantee by itself here"
        )
    if kind == "composition":
        return f"σ fixed in advance: guarantee_epsilon is the accountant's composition; {odometer}"
    if config.target_mi is not None or config.controller in FEEDBACK_CONTROLLERS:
        return (
            "odometer only: RDP composition of the σ history used; σ was chosen from audit readings "
            "without a budget, so this is no formal (ε, δ) guarantee (use --target-epsilon for one)"
        )
    return "RDP accountant composition of the noise multipliers used (opacus get_epsilon)"


def privacy_figures(run: TrainingRun) -> dict[str, Any]:
    """``noise_multiplier`` (σ of the last step), ``epsilon`` (the odometer at δ, lost steps included),
    ``guarantee_epsilon`` and ``guarantee_kind`` (the engine's formal ε and the theorem behind it, see
    :data:`GUARANTEE_LABELS`) and ``accountant`` of ``run``; a non-private run has σ 0 and no ε (None: ε = ∞),
    guarantee or accountant."""
    history, config = run.progress.history, run.config
    if run.engine is None:
        return {
            "noise_multiplier": 0.0,
            "epsilon": None,
            "guarantee_epsilon": None,
            "guarantee_kind": None,
            "accountant": None,
        }
    privacy = run.engine.privacy_summary(config.delta)
    if history and not run.progress.discarded:
        odometer = history[-1]["epsilon"]
    else:  # lost steps are booked in the accountant but in no kept record
        odometer = float(run.engine.get_epsilon(config.delta))
    guarantee = privacy["guarantee_epsilon"]
    return {
        "noise_multiplier": float(run.optimizer.noise_multiplier),
        "epsilon": odometer,
        "guarantee_epsilon": guarantee,
        "guarantee_kind": privacy.get("guarantee_kind", "renyi-filter" if guarantee is not None else None),
        "accountant": privacy["accountant"],
    }


def build_summary(
    run: TrainingRun, *, outputs: Mapping[str, Any], figures: Mapping[str, Any]
) -> dict[str, Any]:
    """The summary of a finished (or stopped-early) run, as :func:`adaptive_dp.training.train` returns it.

    Args:
        run: the run, after its last epoch (``run.tracker`` open).
        outputs: :func:`output_paths` (``tradeoff`` None if the figure could not be drawn).
        figures: :func:`privacy_figures` of ``run``.

    ``private_metrics_logged`` says whether the training-batch loss and batch size (not covered by ε) were
    published (``log_private_metrics``, always in a non-private run). ``epsilon``, ``odometer_epsilon`` and
    ``guarantee_epsilon`` are null in a non-private run (ε = ∞; ``non_private: true``). ``interrupted`` names
    the signal that stopped the run (None for a run that ended); ``test_accuracy`` is the last finished
    epoch's (None before one). ``run_id`` is the id every file of the run carries. ``empirical_epsilon`` is
    the canary audit's ε̂ at δ (``figures["empirical_epsilon"]``; null without canaries or before the run ended).
    """
    config, progress = run.config, run.progress
    final = progress.epochs[-1] if progress.epochs else {}
    sigmas = [r["noise_multiplier"] for r in progress.history] or [figures["noise_multiplier"]]
    monitor = getattr(run.engine, "monitor", None)
    return {
        "run_id": run.run_id,
        "non_private": config.non_private,
        "test_accuracy": final.get("test_accuracy"),
        "test_loss": final.get("test_loss"),
        "epsilon": figures["epsilon"],
        "odometer_epsilon": figures["epsilon"],
        "guarantee_epsilon": figures["guarantee_epsilon"],
        "guarantee_kind": figures["guarantee_kind"],
        "delta": config.delta,
        "epsilon_meaning": epsilon_meaning(config, kind=figures["guarantee_kind"]),
        "noise_multiplier": figures["noise_multiplier"],
        "initial_noise_multiplier": run.initial_sigma,
        "noise_multiplier_range": [min(sigmas), max(sigmas)],
        "max_grad_norm": config.max_grad_norm,
        "sample_rate": run.sample_rate,
        "steps": len(progress.history),
        "discarded_steps": len(progress.discarded),
        "resumed_at_step": progress.resumed_at_step,
        "epochs": config.epochs,
        **spend_summary(run),  # spend_budget and the compute the plan and it cost
        "stopped_early": progress.stop_reason is not None,
        "stop_reason": progress.stop_reason,
        "interrupted": progress.interrupted,
        "previous_run_moved_to": str(run.previous_run) if run.previous_run is not None else None,
        "grad_sample_mode": run.grad_sample_mode,
        "controller": config.controller if config.controller or config.target_mi is None else "pid",
        "estimator": config.estimator if config.monitor_on else None,
        "monitor_every": config.monitor_every if config.monitor_on else None,
        **leakage_summary(progress.history, target_mi=config.target_mi),
        "audit_size": run.sizes["audit_size"],
        "audit_examples_read": int(monitor.x.shape[0]) if monitor is not None else 0,
        "private_metrics_logged": config.log_private_metrics or config.non_private,
        "wall_time_s": time.perf_counter() - run.t_start,
        "epoch_times_s": progress.epoch_times,
        "per_epoch": progress.epochs,
        "device": str(run.device),
        "distributed": _distributed(run.context),
        "engine": f"{type(run.engine).__module__}.{type(run.engine).__name__}",
        "accountant": figures["accountant"],
        "empirical_epsilon": figures.get("empirical_epsilon"),
        "canaries": config.canaries,
        "dataset": {
            "name": run.info.name,
            **run.sizes,
            "num_classes": run.info.num_classes,
            "image_size": run.info.image_size,
        },
        "model": config.model,
        "config": config.to_dict(),
        "outputs": dict(outputs),
        "wandb": {
            "mode": run.tracker.mode,
            "dir": outputs["wandb"],
            "file": str(run.tracker.wandb_file) if run.tracker.wandb_file is not None else None,
        },
        "versions": versions(),
    }


def outcome_line(summary: Mapping[str, Any]) -> str:
    """What happened, in one line: σ range, readings over the ceiling, ε guarantee vs odometer, e.g.
    "σ 0.91–1.73 · 2 of 12 readings over the 0.5-nat ceiling · ε guarantee 3.00 (budget), odometer 2.71 at
    δ=1e-05" (the guarantee labelled by its ``guarantee_kind``, :data:`GUARANTEE_LABELS`; a non-private run:
    "non-private SGD · no clipping, no noise · ε = ∞ · N steps")."""
    if summary.get("non_private"):
        return f"non-private SGD · no clipping, no noise · ε = ∞ · {summary['steps']} steps"
    lo, hi = summary["noise_multiplier_range"]
    parts = [f"σ {lo:.2f}" if f"{lo:.2f}" == f"{hi:.2f}" else f"σ {lo:.2f}–{hi:.2f}"]
    readings, target = summary.get("mi_readings") or 0, summary.get("target_mi")
    if target is not None:
        over = summary.get("readings_over_ceiling") or 0
        parts.append(f"{over} of {readings} readings over the {target:g}-nat ceiling")
    elif readings:
        parts.append(f"{readings} readings, MI max {summary['max_mi']:.3f} nats")
    if summary.get("meter_blind_steps"):
        parts.append(f"blind meter held σ up on {summary['meter_blind_steps']} steps")
    delta, odometer, guarantee = summary["delta"], summary["odometer_epsilon"], summary["guarantee_epsilon"]
    kind = summary.get("guarantee_kind", "renyi-filter" if guarantee is not None else None)
    if kind == "composition":
        parts.append(f"ε {guarantee:.2f} at δ={delta:g} (composition, σ fixed in advance)")
    elif guarantee is not None:
        label = GUARANTEE_LABELS.get(kind, kind)
        parts.append(f"ε guarantee {guarantee:.2f} ({label}), odometer {odometer:.2f} at δ={delta:g}")
    elif target is not None or summary.get("controller") in FEEDBACK_CONTROLLERS:
        parts.append(f"ε odometer {odometer:.2f} at δ={delta:g} (no budget: not a guarantee)")
    else:
        parts.append(f"ε {odometer:.2f} at δ={delta:g}")
    return " · ".join(parts)


def output_paths(run: TrainingRun) -> dict[str, Any]:
    """The run's output files (``tradeoff`` / ``checkpoint`` None on ranks > 0 under DDP); with canaries also
    ``canary_audit`` (JSON) and ``canary_plot`` (PNG)."""
    tracker = run.tracker
    outputs = {
        "dir": str(run.out),
        "history": str(tracker.history_path),
        "summary": str(tracker.summary_path),
        "tradeoff": str(run.out / "tradeoff.png") if run.is_main else None,
        "checkpoint": str(run.out / "checkpoint.pt") if run.is_main else None,
        "wandb": str(tracker.wandb_dir) if tracker.wandb_dir is not None else None,
    }
    if run.config.canaries and not run.config.non_private:
        outputs["canary_audit"] = str(run.out / "canary_audit.json") if run.is_main else None
        outputs["canary_plot"] = str(run.out / "canary_audit.png") if run.is_main else None
    if run.context is not None:
        outputs["rank_history"] = str(tracker.rank_history_path)
    return outputs


def _distributed(context) -> dict[str, Any] | None:
    if context is None:
        return None
    return {
        "rank": context.rank,
        "world_size": context.world_size,
        "backend": context.backend,
        "timeout_s": context.timeout_s,
    }


def versions() -> dict[str, str]:
    """Versions of adaptive_dp, torch and opacus."""
    import opacus
    import torch

    from adaptive_dp import __version__

    return {"adaptive_dp": __version__, "torch": torch.__version__, "opacus": opacus.__version__}
