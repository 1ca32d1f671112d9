"""The gradient DP-SGD releases about a batch, as the attacks see it: model wrapper, checks, clipped gradients.

One DP-SGD step publishes, for a batch of examples, every per-sample gradient clipped to L2 norm
``max_grad_norm`` (C), summed, plus Gaussian noise N(0, σ²C²I) with σ the noise multiplier (Abadi et al.
2016, Alg. 1). The attacks (:mod:`~adaptive_dp.attacks.inversion`, :mod:`~adaptive_dp.attacks.identification`,
:mod:`~adaptive_dp.attacks.i2f`) all start from :func:`gradient_function`, whose per-sample gradients and
clipping are the leakage monitor's own (:mod:`adaptive_dp.leakage.gradients`), so an attack and a reading
see the same release.

Images are in the data's own [0, 1] range; normalisation belongs inside the model (:func:`with_normalization`).
Gradients are computed with ``torch.func`` on a plain, hook-free model: never pass an opacus
``GradSampleModule`` (its hooks stay on the wrapped module; build a fresh copy and ``load_state_dict``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adaptive_dp.leakage.gradients import clip_factor, per_sample_gradient_fn

__all__ = [
    "Normalize",
    "as_targets",
    "check_images",
    "check_plain_model",
    "check_sigma",
    "clipped_per_sample_gradients",
    "gradient_function",
    "num_classes_of",
    "release_gradient",
    "soft_cross_entropy",
    "with_normalization",
]


class Normalize(nn.Module):
    """Per-channel normalisation (x − mean) / std as a module, so a model can take [0, 1] images.

    Args:
        mean: per-channel means (length C).
        std: per-channel standard deviations (length C), all > 0.

    Raises:
        ValueError: if lengths differ or a std is not positive.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != len(std) or len(mean) == 0:
            raise ValueError(f"mean and std need the same, non-zero length; got {len(mean)} and {len(std)}")
        if any(not s > 0 for s in std):
            raise ValueError(f"every std must be > 0, got {tuple(std)}")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(-1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


def with_normalization(model: nn.Module, mean: Sequence[float], std: Sequence[float]) -> nn.Module:
    """``model`` preceded by :class:`Normalize`, on the model's device: it takes [0, 1] images.

    Args:
        model: a plain classifier taking normalised images [B, C, H, W] → logits [B, K].
        mean, std: the data set's per-channel statistics (``DatasetInfo.mean`` / ``.std``).

    Returns:
        ``nn.Sequential(Normalize(mean, std), model)``; it shares ``model``'s parameters.
    """
    check_plain_model(model)
    device = _model_device(model)
    return nn.Sequential(Normalize(mean, std).to(device), model)


def check_plain_model(model: nn.Module) -> None:
    """Refuse anything but a plain ``nn.Module`` (an opacus GradSampleModule keeps hooks on its module).

    Raises:
        TypeError: not a module. ValueError: a GradSampleModule, naming the fix.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for module in model.modules():
        if (
            type(module).__name__ in {"GradSampleModule", "GradSampleModuleExpandedWeights"}
            or hasattr(module, "_module")
            and hasattr(module, "disable_hooks")
        ):
            raise ValueError(
                "attacks need a plain, hook-free model, got an opacus GradSampleModule; build a fresh copy "
                "(same class) and load_state_dict(gsm._module.state_dict()), or use "
                "adaptive_dp.training.load_trained_model"
            )


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    raise ValueError("model has no parameters; there is no gradient to attack")


def check_images(images: Tensor, *, name: str = "images") -> None:
    """Check a batch of images in the data's own range.

    Args:
        images: [B, C, H, W] floating tensor with values in [0, 1].
        name: what to call the tensor in the error message.

    Raises:
        ValueError: if the tensor is not 4-D floating point, is empty, has non-finite values, or has values
            outside [0, 1] (pass ``denormalize(x, info)`` of normalised data).
    """
    if not isinstance(images, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(images).__name__}")
    if images.dim() != 4:
        raise ValueError(f"{name} must be [B, C, H, W], got shape {tuple(images.shape)}; add .unsqueeze(0)")
    if not images.is_floating_point():
        raise ValueError(
            f"{name} must be floating point in [0, 1], got dtype {images.dtype}; divide uint8 by 255"
        )
    if images.numel() == 0:
        raise ValueError(f"{name} is empty")
    if not torch.isfinite(images).all():
        raise ValueError(f"{name} contains NaN or inf")
    lo, hi = float(images.min()), float(images.max())
    if lo < 0.0 or hi > 1.0:
        raise ValueError(
            f"{name} must lie in [0, 1] (the data's own range), got [{lo:.3g}, {hi:.3g}]; pass "
            "denormalize(x, info) and let with_normalization() normalise inside the model"
        )


def as_targets(labels: Tensor, batch: int, num_classes: int) -> Tensor:
    """Hard labels [B] (long) → one-hot [B, K] float32; probability vectors [B, K] pass through.

    Raises:
        ValueError: wrong length, labels outside [0, K), or another shape.
    """
    if labels.dim() == 1 and not labels.is_floating_point():
        if labels.shape[0] != batch:
            raise ValueError(f"labels has {labels.shape[0]} entries for {batch} images")
        if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
            raise ValueError(f"labels must lie in [0, {num_classes - 1}], got {labels.tolist()}")
        return F.one_hot(labels, num_classes).to(torch.float32)
    if labels.dim() == 2 and labels.shape == (batch, num_classes):
        return labels
    raise ValueError(
        f"labels must be [B] class indices or [B, {num_classes}] probabilities for B = {batch}, "
        f"got shape {tuple(labels.shape)}"
    )


def num_classes_of(model: nn.Module, images: Tensor) -> int:
    """K, the width of the model's output on one image of ``images`` [B, C, H, W]."""
    with torch.no_grad():
        return int(model(images[:1]).shape[-1])


def soft_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """−Σ t_k log softmax(logits)_k summed over the batch (nats): cross-entropy with probability targets.

    Args:
        logits: [B, K]; targets: [B, K] probabilities (one-hot for hard labels).
    """
    return -(targets * F.log_softmax(logits, dim=-1)).sum()


def gradient_function(model: nn.Module, *, max_grad_norm: float | None) -> Callable[[Tensor, Tensor], Tensor]:
    """The map (images, targets) → flat per-sample gradients, clipped as DP-SGD clips them.

    :func:`adaptive_dp.leakage.gradients.per_sample_gradient_fn` of :func:`soft_cross_entropy` at the model's
    current (detached) parameters, clipped with :func:`adaptive_dp.leakage.gradients.clip_factor` — the
    monitor's per-sample gradients and clipping — so the result stays differentiable with respect to
    ``images`` and ``targets`` (what the attacks and the I²F Jacobian products need).

    Args:
        model: plain classifier taking [0, 1] images (see :func:`with_normalization`).
        max_grad_norm: clipping norm C > 0; each per-sample gradient g becomes g · min(1, C / (‖g‖ + 1e-6))
            as in opacus. None = no clipping.

    Returns:
        ``fn(images [B, C, H, W], targets [B, K] probabilities) -> [B, P]`` clipped per-sample gradients of
        the cross-entropy −Σ_k t_k log softmax(f(x))_k, parameters flattened in ``named_parameters`` order.

    Raises:
        ValueError: for a GradSampleModule or a non-positive ``max_grad_norm``.
    """
    check_plain_model(model)
    if max_grad_norm is not None and not (max_grad_norm > 0 and max_grad_norm < float("inf")):
        raise ValueError(f"max_grad_norm must be a positive finite number, got {max_grad_norm}")
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}
    per_sample = per_sample_gradient_fn(model, buffers, loss_fn=soft_cross_entropy)

    def fn(images: Tensor, targets: Tensor) -> Tensor:
        grads, _ = per_sample(params, images, targets)
        flat = torch.cat([g.reshape(images.shape[0], -1) for g in grads.values()], dim=1)
        if max_grad_norm is None:
            return flat
        return flat * clip_factor(flat.norm(dim=1, keepdim=True), max_grad_norm)

    return fn


