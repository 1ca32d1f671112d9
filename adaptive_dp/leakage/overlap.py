"""Refuse an audit split that is, or overlaps, the training data.

Why (``docs/accounting.md``, condition 1): σ_{t+1} may depend only on public data and DP outputs. The leakage
monitor reads the audit examples' own gradients, so an audit example that is also trained on makes σ a direct
function of a private training example, which the accountant does not pay for. Audit examples themselves get no
DP protection: use public data, or let the engine carve a held-out split (``audit_fraction``).

Three checks, cheapest first:

1. the same object: the training Dataset or DataLoader (or a DataLoader over the training Dataset);
2. index overlap: both sides are resolved through ``Subset`` and ``ConcatDataset`` to the root datasets and
   indices they cover; a shared root with a shared index is an overlap;
3. content: the bytes of every audit example's tensors are hashed and looked up among the hashes of the
   training examples — all of them for training sets under :data:`FULL_CHECK_LIMIT` examples, else a seeded
   sample of :data:`SAMPLE_SIZE`. Skipped when check 2 proves the two sides are disjoint index sets of one root
   dataset (a split of one data set: its own duplicate examples are the data's, not a wiring error).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Subset

__all__ = ["AuditOverlapError", "FULL_CHECK_LIMIT", "SAMPLE_SIZE", "check_audit_disjoint"]

#: training sets below this size are hashed in full; larger ones through a sample of SAMPLE_SIZE examples.
FULL_CHECK_LIMIT = 100_000
SAMPLE_SIZE = 1_000

_THREAT = (
    "The leakage monitor reads the audit examples' gradients to choose σ, so audit examples must never be trained "
    "on (σ would then depend on private training examples, which ε does not cover), and they get no DP protection "
    "themselves: pass public or held-out examples as audit_data, or audit_fraction=0.02 to carve a held-out split "
    "off the training set before training."
)


class AuditOverlapError(ValueError):
    """The audit split is, or overlaps, the training data (see the module doc for the threat)."""


def check_audit_disjoint(
    *, train: Dataset | DataLoader, audit: Any, audit_dataset: Dataset, seed: int = 0
) -> None:
    """Raise :class:`AuditOverlapError` when the audit examples are, or overlap, the training examples.

    Args:
        train: the training DataLoader (or Dataset) the private loader is built from.
        audit: what the user passed as ``audit_data`` (a Dataset, a DataLoader or tensors).
        audit_dataset: ``audit`` normalised to a map-style Dataset of ``(x, y)``.
        seed: seed of the training-example sample of the content check (large training sets only).

    Raises:
        AuditOverlapError: with the first offending example and the fix.
    """
    train_dataset = train.dataset if isinstance(train, DataLoader) else train
    if any(a is b for a in (audit, audit_dataset) for b in (train, train_dataset)) or (
        isinstance(audit, DataLoader) and audit.dataset is train_dataset
    ):
        raise AuditOverlapError(f"audit_data is the training data itself. {_THREAT}")
    train_roots, audit_roots = _roots(train_dataset), _roots(audit_dataset)
    shared = set(train_roots) & set(audit_roots)
    for key in shared:
        common = train_roots[key][1] & audit_roots[key][1]
        if common:
            raise AuditOverlapError(
                f"{len(common)} audit example(s) are also training examples (e.g. index {min(common)} of "
                f"{type(train_roots[key][0]).__name__}). {_THREAT}"
            )
    if shared and set(train_roots) == set(audit_roots):
        return  # disjoint index sets of the same data: a held-out split
    _check_content(train_dataset, audit_dataset, seed=seed)


def _roots(dataset: Dataset) -> dict[int, tuple[Dataset, set[int]]]:
    """Root datasets (not Subset/ConcatDataset) under ``dataset`` with the indices of each it covers."""
    out: dict[int, tuple[Dataset, set[int]]] = {}
    for root, indices in _leaves(dataset, None):
        entry = out.setdefault(id(root), (root, set()))
        entry[1].update(indices)
    return out


def _leaves(dataset: Dataset, indices: Iterable[int] | None) -> Iterable[tuple[Dataset, Iterable[int]]]:
    positions = range(len(dataset)) if indices is None else indices  # type: ignore[arg-type]
    if isinstance(dataset, Subset):
        yield from _leaves(dataset.dataset, [int(dataset.indices[i]) for i in positions])
    elif isinstance(dataset, ConcatDataset):
        bounds = [0, *dataset.cumulative_sizes]
        wanted = np.asarray(list(positions), dtype=np.int64)
        for part, lo, hi in zip(dataset.datasets, bounds[:-1], bounds[1:]):
            inside = wanted[(wanted >= lo) & (wanted < hi)] - lo
            if inside.size:
                yield from _leaves(part, inside.tolist())
    else:
        yield dataset, positions


def _check_content(train: Dataset, audit: Dataset, *, seed: int) -> None:
    n = len(train)  # type: ignore[arg-type]
    if n <= FULL_CHECK_LIMIT:
        positions = range(n)
    else:
        positions = np.random.default_rng(seed).choice(n, size=SAMPLE_SIZE, replace=False).tolist()
    seen = {_fingerprint(train[i]): i for i in positions}
    for j in range(len(audit)):  # type: ignore[arg-type]
        i = seen.get(_fingerprint(audit[j]))
        if i is not None:
            raise AuditOverlapError(
                f"audit example {j} is byte-identical to training example {i} (checked "
                f"{'all' if n <= FULL_CHECK_LIMIT else SAMPLE_SIZE} of {n} training examples). {_THREAT}"
            )


def _fingerprint(example: Any) -> bytes:
    """A hash of the input tensor's bytes (the first item of an ``(x, y)`` pair), shape and dtype included."""
    x = example[0] if isinstance(example, (tuple, list)) else example
    if isinstance(x, torch.Tensor):
        t = x.detach().cpu().contiguous()
        payload = t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes()
        meta = f"{tuple(t.shape)}{t.dtype}".encode()
    else:
        payload, meta = np.asarray(x).tobytes(), b"array"
    return hashlib.blake2b(meta + payload, digest_size=16).digest()
