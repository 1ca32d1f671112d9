"""DP optimizers whose noise multiplier is decided per step by the noise-control loop.

Opacus picks its optimizer class by dispatch on ``(clipping, distributed, grad_sample_mode)``
(``opacus.optimizers.get_optimizer_class``: DPOptimizer, DistributedDPOptimizer, DPPerLayerOptimizer,
AdaClipDPOptimizer, the fast-gradient-clipping ones). Each has an adaptive subclass here, registered against
its opacus base with :func:`register_adaptive_optimizer`; :func:`get_adaptive_optimizer_class` does opacus'
dispatch and then looks the subclass up. The subclasses override the public steps of ``DPOptimizer``:

* ``add_noise`` — σ of the step is decided (:meth:`NoiseControlLoop.decide`) right before opacus draws the
  noise; it is only reached for real steps, so virtual steps (gradient accumulation with
  ``BatchMemoryManager``) decide and book nothing;
* ``pre_step`` — after opacus' step hooks (the accountant) have run, the step is booked
  (:meth:`NoiseControlLoop.book`: filter charge, odometer, history record);
* ``step`` — after the update θ_{t+1} is applied, a leakage reading is taken when one is due.

Without a control loop attached they behave exactly as their opacus base.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from opacus.optimizers import (
    AdaClipDPOptimizer,
    DistributedDPOptimizer,
    DistributedDPOptimizerFastGradientClipping,
    DPOptimizer,
    DPOptimizerFastGradientClipping,
    DPPerLayerOptimizer,
    FSDPOptimizerFastGradientClipping,
    SimpleDistributedPerLayerOptimizer,
    get_optimizer_class,
)

from adaptive_dp import distributed as ddp

__all__ = [
    "ADAPTIVE_OPTIMIZERS",
    "AdaptiveNoiseMixin",
    "get_adaptive_optimizer_class",
    "register_adaptive_optimizer",
]

#: opacus optimizer class -> its adaptive subclass
ADAPTIVE_OPTIMIZERS: dict[type[DPOptimizer], type[DPOptimizer]] = {}

#: opacus classes that add the noise outside ``add_noise`` (inside backward hooks), so σ cannot be decided
#: per step there: a control loop that changes σ is refused for them.
NOISE_IN_BACKWARD: tuple[type[DPOptimizer], ...] = (SimpleDistributedPerLayerOptimizer,)


def register_adaptive_optimizer(base: type[DPOptimizer]) -> Callable[[type], type]:
    """Class decorator: register the decorated class as the adaptive version of opacus' ``base``."""

    def decorate(cls: type) -> type:
        if not issubclass(cls, base):
            raise TypeError(f"{cls.__name__} must subclass {base.__name__}")
        ADAPTIVE_OPTIMIZERS[base] = cls
        return cls

    return decorate


def get_adaptive_optimizer_class(
    *, clipping: str, distributed: bool, grad_sample_mode: str | None = None
) -> type:
    """The adaptive optimizer class for opacus' choice for these settings.

    Raises:
        ValueError: opacus' error for an unsupported combination.
    """
    base = get_optimizer_class(clipping=clipping, distributed=distributed, grad_sample_mode=grad_sample_mode)
    return ADAPTIVE_OPTIMIZERS[base]


