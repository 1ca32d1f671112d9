"""Image data sets for DP-SGD, read without torchvision, and the audit split.

Data sets (``DATASETS``):

- ``"digits"`` — scikit-learn's 8×8 handwritten digits (1,797 images, shipped inside the scikit-learn
  wheel, so it works offline). Pixel values 0..16 are rescaled to uint8 0..255 (round(v·255/16)). There
  is no official split: a fixed stratified 80/20 split with ``random_state=0``
  (``sklearn.model_selection.train_test_split``) gives 1,437 training and 360 test images.
- ``"mnist"``, ``"fashion-mnist"`` — the four standard IDX files (``train-images-idx3-ubyte``,
  ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, each ``.gz`` or not),
  parsed here with numpy.
- ``"cifar10"`` — the original python batches (``cifar-10-batches-py/``), an image-folder tree
  (``{train,test}/<class>/*.jpg|png``), or the tar ``cifar10-jpeg/cifar10-jpeg.tar`` holding such a tree.
  Image folders and the tar are decoded once into cached uint8 ``.npy`` files per split under
  :func:`get_cache_dir` (the tar's JPEGs are decoded straight from its members, no extracted copy); the
  cache is safe under concurrent processes (``filelock`` lock + write to a temporary name + ``os.replace``).

Where the files are looked for: :func:`get_data_root` — the ``data_dir`` argument (``--data-dir``), else
``$ADAPTIVE_DP_DATA``, else ``get_cache_dir()/data``. Under that root ROOT, in this order:

- MNIST: ``ROOT/mnist/``, ``ROOT/MNIST/raw/`` (torchvision's layout), ``ROOT/``;
- Fashion-MNIST: ``ROOT/fashion-mnist/``, ``ROOT/FashionMNIST/raw/``, ``ROOT/`` (both IDX data sets use the
  same file names, so ``ROOT/`` itself is only right when it holds that one data set's files);
- CIFAR-10: python batches in ``ROOT/cifar-10-batches-py/`` or ``ROOT/``; an image-folder tree in
  ``ROOT/cifar10/``, ``ROOT/CIFAR10/``, ``ROOT/cifar-10/`` or ``ROOT/``; the tar
  ``ROOT/cifar10-jpeg/cifar10-jpeg.tar`` or ``ROOT/cifar10-jpeg.tar``.

:func:`load_dataset` raises :class:`DataNotFoundError` listing the searched paths, the expected file names
and how to get them; ``download=True`` fetches missing files with torchvision's downloader (where
torchvision is installed) into ROOT, in torchvision's layout, and then reads them with the parsers here.

Audit split: :func:`audit_split` carves a seeded, disjoint hold-out off a training set; the leakage
monitor measures on it, and it must never reach the training loader. Those examples are never trained
on, so they get no DP protection themselves: they are the "public" side of the measurement. A user who
has a genuinely public set (e.g. a test split or a public data set from the same distribution) skips
:func:`audit_split` and passes that set as ``audit_data`` to ``AdaptivePrivacyEngine.make_private``.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import hashlib
import io
import os
import pickle
import tarfile
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, Subset

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

DATA_ENV = "ADAPTIVE_DP_DATA"
CACHE_ENV = "ADAPTIVE_DP_CACHE"
SPLITS = ("train", "test")

CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
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
DIGIT_CLASSES = tuple(str(d) for d in range(10))
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")


@dataclass(frozen=True)
class DatasetInfo:
    """Static description of a data set.

    ``mean``/``std`` are the per-channel pixel statistics of the training images scaled to [0, 1] (used by
    :func:`normalize`); ``classes`` are the label names in label order.
    """

    name: str
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: tuple[str, ...]


#: The supported data sets. Means/stds: MNIST 0.1307/0.3081 and CIFAR-10 (0.4914, 0.4822, 0.4465)/
#: (0.2470, 0.2435, 0.2616) are the standard training-set statistics; Fashion-MNIST 0.2860/0.3530;
#: digits 0.3053/0.3759 computed over all 1,797 images after the uint8 rescaling.
DATASETS: dict[str, DatasetInfo] = {
    "digits": DatasetInfo("digits", 10, 1, 8, (0.3053,), (0.3759,), DIGIT_CLASSES),
    "mnist": DatasetInfo("mnist", 10, 1, 28, (0.1307,), (0.3081,), DIGIT_CLASSES),
    "fashion-mnist": DatasetInfo("fashion-mnist", 10, 1, 28, (0.2860,), (0.3530,), FASHION_MNIST_CLASSES),
    "cifar10": DatasetInfo(
        "cifar10", 10, 3, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), CIFAR10_CLASSES
    ),
}

_ALIASES = {"cifar-10": "cifar10", "fashionmnist": "fashion-mnist", "fmnist": "fashion-mnist"}


class DataNotFoundError(FileNotFoundError):
    """A data set's files are not where they were looked for; the message says where and how to get them."""


