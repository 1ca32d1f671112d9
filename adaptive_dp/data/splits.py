"""The audit split: a seeded, disjoint hold-out carved off a training set for the leakage monitor.

The monitor measures on it, and it must never reach the training loader. Those examples are never trained
on, so they get no DP protection themselves: they are the "public" side of the measurement. A user who has
a genuinely public set (e.g. a test split or a public data set from the same distribution) skips
:func:`audit_split` and passes that set as ``audit_data`` to ``AdaptivePrivacyEngine.make_private``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

__all__ = ["audit_split"]


def _audit_size(n: int, fraction: float | None, size: int | None) -> int:
    if (fraction is None) == (size is None):
        raise ValueError(
            "give exactly one of fraction= (in (0, 1)) or size= (in [1, N-1]) for the audit split"
        )
    if n < 2:
        raise ValueError(f"the dataset needs at least 2 examples for an audit split, it has {n}")
    if fraction is not None:
        if not (isinstance(fraction, (int, float)) and 0.0 < float(fraction) < 1.0):
            raise ValueError(f"fraction must lie in (0, 1), got {fraction!r}")
        return min(max(1, round(float(fraction) * n)), n - 1)
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or not 1 <= int(size) <= n - 1:
        raise ValueError(f"size must be an integer in [1, {n - 1}] (N = {n}), got {size!r}")
    return int(size)


def audit_split(
    dataset: Dataset,
    *,
    fraction: float | None = None,
    size: int | None = None,
    seed: int = 0,
) -> tuple[Subset, Subset]:
    """Carve a seeded, disjoint audit split off a training set.

    The audit examples are chosen uniformly at random (``torch.Generator`` seeded with ``seed``); the two
    index sets are disjoint, sorted, and together cover ``range(len(dataset))``. Build the training loader
    from the first subset only: the audit subset is what the leakage monitor measures on, and the DP
    guarantee of the trained model covers the training subset only — the audit examples are never trained
    on and get no DP protection of their own. With a genuinely public set, skip this function and give that
    set to the engine as ``audit_data`` directly.

    Args:
        dataset: any sized map-style dataset of N ≥ 2 examples.
        fraction: audit share of N in (0, 1); the audit size is round(fraction · N), at least 1 and at most
            N − 1. Exactly one of ``fraction`` and ``size`` must be given.
        size: audit size in [1, N − 1].
        seed: seed of the random choice.

    Returns:
        ``(train, audit)`` as ``torch.utils.data.Subset`` views of ``dataset``.

    Raises:
        ValueError: both or neither of ``fraction``/``size`` given, or either out of range.
    """
    n = len(dataset)
    k = _audit_size(n, fraction, size)
    generator = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(n, generator=generator)
    audit_idx = torch.sort(perm[:k]).values.tolist()
    train_idx = torch.sort(perm[k:]).values.tolist()
    return Subset(dataset, train_idx), Subset(dataset, audit_idx)
