"""DP optimizers that let the noise-control loop decide σ per step (opacus' optimizers + one override each)."""

from adaptive_dp.optimizers.adaptive import (
    ADAPTIVE_OPTIMIZERS,
    NOISE_IN_BACKWARD,
    AdaptiveNoiseMixin,
    clipping_norm,
    get_adaptive_optimizer_class,
    register_adaptive_optimizer,
)

__all__ = [
    "ADAPTIVE_OPTIMIZERS",
    "NOISE_IN_BACKWARD",
    "AdaptiveNoiseMixin",
    "clipping_norm",
    "get_adaptive_optimizer_class",
    "register_adaptive_optimizer",
]
