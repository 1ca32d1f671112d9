"""Gradient-inversion attacks on the gradient DP-SGD releases: DLG, iDLG and Inverting Gradients.

The released gradient for a batch of examples is what one DP-SGD step publishes about them (Abadi et al.
2016): every per-sample gradient clipped to L2 norm ``max_grad_norm`` (C), summed, plus Gaussian noise
N(0, σ²C²I) with σ the noise multiplier. An attacker who knows the model (at initialisation or from a
``train`` checkpoint) searches for dummy images whose gradient, clipped the same way, matches it.

Images are optimised in the data's own [0, 1] range; normalisation belongs inside the model
(:func:`with_normalization`), so reconstructions and metrics are in [0, 1] too. Gradients are computed with
``torch.func`` (``functional_call``/``grad``/``vmap``) on a plain, hook-free model: never pass an opacus
``GradSampleModule`` (its hooks stay on the wrapped module; build a fresh copy and ``load_state_dict``).

Attacks:

- :func:`dlg` — Deep Leakage from Gradients (Zhu et al. 2019, NeurIPS): L-BFGS on a dummy image and a
  soft dummy label, Euclidean gradient matching.
- :func:`idlg` — improved DLG (Zhao et al. 2020, arXiv:2001.02610): the label is read off the sign of the
  last layer's gradient (:func:`infer_labels`), then DLG on the image only.
- :func:`inverting_gradients` — Geiping et al. 2020 (NeurIPS), "Inverting Gradients — How easy is it to
  break privacy in federated learning?": cosine-similarity matching, total-variation prior, Adam on signed
  gradients, box constraint [0, 1], learning rate decayed ×0.1 at 3/8, 5/8 and 7/8 of the iterations,
  restarts keeping the best match.

The identification (linkage) attack lives in :mod:`adaptive_dp.attacks.identification`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

__all__ = [
    "AttackResult",
    "Normalize",
    "check_images",
    "clipped_per_sample_gradients",
    "dlg",
    "gradient_function",
    "idlg",
    "infer_labels",
    "inverting_gradients",
    "release_gradient",
    "total_variation",
    "with_normalization",
]

#: Default L-BFGS iterations of DLG/iDLG. Zhu et al.'s reference code makes 300 ``LBFGS.step`` calls of up to
#: 20 iterations each; on CIFAR-10 with the LeNet at init, 300 single iterations leave ~11 dB and 2000 reach
#: ~29 dB median PSNR (σ = 0, C = 1), so the default is 2000 (runs stop earlier on a plateau).
DLG_ITERATIONS = 2000

#: DLG/iDLG stop once the matching loss has not improved by ``PLATEAU_RTOL`` (relative) for
#: ``PLATEAU_PATIENCE`` L-BFGS iterations (a noisy release has a loss floor ≈ σ²C²P; a stalled start too).
PLATEAU_PATIENCE = 100
PLATEAU_RTOL = 1e-4

#: Opacus adds this to the per-sample norm before dividing (``optimizers/optimizer.py``); we match it.
CLIP_EPS = 1e-6


# ----------------------------------------------------------------------------------------------- model


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
    _check_plain_model(model)
    device = _model_device(model)
    return nn.Sequential(Normalize(mean, std).to(device), model)


def _check_plain_model(model: nn.Module) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for module in model.modules():
        if type(module).__name__ in {"GradSampleModule", "GradSampleModuleExpandedWeights"} or hasattr(
            module, "_module"
        ) and hasattr(module, "disable_hooks"):
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
        raise ValueError(f"{name} must be floating point in [0, 1], got dtype {images.dtype}; divide uint8 by 255")
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


def _as_targets(labels: Tensor, batch: int, num_classes: int) -> Tensor:
    """Hard labels [B] (long) → one-hot [B, K]; probability vectors [B, K] pass through."""
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


def _num_classes(model: nn.Module, images: Tensor) -> int:
    with torch.no_grad():
        return int(model(images[:1]).shape[-1])


# ------------------------------------------------------------------------------------- released gradient


def gradient_function(model: nn.Module, *, max_grad_norm: float | None) -> Callable[[Tensor, Tensor], Tensor]:
    """The map (images, targets) → flat per-sample gradients, clipped as DP-SGD clips them.

    Built on ``torch.func``: ``vmap(grad(loss))`` over the batch at the model's current (detached)
    parameters, so the result stays differentiable with respect to ``images`` and ``targets`` (what the
    attacks and the I²F Jacobian products need).

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
    _check_plain_model(model)
    if max_grad_norm is not None and not (max_grad_norm > 0 and max_grad_norm < float("inf")):
        raise ValueError(f"max_grad_norm must be a positive finite number, got {max_grad_norm}")
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}

    def loss_one(p: dict[str, Tensor], x: Tensor, t: Tensor) -> Tensor:
        logits = functional_call(model, (p, buffers), (x.unsqueeze(0),))
        return -(t.unsqueeze(0) * F.log_softmax(logits, dim=-1)).sum()

    per_sample = vmap(grad(loss_one), in_dims=(None, 0, 0))

    def fn(images: Tensor, targets: Tensor) -> Tensor:
        grads = per_sample(params, images, targets)
        flat = torch.cat([g.reshape(images.shape[0], -1) for g in grads.values()], dim=1)
        if max_grad_norm is None:
            return flat
        factor = (max_grad_norm / (flat.norm(dim=1, keepdim=True) + CLIP_EPS)).clamp(max=1.0)
        return flat * factor

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
    k = _num_classes(model, images)
    targets = _as_targets(labels.to(images.device), images.shape[0], k)
    with torch.no_grad():
        parts = [fn(images[i : i + chunk_size], targets[i : i + chunk_size]) for i in range(0, len(images), chunk_size)]
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
    _check_sigma(noise_multiplier)
    clipped = clipped_per_sample_gradients(model, images, labels, max_grad_norm=max_grad_norm)
    total = clipped.sum(dim=0)
    if noise_multiplier > 0:
        noise = torch.randn(total.shape, generator=generator, device=total.device, dtype=total.dtype)
        total = total + noise_multiplier * max_grad_norm * noise
    return total


