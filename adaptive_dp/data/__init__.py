"""Data sets read from their standard layouts (IDX, CIFAR-10 python batches, image folders, the JPEG tar).

See :mod:`adaptive_dp.data.datasets`; torchvision is optional.
"""

from adaptive_dp.data.datasets import (
    DATASETS,
    CorruptDataError,
    DataNotFoundError,
    DatasetInfo,
    audit_split,
    load_dataset,
    normalize,
)

__all__ = [
    "DATASETS",
    "CorruptDataError",
    "DataNotFoundError",
    "DatasetInfo",
    "audit_split",
    "load_dataset",
    "normalize",
]
