"""The data-set registry: every data set registers its reader here, so :data:`DATASETS` is the one name list.

A reader is a function ``read(split, root) -> (images, labels) | None``: images uint8 [N, C, H, W]
(pixel values 0..255), labels int64 [N], or None when its files are not under the data root ``root``.
Register it with :func:`register_dataset`, in a module that :mod:`adaptive_dp.data.datasets` imports::

    @register_dataset(DatasetInfo("mnist", 10, 1, 28, (0.1307,), (0.3081,), DIGIT_CLASSES),
                      torchvision_class="MNIST", expected=_mnist_expected)
    def _read_mnist(split: str, root: Path) -> tuple[np.ndarray, np.ndarray] | None: ...

:func:`adaptive_dp.data.load_dataset` then finds it by name (or alias), builds the
:class:`~adaptive_dp.data.images.ImageDataset` and, when the reader returns None, raises the
``DataNotFoundError`` that ``expected`` describes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "DATASETS",
    "SPLITS",
    "DatasetInfo",
    "DatasetSource",
    "canonical_name",
    "get_source",
    "register_dataset",
]

SPLITS = ("train", "test")

Arrays = tuple[np.ndarray, np.ndarray]
Reader = Callable[[str, Path], Arrays | None]
#: root -> (searched paths, a sentence naming the expected files), for the not-found message.
Expected = Callable[[Path], tuple[list[Path], str]]


@dataclass(frozen=True)
class DatasetInfo:
    """Static description of a data set.

    ``mean``/``std`` are the per-channel pixel statistics of the training images scaled to [0, 1] (used by
    :func:`~adaptive_dp.data.normalize`); ``classes`` are the label names in label order.
    """

    name: str
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: tuple[str, ...]


@dataclass(frozen=True)
class DatasetSource:
    """A registered data set: its :class:`DatasetInfo`, reader, and how to report or fetch missing files.

    Attributes:
        info: the static description.
        read: ``read(split, root)`` → (images uint8 [N, C, H, W], labels int64 [N]) or None if not found.
        expected: ``expected(root)`` → (searched paths, expected file names); None for data shipped in a
            package (never missing).
        torchvision_class: the ``torchvision.datasets`` class that downloads it (``download=True``), if any.
    """

    info: DatasetInfo
    read: Reader
    expected: Expected | None = None
    torchvision_class: str | None = None


#: The registered data sets by canonical name (filled by :func:`register_dataset`).
DATASETS: dict[str, DatasetInfo] = {}
_SOURCES: dict[str, DatasetSource] = {}
_ALIASES: dict[str, str] = {}


def _key(name: str) -> str:
    return str(name).strip().lower().replace("_", "-")


def register_dataset(
    info: DatasetInfo,
    *,
    aliases: tuple[str, ...] = (),
    expected: Expected | None = None,
    torchvision_class: str | None = None,
) -> Callable[[Reader], Reader]:
    """Decorator registering a reader as data set ``info.name`` (see the module docstring for the contract).

    Args:
        info: the data set's description; ``info.name`` is its canonical name.
        aliases: other accepted spellings (matched case- and ``_``/``-``-insensitively).
        expected: ``root -> (searched paths, expected files)`` for the not-found message.
        torchvision_class: name of the ``torchvision.datasets`` class that can download it.

    Returns:
        The decorator; it returns the reader unchanged.

    Raises:
        ValueError: if the name or an alias is already registered.
    """

    def decorator(read: Reader) -> Reader:
        names = [info.name, *(_key(a) for a in aliases)]
        taken = [n for n in names if n in DATASETS or n in _ALIASES]
        if taken:
            raise ValueError(f"data set name(s) {taken} already registered; pick another name")
        DATASETS[info.name] = info
        _SOURCES[info.name] = DatasetSource(info, read, expected, torchvision_class)
        _ALIASES.update({alias: info.name for alias in names[1:]})
        return read

    return decorator


def canonical_name(name: str) -> str:
    """The registered name for ``name`` (case, ``_``/``-`` and aliases such as "cifar-10" resolved).

    Raises:
        ValueError: unknown data set; the message lists the registered ones.
    """
    key = _ALIASES.get(_key(name), _key(name))
    if key not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; known data sets: {', '.join(DATASETS)}")
    return key


def get_source(name: str) -> DatasetSource:
    """The :class:`DatasetSource` registered for ``name`` (any accepted spelling; ValueError if unknown)."""
    return _SOURCES[canonical_name(name)]
