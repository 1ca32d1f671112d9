"""Data sets read from their standard layouts (IDX, CIFAR-10 python batches, image folders, the JPEG tar).

One module per stage: :mod:`~adaptive_dp.data.registry` (``DATASETS``, ``register_dataset``),
:mod:`~adaptive_dp.data.paths` (data root, cache folder, errors), :mod:`~adaptive_dp.data.cache` (decoded
arrays), the formats :mod:`~adaptive_dp.data.digits`, :mod:`~adaptive_dp.data.idx` and
:mod:`~adaptive_dp.data.cifar`, :mod:`~adaptive_dp.data.images` (``ImageDataset``, normalisation),
:mod:`~adaptive_dp.data.splits` (the audit split) and :mod:`~adaptive_dp.data.datasets` (``load_dataset``).
torchvision is optional.
"""

from adaptive_dp.data.datasets import (
    CIFAR10_CLASSES,
    DATASETS,
    CorruptDataError,
    DataNotFoundError,
    DatasetInfo,
    ImageDataset,
    audit_split,
    denormalize,
    get_cache_dir,
    get_data_root,
    load_dataset,
    normalize,
    read_idx,
)
from adaptive_dp.data.registry import register_dataset

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
    "register_dataset",
]
