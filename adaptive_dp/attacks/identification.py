"""Identification (linkage) attack on DP-SGD's released per-example gradient.

Given one released gradient g̃ = clip_C(g(x*)) + N(0, σ²C²I) and N candidate examples (the true x* among
them), the attacker computes every candidate's own clipped gradient g_j and picks the one under which g̃
is most likely. For the Gaussian mechanism the log likelihood is −‖g̃ − g_j‖² / (2σ²C²) + const, so the
likelihood-ratio (Neyman–Pearson / maximum a posteriori with a uniform prior) decision is the nearest
candidate in L2. Its success rate against chance 1/N is what the likelihood-ratio MI estimate bounds via
Fano's inequality, and it keeps working at noise levels where reconstruction has already failed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from adaptive_dp.attacks.release import check_sigma, clipped_per_sample_gradients

__all__ = ["IdentificationResult", "identification_attack", "identification_curve", "identify"]


@dataclass(frozen=True)
class IdentificationResult:
    """Success of the identification attack at one noise multiplier.

    Attributes:
        noise_multiplier: σ of the releases.
        rate: fraction of releases linked to their true candidate.
        stderr: binomial standard error √(rate(1 − rate)/trials).
        chance: 1 / candidates, the rate of a random guess.
        correct: number of correct identifications.
        trials: number of releases attacked.
        candidates: N, the size of the candidate set.
    """

    noise_multiplier: float
    rate: float
    stderr: float
    chance: float
    correct: int
    trials: int
    candidates: int


def identify(released: Tensor, candidate_gradients: Tensor) -> Tensor:
    """The likelihood-ratio decision: index of the candidate nearest (L2) to each released gradient.

    Args:
        released: [P] or [T, P] released (noisy, clipped) gradients.
        candidate_gradients: [N, P] the candidates' own clipped gradients.

    Returns:
        [T] long tensor of candidate indices (T = 1 for a single [P] release).

    Raises:
        ValueError: if the parameter dimensions differ or a tensor has the wrong rank.

    Source: Gaussian log likelihood −‖g̃ − g_j‖²/(2σ²C²) (the critic of
    :func:`adaptive_dp.leakage.mine.likelihood_ratio_scores`); argmax over j = nearest neighbour.
    """
    if released.dim() == 1:
        released = released.unsqueeze(0)
    if released.dim() != 2 or candidate_gradients.dim() != 2:
        raise ValueError(
            f"released must be [P] or [T, P] and candidate_gradients [N, P], got {tuple(released.shape)} and "
            f"{tuple(candidate_gradients.shape)}"
        )
    if released.shape[1] != candidate_gradients.shape[1]:
        raise ValueError(
            f"released has {released.shape[1]} parameters but candidates have {candidate_gradients.shape[1]}; "
            "compute both on the same model"
        )
    # ‖a − b‖² = ‖a‖² − 2 a·b + ‖b‖²; the ‖a‖² term is shared by every candidate of a row.
    scores = 2.0 * released.double() @ candidate_gradients.double().T - candidate_gradients.double().pow(
        2
    ).sum(1)
    return scores.argmax(dim=1)


def _check_int(name: str, value: int, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def identification_curve(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    *,
    noise_multipliers: Sequence[float],
    max_grad_norm: float,
    trials_per_candidate: int = 1,
    seed: int = 0,
) -> list[IdentificationResult]:
    """Identification success over a grid of noise multipliers, with common random numbers.

    Every candidate in turn is the true example; its clipped gradient is released ``trials_per_candidate``
    times with noise σ·C·z, the same standard normal draws z reused for every σ (so the curve is smooth in
    σ), and :func:`identify` picks among all N candidates.

    Args:
        model: plain classifier taking [0, 1] images (:func:`adaptive_dp.attacks.with_normalization`).
        images: [N, C, H, W] candidates in [0, 1] (N ≥ 2).
        labels: [N] their class indices.
        noise_multipliers: σ values ≥ 0.
        max_grad_norm: clipping norm C > 0.
        trials_per_candidate: noisy releases per candidate (trials = N · this).
        seed: seeds the noise.

    Returns:
        One :class:`IdentificationResult` per σ, in the given order.

    Raises:
        ValueError: for fewer than 2 candidates, bad images/labels, a negative σ, or bad counts.
    """
    _check_int("trials_per_candidate", trials_per_candidate, 1)
    sigmas = [float(s) for s in noise_multipliers]
    if not sigmas:
        raise ValueError("noise_multipliers is empty")
    for s in sigmas:
        check_sigma(s)
    if images.dim() != 4 or images.shape[0] < 2:
        raise ValueError(f"images must be [N, C, H, W] with N >= 2 candidates, got {tuple(images.shape)}")
    clean = clipped_per_sample_gradients(model, images, labels, max_grad_norm=max_grad_norm)
    n = clean.shape[0]
    truth = torch.arange(n, device=clean.device).repeat(trials_per_candidate)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    z = torch.randn(truth.numel(), clean.shape[1], generator=gen).to(clean.device, clean.dtype)
    results = []
    for sigma in sigmas:
        released = clean[truth] + sigma * max_grad_norm * z
        correct = int((identify(released, clean) == truth).sum())
        trials = truth.numel()
        rate = correct / trials
        results.append(
            IdentificationResult(
                noise_multiplier=sigma,
                rate=rate,
                stderr=math.sqrt(rate * (1 - rate) / trials),
                chance=1.0 / n,
                correct=correct,
                trials=trials,
                candidates=n,
            )
        )
    return results


def identification_attack(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    *,
    noise_multiplier: float,
    max_grad_norm: float,
    trials_per_candidate: int = 1,
    seed: int = 0,
) -> IdentificationResult:
    """Identification success at one noise multiplier (:func:`identification_curve` with one σ).

    Args: as :func:`identification_curve`, with a single ``noise_multiplier``.

    Returns:
        :class:`IdentificationResult`.

    Raises:
        ValueError: as :func:`identification_curve`.
    """
    return identification_curve(
        model,
        images,
        labels,
        noise_multipliers=[noise_multiplier],
        max_grad_norm=max_grad_norm,
        trials_per_candidate=trials_per_candidate,
        seed=seed,
    )[0]