def _check_sigma(noise_multiplier: float) -> None:
    if not (noise_multiplier >= 0 and noise_multiplier < float("inf")):
        raise ValueError(f"noise_multiplier must be >= 0 and finite, got {noise_multiplier}")


# ----------------------------------------------------------------------------------------------- labels


def _last_linear_weight_index(model: nn.Module, num_classes: int) -> tuple[int, int]:
    """(offset, size) of the last layer's weight [K, F] in the flat gradient."""
    offset, found = 0, None
    for _, p in model.named_parameters():
        if p.dim() == 2 and p.shape[0] == num_classes:
            found = (offset, p.numel())
        offset += p.numel()
    if found is None:
        raise ValueError(f"no [num_classes={num_classes}, F] weight found; iDLG needs a final linear layer")
    return found


def infer_labels(model: nn.Module, released: Tensor, *, num_classes: int, batch_size: int = 1) -> Tensor:
    """Labels read off the last layer's released gradient (iDLG, Zhao et al. 2020, Sec. 3).

    For cross-entropy, the gradient of the last linear layer's row k is (p_k − y_k)·h with h the
    layer's input; when h ≥ 0 (sigmoid/ReLU features) the true class is the only row whose entries sum to
    a negative number. Clipping scales all rows alike and keeps the sign; noise can flip it.

    Args:
        model: the plain model the gradient was computed on (to locate its last layer).
        released: [P] released gradient.
        num_classes: K.
        batch_size: how many labels to return (the most negative rows; distinct labels assumed for B > 1).

    Returns:
        [batch_size] long tensor of class indices.

    Raises:
        ValueError: if ``released`` does not have the model's parameter count or no final [K, F] layer exists.
    """
    n_params = sum(p.numel() for p in model.parameters())
    if released.dim() != 1 or released.numel() != n_params:
        raise ValueError(f"released must be a flat [P={n_params}] gradient, got shape {tuple(released.shape)}")
    if not 1 <= batch_size <= num_classes:
        raise ValueError(f"batch_size must be in [1, {num_classes}], got {batch_size}")
    offset, size = _last_linear_weight_index(model, num_classes)
    row_sums = released[offset : offset + size].view(num_classes, -1).sum(dim=1)
    return torch.argsort(row_sums)[:batch_size]


# ---------------------------------------------------------------------------------------------- attacks


