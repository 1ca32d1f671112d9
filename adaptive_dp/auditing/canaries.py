"""Canaries for a one-run audit: gradient canaries (white box), mislabelled input canaries (black box).

A canary is an example the auditor controls. Each one is included in the training run independently with
probability 1/2 (:func:`draw_inclusion`); after training, the auditor ranks the canaries by a score and guesses
which were included (:mod:`adaptive_dp.auditing.audit`).

* **Gradient canaries** (:func:`make_gradient_canaries`) are fixed vectors of norm C in the space of the
  trainable parameters, added to the clipped gradient sum before the noise at each step where the canary
  is sampled; the auditor sees every intermediate model and scores each canary by how far the updates moved
  along it (:mod:`adaptive_dp.auditing.scoring`). This is the white-box "Dirac canary" / random-direction
  attack of Steinke, Nasr & Jagielski (arXiv:2305.08846v1, experiments) and Nasr et al. (USENIX Security 2023).
* **Input canaries** (:func:`make_input_canaries`) are training examples given a wrong label; the auditor
  keeps only the final model and scores each canary by its negative loss (:func:`input_canary_scores`):
  an included, memorised canary has a low loss under its wrong label (the black-box setting of the same paper).
"""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "canary_seeds",
    "draw_inclusion",
    "input_canary_scores",
    "make_gradient_canaries",
    "make_input_canaries",
    "mislabel",
]

_KINDS = ("random", "dirac")


def _check_int(name: str, value: object, *, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}.")
    return int(value)


def _generator(seed: object) -> torch.Generator:
    return torch.Generator().manual_seed(_check_int("seed", seed, low=0))


def make_gradient_canaries(
    *, count: int, dim: int, max_grad_norm: float, kind: str = "random", seed: int, sparse: bool = False
) -> Tensor:
    """Fixed canary gradients of norm C for a white-box one-run audit.

    ``kind="random"``: each row is an independent direction drawn uniformly from the sphere (a normalised
    standard Gaussian vector), scaled to norm C. In dimension P two such directions have an inner product of
    about C² / √P, so with many canaries each score also carries the others' signal (cross-talk); that costs
    the audit power, never soundness, since the scores are a post-processing of the DP outputs.
    ``kind="dirac"``: row i is C times the unit vector of its own coordinate, coordinates distinct and chosen
    at random (the paper's Dirac canaries: no cross-talk, but they need ``count <= dim``).

    Args:
        count: m, the number of canaries; >= 1.
        dim: P, the number of trainable parameters (length of the flat parameter vector); >= 1.
        max_grad_norm: C, the clipping norm, which each canary has; > 0 and finite.
        kind: ``"random"`` or ``"dirac"``.
        seed: seed of the generator (>= 0); the same seed gives the same canaries.
        sparse: return a sparse COO tensor (``kind="dirac"`` only): O(m) memory whatever P, the same canaries.

    Returns:
        [m, P] float32 canary gradients, each row of norm C. Memory: 4·m·P bytes (dense), O(m) (sparse).

    Raises:
        ValueError: if ``count`` or ``dim`` is not a positive int, ``max_grad_norm`` is not positive and finite,
            ``kind`` is unknown, ``kind="dirac"`` with ``count > dim``, ``sparse=True`` with ``kind="random"``,
            or ``seed`` is not an int >= 0.

    Source: Steinke, Nasr & Jagielski, "Privacy Auditing with One (1) Training Run", arXiv:2305.08846v1,
    experiments (white-box gradient canaries); Nasr et al., "Tight Auditing of Differentially Private Machine
    Learning", USENIX Security 2023 (Dirac canaries).
    """
    count = _check_int("count", count, low=1)
    dim = _check_int("dim", dim, low=1)
    if isinstance(max_grad_norm, bool) or not isinstance(max_grad_norm, numbers.Real):
        raise ValueError(f"max_grad_norm must be a positive real number, got {max_grad_norm!r}.")
    if not (0.0 < float(max_grad_norm) < math.inf):
        raise ValueError(f"max_grad_norm must be positive and finite, got {max_grad_norm}.")
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}.")
    if sparse and kind != "dirac":
        raise ValueError("sparse=True needs kind='dirac' (random directions are dense).")
    generator = _generator(seed)
    if kind == "dirac":
        if count > dim:
            raise ValueError(f"kind='dirac' needs count <= dim (one coordinate each), got {count} > {dim}.")
        coordinates = torch.randperm(dim, generator=generator)[:count]
        if sparse:
            indices = torch.stack([torch.arange(count), coordinates])
            values = torch.full((count,), float(max_grad_norm))
            return torch.sparse_coo_tensor(indices, values, (count, dim), check_invariants=True).coalesce()
        canaries = torch.zeros(count, dim)
        canaries[torch.arange(count), coordinates] = float(max_grad_norm)
        return canaries
    canaries = torch.randn(count, dim, generator=generator)
    return canaries * (float(max_grad_norm) / canaries.norm(dim=1, keepdim=True))


