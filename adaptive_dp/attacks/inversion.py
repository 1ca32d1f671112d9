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
  soft dummy label, Euclidean gradient matching; several starts probed, the best-matching one continued.
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
    "DLG_ITERATIONS",
    "DLG_PROBE_ITERATIONS",
    "DLG_RESTARTS",
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

#: Default L-BFGS iterations of DLG/iDLG (the continued restart, its probe included). Zhu et al.'s reference code
#: makes 300 ``LBFGS.step`` calls of up to 20 iterations each; on CIFAR-10 with the LeNet at init (σ = 0, C = 1)
#: a good start needs 2000–3000 single iterations to pass 20 dB PSNR (runs stop earlier on a plateau).
DLG_ITERATIONS = 3000

#: Default restarts of DLG/iDLG and the iterations each is probed for before the lowest matching loss continues
#: (:func:`dlg`).
DLG_RESTARTS = 4
DLG_PROBE_ITERATIONS = 200

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


class _MatchingRun:
    """One L-BFGS run on ‖Σ clip(g(dummy)) − released‖² (Zhu et al. 2019, Algorithm 1) that can be advanced in
    stages; keeps the best iterate. Stops early on a plateau (:data:`PLATEAU_PATIENCE`, :data:`PLATEAU_RTOL`),
    a zero loss or a non-finite value."""

    def __init__(
        self,
        fn: Callable[[Tensor, Tensor], Tensor],
        released: Tensor,
        dummy: Tensor,
        label_param: Tensor | None,
        fixed_targets: Tensor | None,
        *,
        lr: float,
    ) -> None:
        self.fn, self.released = fn, released
        self.dummy, self.label_param, self.fixed_targets = dummy, label_param, fixed_targets
        variables = [dummy] + ([label_param] if label_param is not None else [])
        self.optimizer = torch.optim.LBFGS(variables, lr=lr, max_iter=1, history_size=100)
        self.best_loss, self.best_image = float("inf"), dummy.detach().clone()
        self.best_label = None if label_param is None else label_param.detach().clone()
        self.done, self.stopped = 0, False
        self._reference, self._stalled = float("inf"), 0

    def _targets(self) -> Tensor:
        return F.softmax(self.label_param, dim=-1) if self.label_param is not None else self.fixed_targets

    def _loss(self) -> Tensor:
        return (self.fn(self.dummy, self._targets()).sum(dim=0) - self.released).pow(2).sum()

    def _keep(self, value: float) -> None:
        if value < self.best_loss:
            self.best_loss, self.best_image = value, self.dummy.detach().clone()
            self.best_label = None if self.label_param is None else self.label_param.detach().clone()

    def advance(self, iterations: int, *, progress: bool, desc: str) -> None:
        """Up to ``iterations`` more L-BFGS iterations (one function evaluation each), then score the iterate."""

        def closure() -> Tensor:
            self.optimizer.zero_grad()
            loss = self._loss()
            loss.backward()
            return loss

        for _ in _progress(range(max(iterations, 0) if not self.stopped else 0), enabled=progress, desc=desc):
            loss = self.optimizer.step(closure)
            self.done += 1
            value = float(loss.detach())
            if not torch.isfinite(loss) or not torch.isfinite(self.dummy).all():
                self.stopped = True
                break
            self._keep(value)
            if value < self._reference * (1 - PLATEAU_RTOL):
                self._reference, self._stalled = value, 0
            else:
                self._stalled += 1
            if value == 0.0 or self._stalled >= PLATEAU_PATIENCE:
                self.stopped = True
                break
        # a step's loss is evaluated before its update: score the current iterate too
        with torch.no_grad():
            if torch.isfinite(self.dummy).all():
                self._keep(float(self._loss()))