@dataclass(frozen=True)
class AttackResult:
    """Outcome of one gradient-inversion run.

    Attributes:
        reconstruction: [B, C, H, W] images in [0, 1] (detached).
        labels: [B] labels the attack used or recovered (argmax of DLG's soft label).
        loss: final gradient-matching loss (Euclidean for DLG/iDLG, 1 − cosine (+TV) for IG).
        iterations: optimiser iterations run (summed over restarts).
        seconds: wall-clock time.
    """

    reconstruction: Tensor
    labels: Tensor
    loss: float
    iterations: int
    seconds: float


def _check_released(model: nn.Module, released: Tensor) -> None:
    n_params = sum(p.numel() for p in model.parameters())
    if not isinstance(released, Tensor) or released.dim() != 1 or released.numel() != n_params:
        shape = tuple(released.shape) if isinstance(released, Tensor) else type(released).__name__
        raise ValueError(f"released gradient must be a flat [P={n_params}] tensor (see release_gradient), got {shape}")
    if not torch.isfinite(released).all():
        raise ValueError("released gradient contains NaN or inf")


def _check_shape(image_shape: Sequence[int]) -> tuple[int, int, int]:
    shape = tuple(int(s) for s in image_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"image_shape must be (C, H, W) with positive sizes, got {tuple(image_shape)}")
    return shape  # type: ignore[return-value]


def _progress(iterable, *, enabled: bool, desc: str):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, leave=False)


def _lbfgs_matching(
    fn: Callable[[Tensor, Tensor], Tensor],
    released: Tensor,
    dummy: Tensor,
    label_param: Tensor | None,
    fixed_targets: Tensor | None,
    *,
    iterations: int,
    lr: float,
    progress: bool,
    desc: str,
) -> tuple[Tensor, Tensor, float, int]:
    """L-BFGS on ‖Σ clip(g(dummy)) − released‖² (Zhu et al. 2019, Algorithm 1); keeps the best iterate.

    Stops early on a plateau (:data:`PLATEAU_PATIENCE`, :data:`PLATEAU_RTOL`). Returns (image, label
    logits, loss, iterations run).
    """
    variables = [dummy] + ([label_param] if label_param is not None else [])
    optimizer = torch.optim.LBFGS(variables, lr=lr, max_iter=1, history_size=100)
    best = (float("inf"), dummy.detach().clone(), None if label_param is None else label_param.detach().clone())

    def targets() -> Tensor:
        return F.softmax(label_param, dim=-1) if label_param is not None else fixed_targets

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = (fn(dummy, targets()).sum(dim=0) - released).pow(2).sum()
        loss.backward()
        return loss

    done, reference, stalled = 0, float("inf"), 0
    for _ in _progress(range(iterations), enabled=progress, desc=desc):
        loss = optimizer.step(closure)
        done += 1
        value = float(loss.detach())
        if not torch.isfinite(loss) or not torch.isfinite(dummy).all():
            break
        if value < best[0]:
            best = (value, dummy.detach().clone(), None if label_param is None else label_param.detach().clone())
        if value < reference * (1 - PLATEAU_RTOL):
            reference, stalled = value, 0
        else:
            stalled += 1
        if value == 0.0 or stalled >= PLATEAU_PATIENCE:
            break
    # the step's loss is evaluated before its update: score the final iterate too
    with torch.no_grad():
        if torch.isfinite(dummy).all():
            final = float((fn(dummy, targets()).sum(dim=0) - released).pow(2).sum())
            if final < best[0]:
                best = (final, dummy.detach().clone(), None if label_param is None else label_param.detach().clone())
    return best[1], (best[2] if best[2] is not None else torch.empty(0)), best[0], done


