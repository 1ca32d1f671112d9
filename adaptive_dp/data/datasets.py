"""Image data sets for DP-SGD, read without torchvision: :func:`load_dataset` over the registered readers.

Data sets (:data:`~adaptive_dp.data.registry.DATASETS`, one module per format, each registering itself
with :func:`~adaptive_dp.data.registry.register_dataset`):

- ``"digits"`` — scikit-learn's 8×8 handwritten digits, works offline (:mod:`adaptive_dp.data.digits`);
- ``"mnist"``, ``"fashion-mnist"`` — the four standard IDX files (:mod:`adaptive_dp.data.idx`);
- ``"cifar10"`` — the python batches, an image-folder tree or the JPEG tar (:mod:`adaptive_dp.data.cifar`).

Where the files are looked for: :func:`~adaptive_dp.data.paths.get_data_root` — the ``data_dir`` argument
(``--data-dir``), else ``$ADAPTIVE_DP_DATA``, else ``get_cache_dir()/data``; each format module lists the
folders it searches under that root. :func:`load_dataset` raises ``DataNotFoundError`` listing the searched
paths, the expected file names and how to get them; ``download=True`` fetches missing files with
torchvision's downloader (where torchvision is installed) into the root, in torchvision's layout, and then
reads them with the parsers here. The audit split (:func:`~adaptive_dp.data.splits.audit_split`) carves
the leakage monitor's hold-out off a training set.

This module is also the import path of the data API used across the package, tests and benchmarks.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from adaptive_dp.data import digits, idx  # noqa: F401 - each registers its data sets (in this order)
from adaptive_dp.data.cifar import CIFAR10_CLASSES
from adaptive_dp.data.idx import read_idx
from adaptive_dp.data.images import ImageDataset, denormalize, normalize
from adaptive_dp.data.paths import (
    DATA_ENV,
    CorruptDataError,
    DataNotFoundError,
    get_cache_dir,
    get_data_root,
)
from adaptive_dp.data.registry import DATASETS, SPLITS, DatasetInfo, DatasetSource, get_source
from adaptive_dp.data.splits import audit_split

__all__ = [
    "CIFAR10_CLASSES",
    "DATASETS",
    "CorruptDataError",
    "DataNotFoundError",
    "DatasetInfo",
    "ImageDataset",
    "audit_split",
    "denormalize",
    "get_cache_dir",
    "get_data_root",
    "load_dataset",
    "normalize",
    "read_idx",
]


def _download_with_torchvision(source: DatasetSource, root: Path) -> None:
    name = source.info.name
    try:
        import torchvision.datasets as tv_datasets
    except ImportError as exc:
        raise DataNotFoundError(
            f"download=True needs torchvision to fetch {name}, and it is not installed. Install it "
            f"(pip install 'adaptive-dp[vision]') or put the files under {root} yourself (see the message "
            "without download=True for the expected names)."
        ) from exc
    root.mkdir(parents=True, exist_ok=True)
    dataset_class = getattr(tv_datasets, source.torchvision_class)
    for train in (True, False):
        dataset_class(str(root), train=train, download=True)


def _not_found(source: DatasetSource, split: str, root: Path) -> DataNotFoundError:
    searched, what = source.expected(root) if source.expected is not None else ([root], "its files")
    paths = "\n".join(f"  - {p}" for p in searched)
    return DataNotFoundError(
        f"{source.info.name} ({split} split) not found under the data root {root}.\nSearched:\n{paths}\n"
        f"Expected {what}.\nFix: point --data-dir (or the environment variable {DATA_ENV}) at the folder "
        f"holding them, or pass download=True to fetch them with torchvision (if installed) into {root}."
    )


def _owned_tensor(array: np.ndarray, dtype: type) -> Tensor:
    # Copy read-only or shared arrays (the IDX parse cache) so callers may modify their dataset freely.
    if array.dtype != dtype or not array.flags.writeable or not array.flags.c_contiguous:
        array = np.array(array, dtype=dtype)
    return torch.from_numpy(array)


def load_dataset(
    name: str,
    *,
    split: str = "train",
    data_dir: str | os.PathLike | None = None,
    download: bool = False,
) -> ImageDataset:
    """Load one split of a data set into memory.

    Args:
        name: a registered name — "digits", "mnist", "fashion-mnist" or "cifar10" (case and ``_``/``-``
            insensitive, aliases such as "cifar-10" accepted).
        split: "train" or "test".
        data_dir: the data root (see :func:`get_data_root`); ignored for "digits" (embedded in scikit-learn).
        download: if the files are missing, fetch them with torchvision's downloader into the data root
            (needs torchvision and internet), then read them with this package's parsers.

    Returns:
        An :class:`ImageDataset`: digits 1,437 train / 360 test (8×8×1); MNIST and Fashion-MNIST 60,000 /
        10,000 (28×28×1); CIFAR-10 50,000 / 10,000 (32×32×3, class order :data:`CIFAR10_CLASSES`).

    Raises:
        ValueError: unknown data set (the message lists the known ones) or split.
        DataNotFoundError: files missing; the message lists the searched paths, expected names and the fix.
        CorruptDataError: files present but unreadable (truncated download, wrong magic number).
    """
    source = get_source(name)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    root = get_data_root(data_dir)
    found = source.read(split, root)
    if found is None and download and source.torchvision_class is not None:
        _download_with_torchvision(source, root)
        found = source.read(split, root)
    if found is None:
        raise _not_found(source, split, root)
    images, labels = found
    return ImageDataset(_owned_tensor(images, np.uint8), _owned_tensor(labels, np.int64), source.info)