def clipped_per_sample_gradients(
    model: nn.Module, images: Tensor, labels: Tensor, *, max_grad_norm: float | None, chunk_size: int = 64
) -> Tensor:
    """Per-sample gradients clipped to ``max_grad_norm``, flattened (detached).

    Args:
        model: plain classifier taking [0, 1] images.
        images: [B, C, H, W] in [0, 1].
        labels: [B] class indices (or [B, K] probabilities).
        max_grad_norm: clipping norm C > 0 (None: unclipped).
        chunk_size: examples per vectorised chunk (memory bound).

    Returns:
        [B, P] float tensor on the model's device; every row has L2 norm ≤ C.

    Raises:
        ValueError: for bad shapes, images outside [0, 1], labels out of range.
    """
    check_images(images)
    fn = gradient_function(model, max_grad_norm=max_grad_norm)
    k = num_classes_of(model, images)
    targets = as_targets(labels.to(images.device), images.shape[0], k)
    with torch.no_grad():
        parts = [
            fn(images[i : i + chunk_size], targets[i : i + chunk_size])
            for i in range(0, len(images), chunk_size)
        ]
    return torch.cat(parts, dim=0)


def release_gradient(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    *,
    noise_multiplier: float,
    max_grad_norm: float,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The gradient one DP-SGD step releases about a batch: Σ_i clip_C(g_i) + N(0, σ²C²I).

    Args:
        model: plain classifier taking [0, 1] images.
        images: [B, C, H, W] in [0, 1] (B = 1 for a single example's release).
        labels: [B] class indices.
        noise_multiplier: σ ≥ 0 (0 = clipping only).
        max_grad_norm: clipping norm C > 0.
        generator: torch generator for the noise (on the model's device), for repeatable runs.

    Returns:
        [P] flat released gradient (before opacus divides by the expected batch size, which an attacker can
        undo), parameters in ``named_parameters`` order.

    Raises:
        ValueError: for a negative or non-finite σ, or bad images/labels.

    Source: Abadi et al. 2016, "Deep Learning with Differential Privacy", Algorithm 1.
    """
    check_sigma(noise_multiplier)
    clipped = clipped_per_sample_gradients(model, images, labels, max_grad_norm=max_grad_norm)
    total = clipped.sum(dim=0)
    if noise_multiplier > 0:
        noise = torch.randn(total.shape, generator=generator, device=total.device, dtype=total.dtype)
        total = total + noise_multiplier * max_grad_norm * noise
    return total


def check_sigma(noise_multiplier: float) -> None:
    """Raises ValueError unless the noise multiplier σ is ≥ 0 and finite."""
    if not (noise_multiplier >= 0 and noise_multiplier < float("inf")):
        raise ValueError(f"noise_multiplier must be >= 0 and finite, got {noise_multiplier}")
