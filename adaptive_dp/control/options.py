"""The engine's adaptive settings, in one typed, immutable object.

``AdaptivePrivacyEngine.make_private(..., target_mi=0.5, controller="pid")`` and
``make_private(..., adaptive=AdaptiveOptions(target_mi=0.5, controller="pid"))`` are the same call: the keywords
of :class:`AdaptiveOptions` are split off the keyword arguments opacus receives by :meth:`AdaptiveOptions.split`.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["AdaptiveOptions", "DEFAULT_MONITOR_EVERY", "DEFAULT_SPEND_LIMIT", "SPEND_MODES"]

DEFAULT_MONITOR_EVERY = 10
#: values of ``spend_budget`` (None: off).
SPEND_MODES = ("steps", "sample-rate")
#: default ``spend_limit``: at most 4× the plan's compute (4× the planned steps, or q ≤ 4 × the base q).
DEFAULT_SPEND_LIMIT = 4.0


@dataclass(frozen=True, kw_only=True)
class AdaptiveOptions:
    """What :class:`~adaptive_dp.AdaptivePrivacyEngine` adds to opacus' ``make_private``.

    Attributes:
        target_mi: leakage ceiling, nats of MI per audit example; None = no ceiling (monitor only, or all off).
            Needs audit data.
        controller: a registry name of ``controllers.CONTROLLERS`` (``"pid"`` when ``target_mi`` is given
            without one; schedules such as ``"linear"`` need ``total_steps``, ``epochs`` or a budget), or a
            controller instance whose own ``target`` / ``sigma_min`` / ``sigma_max`` win.
        estimator: ``"likelihood-ratio"`` (training-free, model-aware; default) or ``"token-mine"``.
        token_encoder: privacy-token encoder of ``"token-mine"``.
        audit_data: public or held-out audit examples (a Dataset, a DataLoader, or tensors ``(x, y)``); they
            get no DP protection and must not overlap the training data (refused when they do).
        audit_fraction: share of the training dataset carved off as the audit split *before* the private
            loader is built (q is then computed on what is trained on); exclusive with ``audit_data``.
        monitor_every: optimizer steps between leakage readings; the first reading is taken before step 1.
        sigma_min, sigma_max: the controller's σ range (defaults 0.3 and 10, widened to include the initial
            noise multiplier). ``sigma_max`` is also the budget's stop.
        sigma_end: end value of open-loop schedules (σ runs from the initial noise multiplier to it).
        total_steps: planned optimizer steps, for schedules (a budget sets it from ``epochs``).
        epochs: planned epochs over the (carved) training loader, an alternative to ``total_steps``.
        target_delta: δ of the per-step odometer ε in the history (default: the budget's δ, else 1e-5).
        checkpoint_path: where to save the state before raising ``PrivacyBudgetExhausted``.
        seed: seed of the monitor (and of an ``audit_fraction`` split).
        controller_options: extra keywords for ``controllers.build_controller``.
        monitor_options: extra keywords for :class:`~adaptive_dp.leakage.LeakageMonitor`.
        canaries: m canaries for a one-run audit (``engine.canary_audit()``; Steinke, Nasr & Jagielski 2023); 0 = none
            (they then cost nothing). Each is included with probability 1/2 and, when included, sampled like any
            example at the run's q (q unchanged); they never touch the audit split.
        canary_mode: ``"gradient"`` (white box: canary gradients of norm C added to the clipped sum, scored from the
            sequence of models; plain SGD or SGD with momentum) or ``"input"`` (black box: mislabelled training
            examples, scored by their loss under the final model).
        canary_kind: gradient canaries' directions: ``"dirac"`` (one coordinate each; O(m) memory) or ``"random"``.
        meter_guard: check a learned estimator against the likelihood-ratio reference and never let it lower σ
            while it cannot see the leakage (:mod:`adaptive_dp.control.guard`); on by default.
        spend_budget: spend what a binding leakage ceiling leaves of an ε budget (``make_private_with_epsilon``
            only; off by default since it costs compute; :mod:`adaptive_dp.control.spend`): ``"steps"`` trains past
            the planned steps while the Rényi filter pays (up to ``spend_limit`` × the planned steps);
            ``"sample-rate"`` keeps the controller's σ and raises the Poisson rate q of the remaining planned steps
            so the budget is spent by the end of the plan (q ≤ ``spend_limit`` × the base q, ≤ 1; one process).
        spend_limit: the extra compute ``spend_budget`` may use, as a multiple of the plan (> 1; default
            :data:`DEFAULT_SPEND_LIMIT` = 4): total steps for ``"steps"``, the largest q / base q for
            ``"sample-rate"``.
    """

    target_mi: float | None = None
    controller: Any = None
    estimator: str = "likelihood-ratio"
    token_encoder: str = "span"
    audit_data: Any = None
    audit_fraction: float | None = None
    monitor_every: int = DEFAULT_MONITOR_EVERY
    sigma_min: float | None = None
    sigma_max: float | None = None
    sigma_end: float | None = None
    total_steps: int | None = None
    epochs: float | None = None
    target_delta: float | None = None
    checkpoint_path: str | os.PathLike | None = None
    seed: int = 0
    controller_options: Mapping[str, Any] = field(default_factory=dict)
    monitor_options: Mapping[str, Any] = field(default_factory=dict)
    canaries: int = 0
    canary_mode: str = "gradient"
    canary_kind: str = "dirac"
    meter_guard: bool = True
    spend_budget: str | None = None
    spend_limit: float | None = None

    def __post_init__(self) -> None:
        self._validate()

    @classmethod
    def names(cls) -> frozenset[str]:
        """The keyword names of the options."""
        return frozenset(f.name for f in dataclasses.fields(cls))

    @classmethod
    def split(
        cls, kwargs: Mapping[str, Any], *, adaptive: AdaptiveOptions | None = None
    ) -> tuple[AdaptiveOptions, dict[str, Any]]:
        """Split ``kwargs`` into adaptive options and the keywords that go on to opacus.

        Args:
            kwargs: keyword arguments of a ``make_private*`` call.
            adaptive: options passed as an object; keywords given too override its fields.

        Raises:
            ValueError: an option is invalid (see :meth:`_validate`).
        """
        names = cls.names()
        mine = {k: v for k, v in kwargs.items() if k in names}
        rest = {k: v for k, v in kwargs.items() if k not in names}
        for key in ("controller_options", "monitor_options"):
            if mine.get(key) is None:
                mine.pop(key, None)
        base = adaptive if adaptive is not None else cls()
        return dataclasses.replace(base, **mine), rest

    @property
    def adaptive(self) -> bool:
        """Whether σ may change during training (a controller or a ceiling)."""
        return self.controller is not None or self.target_mi is not None

    @property
    def wants_audit(self) -> bool:
        """Whether audit data was given (so the leakage monitor runs)."""
        return self.audit_data is not None or bool(self.audit_fraction)

    def _validate(self) -> None:
        """One clear ValueError per invalid option."""
        if self.target_mi is not None and not (_is_number(self.target_mi) and 0 < self.target_mi < math.inf):
            raise ValueError(f"target_mi must be a positive number of nats, got {self.target_mi!r}")
        every = self.monitor_every
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise ValueError(f"monitor_every must be an integer >= 1 (optimizer steps), got {every!r}")
        if self.audit_data is not None and self.audit_fraction:
            raise ValueError("pass either audit_data or audit_fraction, not both")
        if (
            isinstance(self.canaries, bool)
            or not isinstance(self.canaries, int)
            or self.canaries < 0
            or (self.canaries == 1)
        ):
            raise ValueError(f"canaries must be 0 (none) or an integer >= 2, got {self.canaries!r}")
        if self.canary_mode not in ("gradient", "input"):
            raise ValueError(f"canary_mode must be 'gradient' or 'input', got {self.canary_mode!r}")
        if self.canary_kind not in ("dirac", "random"):
            raise ValueError(f"canary_kind must be 'dirac' or 'random', got {self.canary_kind!r}")
        if self.spend_budget is not None and self.spend_budget not in SPEND_MODES:
            raise ValueError(
                f"spend_budget must be None (off), 'steps' or 'sample-rate', got {self.spend_budget!r}"
            )
        if self.spend_limit is not None and not (
            _is_number(self.spend_limit) and 1 < self.spend_limit < math.inf
        ):
            raise ValueError(
                f"spend_limit must be a number > 1 (a multiple of the plan's compute), got {self.spend_limit!r}"
            )
        if self.total_steps is not None and self.epochs is not None:
            raise ValueError("pass either total_steps or epochs, not both")
        if (
            self.target_mi is not None
            and not self.wants_audit
            and (self.controller is None or isinstance(self.controller, str))
        ):
            raise ValueError(
                "target_mi needs audit data to measure leakage on: pass audit_data=<public or held-out examples> "
                "or audit_fraction=0.02 (carved from the training set before training)"
            )


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
