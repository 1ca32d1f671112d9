"""Per-sample gradients and DP-SGD clipping, implemented once for the leakage monitor and the attacks.

What one DP-SGD step releases about an example is its per-sample gradient clipped to the clipping norm C
(``max_grad_norm``) plus Gaussian noise N(0, σ²C²I) (Abadi et al. 2016, "Deep Learning with Differential
Privacy", Alg. 1). The monitor (:mod:`adaptive_dp.leakage.monitor`) and the attacks
(:mod:`adaptive_dp.attacks`) simulate that release, so both take their per-sample gradients and their
clipping from here:

- :func:`per_sample_gradient_fn` — ``vmap(grad_and_value(ℓ))`` over ``functional_call``: each example is its
  own batch of one, so the gradient is ∇θ ℓ(f(x_i), y_i) whatever ``loss_reduction`` the optimizer uses
  (opacus rescales ``grad_sample`` to this for "mean"); differentiable in the inputs (the attacks and the
  I²F Jacobian products differentiate through it).
- :func:`per_sample_gradients` — the same in chunks, as one [N, *p.shape] tensor per parameter, with each
  example's loss.
- :func:`clip_factor` — the clipping formula min(1, C / (‖g‖ + :data:`CLIP_EPS`)), opacus' own
  (``DPOptimizer.clip_and_accumulate``, ``DPPerLayerOptimizer.clip_and_accumulate``); :func:`clip_factors` and
  :func:`clip_per_sample` apply it flat (one norm over all layers) or per layer.
- :func:`hook_free_copy` — a copy of a module without opacus' hooks: a ``GradSampleModule`` keeps its hooks on
  the wrapped module, so a second forward/backward through that module object would hit them (and write
  ``p.grad_sample``), and ``torch.func`` does not trace through them; the monitor differentiates a copy fed
  the live parameters instead.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

__all__ = [
    "CLIP_EPS",
    "clip_factor",
    "clip_factors",
    "clip_per_sample",
    "hook_free_copy",
    "per_sample_gradient_fn",
    "per_sample_gradients",
    "per_sample_norms",
    "total_clipping_norm",
]

#: Added to the per-sample norm before dividing, as opacus' optimizers do (``optimizers/optimizer.py``,
#: ``perlayeroptimizer.py``: ``max_grad_norm / (per_sample_norms + 1e-6)``), so our clipped gradients are
#: opacus' to float precision.
CLIP_EPS = 1e-6

_OPACUS_MODULE_ATTRS = (
    "activations",
    "max_batch_len",
    "autograd_grad_sample_hooks",
    "ft_compute_sample_grad",
)

LossFn = Callable[[Tensor, Tensor], Tensor]


# --------------------------------------------------------------------------------------------------
# Clipping
# --------------------------------------------------------------------------------------------------


def clip_factor(norms: Tensor, max_grad_norm: float | Tensor) -> Tensor:
    """The DP-SGD clipping factors min(1, C / (‖g‖ + 1e-6)), elementwise (differentiable).

    Args:
        norms: per-sample L2 norms, any shape (e.g. [N], [N, 1], or [N, L] for per-layer norms).
        max_grad_norm: C > 0, a float or a tensor broadcastable to ``norms`` (per-layer C_l as [L]).

    Returns:
        Factors in (0, 1], shape and dtype of ``norms``; ``g · factor`` has norm ≤ C.

    Source: Abadi et al. 2016, Alg. 1; opacus ``DPOptimizer.clip_and_accumulate`` (the 1e-6 is
    :data:`CLIP_EPS`).
    """
    return (max_grad_norm / (norms + CLIP_EPS)).clamp(max=1.0)


def per_sample_norms(grads: Sequence[Tensor]) -> Tensor:
    """[N, L] norms of each example's gradient in each of the L parameter tensors (one pass over the data).

    The flat norm of example i is ``norms[i].norm()`` (opacus' ``DPOptimizer`` computes it the same way). A
    NaN or inf anywhere in ``grads[l][i]`` makes ``norms[i, l]`` non-finite, so one check of this small matrix
    replaces a finiteness check of every gradient entry.
    """
    n = grads[0].shape[0]
    return torch.stack([g.reshape(n, -1).norm(dim=1) for g in grads], dim=1)


def clip_factors(norms: Tensor, max_grad_norm: float | Sequence[float], *, per_layer: bool = False) -> Tensor:
    """[N, L] factors (:func:`clip_factor`) that clip per-sample gradients with norms ``norms`` [N, L].

    Flat: one factor per example (‖g_i‖ over all layers), repeated over the L columns. Per layer: each
    layer l clipped to its own C_l (``max_grad_norm`` a list, or C/√L each when a float).

    Raises:
        ValueError: per-layer norms whose count is not L.

    Source: Abadi et al. 2016, Alg. 1; opacus ``DPOptimizer`` / ``DPPerLayerOptimizer.clip_and_accumulate``.
    """
    if per_layer:
        return clip_factor(norms, norms.new_tensor(_per_layer_norms(max_grad_norm, norms.shape[1])))
    return clip_factor(norms.norm(dim=1), float(max_grad_norm)).unsqueeze(1).expand_as(norms)


def clip_per_sample(
    grads: Sequence[Tensor],
    max_grad_norm: float | Sequence[float],
    *,
    per_layer: bool = False,
    inplace: bool = False,
) -> list[Tensor]:
    """Clip per-sample gradients as opacus' DPOptimizer does.

    Flat: g_i ← g_i · min(1, C / (‖g_i‖ + 1e-6)) with ‖g_i‖ over all layers. Per layer: each layer l is
    clipped to its own C_l (``max_grad_norm`` a list, or C/√L each when a float).

    Args:
        grads: per-layer [N, *shape] tensors.
        max_grad_norm: C (flat) or per-layer C_l.
        per_layer: per-layer clipping (opacus ``clipping="per_layer"``).
        inplace: scale ``grads`` themselves (no copy; they must own their memory) and return them.

    Returns:
        Clipped per-layer tensors.

    Source: Abadi et al. 2016, "Deep Learning with Differential Privacy", Alg. 1; opacus ``DPOptimizer``.
    """
    factors = clip_factors(per_sample_norms(grads), max_grad_norm, per_layer=per_layer)
    return scale_per_sample(grads, factors, inplace=inplace)


def scale_per_sample(grads: Sequence[Tensor], factors: Tensor, *, inplace: bool = False) -> list[Tensor]:
    """g_l[i] · factors[i, l] for every layer l (in place or as new tensors); ``factors`` is [N, L]."""
    out = []
    for layer, g in enumerate(grads):
        f = factors[:, layer].reshape(-1, *([1] * (g.dim() - 1))).to(g.dtype)
        out.append(g.mul_(f) if inplace else g * f)
    return out


def _per_layer_norms(max_grad_norm: float | Sequence[float], layers: int) -> list[float]:
    if isinstance(max_grad_norm, (int, float)):
        return [float(max_grad_norm) / math.sqrt(layers)] * layers
    norms = [float(c) for c in max_grad_norm]
    if len(norms) != layers:
        raise ValueError(
            f"max_grad_norm has {len(norms)} per-layer norms for {layers} trainable parameters; "
            "pass one norm per trainable parameter, as to make_private(clipping='per_layer')"
        )
    return norms


def total_clipping_norm(max_grad_norm: float | Sequence[float]) -> float:
    """C of the whole clipped gradient: C itself, or ‖(C_l)_l‖ for per-layer clipping (opacus' convention).

    Raises:
        ValueError: if C (or any C_l) is not positive and finite.
    """
    if isinstance(max_grad_norm, (int, float)):
        c, parts = float(max_grad_norm), [float(max_grad_norm)]
    else:
        parts = [float(v) for v in max_grad_norm]
        c = math.sqrt(sum(v * v for v in parts))
    if not parts or not all(math.isfinite(v) and v > 0 for v in parts):
        raise ValueError(f"max_grad_norm must be positive and finite, got {max_grad_norm!r}")
    return c


# --------------------------------------------------------------------------------------------------
# Per-sample gradients
# --------------------------------------------------------------------------------------------------


def hook_free_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` with every hook and opacus attribute removed, in eval mode, frozen.

    The hook dicts are emptied on the original only for the duration of the copy (so opacus' hooks, bound
    to the GradSampleModule, are not copied), then restored.
    """
    saved = []
    for m in module.modules():
        stash = {
            k: v
            for k, v in vars(m).items()
            if (k.endswith("hooks") and isinstance(v, dict)) or k in _OPACUS_MODULE_ATTRS
        }
        saved.append((m, stash))
        for k, v in stash.items():
            if isinstance(v, dict):
                setattr(m, k, type(v)())
            else:
                delattr(m, k)
    try:
        shadow = copy.deepcopy(module)
    finally:
        for m, stash in saved:
            for k, v in stash.items():
                setattr(m, k, v)
    for p in shadow.parameters():
        p.requires_grad_(False)
    return shadow.eval()


def per_sample_gradient_fn(
    module: nn.Module, buffers: dict[str, Tensor], *, loss_fn: LossFn
) -> Callable[[dict[str, Tensor], Tensor, Tensor], tuple[dict[str, Tensor], Tensor]]:
    """``fn(params, x [B, ...], y [B, ...]) -> ({name: [B, *shape]}, losses [B])``: per-sample gradients.

    ``vmap(grad_and_value(ℓ))`` with ℓ(θ, x_i, y_i) = ``loss_fn(functional_call(module, (θ, buffers),
    x_i[None]), y_i[None])``: every example is a batch of one. Differentiable in ``x`` and ``y`` (the
    attacks optimise inputs through it); the module's own hooks must not be opacus' (:func:`hook_free_copy`).

    Args:
        module: a hook-free module (plain model, or :func:`hook_free_copy` of a GradSampleModule's module).
        buffers: name → tensor for every state entry of ``module`` not in ``params`` (buffers, frozen params).
        loss_fn: ``loss_fn(output [1, ...], target [1, ...]) -> scalar`` (e.g. ``F.cross_entropy``, nats).

    Returns:
        The vmapped function; its losses are the per-example ``loss_fn`` values.
    """
    from torch.func import functional_call, grad_and_value, vmap

    def loss_one(p: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
        out = functional_call(module, (p, buffers), (xi.unsqueeze(0),))
        return loss_fn(out, yi.unsqueeze(0))

    return vmap(grad_and_value(loss_one), in_dims=(None, 0, 0), randomness="error")


def per_sample_gradients(
    shadow: nn.Module,
    params: dict[str, Tensor],
    buffers: dict[str, Tensor],
    x: Tensor,
    y: Tensor,
    *,
    loss_fn: LossFn,
    batch_size: int = 64,
) -> tuple[list[Tensor], Tensor]:
    """Per-sample gradients of the per-example loss, one tensor [N, *p.shape] per parameter, and the losses.

    :func:`per_sample_gradient_fn` over chunks of ``batch_size`` examples (bounds memory). The losses come
    from the same forward passes: no extra pass.

    Args:
        shadow: a hook-free module (:func:`hook_free_copy`).
        params: name → parameter tensor (the live, detached parameters to differentiate).
        buffers: name → buffer tensor.
        x: [N, ...] inputs; y: [N, ...] targets, on the parameters' device.
        loss_fn: ``loss_fn(logits [1, K], target [1]) -> scalar`` (e.g. ``F.cross_entropy``).
        batch_size: examples per vmap call.

    Returns:
        ``(grads, losses)``: a list over ``params`` (insertion order) of [N, *shape] tensors, and the [N]
        per-example losses (units of ``loss_fn``; nats for cross-entropy).
    """
    per_example = per_sample_gradient_fn(shadow, buffers, loss_fn=loss_fn)
    chunks: list[tuple[dict[str, Tensor], Tensor]] = []
    for start in range(0, x.shape[0], batch_size):
        with torch.enable_grad():
            chunks.append(per_example(params, x[start : start + batch_size], y[start : start + batch_size]))
    if len(chunks) == 1:  # one vmap call: its outputs are already [N, *shape], no copy
        grads, losses = chunks[0]
        return [grads[name] for name in params], losses.detach()
    grads = [torch.cat([c[0][name] for c in chunks]) for name in params]
    return grads, torch.cat([c[1] for c in chunks]).detach()