class CorruptDataError(ValueError):
    """A data file exists but cannot be parsed (truncated download, wrong file); re-download it."""


# --------------------------------------------------------------------------------------------------------
# Normalisation and the dataset class
# --------------------------------------------------------------------------------------------------------


def _channel_stats(info: DatasetInfo, like: Tensor) -> tuple[Tensor, Tensor]:
    dtype = like.dtype if like.is_floating_point() else torch.float32
    mean = torch.tensor(info.mean, dtype=dtype, device=like.device).view(-1, 1, 1)
    std = torch.tensor(info.std, dtype=dtype, device=like.device).view(-1, 1, 1)
    if like.dim() < 3 or like.shape[-3] != len(info.mean):
        raise ValueError(
            f"expected images [..., {len(info.mean)}, H, W] for {info.name}, got shape {tuple(like.shape)}"
        )
    return mean, std


def normalize(x01: Tensor, info: DatasetInfo) -> Tensor:
    """Standardise images per channel: (x01 − mean) / std with ``info``'s statistics.

    Args:
        x01: [..., C, H, W] images with values in [0, 1], any device.
        info: the data set's :class:`DatasetInfo` (C must equal ``info.in_channels``).

    Returns:
        A new float tensor of the same shape, on the same device.

    Raises:
        ValueError: if the channel dimension does not match ``info``.
    """
    mean, std = _channel_stats(info, x01)
    return (x01 - mean) / std


def denormalize(x: Tensor, info: DatasetInfo) -> Tensor:
    """Invert :func:`normalize`: x · std + mean, back to the [0, 1] pixel scale (not clamped).

    Args:
        x: [..., C, H, W] normalised images, any device.
        info: the data set's :class:`DatasetInfo`.

    Returns:
        A new float tensor of the same shape, on the same device.
    """
    mean, std = _channel_stats(info, x)
    return x * std + mean


class ImageDataset(Dataset):
    """Images held in memory as uint8, served normalised.

    Attributes:
        images: uint8 tensor [N, C, H, W] (pixel values 0..255).
        targets: int64 tensor [N] of labels in ``range(info.num_classes)``.
        info: the :class:`DatasetInfo` (name, classes, mean/std used for normalisation).

    ``dataset[i]`` returns ``(x, y)``: x float32 [C, H, W] = normalize(images[i] / 255, info), y an int.
    Item access is a handful of tensor ops (opacus' Poisson loader calls it per example), and
    ``__getitems__`` normalises a whole batch of indices at once (used by ``torch.utils.data.DataLoader``).
    Data sets of at most ``FLOAT_CACHE_LIMIT`` pixel values (digits, the MNIST/Fashion-MNIST test splits)
    keep a normalised float32 copy, made on first access; larger ones (MNIST train: 47 M values, CIFAR-10
    train: 154 M) normalise on the fly. Treat ``images`` as read-only once items have been read (the cached
    copy would not see later in-place edits); build a new ``ImageDataset`` instead.
    """

    FLOAT_CACHE_LIMIT = 16_000_000

    def __init__(self, images: Tensor, targets: Tensor, info: DatasetInfo) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(
                f"images must be a uint8 tensor [N, C, H, W], got {images.dtype} {tuple(images.shape)}"
            )
        if images.shape[1] != info.in_channels:
            raise ValueError(f"{info.name} has {info.in_channels} channel(s), images have {images.shape[1]}")
        targets = torch.as_tensor(targets, dtype=torch.long)
        if targets.shape != (images.shape[0],):
            raise ValueError(f"targets must be [N] = [{images.shape[0]}], got {tuple(targets.shape)}")
        if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= info.num_classes):
            raise ValueError(
                f"labels must lie in [0, {info.num_classes}), got [{targets.min()}, {targets.max()}]"
            )
        self.images = images
        self.targets = targets
        self.info = info
        channels = images.shape[1]
        # x = uint8 · scale + shift  ==  (uint8 / 255 − mean) / std
        std = torch.tensor(info.std, dtype=torch.float32).view(channels, 1, 1)
        mean = torch.tensor(info.mean, dtype=torch.float32).view(channels, 1, 1)
        self._scale = 1.0 / (255.0 * std)
        self._shift = -mean / std
        self._normalised: Tensor | None = None

    def __len__(self) -> int:
        return self.images.shape[0]

    def _float_images(self) -> Tensor | None:
        if self._normalised is None and self.images.numel() <= self.FLOAT_CACHE_LIMIT:
            self._normalised = self.images.float() * self._scale + self._shift
        return self._normalised

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        cached = self._float_images()
        if cached is not None:
            return cached[index], int(self.targets[index])
        return self.images[index].float() * self._scale + self._shift, int(self.targets[index])

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[Tensor, int]]:
        index = torch.as_tensor(list(indices), dtype=torch.long)
        cached = self._float_images()
        x = cached[index] if cached is not None else self.images[index].float() * self._scale + self._shift
        return list(zip(x.unbind(0), self.targets[index].tolist()))

    def __repr__(self) -> str:
        return f"ImageDataset({self.info.name}, n={len(self)}, shape={tuple(self.images.shape[1:])})"


