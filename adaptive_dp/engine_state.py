"""Privacy reports and checkpoints of :class:`~adaptive_dp.AdaptivePrivacyEngine` (a mixin before opacus' engine).

The guarantee and its kind (filter, odometer or composition), the labelled privacy summary, the canary audit, and
opacus' ``save_checkpoint`` / ``load_checkpoint`` extended with the control loop's (and the canaries') state.
"""

from __future__ import annotations

import os
from typing import IO, Any, BinaryIO

from opacus.grad_sample import AbstractGradSampleModule
from opacus.optimizers import DPOptimizer
from torch import nn

__all__ = ["EngineStateMixin"]


class EngineStateMixin:
    """Reports and checkpoints; mixed into :class:`~adaptive_dp.AdaptivePrivacyEngine` (which defines the parts used)."""

    # ------------------------------------------------------------------ privacy reports
    @property
    def guarantee_kind(self) -> str:
        """Which theorem stands behind :attr:`guarantee_epsilon` (docs/accounting.md).

        ``"renyi-filter"``: a hard budget (Feldman & Zrnic 2021, Thm 3.1); ``"renyi-odometer"``: σ chosen from the
        data's leakage readings without a budget (a supermartingale mixture over RDP orders, valid at any stopping
        time); ``"composition"``: σ fixed in advance (given or scheduled), where the accountant's composition is the
        guarantee.
        """
        if self.budget_filter is not None:
            return "renyi-filter"
        if self.control_loop is not None and self.control_loop.odometer is not None:
            return "renyi-odometer"
        return "composition"

    @property
    def guarantee_epsilon(self) -> float | None:
        """The formal ε at :attr:`target_delta` for the run so far (see :attr:`guarantee_kind`); None before a step.

        With a budget it is the filter's target (fixed up front); with data-adaptive σ and no budget, the Rényi
        odometer's ε (≥ the composition); with σ fixed in advance, the accountant's composition.
        """
        kind = self.guarantee_kind
        if kind == "renyi-filter":
            return float(self.budget_filter.guarantee_epsilon)
        if not self.history:
            return None
        if kind == "renyi-odometer":
            return float(self.control_loop.odometer.get_epsilon(self.target_delta))
        return float(self.get_epsilon(self.target_delta))

    def privacy_summary(self, delta: float | None = None) -> dict[str, Any]:
        """Both privacy figures, labelled: the filter's guarantee and the accountant's odometer.

        Returns:
            ``{"steps", "delta", "guarantee_epsilon", "guarantee_kind", "odometer_epsilon", "accountant"}``: the
            guarantee at the engine's ``target_delta`` (:attr:`guarantee_epsilon`), and the odometer
            ``get_epsilon(delta)``, the accountant's composition of the σ history used (opacus' meaning; not a
            guarantee by itself when σ was chosen from the data).
        """
        delta = self.target_delta if delta is None else float(delta)
        return {
            "steps": len(self.history),
            "delta": delta,
            "guarantee_epsilon": self.guarantee_epsilon,
            "guarantee_kind": self.guarantee_kind,
            "odometer_epsilon": float(self.get_epsilon(delta)) if len(self.history) else 0.0,
            "accountant": self.accountant.mechanism(),
            **self.spend_summary(),
        }

    def spend_summary(self) -> dict[str, Any]:
        """What the run spent of its plan, and the compute ``spend_budget`` cost (docs/accounting.md).

        Returns:
            ``spend_budget`` (None: off), ``spend_limit``, ``planned_steps`` (None without a plan),
            ``steps_past_plan`` (steps taken beyond it), ``base_sample_rate`` (q of the plan),
            ``mean_sample_rate`` (mean q booked per step), ``compute_vs_plan`` (expected examples processed,
            Σ_t q_t, over the plan's T · q_base: the compute relative to the plan; None without a plan) and
            ``budget_spent`` (the filter's max_α spent(α) / B(α); None without a budget).
        """
        loop = self.control_loop
        spender = None if loop is None else loop.spender
        budget_filter = self.budget_filter
        base = self.sample_rate
        planned = budget_filter.planned_steps if budget_filter is not None else None
        if planned is None and self.options.total_steps is not None:
            planned = int(self.options.total_steps)
        rates = [r["sample_rate"] if r.get("sample_rate") is not None else base for r in self.history]
        examples = sum(rates) if base is not None else None
        return {
            "spend_budget": None if spender is None else spender.mode,
            "spend_limit": None if spender is None else spender.limit,
            "planned_steps": planned,
            "steps_past_plan": None if planned is None else max(len(self.history) - planned, 0),
            "base_sample_rate": base,
            "mean_sample_rate": examples / len(rates) if rates and examples is not None else None,
            "compute_vs_plan": examples / (planned * base) if planned and examples is not None else None,
            "budget_spent": None if budget_filter is None else budget_filter.spent_fraction(),
        }

    def canary_audit(self, confidence: float = 0.95, *, delta: float | None = None) -> Any:
        """The one-run empirical ε lower bound ε̂ of this run from its canaries (Steinke, Nasr & Jagielski 2023).

        Args:
            confidence: probability that ε̂ is below the run's true ε (the bound holds at this level).
            delta: δ of the bound (default: the engine's ``target_delta``).

        Returns:
            :class:`~adaptive_dp.auditing.CanaryAudit` (``epsilon_lower_bound``, ``canaries``, ``guesses``,
            ``correct``, ``confidence``, ``delta``, ``mode``, ``k``).

        Raises:
            RuntimeError: the run has no canaries (``make_private(..., canaries=M)``).
        """
        if self.canary_run is None:
            raise RuntimeError(
                "this run has no canaries: pass canaries=1000 (and canary_mode=) to make_private"
            )
        delta = self.target_delta if delta is None else float(delta)
        if self.options.canary_mode == "input":
            model = (
                self._module._module if isinstance(self._module, AbstractGradSampleModule) else self._module
            )
            return self.canary_run.audit(model=model, delta=delta, confidence=confidence)
        return self.canary_run.audit(delta=delta, confidence=confidence)

    # ------------------------------------------------------------------ checkpoints
    def adaptive_state_dict(self) -> dict[str, Any]:
        """The control loop's state (controller, monitor, filter, history, pending reading, σ bookkeeping)."""
        if self.control_loop is None:
            raise RuntimeError("make_private has not been called; there is no adaptive state to save")
        state = self.control_loop.state_dict()
        state["canaries"] = None if self.canary_run is None else self.canary_run.state_dict()
        return state

    def load_adaptive_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`adaptive_state_dict` into an engine set up by the same ``make_private`` call.

        With a controller, σ is controller state and the optimizer gets the σ of the saved run; without one
        ``optimizer.noise_multiplier`` is left as it is (opacus' checkpoint semantics).

        Raises:
            ValueError: the saved state has a controller / monitor / filter this engine lacks (or the other way).
        """
        if self.control_loop is None:
            raise RuntimeError(
                "call make_private with the settings of the saved run before loading its state"
            )
        self.control_loop.load_state_dict(state)
        if (state.get("canaries") is None) != (self.canary_run is None):
            raise ValueError(
                "the checkpoint and this engine disagree on canaries; use the saved run's canaries="
            )
        if self.canary_run is not None:
            self.canary_run.load_state_dict(state["canaries"])
        if self.controller is not None and self._optimizer is not None:
            self._optimizer.noise_multiplier = self.control_loop.last_set_sigma

    def save_checkpoint(
        self,
        *,
        path: str | os.PathLike | BinaryIO | IO[bytes],
        module: nn.Module,
        optimizer: DPOptimizer | None = None,
        noise_scheduler=None,
        grad_clip_scheduler=None,
        checkpoint_dict: dict[str, Any] | None = None,
        module_state_dict_kwargs: dict[str, Any] | None = None,
        torch_save_kwargs: dict[str, Any] | None = None,
    ):
        """opacus' ``save_checkpoint``, plus the control loop's state under ``"adaptive_dp_state_dict"``."""
        checkpoint_dict = dict(checkpoint_dict or {})
        if self.control_loop is not None:
            checkpoint_dict["adaptive_dp_state_dict"] = self.adaptive_state_dict()
        return super().save_checkpoint(
            path=path,
            module=module,
            optimizer=optimizer,
            noise_scheduler=noise_scheduler,
            grad_clip_scheduler=grad_clip_scheduler,
            checkpoint_dict=checkpoint_dict,
            module_state_dict_kwargs=module_state_dict_kwargs,
            torch_save_kwargs=torch_save_kwargs,
        )

    def load_checkpoint(
        self,
        *,
        path: str | os.PathLike | BinaryIO | IO[bytes],
        module: nn.Module,
        optimizer: DPOptimizer | None = None,
        noise_scheduler=None,
        grad_clip_scheduler=None,
        module_load_dict_kwargs: dict[str, Any] | None = None,
        torch_load_kwargs: dict[str, Any] | None = None,
    ) -> dict:
        """opacus' ``load_checkpoint``; also restores the control loop's state when the checkpoint has it.

        Call it after ``make_private`` with the settings of the run that saved the checkpoint; the next step then
        gets the σ and the ε it would have had without the interruption.
        """
        checkpoint = super().load_checkpoint(
            path=path,
            module=module,
            optimizer=optimizer,
            noise_scheduler=noise_scheduler,
            grad_clip_scheduler=grad_clip_scheduler,
            module_load_dict_kwargs=module_load_dict_kwargs,
            torch_load_kwargs=torch_load_kwargs,
        )
        state = checkpoint.pop("adaptive_dp_state_dict", None)
        if state is not None and self.control_loop is not None:
            self.load_adaptive_state_dict(state)
        return checkpoint