def canary_seeds(*, seed: int, streams: int) -> tuple[int, ...]:
    """Independent seeds for the separate random streams of one canary run, derived from one seed.

    The canaries, the coin flips and the per-step sampling must not share a generator (the coin flips must be
    independent of everything the auditor sees). numpy's ``SeedSequence(seed).spawn`` gives statistically
    independent children; each child's first 63-bit word is the stream's torch seed.

    Args:
        seed: the run's seed (int >= 0).
        streams: how many seeds to derive (int >= 1).

    Returns:
        ``streams`` ints in [0, 2^63), the same for the same ``seed``.

    Raises:
        ValueError: if ``seed`` is not an int >= 0 or ``streams`` not an int >= 1.
    """
    seed = _check_int("seed", seed, low=0)
    streams = _check_int("streams", streams, low=1)
    children = np.random.SeedSequence(seed).spawn(streams)
    return tuple(int(child.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1)) for child in children)


def draw_inclusion(*, count: int, seed: int) -> Tensor:
    """Which canaries the run includes: each independently with probability 1/2.

    The coin flips are the randomness the one-run bound rests on (Algorithm 1 of arXiv:2305.08846v1): draw
    them independently of everything the auditor later sees, and never let the guesses read them.

    Args:
        count: m, the number of canaries; >= 1.
        seed: seed of the generator (>= 0).

    Returns:
        [m] bool, True for an included canary.

    Raises:
        ValueError: if ``count`` is not a positive int or ``seed`` is not an int >= 0.
    """
    count = _check_int("count", count, low=1)
    return torch.rand(count, generator=_generator(seed)) < 0.5


def make_input_canaries(
    *, dataset_size: int, count: int, num_classes: int, seed: int
) -> tuple[Tensor, Tensor]:
    """Mislabelled training examples for a black-box one-run audit.

    Picks m distinct examples of the training set and, for each, a label shift s in {1, …, K - 1}, uniform:
    the canary is the example with label (y + s) mod K (:func:`mislabel`), which differs from its true label y
    whatever y is, so the shift can be drawn before the labels are read.

    Args:
        dataset_size: N, the number of training examples to choose from; >= ``count``.
        count: m, the number of canaries; >= 1.
        num_classes: K, the number of classes; >= 2.
        seed: seed of the generator (>= 0).

    Returns:
        ``(indices, shifts)``: [m] int64 distinct indices in [0, N) and [m] int64 label shifts in [1, K).

    Raises:
        ValueError: if a count is not an int in its range (``count > dataset_size``, ``num_classes < 2``) or
            ``seed`` is not an int >= 0.

    Source: arXiv:2305.08846v1, experiments (black-box audit with mislabelled input canaries).
    """
    count = _check_int("count", count, low=1)
    dataset_size = _check_int("dataset_size", dataset_size, low=count)
    num_classes = _check_int("num_classes", num_classes, low=2)
    generator = _generator(seed)
    indices = torch.randperm(dataset_size, generator=generator)[:count]
    shifts = torch.randint(1, num_classes, (count,), generator=generator)
    return indices, shifts


def mislabel(*, targets: Tensor, shifts: Tensor, num_classes: int) -> Tensor:
    """The canaries' wrong labels: (y + s) mod K.

    Args:
        targets: [m] int64 true labels of the canary examples, in [0, K).
        shifts: [m] int64 label shifts from :func:`make_input_canaries`, in [1, K).
        num_classes: K; >= 2.

    Returns:
        [m] int64 labels, each different from the true one.

    Raises:
        ValueError: if the shapes differ, a label is outside [0, K) or a shift outside [1, K).
    """
    num_classes = _check_int("num_classes", num_classes, low=2)
    if targets.ndim != 1 or targets.shape != shifts.shape:
        raise ValueError(
            f"targets and shifts must be 1-D of one length, got {tuple(targets.shape)} and "
            f"{tuple(shifts.shape)}."
        )
    if bool(((targets < 0) | (targets >= num_classes)).any()):
        raise ValueError(f"targets must lie in [0, {num_classes}).")
    if bool(((shifts < 1) | (shifts >= num_classes)).any()):
        raise ValueError(f"shifts must lie in [1, {num_classes}); pass the shifts from make_input_canaries.")
    return (targets.long() + shifts.long()) % num_classes


def input_canary_scores(*, losses: Tensor) -> Tensor:
    """Black-box scores: the negative loss of each canary (under its wrong label) in the final model.

    A higher score means "more likely included": an included canary was trained on and tends to have a
    lower loss (the loss attack of arXiv:2305.08846v1, black-box experiments).

    Args:
        losses: [m] per-canary losses (e.g. cross-entropy in nats), finite.

    Returns:
        [m] float64 scores, ``-losses``.

    Raises:
        ValueError: if ``losses`` is not 1-D or holds a non-finite value.
    """
    if losses.ndim != 1 or not bool(torch.isfinite(losses).all()):
        raise ValueError(f"losses must be a 1-D tensor of finite values, got shape {tuple(losses.shape)}.")
    return -losses.detach().double()