def dlg(
    model: nn.Module,
    released: Tensor,
    *,
    image_shape: Sequence[int],
    max_grad_norm: float | None,
    batch_size: int = 1,
    iterations: int = DLG_ITERATIONS,
    lr: float = 1.0,
    restarts: int = 1,
    seed: int = 0,
    progress: bool = False,
) -> AttackResult:
    """Deep Leakage from Gradients (Zhu et al. 2019, NeurIPS, Algorithm 1).

    Optimises a dummy image (uniform in [0, 1]) and a dummy soft label (logits, N(0, 1)) with L-BFGS so
    that the sum of their per-sample gradients, clipped to ``max_grad_norm`` as DP-SGD clips, matches the
    released gradient in squared Euclidean distance. No box constraint during the search (as in DLG); the
    returned image is clamped to [0, 1].

    Args:
        model: plain classifier taking [0, 1] images (:func:`with_normalization`).
        released: [P] released gradient (:func:`release_gradient`).
        image_shape: (C, H, W) of one image.
        max_grad_norm: the clipping norm C used for the release (None: unclipped).
        batch_size: number of images B behind the released sum.
        iterations: at most this many L-BFGS iterations per restart (one function evaluation each; see
            :data:`DLG_ITERATIONS`); a run stops early once the loss plateaus.
        lr: L-BFGS step size (DLG: 1).
        restarts: independent dummy initialisations (DLG: 1); the lowest matching loss wins. L-BFGS from a
            bad start can stall in a local minimum, which a restart usually escapes.
        seed: seeds the dummy initialisation (restart r uses seed + r).
        progress: show a tqdm progress bar.

    Returns:
        :class:`AttackResult` with [B, C, H, W] reconstruction and the soft label's argmax.

    Raises:
        ValueError: for a released gradient of the wrong size, bad shapes or options.
    """
    return _dlg(model, released, image_shape=image_shape, max_grad_norm=max_grad_norm, batch_size=batch_size,
                iterations=iterations, lr=lr, restarts=restarts, seed=seed, progress=progress, labels=None, desc="DLG")


def idlg(
    model: nn.Module,
    released: Tensor,
    *,
    image_shape: Sequence[int],
    max_grad_norm: float | None,
    iterations: int = DLG_ITERATIONS,
    lr: float = 1.0,
    restarts: int = 1,
    seed: int = 0,
    progress: bool = False,
) -> AttackResult:
    """improved DLG (Zhao et al. 2020, "iDLG: Improved Deep Leakage from Gradients").

    Recovers the label from the sign of the last layer's gradient (:func:`infer_labels`), then runs DLG's
    L-BFGS on the image alone with that hard label. One example per release (B = 1), as in the paper.

    Args: as :func:`dlg` (without ``batch_size``).

    Returns:
        :class:`AttackResult` with [1, C, H, W] reconstruction and the recovered label.

    Raises:
        ValueError: as :func:`dlg`; also if the model has no final [K, F] linear layer.
    """
    _check_released(model, released)
    c, h, w = _check_shape(image_shape)
    device = released.device
    num_classes = _num_classes(model, torch.zeros(1, c, h, w, device=device))
    labels = infer_labels(model, released, num_classes=num_classes, batch_size=1)
    return _dlg(model, released, image_shape=image_shape, max_grad_norm=max_grad_norm, batch_size=1,
                iterations=iterations, lr=lr, restarts=restarts, seed=seed, progress=progress, labels=labels,
                desc="iDLG")


def _check_common(iterations: int, lr: float, batch_size: int) -> None:
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"iterations must be a positive integer, got {iterations!r}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")


def _dlg(model, released, *, image_shape, max_grad_norm, batch_size, iterations, lr, restarts, seed, progress,
         labels, desc):
    _check_released(model, released)
    _check_common(iterations, lr, batch_size)
    _check_restarts(restarts)
    c, h, w = _check_shape(image_shape)
    start = time.perf_counter()
    device = released.device
    num_classes = _num_classes(model, torch.zeros(1, c, h, w, device=device))
    fn = gradient_function(model, max_grad_norm=max_grad_norm)
    released = released.detach()
    best, total = None, 0
    for r in range(restarts):
        gen = torch.Generator(device="cpu").manual_seed(seed + r)
        dummy = torch.rand(batch_size, c, h, w, generator=gen).to(device).requires_grad_(True)
        if labels is None:
            label_param = torch.randn(batch_size, num_classes, generator=gen).to(device).requires_grad_(True)
            fixed = None
        else:
            label_param, fixed = None, F.one_hot(labels.to(device), num_classes).to(torch.float32)
        run = _lbfgs_matching(fn, released, dummy, label_param, fixed, iterations=iterations, lr=lr,
                              progress=progress, desc=f"{desc} restart {r + 1}/{restarts}")
        total += run[3]
        if best is None or run[2] < best[2]:
            best = run
    image, label_logits, loss, _ = best
    out_labels = labels.to(device) if labels is not None else label_logits.argmax(dim=-1)
    return AttackResult(image.clamp(0.0, 1.0), out_labels, loss, total, time.perf_counter() - start)


def _check_restarts(restarts: int) -> None:
    if isinstance(restarts, bool) or not isinstance(restarts, int) or restarts < 1:
        raise ValueError(f"restarts must be a positive integer, got {restarts!r}")


