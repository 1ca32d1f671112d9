"""The audit split: public or held-out examples on which the engine measures gradient leakage.

Why it exists (see ``docs/accounting.md``): the noise multiplier σ_{t+1} may depend only on what is
already public. Leakage is therefore measured on examples that are never trained on — either a public
set the user supplies (``audit_data``) or examples carved off the training set *before* the private
data loader is built (``audit_fraction``), so that opacus' sample rate q = 1 / len(loader) is computed
on the examples that are really trained on. Carved examples get no DP protection themselves.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

__all__ = ["as_audit_dataset", "audit_indices", "audit_tensors", "carve_audit_split", "rebuild_loader"]


def as_audit_dataset(audit_data: Any) -> Dataset:
    """Normalise what a user may pass as ``audit_data`` to a map-style Dataset of ``(x, y)`` pairs.

    Args:
        audit_data: a map-style ``Dataset``; a ``DataLoader`` (its dataset is used); a tuple/list
            ``(x, y)`` of tensors with the same first dimension N; or a single tensor ``x`` of shape
            [N, ...] (labels are then all 0 — enough for estimators that do not use them).

    Returns:
        A map-style Dataset whose items are ``(x_i, y_i)``.

    Raises:
        ValueError: if ``audit_data`` is empty, an iterable-style dataset, or tensors of unequal length.
    """
    if isinstance(audit_data, DataLoader):
        audit_data = audit_data.dataset
    if isinstance(audit_data, torch.Tensor):
        audit_data = (audit_data, torch.zeros(len(audit_data), dtype=torch.long, device=audit_data.device))
    if (
        isinstance(audit_data, (tuple, list))
        and audit_data
        and all(isinstance(t, torch.Tensor) for t in audit_data)
    ):
        lengths = {len(t) for t in audit_data}
        if len(lengths) != 1:
            raise ValueError(
                f"audit_data tensors have different lengths {sorted(lengths)}; pass (x, y) with the same "
                "first dimension"
            )
        audit_data = TensorDataset(*audit_data)
    if not isinstance(audit_data, Dataset) or isinstance(audit_data, torch.utils.data.IterableDataset):
        raise ValueError(
            f"audit_data must be a map-style Dataset, a DataLoader over one, or tensors (x, y); got "
            f"{type(audit_data).__name__}"
        )
    if len(audit_data) == 0:  # type: ignore[arg-type]
        raise ValueError("audit_data is empty; pass at least 2 audit examples or use audit_fraction > 0")
    return audit_data


def audit_tensors(audit_data: Any, *, max_examples: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``max_examples`` audit examples as two tensors, after :func:`as_audit_dataset`'s checks.

    Args:
        audit_data: anything :func:`as_audit_dataset` accepts.
        max_examples: cap on N (None: all).

    Returns:
        ``(x [N, ...], y [N, ...])``. Tensors given as ``(x, y)`` (or a ``TensorDataset``) are sliced as they
        are; items of another Dataset are stacked, scalar labels as a long tensor [N].

    Raises:
        ValueError: as :func:`as_audit_dataset`.
    """
    dataset = as_audit_dataset(audit_data)
    n = len(dataset) if max_examples is None else min(len(dataset), int(max_examples))
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) >= 2:
        x, y = dataset.tensors[:2]
        return x[:n], y[:n]
    items = [dataset[i] for i in range(n)]
    xs = torch.stack([torch.as_tensor(item[0]) for item in items])
    labels = [torch.as_tensor(item[1]) for item in items]
    if all(t.dim() == 0 for t in labels):
        return xs, torch.stack(labels).long()
    return xs, torch.stack(labels)


def audit_indices(subset: Subset) -> list[int]:
    """Indices into the root dataset that a (possibly nested) ``Subset`` covers, in order."""
    indices = list(range(len(subset)))
    data: Any = subset
    while isinstance(data, Subset):
        indices = [int(data.indices[i]) for i in indices]
        data = data.dataset
    return indices


def rebuild_loader(data_loader: DataLoader, dataset: Dataset) -> DataLoader:
    """A DataLoader over ``dataset`` with the batch size and worker settings of ``data_loader``.

    The sample rate opacus derives from the result, 1 / len(loader), is then the one of ``dataset``.

    Raises:
        ValueError: if ``data_loader`` has a custom batch sampler without a ``batch_size``.
    """
    batch_size = data_loader.batch_size
    if batch_size is None:
        batch_size = getattr(data_loader.batch_sampler, "batch_size", None)
    if batch_size is None:
        raise ValueError(
            "audit_fraction needs a DataLoader built with batch_size=... (its batch sampler has no batch_size); "
            "carve the audit split yourself (adaptive_dp.data.audit_split) and pass audit_data= instead"
        )
    shuffle = isinstance(data_loader.sampler, torch.utils.data.RandomSampler)
    kwargs: dict[str, Any] = dict(
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=data_loader.num_workers,
        collate_fn=data_loader.collate_fn,
        pin_memory=data_loader.pin_memory,
        drop_last=data_loader.drop_last,
        timeout=data_loader.timeout,
        worker_init_fn=data_loader.worker_init_fn,
        generator=data_loader.generator,
        persistent_workers=data_loader.persistent_workers,
    )
    if data_loader.num_workers > 0:
        kwargs["prefetch_factor"] = data_loader.prefetch_factor
        kwargs["multiprocessing_context"] = data_loader.multiprocessing_context
    return DataLoader(dataset, **kwargs)


def carve_audit_split(
    data_loader: DataLoader, *, fraction: float, seed: int = 0
) -> tuple[DataLoader, Subset]:
    """Carve an audit split off a training loader's dataset before the private loader is built.

    Args:
        data_loader: the user's training DataLoader (map-style dataset of N examples).
        fraction: share of the N examples held out for auditing, in (0, 1).
        seed: seed of the random, disjoint split.

    Returns:
        ``(train_loader, audit_subset)``: a DataLoader over the remaining N − ⌈fraction·N⌉ examples
        (same batch size and worker settings, so opacus computes q on it) and the audit ``Subset``.

    Raises:
        ValueError: if ``fraction`` is not in (0, 1) or the split leaves fewer than 2 audit examples.
    """
    if not 0.0 < float(fraction) < 1.0:
        raise ValueError(
            f"audit_fraction must be in (0, 1), got {fraction!r}; use 0/None to turn the monitor off"
        )
    from adaptive_dp.data.datasets import audit_split

    train_subset, audit_subset = audit_split(data_loader.dataset, fraction=float(fraction), seed=seed)
    if len(audit_subset) < 2:
        raise ValueError(
            f"audit_fraction={fraction} leaves {len(audit_subset)} audit example(s) of {len(data_loader.dataset)}; "
            "raise audit_fraction or pass audit_data="
        )
    return rebuild_loader(data_loader, train_subset), audit_subset