def dlg(
    model: nn.Module,
    released: Tensor,
    *,
    image_shape: Sequence[int],
    max_grad_norm: float | None,
    batch_size: int = 1,
    iterations: int = DLG_ITERATIONS,
    lr: float = 1.0,
    restarts: int = DLG_RESTARTS,
    probe_iterations: int = DLG_PROBE_ITERATIONS,
    seed: int = 0,
    progress: bool = False,
) -> AttackResult:
    """Deep Leakage from Gradients (Zhu et al. 2019, NeurIPS, Algorithm 1), with restarts.

    Optimises a dummy image (uniform in [0, 1]) and a dummy soft label (logits, N(0, 1)) with L-BFGS so
    that the sum of their per-sample gradients, clipped to ``max_grad_norm`` as DP-SGD clips, matches the
    released gradient in squared Euclidean distance. No box constraint during the search (as in DLG); the
    returned image is clamped to [0, 1].

    Restarts: ``restarts`` dummies each run ``probe_iterations`` L-BFGS iterations; the one with the lowest
    gradient-matching loss so far continues (same optimiser state) up to ``iterations`` in all. From a bad
    start L-BFGS stalls far above the good starts' loss already after a few hundred iterations (CIFAR-10,
    LeNet at init, σ = 0: the starts that end below 1e-5 lead from iteration 100 on), so the probe finds the
    start worth the full budget at a fraction of its cost. ``probe_iterations >= iterations`` runs every restart
    to the end (independent restarts, the lowest final loss wins); ``restarts=1`` is plain DLG.

    Args:
        model: plain classifier taking [0, 1] images (:func:`with_normalization`).
        released: [P] released gradient (:func:`release_gradient`).
        image_shape: (C, H, W) of one image.
        max_grad_norm: the clipping norm C used for the release (None: unclipped).
        batch_size: number of images B behind the released sum.
        iterations: at most this many L-BFGS iterations for the continued restart, probe included (one
            function evaluation each; see :data:`DLG_ITERATIONS`); a run stops early once the loss plateaus.
        lr: L-BFGS step size (DLG: 1).
        restarts: dummy initialisations probed (:data:`DLG_RESTARTS`; DLG itself: 1).
        probe_iterations: L-BFGS iterations of every restart before the best one is chosen
            (:data:`DLG_PROBE_ITERATIONS`).
        seed: seeds the dummy initialisation (restart r uses seed + r).
        progress: show a tqdm progress bar.

    Returns:
        :class:`AttackResult` with [B, C, H, W] reconstruction, the soft label's argmax, the chosen restart's
        best loss and the iterations of all restarts.

    Raises:
        ValueError: for a released gradient of the wrong size, bad shapes or options.
    """
    return _dlg(
        model,
        released,
        image_shape=image_shape,
        max_grad_norm=max_grad_norm,
        batch_size=batch_size,
        schedule=(iterations, restarts, probe_iterations),
        lr=lr,
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
    restarts: int = DLG_RESTARTS,
    probe_iterations: int = DLG_PROBE_ITERATIONS,
    seed: int = 0,
    progress: bool = False,
) -> AttackResult:
    """improved DLG (Zhao et al. 2020, "iDLG: Improved Deep Leakage from Gradients").

    Recovers the label from the sign of the last layer's gradient (:func:`infer_labels`), then runs DLG's
    L-BFGS (with :func:`dlg`'s restarts) on the image alone with that hard label. One example per release
    (B = 1), as in the paper.

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
        schedule=(iterations, restarts, probe_iterations),
        lr=lr,
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
    model, released, *, image_shape, max_grad_norm, batch_size, schedule, lr, seed, progress, labels, desc
):
    """DLG/iDLG with restarts: ``schedule`` = (iterations, restarts, probe_iterations); see :func:`dlg`."""
    iterations, restarts, probe = schedule
    _check_released(model, released)
    _check_common(iterations, lr, batch_size)
    _check_restarts(restarts)
    if isinstance(probe, bool) or not isinstance(probe, int) or probe < 1:
        raise ValueError(f"probe_iterations must be a positive integer, got {probe!r}")
    c, h, w = _check_shape(image_shape)
    start = time.perf_counter()
    device = released.device
    num_classes = num_classes_of(model, torch.zeros(1, c, h, w, device=device))
    fn = gradient_function(model, max_grad_norm=max_grad_norm)
    released = released.detach()
    fixed = None if labels is None else F.one_hot(labels.to(device), num_classes).to(torch.float32)
    runs = []
    for r in range(restarts):
        gen = torch.Generator(device="cpu").manual_seed(seed + r)
        dummy = torch.rand(batch_size, c, h, w, generator=gen).to(device).requires_grad_(True)
        label_param = None
        if labels is None:
            label_param = torch.randn(batch_size, num_classes, generator=gen).to(device).requires_grad_(True)
        run = _MatchingRun(fn, released, dummy, label_param, fixed, lr=lr)
        run.advance(min(probe, iterations), progress=progress, desc=f"{desc} restart {r + 1}/{restarts}")
        runs.append(run)
    best = min(runs, key=lambda run: run.best_loss)  # the first of equals
    best.advance(iterations - best.done, progress=progress, desc=f"{desc} best restart")
    out_labels = labels.to(device) if labels is not None else best.best_label.argmax(dim=-1)
    total = sum(run.done for run in runs)
    return AttackResult(
        best.best_image.clamp(0.0, 1.0), out_labels, best.best_loss, total, time.perf_counter() - start
    )


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