class AdaptiveNoiseMixin:
    """Hands σ of every real step to a :class:`~adaptive_dp.control.NoiseControlLoop` (see the module doc).

    Two more public hook points, for parts that act on every real step (e.g. canary audits,
    :mod:`adaptive_dp.auditing`): ``attach_pre_noise_hook(fn)`` — ``fn(optimizer)`` runs after σ is decided and
    before the noise is drawn (``p.summed_grad`` holds the clipped sum, the parameters are still θ_t);
    ``attach_post_step_hook(fn)`` — ``fn(optimizer)`` runs after the update θ_{t+1} of a booked step.
    """

    control_loop: Any = None
    #: q the step's batch was drawn at, when it is not the fixed 1 / len(data_loader) (``spend_budget=
    #: "sample-rate"`` sets it with the sampler's ``sample_rate``); the accountant's step hook books it.
    step_sample_rate: float | None = None
    _decision: Any = None  # the loop's record for the step in progress
    _booked: bool = False  # whether the step in progress was booked (a reading may follow the update)
    _pre_noise_hooks: tuple = ()
    _post_step_hooks: tuple = ()

    def attach_pre_noise_hook(self, fn: Callable[[Any], None]) -> None:
        """Run ``fn(optimizer)`` on every real step after σ is decided, before the noise is drawn."""
        self._pre_noise_hooks = (*self._pre_noise_hooks, fn)

    def attach_post_step_hook(self, fn: Callable[[Any], None]) -> None:
        """Run ``fn(optimizer)`` after the parameter update of every booked step."""
        self._post_step_hooks = (*self._post_step_hooks, fn)

    def attach_control_loop(self, loop: Any) -> None:
        """Let ``loop`` decide, book and record σ of every following step (one loop per optimizer)."""
        if self.control_loop is not None and self.control_loop is not loop:
            raise RuntimeError("this optimizer already has a control loop; one engine, one private model")
        self.control_loop = loop

    def add_noise(self) -> None:
        if self.control_loop is not None:
            self._decision = self.control_loop.decide(self)
        for hook in self._pre_noise_hooks:
            hook(self)
        super().add_noise()

    def pre_step(self, closure: Callable[[], float] | None = None) -> bool | None:
        self._decision = None
        stepped = super().pre_step(closure)
        decision, self._decision = self._decision, None
        if stepped and decision is not None:
            self.control_loop.book(self, decision)
            self._booked = True
        return stepped

    def step(self, closure: Callable[[], float] | None = None) -> Any:
        self._booked = False
        result = super().step(closure)
        if self._booked:
            for hook in self._post_step_hooks:
                hook(self)
            self.control_loop.after_update(max_grad_norm=clipping_norm(self))
        return result


class CollectiveErrorsMixin:
    """For distributed optimizers: a failed all-reduce becomes one :class:`~adaptive_dp.distributed.DistributedError`."""

    def reduce_gradients(self) -> None:
        with ddp.collective_errors("all-reduce of the noisy gradients"):
            super().reduce_gradients()


def clipping_norm(optimizer: Any) -> float | list[float]:
    """The clipping norm C the monitor must use: per-layer norms, or the current (possibly adaptive) one."""
    per_layer = getattr(optimizer, "max_grad_norms", None)
    if per_layer is not None:
        return [float(c) for c in per_layer]
    return float(optimizer.max_grad_norm)


@register_adaptive_optimizer(DPOptimizer)
class AdaptiveDPOptimizer(AdaptiveNoiseMixin, DPOptimizer):
    """opacus' ``DPOptimizer`` (flat clipping, one process) with σ decided by the control loop."""


@register_adaptive_optimizer(DPPerLayerOptimizer)
class AdaptiveDPPerLayerOptimizer(AdaptiveNoiseMixin, DPPerLayerOptimizer):
    """opacus' ``DPPerLayerOptimizer`` (per-layer clipping) with σ decided by the control loop."""


@register_adaptive_optimizer(AdaClipDPOptimizer)
class AdaptiveAdaClipDPOptimizer(AdaptiveNoiseMixin, AdaClipDPOptimizer):
    """opacus' ``AdaClipDPOptimizer`` (adaptive clipping) with σ decided by the control loop."""


@register_adaptive_optimizer(DPOptimizerFastGradientClipping)
class AdaptiveDPOptimizerFastGradientClipping(AdaptiveNoiseMixin, DPOptimizerFastGradientClipping):
    """opacus' ghost-clipping optimizer with σ decided by the control loop."""


@register_adaptive_optimizer(DistributedDPOptimizer)
class AdaptiveDistributedDPOptimizer(AdaptiveNoiseMixin, CollectiveErrorsMixin, DistributedDPOptimizer):
    """opacus' ``DistributedDPOptimizer`` with σ decided on rank 0 and broadcast to every rank each step."""


@register_adaptive_optimizer(DistributedDPOptimizerFastGradientClipping)
class AdaptiveDistributedDPOptimizerFastGradientClipping(
    AdaptiveNoiseMixin, CollectiveErrorsMixin, DistributedDPOptimizerFastGradientClipping
):
    """opacus' distributed ghost-clipping optimizer with σ decided on rank 0 and broadcast."""


@register_adaptive_optimizer(FSDPOptimizerFastGradientClipping)
class AdaptiveFSDPOptimizerFastGradientClipping(AdaptiveNoiseMixin, FSDPOptimizerFastGradientClipping):
    """opacus' FSDP ghost-clipping optimizer with σ decided on rank 0 and broadcast."""


@register_adaptive_optimizer(SimpleDistributedPerLayerOptimizer)
class AdaptiveSimpleDistributedPerLayerOptimizer(AdaptiveNoiseMixin, SimpleDistributedPerLayerOptimizer):
    """opacus' distributed per-layer optimizer; it adds noise in backward hooks, so σ stays the user's."""