# --------------------------------------------------------------------------------------------------------
# Roots and caches
# --------------------------------------------------------------------------------------------------------


def get_cache_dir() -> Path:
    """Folder for extracted and decoded data: ``$ADAPTIVE_DP_CACHE``, else ``~/.cache/adaptive_dp``.

    The folder is not created here.
    """
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "adaptive_dp"


def get_data_root(data_dir: str | os.PathLike | None = None) -> Path:
    """The data root: ``data_dir`` (``--data-dir``) if given, else ``$ADAPTIVE_DP_DATA``, else
    ``get_cache_dir() / "data"``. The folder need not exist."""
    if data_dir is not None and str(data_dir) != "":
        return Path(data_dir).expanduser()
    env = os.environ.get(DATA_ENV)
    if env:
        return Path(env).expanduser()
    return get_cache_dir() / "data"


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Exclusive inter-process lock on ``path`` (created if missing) for the duration of the block
    (``filelock.FileLock``: flock on POSIX, msvcrt locking on Windows)."""
    from filelock import FileLock

    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path)):
        yield


def _atomic_save_npy(path: Path, array: np.ndarray) -> None:
    """``np.save`` to a temporary name in the same folder, then ``os.replace`` it into place."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            np.save(handle, array)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _cache_files(prefix: Path) -> tuple[Path, Path]:
    return prefix.with_name(prefix.name + ".images.npy"), prefix.with_name(prefix.name + ".labels.npy")


def _cache_ready(prefix: Path) -> bool:
    return _cache_files(prefix)[0].is_file()  # written last, so its presence means both are complete


def _save_cached(prefix: Path, images: np.ndarray, labels: np.ndarray) -> None:
    images_path, labels_path = _cache_files(prefix)
    _atomic_save_npy(labels_path, labels)
    _atomic_save_npy(images_path, images)


def _load_cached(prefix: Path) -> tuple[np.ndarray, np.ndarray]:
    images_path, labels_path = _cache_files(prefix)
    return np.load(images_path), np.load(labels_path)


