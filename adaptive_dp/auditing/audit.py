"""From canary scores to an empirical ε: top-k / bottom-k guesses and the one-run bound.

The auditor ranks the m canaries by score, guesses "included" for the k highest and "excluded" for the k
lowest, abstains on the rest, counts the right guesses and converts the count into ε̂ with
:func:`~adaptive_dp.auditing.bound.epsilon_lower_bound`. k is chosen from a small set fixed before the scores
are seen; trying every k in the set and keeping the best is paid for with a Bonferroni correction (each k is
tested at confidence 1 - (1 - confidence) / |set|), so the reported ε̂ holds at ``confidence`` overall.

Source: Steinke, Nasr & Jagielski, "Privacy Auditing with One (1) Training Run", arXiv:2305.08846v1 —
Algorithm 1 (the game: coin flips, top k₊ / bottom k₋ guesses, abstentions), Corollary 5.4 (the bound with
abstentions), and the paper's advice to fix k₊, k₋ in advance or to correct for choosing them.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from adaptive_dp.auditing.bound import epsilon_lower_bound

__all__ = ["DEFAULT_K_FRACTIONS", "CanaryAudit", "audit_from_scores", "default_k_values"]

#: Guesses per side as fractions of m (k = ⌊f·m⌋, at least 1): 1 % … 50 % (50 %: every canary guessed).
DEFAULT_K_FRACTIONS: tuple[float, ...] = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5)
_MODES = ("gradient", "input")


@dataclasses.dataclass(frozen=True)
class CanaryAudit:
    """Result of a one-run canary audit.

    Attributes:
        epsilon_lower_bound: ε̂ (nats): with probability >= ``confidence``, the run is not (ε, δ)-DP for
            any ε < ε̂.
        canaries: m, the number of canaries.
        guesses: r = 2k, the canaries guessed on (the rest abstained).
        correct: v, the right guesses.
        confidence: overall confidence of ``epsilon_lower_bound`` (after the Bonferroni correction over k).
        delta: δ at which ε was audited.
        mode: ``"gradient"`` (white box) or ``"input"`` (black box).
        k: guesses per side of the reported result (top k "included", bottom k "excluded").
    """

    epsilon_lower_bound: float
    canaries: int
    guesses: int
    correct: int
    confidence: float
    delta: float
    mode: str
    k: int

    def as_dict(self) -> dict[str, Any]:
        """The fields as a plain dict (JSON-ready)."""
        return dataclasses.asdict(self)


def default_k_values(canaries: int) -> tuple[int, ...]:
    """The k values tried for m canaries: ⌊f·m⌋ (at least 1) for f in :data:`DEFAULT_K_FRACTIONS`, distinct.

    Depends on m only, never on the scores, so it is fixed before the audit.

    Raises:
        ValueError: if ``canaries`` is not an int >= 2 (two sides need one canary each).
    """
    if isinstance(canaries, bool) or not isinstance(canaries, numbers.Integral) or canaries < 2:
        raise ValueError(f"canaries must be an int >= 2, got {canaries!r}.")
    values = (max(1, int(f * canaries)) for f in DEFAULT_K_FRACTIONS)
    return tuple(sorted(set(values)))


def _check_k_values(k_values: Sequence[int], canaries: int) -> tuple[int, ...]:
    values = tuple(k_values)
    if not values or len(set(values)) != len(values):
        raise ValueError(f"k_values must be a non-empty set of distinct ints, got {values!r}.")
    for k in values:
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not (1 <= k <= canaries // 2):
            raise ValueError(f"every k must be an int in [1, m // 2] = [1, {canaries // 2}], got {k!r}.")
    return tuple(int(k) for k in values)


def _check_scores(scores: Tensor, included: Tensor) -> None:
    if not isinstance(scores, Tensor) or scores.ndim != 1 or scores.shape[0] < 2:
        raise ValueError("scores must be a 1-D tensor with one score per canary (m >= 2).")
    if not isinstance(included, Tensor) or included.dtype != torch.bool or included.shape != scores.shape:
        raise ValueError(
            f"included must be a bool tensor of shape {tuple(scores.shape)} (from draw_inclusion)."
        )
    if not bool(torch.isfinite(scores).all()):
        raise ValueError("scores must be finite; a NaN or inf score cannot be ranked.")


def _count_correct(order: Tensor, included: Tensor, k: int) -> int:
    top, bottom = order[:k], order[-k:]
    return int(included[top].sum()) + int((~included[bottom]).sum())


def audit_from_scores(
    *,
    scores: Tensor,
    included: Tensor,
    delta: float,
    confidence: float = 0.95,
    k_values: Sequence[int] | None = None,
    mode: str = "gradient",
) -> CanaryAudit:
    """Empirical ε lower bound of a run from its canaries' scores and coin flips.

    For each k in ``k_values``: guess "included" for the k highest scores and "excluded" for the k lowest
    (ties broken by canary index, never by ``included``), count the right guesses v out of r = 2k and compute
    ε̂_k at confidence ``1 - (1 - confidence) / len(k_values)`` (Bonferroni). The result is the k with the
    largest ε̂_k (the first such k on ties).

    Args:
        scores: [m] canary scores, higher meaning "more likely included" (:class:`CanaryScorer` or
            :func:`input_canary_scores`).
        included: [m] bool coin flips (:func:`draw_inclusion`).
        delta: δ at which ε is audited; in [0, 1).
        confidence: overall confidence of the bound; in [0.5, 1).
        k_values: guesses per side to try, each in [1, m // 2], fixed before the scores are seen;
            default :func:`default_k_values` (m).
        mode: ``"gradient"`` or ``"input"``, recorded in the result.

    Returns:
        :class:`CanaryAudit`.

    Raises:
        ValueError: if the scores are not a finite 1-D tensor of m >= 2, ``included`` is not a bool tensor of
            the same shape, a k is out of range or repeated, ``mode`` is unknown, or ``delta`` / ``confidence``
            are out of range.
    """
    _check_scores(scores, included)
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}.")
    if (
        isinstance(confidence, bool)
        or not isinstance(confidence, numbers.Real)
        or not 0.5 <= confidence < 1.0
    ):
        raise ValueError(f"confidence must be a real number in [0.5, 1), got {confidence!r}; use e.g. 0.95.")
    m = int(scores.shape[0])
    values = default_k_values(m) if k_values is None else _check_k_values(k_values, m)
    order = torch.sort(scores.detach().cpu(), descending=True, stable=True).indices
    included = included.cpu()
    per_k_confidence = 1.0 - (1.0 - float(confidence)) / len(values)
    results = []
    for k in values:
        correct = _count_correct(order, included, k)
        eps = epsilon_lower_bound(
            canaries=m, guesses=2 * k, correct=correct, delta=delta, confidence=per_k_confidence
        )
        results.append(CanaryAudit(eps, m, 2 * k, correct, float(confidence), float(delta), mode, k))
    return max(results, key=lambda audit: audit.epsilon_lower_bound)  # the first of equal ε̂