def total_variation(images: Tensor) -> Tensor:
    """Anisotropic total variation: mean |Δx| over horizontal plus vertical neighbours (Geiping et al. 2020).

    Args:
        images: [B, C, H, W].

    Returns:
        scalar tensor (per-pixel units of the image).
    """
    dx = (images[:, :, :, 1:] - images[:, :, :, :-1]).abs().mean()
    dy = (images[:, :, 1:, :] - images[:, :, :-1, :]).abs().mean()
    return dx + dy


def inverting_gradients(
    model: nn.Module,
    released: Tensor,
    *,
    image_shape: Sequence[int],
    max_grad_norm: float | None,
    labels: Tensor | None = None,
    batch_size: int = 1,
    iterations: int = 4800,
    lr: float = 0.1,
    tv_weight: float = 1e-4,
    restarts: int = 1,
    seed: int = 0,
    progress: bool = False,
) -> AttackResult:
    """Inverting Gradients (Geiping et al. 2020, NeurIPS, Sec. 4; defaults from their ``inversefed`` code).

    Minimises 1 − cos(Σ clip(g(x)), released) + ``tv_weight`` · TV(x) over x with Adam applied to the
    *sign* of the gradient, projects x onto the box [0, 1] after every step, divides the learning rate by
    10 at 3/8, 5/8 and 7/8 of the iterations, and keeps the restart with the lowest final objective.

    Args:
        model: plain classifier taking [0, 1] images.
        released: [P] released gradient.
        image_shape: (C, H, W).
        max_grad_norm: clipping norm C of the release (None: unclipped). Cosine matching is invariant to the
            common scale, so clipping matters only through its per-sample normalisation.
        labels: [B] known labels; None = recovered by :func:`infer_labels` (as ``inversefed`` does).
        batch_size: B.
        iterations: Adam steps per restart (paper: 4800 on CIFAR-10, 24000 for trained ResNets).
        lr: Adam learning rate (0.1).
        tv_weight: weight of the total-variation prior (:func:`total_variation`).
        restarts: independent random initialisations; the best (lowest objective) is returned.
        seed: seeds the initialisations (restart r uses seed + r).
        progress: show a tqdm progress bar.

    Returns:
        :class:`AttackResult` (``iterations`` counts all restarts).

    Raises:
        ValueError: for bad shapes, sizes or options.
    """
    _check_released(model, released)
    _check_common(iterations, lr, batch_size)
    _check_restarts(restarts)
    if not tv_weight >= 0:
        raise ValueError(f"tv_weight must be >= 0, got {tv_weight}")
    c, h, w = _check_shape(image_shape)
    start = time.perf_counter()
    device = released.device
    num_classes = _num_classes(model, torch.zeros(1, c, h, w, device=device))
    if labels is None:
        labels = infer_labels(model, released, num_classes=num_classes, batch_size=batch_size)
    labels = labels.to(device)
    targets = _as_targets(labels, batch_size, num_classes)
    fn = gradient_function(model, max_grad_norm=max_grad_norm)
    released = released.detach()
    milestones = [int(iterations * f) for f in (3 / 8, 5 / 8, 7 / 8)]
    best_loss, best_image = float("inf"), None
    for r in range(restarts):
        gen = torch.Generator(device="cpu").manual_seed(seed + r)
        x = torch.rand(batch_size, c, h, w, generator=gen).to(device).requires_grad_(True)
        optimizer = torch.optim.Adam([x], lr=lr)
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.1)

        def objective(x: Tensor = x) -> Tensor:
            g = fn(x, targets).sum(dim=0)
            cos = F.cosine_similarity(g, released, dim=0, eps=1e-12)
            return 1.0 - cos + tv_weight * total_variation(x)

        for _ in _progress(range(iterations), enabled=progress, desc=f"IG restart {r + 1}/{restarts}"):
            optimizer.zero_grad()
            loss = objective()
            loss.backward()
            x.grad.sign_()
            optimizer.step()
            scheduler.step()
            with torch.no_grad():
                x.clamp_(0.0, 1.0)
        with torch.no_grad():
            final = float(objective())
        if final < best_loss or best_image is None:
            best_loss, best_image = final, x.detach().clone()
    return AttackResult(best_image, labels, best_loss, iterations * restarts, time.perf_counter() - start)
