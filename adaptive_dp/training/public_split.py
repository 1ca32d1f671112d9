"""The public split of a public-pretraining → private fine-tuning workflow: carved, recorded, checked.

``adaptive-dp pretrain`` trains without privacy on ``count`` examples of a data set's *training* set, chosen by a
seeded random permutation (:func:`carve_public_split`). Those examples are declared public: the pretrained model
(and anything derived from it) may reveal them. The record of the split (:func:`split_record`: seed, count,
training-set size, the sorted indices and their SHA-256) goes into the pretrain checkpoint and
``OUT/public_split.json``; ``adaptive-dp train --init`` reads it back (:func:`check_split_record`) and trains
privately only on the rest of the training set, so no example is both public and private.

torch is imported inside the functions (``adaptive-dp --help`` stays fast).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["carve_public_split", "check_split_record", "indices_sha256", "split_record"]


def carve_public_split(train_size: int, count: int, *, seed: int) -> list[int]:
    """The indices of the public split: ``count`` of ``range(train_size)``, chosen uniformly at random.

    The choice is the first ``count`` entries of ``torch.randperm(train_size)`` under a ``torch.Generator``
    seeded with ``seed`` (the global RNG is untouched), sorted; the same arguments always give the same split.

    Args:
        train_size: N, examples of the whole training set (≥ 2).
        count: public examples, in [1, N − 1] (at least one example must stay private).
        seed: integer ≥ 0.

    Returns:
        ``count`` distinct sorted indices in [0, N).

    Raises:
        ValueError: ``count`` outside [1, N − 1] (the message names N and the fix).
    """
    import torch

    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count < train_size:
        raise ValueError(
            f"--public-examples {count!r}: the training set has {train_size} examples and at least one must stay "
            f"private; choose --public-examples between 1 and {train_size - 1}"
        )
    generator = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(int(train_size), generator=generator)
    return sorted(int(i) for i in perm[:count].tolist())


def indices_sha256(indices: Iterable[int]) -> str:
    """SHA-256 (hex) of the sorted indices written as ASCII decimals joined by commas (e.g. ``"3,17,42"``)."""
    text = ",".join(str(int(i)) for i in sorted(indices))
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def split_record(*, dataset: str, train_size: int, seed: int, indices: list[int]) -> dict[str, Any]:
    """The record of a public split, JSON-able and readable by ``torch.load(weights_only=True)``.

    Returns:
        ``{"dataset", "train_size", "seed", "count", "sha256", "indices"}`` (indices sorted ints).
    """
    indices = sorted(int(i) for i in indices)
    return {
        "dataset": str(dataset),
        "train_size": int(train_size),
        "seed": int(seed),
        "count": len(indices),
        "sha256": indices_sha256(indices),
        "indices": indices,
    }


def check_split_record(record: Mapping[str, Any], *, train_size: int, source: str) -> list[int]:
    """The public indices of a record written by :func:`split_record`, after checking it.

    Args:
        record: the record (from a pretrain checkpoint).
        train_size: examples of the training set loaded now.
        source: where the record comes from (for the messages).

    Returns:
        The sorted public indices.

    Raises:
        ValueError: fields missing, indices that do not match their hash or count, repeat or lie outside
            [0, train_size), or a training set of another size than the one the split was carved from.
    """
    if not isinstance(record, Mapping) or not {"indices", "sha256", "train_size"} <= set(record):
        raise ValueError(
            f"{source} holds no public split record: pass the checkpoint.pt that `adaptive-dp pretrain` wrote"
        )
    indices = sorted(int(i) for i in record["indices"])
    if indices_sha256(indices) != record["sha256"] or len(set(indices)) != len(indices):
        raise ValueError(
            f"the public split in {source} is damaged (its indices do not match their SHA-256): pretrain again"
        )
    if int(record["train_size"]) != int(train_size) or (
        indices and not 0 <= indices[0] <= indices[-1] < train_size
    ):
        raise ValueError(
            f"the public split in {source} was carved from a training set of {record['train_size']} examples, but "
            f"the one loaded now has {train_size}: point --data-dir at the data the model was pretrained on, or "
            "pretrain again on this data"
        )
    return indices
