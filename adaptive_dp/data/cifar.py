"""CIFAR-10 from the python batches, an image-folder tree, or a tar holding such a tree (JPEG or PNG).

Under the data root ROOT, in this order: the original python batches in ``ROOT/cifar-10-batches-py/`` or
``ROOT/``; an image-folder tree ``{train,test}/<class>/*.jpg|png`` in ``ROOT/cifar10/``, ``ROOT/CIFAR10/``,
``ROOT/cifar-10/`` or ``ROOT/``; the tar ``ROOT/cifar10-jpeg/cifar10-jpeg.tar`` or ``ROOT/cifar10-jpeg.tar``.
Image folders and the tar are decoded once into cached uint8 ``.npy`` files per split under
``get_cache_dir()/cifar10-decoded`` (:mod:`adaptive_dp.data.cache`; the tar's images are decoded straight
from its members, no extracted copy).
"""

from __future__ import annotations

import io
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np

from adaptive_dp.data.cache import cache_ready, file_lock, fingerprint, load_cached, save_cached
from adaptive_dp.data.paths import CorruptDataError, DataNotFoundError, get_cache_dir
from adaptive_dp.data.registry import SPLITS, DatasetInfo, register_dataset

__all__ = ["CIFAR10_CLASSES", "IMAGE_SUFFIXES"]

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
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
_CIFAR_BATCHES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
Arrays = tuple[np.ndarray, np.ndarray]

# --------------------------------------------------------------------------------------------- python batches


def _cifar_batch_dirs(root: Path) -> list[Path]:
    return [root / "cifar-10-batches-py", root]


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as handle:
            return pickle.load(handle, encoding="bytes")
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means a bad file
        raise CorruptDataError(f"cannot read CIFAR-10 batch {path}: {exc}. Download it again.") from exc


def _check_meta(folder: Path) -> None:
    meta_path = folder / "batches.meta"
    if meta_path.is_file():
        meta = _unpickle(meta_path)
        names = tuple(n.decode() if isinstance(n, bytes) else n for n in meta.get(b"label_names", ()))
        if names and names != CIFAR10_CLASSES:
            raise CorruptDataError(
                f"{meta_path} lists classes {names}, expected the CIFAR-10 names {CIFAR10_CLASSES}"
            )


def _load_cifar_batches(folder: Path, split: str) -> Arrays:
    _check_meta(folder)
    images, labels = [], []
    for batch_name in _CIFAR_BATCHES[split]:
        batch = _unpickle(folder / batch_name)
        data = np.asarray(batch.get(b"data"), dtype=np.uint8)
        batch_labels = np.asarray(batch.get(b"labels"), dtype=np.int64)
        if data.ndim != 2 or data.shape[1] != 3072 or data.shape[0] != batch_labels.shape[0]:
            raise CorruptDataError(
                f"{folder / batch_name}: data {data.shape} and labels {batch_labels.shape} are not a CIFAR-10 batch"
            )
        images.append(data.reshape(-1, 3, 32, 32))  # each row: 1024 red, then green, then blue values
        labels.append(batch_labels)
    return np.concatenate(images), np.concatenate(labels)


# ----------------------------------------------------------------------------------------------- image folders


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


def _stack(decoded: list[np.ndarray], labels: list[int]) -> Arrays:
    images = np.ascontiguousarray(np.stack(decoded).transpose(0, 3, 1, 2))
    return images, np.asarray(labels, dtype=np.int64)


def _cached_image_folder(split_dir: Path, split: str) -> Arrays:
    """Decode ``split_dir/<class>/*`` once into ``get_cache_dir()/cifar10-decoded/folder-<split>-<key>.*.npy``.

    The key hashes the folder's resolved path and, per class, the folder's modification time and number of
    images (adding, removing or renaming images changes it; rewriting one in place does not).
    """
    parts: list[object] = [split_dir.resolve()]
    for cls in CIFAR10_CLASSES:
        class_dir = split_dir / cls
        parts += [class_dir.stat().st_mtime_ns, sum(map(_is_image_name, os.listdir(class_dir)))]
    key = fingerprint(*parts)
    cache = get_cache_dir() / "cifar10-decoded"
    target = cache / f"folder-{split}-{key}"
    if not cache_ready(target):
        with file_lock(cache / f"folder-{split}-{key}.lock"):
            if not cache_ready(target):
                files = _list_image_folder(split_dir)
                decoded = [_decode_image(path, str(path)) for path, _ in files]
                images, labels = _stack(decoded, [label for _, label in files])
                save_cached(target, images, labels)
    return load_cached(target)


# ------------------------------------------------------------------------------------------------- the tar


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


def _read_tar_members(tar_path: Path) -> dict[str, list[tuple[int, str, np.ndarray]]]:
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
    return found


def _decode_tar(tar_path: Path) -> dict[str, Arrays]:
    """Decode every ``{train,test}/<class>/*`` image of an image-folder tar in one sequential pass."""
    result = {}
    for split, items in _read_tar_members(tar_path).items():
        labels = {label for label, _, _ in items}
        if labels != set(range(len(CIFAR10_CLASSES))):
            raise CorruptDataError(
                f"{tar_path} does not hold an image-folder tree {split}/<class>/*.jpg with all CIFAR-10 classes "
                f"({', '.join(CIFAR10_CLASSES)})"
            )
        items.sort(key=lambda item: (item[0], item[1]))
        result[split] = _stack([a for _, _, a in items], [label for label, _, _ in items])
    return result


def _cached_tar(tar_path: Path, split: str) -> Arrays:
    """Decode an image-folder tar once into ``get_cache_dir()/cifar10-decoded/tar-<split>-<key>.{images,labels}.npy``.

    Both splits are decoded in one pass over the tar (reading the tar is cheap, decoding the 60,000 JPEGs
    is the slow part); the key hashes the tar's resolved path, size and modification time, so a changed
    tar is decoded again. The images are decoded straight from the tar's members, which does the one-time
    "extraction" without writing 60,000 small files. Safe under concurrent processes (pytest-xdist
    workers): see :mod:`adaptive_dp.data.cache`.
    """
    stat = tar_path.stat()
    key = fingerprint(tar_path.resolve(), stat.st_size, stat.st_mtime_ns)
    cache = get_cache_dir() / "cifar10-decoded"
    targets = {s: cache / f"tar-{s}-{key}" for s in SPLITS}
    if not cache_ready(targets[split]):
        with file_lock(cache / f"tar-{key}.lock"):
            if not cache_ready(targets[split]):
                for s, (images, labels) in _decode_tar(tar_path).items():
                    save_cached(targets[s], images, labels)
    return load_cached(targets[split])


# ----------------------------------------------------------------------------------------------- registration


def _cifar_expected(root: Path) -> tuple[list[Path], str]:
    searched = [*_cifar_batch_dirs(root)[:1], *_image_folder_roots(root), *_tar_candidates(root)]
    what = (
        "the python batches cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}, or an image-folder "
        f"tree {{train,test}}/<class>/*.jpg|png with the classes {', '.join(CIFAR10_CLASSES)}, "
        "or cifar10-jpeg/cifar10-jpeg.tar holding such a tree"
    )
    return searched, what


# Means/stds (0.4914, 0.4822, 0.4465)/(0.2470, 0.2435, 0.2616): the standard training-set statistics.
@register_dataset(
    DatasetInfo("cifar10", 10, 3, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), CIFAR10_CLASSES),
    aliases=("cifar-10",),
    expected=_cifar_expected,
    torchvision_class="CIFAR10",
)
def _read_cifar10(split: str, root: Path) -> Arrays | None:
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
