"""MNIST and Fashion-MNIST from their four IDX files (LeCun et al.), parsed with numpy.

Files: ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``,
``t10k-labels-idx1-ubyte``, each ``.gz`` or not. Under the data root ROOT they are looked for in
``ROOT/mnist/``, ``ROOT/MNIST/raw/`` (torchvision's layout), ``ROOT/`` for MNIST and in
``ROOT/fashion-mnist/``, ``ROOT/FashionMNIST/raw/``, ``ROOT/`` for Fashion-MNIST (both use the same file
names, so ``ROOT/`` itself is only right when it holds that one data set's files).
"""

from __future__ import annotations

import functools
import gzip
import os
from pathlib import Path

import numpy as np

from adaptive_dp.data.digits import DIGIT_CLASSES
from adaptive_dp.data.paths import CorruptDataError
from adaptive_dp.data.registry import DatasetInfo, register_dataset

__all__ = ["FASHION_MNIST_CLASSES", "IDX_IMAGES_MAGIC", "IDX_LABELS_MAGIC", "read_idx"]

IDX_IMAGES_MAGIC = 2051
IDX_LABELS_MAGIC = 2049
_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


def _read_bytes(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as handle:
                return handle.read()
        return path.read_bytes()
    except (OSError, EOFError) as exc:  # gzip.BadGzipFile is an OSError
        raise CorruptDataError(f"cannot read {path}: {exc}. Delete the file and download it again.") from exc


def _check_magic(path: Path, raw: bytes, expected_magic: int | None) -> None:
    if len(raw) < 4:
        raise CorruptDataError(
            f"{path} is too short ({len(raw)} bytes) to be an IDX file; download it again."
        )
    magic = int.from_bytes(raw[:4], "big")
    if raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise CorruptDataError(
            f"{path} is not a uint8 IDX file (magic number {magic}, expected 2051 or 2049); download it again."
        )
    if expected_magic is not None and magic != expected_magic:
        raise CorruptDataError(
            f"{path} has magic number {magic}, expected {expected_magic}; wrong or corrupt file."
        )


def read_idx(path: str | os.PathLike, *, expected_magic: int | None = None) -> np.ndarray:
    """Parse an IDX file of unsigned bytes (the MNIST format; LeCun et al.), gzip'd when it ends in ``.gz``.

    Header: two zero bytes, type code 0x08 (uint8), the number of dimensions d, then d big-endian uint32
    sizes; the magic number (first 4 bytes, big-endian) is 2051 for image files and 2049 for label files.

    Args:
        path: the file.
        expected_magic: if given, the magic number the file must carry (2051 images, 2049 labels).

    Returns:
        A read-only uint8 array with the file's shape ([N, 28, 28] images, [N] labels).

    Raises:
        CorruptDataError: bad gzip stream, wrong magic number, or a size that does not match the header.
    """
    path = Path(path)
    raw = _read_bytes(path)
    _check_magic(path, raw, expected_magic)
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise CorruptDataError(f"{path}: truncated IDX header; download it again.")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(shape))
    if len(raw) != expected:
        raise CorruptDataError(
            f"{path}: header says shape {shape} ({expected} bytes) but the file has {len(raw)} bytes; "
            "the file is truncated or corrupt, download it again."
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _idx_dirs(root: Path, name: str) -> list[Path]:
    if name == "mnist":
        return [root / "mnist", root / "MNIST" / "raw", root]
    return [root / "fashion-mnist", root / "FashionMNIST" / "raw", root]


def _find_file(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


@functools.lru_cache(maxsize=4)
def _read_idx_pair(images_path: str, labels_path: str, _stamp: tuple) -> tuple[np.ndarray, np.ndarray]:
    images = read_idx(images_path, expected_magic=IDX_IMAGES_MAGIC)
    labels = read_idx(labels_path, expected_magic=IDX_LABELS_MAGIC)
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise CorruptDataError(
            f"{images_path} holds {images.shape} but {labels_path} holds {labels.shape}: counts differ; "
            "the files do not belong together."
        )
    if labels.size and labels.max() >= 10:
        raise CorruptDataError(f"{labels_path} has label {labels.max()} (expected 0..9).")
    return images, labels


def _stamp(*paths: Path) -> tuple:
    return tuple((p.stat().st_size, p.stat().st_mtime_ns) for p in paths)


def _load_idx(name: str, split: str, root: Path) -> tuple[np.ndarray, np.ndarray] | None:
    image_stem, label_stem = _IDX_FILES[split]
    for folder in _idx_dirs(root, name):
        images_path, labels_path = _find_file(folder, image_stem), _find_file(folder, label_stem)
        if images_path is not None and labels_path is not None:
            images, labels = _read_idx_pair(
                str(images_path), str(labels_path), _stamp(images_path, labels_path)
            )
            return images[:, None, :, :], labels  # read-only views of the parse cache
    return None


def _idx_expected(name: str, root: Path) -> tuple[list[Path], str]:
    names = ", ".join(f"{stem}[.gz]" for pair in _IDX_FILES.values() for stem in pair)
    return _idx_dirs(root, name), f"the four IDX files {names}"


# Means/stds of the training images on the [0, 1] scale: MNIST 0.1307/0.3081 (the standard values),
# Fashion-MNIST 0.2860/0.3530.
@register_dataset(
    DatasetInfo("mnist", 10, 1, 28, (0.1307,), (0.3081,), DIGIT_CLASSES),
    expected=functools.partial(_idx_expected, "mnist"),
    torchvision_class="MNIST",
)
def _read_mnist(split: str, root: Path) -> tuple[np.ndarray, np.ndarray] | None:
    return _load_idx("mnist", split, root)


@register_dataset(
    DatasetInfo("fashion-mnist", 10, 1, 28, (0.2860,), (0.3530,), FASHION_MNIST_CLASSES),
    aliases=("fashionmnist", "fmnist"),
    expected=functools.partial(_idx_expected, "fashion-mnist"),
    torchvision_class="FashionMNIST",
)
def _read_fashion_mnist(split: str, root: Path) -> tuple[np.ndarray, np.ndarray] | None:
    return _load_idx("fashion-mnist", split, root)