def _fingerprint(*parts: object) -> str:
    return hashlib.sha256("\x00".join(str(p) for p in parts).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------------------
# IDX (MNIST, Fashion-MNIST)
# --------------------------------------------------------------------------------------------------------

IDX_IMAGES_MAGIC = 2051
IDX_LABELS_MAGIC = 2049
_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _read_bytes(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as handle:
                return handle.read()
        return path.read_bytes()
    except (OSError, EOFError) as exc:  # gzip.BadGzipFile is an OSError
        raise CorruptDataError(f"cannot read {path}: {exc}. Delete the file and download it again.") from exc


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
            return images[:, None, :, :], labels
    return None


def _idx_hint(name: str, root: Path) -> tuple[list[Path], str]:
    names = ", ".join(f"{stem}[.gz]" for pair in _IDX_FILES.values() for stem in pair)
    return _idx_dirs(root, name), f"the four IDX files {names}"


# --------------------------------------------------------------------------------------------------------
# CIFAR-10
# --------------------------------------------------------------------------------------------------------

_CIFAR_BATCHES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}


def _cifar_batch_dirs(root: Path) -> list[Path]:
    return [root / "cifar-10-batches-py", root]


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as handle:
            return pickle.load(handle, encoding="bytes")
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means a bad file
        raise CorruptDataError(f"cannot read CIFAR-10 batch {path}: {exc}. Download it again.") from exc


def _load_cifar_batches(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    meta_path = folder / "batches.meta"
    if meta_path.is_file():
        meta = _unpickle(meta_path)
        names = tuple(n.decode() if isinstance(n, bytes) else n for n in meta.get(b"label_names", ()))
        if names and names != CIFAR10_CLASSES:
            raise CorruptDataError(
                f"{meta_path} lists classes {names}, expected the CIFAR-10 names {CIFAR10_CLASSES}"
            )
    images, labels = [], []
    for batch_name in _CIFAR_BATCHES[split]:
        batch = _unpickle(folder / batch_name)
        data = np.asarray(batch.get(b"data"), dtype=np.uint8)
        batch_labels = np.asarray(batch.get(b"labels"), dtype=np.int64)
        if data.ndim != 2 or data.shape[1] != 3072 or data.shape[0] != batch_labels.shape[0]:
            raise CorruptDataError(
                f"{folder / batch_name}: data {data.shape} and labels {batch_labels.shape} are not a CIFAR-10 batch"
            )
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(batch_labels)
    return np.concatenate(images), np.concatenate(labels)


def _image_folder_roots(root: Path) -> list[Path]:
    return [root / "cifar10", root / "CIFAR10", root / "cifar-10", root]


def _is_image_folder(folder: Path, split: str) -> bool:
    return all((folder / split / cls).is_dir() for cls in CIFAR10_CLASSES)


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES)


def _list_image_folder(split_dir: Path) -> list[tuple[Path, int]]:
    files = []
    for label, cls in enumerate(CIFAR10_CLASSES):
        class_dir = split_dir / cls
        found = sorted(class_dir / name for name in os.listdir(class_dir) if _is_image_name(name))
        if not found:
            raise DataNotFoundError(f"{class_dir} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        files.extend((p, label) for p in found)
    return files


def _decode_image(source: Path | bytes, where: str) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
            array = np.asarray(img if img.mode == "RGB" else img.convert("RGB"), dtype=np.uint8)
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad files
        raise CorruptDataError(f"cannot decode image {where}: {exc}") from exc
    if array.shape != (32, 32, 3):
        raise CorruptDataError(f"{where} is {array.shape[1]}×{array.shape[0]}, CIFAR-10 images are 32×32")
    return array


def _stack(decoded: list[np.ndarray], labels: list[int]) -> tuple[np.ndarray, np.ndarray]:
    images = np.ascontiguousarray(np.stack(decoded).transpose(0, 3, 1, 2))
    return images, np.asarray(labels, dtype=np.int64)


def _cached_image_folder(split_dir: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Decode ``split_dir/<class>/*`` once into ``get_cache_dir()/cifar10-decoded/folder-<split>-<key>.*.npy``.

    The key hashes the folder's resolved path and, per class, the folder's modification time and number of
    images (adding, removing or renaming images changes it; rewriting one in place does not).
    """
    parts: list[object] = [split_dir.resolve()]
    for cls in CIFAR10_CLASSES:
        class_dir = split_dir / cls
        parts += [class_dir.stat().st_mtime_ns, sum(map(_is_image_name, os.listdir(class_dir)))]
    key = _fingerprint(*parts)
    cache = get_cache_dir() / "cifar10-decoded"
    target = cache / f"folder-{split}-{key}"
    if not _cache_ready(target):
        with _file_lock(cache / f"folder-{split}-{key}.lock"):
            if not _cache_ready(target):
                files = _list_image_folder(split_dir)
                decoded = [_decode_image(path, str(path)) for path, _ in files]
                images, labels = _stack(decoded, [label for _, label in files])
                _save_cached(target, images, labels)
    return _load_cached(target)


def _tar_candidates(root: Path) -> list[Path]:
    return [root / "cifar10-jpeg" / "cifar10-jpeg.tar", root / "cifar10-jpeg.tar"]


def _tar_member_key(name: str) -> tuple[str, int, str] | None:
    """``.../{train,test}/<class>/<file>.jpg`` → (split, label, file name); None for anything else."""
    parts = name.split("/")
    if len(parts) < 3 or not _is_image_name(parts[-1]):
        return None
    split, cls = parts[-3], parts[-2]
    if split not in SPLITS or cls not in CIFAR10_CLASSES:
        return None
    return split, CIFAR10_CLASSES.index(cls), parts[-1]


def _decode_tar(tar_path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Decode every ``{train,test}/<class>/*`` image of an image-folder tar in one sequential pass."""
    found: dict[str, list[tuple[int, str, np.ndarray]]] = {split: [] for split in SPLITS}
    try:
        with tarfile.open(tar_path) as tar:
            for member in tar:
                key = _tar_member_key(member.name) if member.isfile() else None
                if key is None:
                    continue
                handle = tar.extractfile(member)
                blob = handle.read() if handle is not None else b""
                found[key[0]].append((key[1], key[2], _decode_image(blob, f"{tar_path}:{member.name}")))
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise CorruptDataError(f"cannot read {tar_path}: {exc}. Download it again.") from exc
    result = {}
    for split, items in found.items():
        labels = {label for label, _, _ in items}
        if labels != set(range(len(CIFAR10_CLASSES))):
            raise CorruptDataError(
                f"{tar_path} does not hold an image-folder tree {split}/<class>/*.jpg with all CIFAR-10 classes "
                f"({', '.join(CIFAR10_CLASSES)})"
            )
        items.sort(key=lambda item: (item[0], item[1]))
        result[split] = _stack([a for _, _, a in items], [label for label, _, _ in items])
    return result


def _cached_tar(tar_path: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Decode an image-folder tar once into ``get_cache_dir()/cifar10-decoded/tar-<split>-<key>.{images,labels}.npy``.

    Both splits are decoded in one pass over the tar (reading the tar is cheap, decoding the 60,000 JPEGs
    is the slow part); the key hashes the tar's resolved path, size and modification time, so a changed
    tar is decoded again. The images are decoded straight from the tar's members, which does the one-time
    "extraction" without writing 60,000 small files. Safe under concurrent processes (pytest-xdist
    workers): a ``filelock`` lock serialises the decoding and each file is written under a temporary
    name and moved into place with ``os.replace``, so readers never see a partial file.
    """
    stat = tar_path.stat()
    key = _fingerprint(tar_path.resolve(), stat.st_size, stat.st_mtime_ns)
    cache = get_cache_dir() / "cifar10-decoded"
    targets = {s: cache / f"tar-{s}-{key}" for s in SPLITS}
    if not _cache_ready(targets[split]):
        with _file_lock(cache / f"tar-{key}.lock"):
            if not _cache_ready(targets[split]):
                for s, (images, labels) in _decode_tar(tar_path).items():
                    _save_cached(targets[s], images, labels)
    return _load_cached(targets[split])


def _load_cifar10(split: str, root: Path) -> tuple[np.ndarray, np.ndarray] | None:
    for folder in _cifar_batch_dirs(root):
        if all((folder / b).is_file() for b in _CIFAR_BATCHES[split]):
            return _load_cifar_batches(folder, split)
    for folder in _image_folder_roots(root):
        if _is_image_folder(folder, split):
            return _cached_image_folder(folder / split, split)
    for tar_path in _tar_candidates(root):
        if tar_path.is_file():
            return _cached_tar(tar_path, split)
    return None


def _cifar_hint(root: Path) -> tuple[list[Path], str]:
    searched = [*_cifar_batch_dirs(root)[:1], *_image_folder_roots(root), *_tar_candidates(root)]
    what = (
        "the python batches cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}, or an image-folder "
        f"tree {{train,test}}/<class>/*.jpg|png with the classes {', '.join(CIFAR10_CLASSES)}, "
        "or cifar10-jpeg/cifar10-jpeg.tar holding such a tree"
    )
    return searched, what


# --------------------------------------------------------------------------------------------------------
# digits
# --------------------------------------------------------------------------------------------------------

DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0


@functools.lru_cache(maxsize=1)
def _digits_split() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = np.rint(bunch.data.reshape(-1, 1, 8, 8) * (255.0 / 16.0)).astype(np.uint8)
    labels = bunch.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=DIGITS_TEST_FRACTION, random_state=DIGITS_SPLIT_SEED, stratify=labels
    )
    for array in (x_train, x_test, y_train, y_test):
        array.setflags(write=False)  # cached: load_dataset copies before handing out tensors
    return {"train": (x_train, y_train), "test": (x_test, y_test)}


# --------------------------------------------------------------------------------------------------------
# load_dataset
# --------------------------------------------------------------------------------------------------------


def _canonical_name(name: str) -> str:
    key = str(name).strip().lower().replace("_", "-")
    key = _ALIASES.get(key, key)
    if key not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; known data sets: {', '.join(DATASETS)}")
    return key


def _locate(name: str, split: str, root: Path) -> tuple[np.ndarray, np.ndarray] | None:
    if name == "cifar10":
        return _load_cifar10(split, root)
    return _load_idx(name, split, root)


_TORCHVISION_CLASSES = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST", "cifar10": "CIFAR10"}


def _download_with_torchvision(name: str, root: Path) -> None:
    try:
        import torchvision.datasets as tv_datasets
    except ImportError as exc:
        raise DataNotFoundError(
            f"download=True needs torchvision to fetch {name}, and it is not installed. Install it "
            f"(pip install 'adaptive-dp[vision]') or put the files under {root} yourself (see the message "
            "without download=True for the expected names)."
        ) from exc
    root.mkdir(parents=True, exist_ok=True)
    dataset_class = getattr(tv_datasets, _TORCHVISION_CLASSES[name])
    for train in (True, False):
        dataset_class(str(root), train=train, download=True)


def _not_found(name: str, split: str, root: Path) -> DataNotFoundError:
    searched, what = _cifar_hint(root) if name == "cifar10" else _idx_hint(name, root)
    paths = "\n".join(f"  - {p}" for p in searched)
    return DataNotFoundError(
        f"{name} ({split} split) not found under the data root {root}.\nSearched:\n{paths}\n"
        f"Expected {what}.\nFix: point --data-dir (or the environment variable {DATA_ENV}) at the folder "
        f"holding them, or pass download=True to fetch them with torchvision (if installed) into {root}."
    )


def load_dataset(
    name: str,
    *,
    split: str = "train",
    data_dir: str | os.PathLike | None = None,
    download: bool = False,
) -> ImageDataset:
    """Load one split of a data set into memory.

    Args:
        name: "digits", "mnist", "fashion-mnist" or "cifar10" (case and ``_``/``-`` insensitive).
        split: "train" or "test".
        data_dir: the data root (see :func:`get_data_root`); ignored for "digits" (embedded in scikit-learn).
        download: if the files are missing, fetch them with torchvision's downloader into the data root
            (needs torchvision and internet), then read them with this module's parsers.

    Returns:
        An :class:`ImageDataset`: digits 1,437 train / 360 test (8×8×1); MNIST and Fashion-MNIST 60,000 /
        10,000 (28×28×1); CIFAR-10 50,000 / 10,000 (32×32×3, class order :data:`CIFAR10_CLASSES`).

    Raises:
        ValueError: unknown data set (the message lists the known ones) or split.
        DataNotFoundError: files missing; the message lists the searched paths, expected names and the fix.
        CorruptDataError: files present but unreadable (truncated download, wrong magic number).
    """
    key = _canonical_name(name)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    info = DATASETS[key]
    if key == "digits":
        images, labels = _digits_split()[split]
    else:
        root = get_data_root(data_dir)
        found = _locate(key, split, root)
        if found is None and download:
            _download_with_torchvision(key, root)
            found = _locate(key, split, root)
        if found is None:
            raise _not_found(key, split, root)
        images, labels = found
    return ImageDataset(_owned_tensor(images, np.uint8), _owned_tensor(labels, np.int64), info)


def _owned_tensor(array: np.ndarray, dtype: type) -> Tensor:
    # Copy read-only or shared arrays (the IDX parse cache) so callers may modify their dataset freely.
    if array.dtype != dtype or not array.flags.writeable or not array.flags.c_contiguous:
        array = np.array(array, dtype=dtype)
    return torch.from_numpy(array)


# --------------------------------------------------------------------------------------------------------
# audit split
# --------------------------------------------------------------------------------------------------------


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
    if (fraction is None) == (size is None):
        raise ValueError(
            "give exactly one of fraction= (in (0, 1)) or size= (in [1, N-1]) for the audit split"
        )
    if n < 2:
        raise ValueError(f"the dataset needs at least 2 examples for an audit split, it has {n}")
    if fraction is not None:
        if not (isinstance(fraction, (int, float)) and 0.0 < float(fraction) < 1.0):
            raise ValueError(f"fraction must lie in (0, 1), got {fraction!r}")
        k = min(max(1, round(float(fraction) * n)), n - 1)
    else:
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or not 1 <= int(size) <= n - 1:
            raise ValueError(f"size must be an integer in [1, {n - 1}] (N = {n}), got {size!r}")
        k = int(size)
    generator = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(n, generator=generator)
    audit_idx = torch.sort(perm[:k]).values.tolist()
    train_idx = torch.sort(perm[k:]).values.tolist()
    return Subset(dataset, train_idx), Subset(dataset, audit_idx)
