"""Gradient-inversion attacks on the gradient DP-SGD releases: DLG, iDLG and Inverting Gradients.

The released gradient for a batch of examples is what one DP-SGD step publishes about them (Abadi et al.
2016): every per-sample gradient clipped to L2 norm ``max_grad_norm`` (C), summed, plus Gaussian noise
N(0, σ²C²I) with σ the noise multiplier. An attacker who knows the model (at initialisation or from a
``train`` checkpoint) searches for dummy images whose gradient, clipped the same way, matches it.

Images are optimised in the data's own [0, 1] range; normalisation belongs inside the model
(:func:`with_normalization`), so reconstructions and metrics are in [0, 1] too. The released gradient and the
clipped per-sample gradients the attacks match come from :mod:`adaptive_dp.attacks.release` (re-exported here),
on a plain, hook-free model: never pass an opacus ``GradSampleModule``.

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

from adaptive_dp.attacks.release import (
    Normalize,
    as_targets,
    check_images,
    clipped_per_sample_gradients,
    gradient_function,
    num_classes_of,
    release_gradient,
    with_normalization,
)

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
        raise ValueError(
            f"released must be a flat [P={n_params}] gradient, got shape {tuple(released.shape)}"
        )
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
        raise ValueError(
            f"released gradient must be a flat [P={n_params}] tensor (see release_gradient), got {shape}"
        )
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
    best = (
        float("inf"),
        dummy.detach().clone(),
        None if label_param is None else label_param.detach().clone(),
    )

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
            best = (
                value,
                dummy.detach().clone(),
                None if label_param is None else label_param.detach().clone(),
            )
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
                best = (
                    final,
                    dummy.detach().clone(),
                    None if label_param is None else label_param.detach().clone(),
                )
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
    return _dlg(
        model,
        released,
        image_shape=image_shape,
        max_grad_norm=max_grad_norm,
        batch_size=batch_size,
        iterations=iterations,
        lr=lr,
        restarts=restarts,
        seed=seed,
        progress=progress,
        labels=None,
        desc="DLG",
    )


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
    num_classes = num_classes_of(model, torch.zeros(1, c, h, w, device=device))
    labels = infer_labels(model, released, num_classes=num_classes, batch_size=1)
    return _dlg(
        model,
        released,
        image_shape=image_shape,
        max_grad_norm=max_grad_norm,
        batch_size=1,
        iterations=iterations,
        lr=lr,
        restarts=restarts,
        seed=seed,
        progress=progress,
        labels=labels,
        desc="iDLG",
    )


def _check_common(iterations: int, lr: float, batch_size: int) -> None:
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"iterations must be a positive integer, got {iterations!r}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")


def _dlg(
    model,
    released,
    *,
    image_shape,
    max_grad_norm,
    batch_size,
    iterations,
    lr,
    restarts,
    seed,
    progress,
    labels,
    desc,
):
    _check_released(model, released)
    _check_common(iterations, lr, batch_size)
    _check_restarts(restarts)
    c, h, w = _check_shape(image_shape)
    start = time.perf_counter()
    device = released.device
    num_classes = num_classes_of(model, torch.zeros(1, c, h, w, device=device))
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
        run = _lbfgs_matching(
            fn,
            released,
            dummy,
            label_param,
            fixed,
            iterations=iterations,
            lr=lr,
            progress=progress,
            desc=f"{desc} restart {r + 1}/{restarts}",
        )
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
    shape = _check_shape(image_shape)
    start = time.perf_counter()
    device = released.device
    num_classes = num_classes_of(model, torch.zeros(1, *shape, device=device))
    if labels is None:
        labels = infer_labels(model, released, num_classes=num_classes, batch_size=batch_size)
    labels = labels.to(device)
    targets = as_targets(labels, batch_size, num_classes)
    fn = gradient_function(model, max_grad_norm=max_grad_norm)
    best_loss, best_image = float("inf"), None
    for r in range(restarts):
        gen = torch.Generator(device="cpu").manual_seed(seed + r)
        x = torch.rand(batch_size, *shape, generator=gen).to(device).requires_grad_(True)
        final = _cosine_matching(
            fn,
            released.detach(),
            targets,
            x,
            iterations=iterations,
            lr=lr,
            tv_weight=tv_weight,
            progress=progress,
            desc=f"IG restart {r + 1}/{restarts}",
        )
        if final < best_loss or best_image is None:
            best_loss, best_image = final, x.detach().clone()
    return AttackResult(best_image, labels, best_loss, iterations * restarts, time.perf_counter() - start)


def _cosine_matching(
    fn: Callable[[Tensor, Tensor], Tensor],
    released: Tensor,
    targets: Tensor,
    x: Tensor,
    *,
    iterations: int,
    lr: float,
    tv_weight: float,
    progress: bool,
    desc: str,
) -> float:
    """One Inverting-Gradients restart from ``x`` (optimised in place); returns the final objective.

    Adam on the sign of the gradient of 1 − cos(Σ clip(g(x)), released) + ``tv_weight``·TV(x), x projected onto
    [0, 1] after every step, learning rate ×0.1 at 3/8, 5/8 and 7/8 of the iterations (Geiping et al. 2020).
    """
    optimizer = torch.optim.Adam([x], lr=lr)
    milestones = [int(iterations * f) for f in (3 / 8, 5 / 8, 7 / 8)]
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.1)

    def objective() -> Tensor:
        g = fn(x, targets).sum(dim=0)
        cos = F.cosine_similarity(g, released, dim=0, eps=1e-12)
        return 1.0 - cos + tv_weight * total_variation(x)

    for _ in _progress(range(iterations), enabled=progress, desc=desc):
        optimizer.zero_grad()
        objective().backward()
        x.grad.sign_()
        optimizer.step()
        scheduler.step()
        with torch.no_grad():
            x.clamp_(0.0, 1.0)
    with torch.no_grad():
        return float(objective())
