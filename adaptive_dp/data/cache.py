"""A cache of decoded (images, labels) arrays as ``.npy`` pairs, safe under concurrent processes.

Each entry is a path prefix P holding ``P.images.npy`` (uint8 [N, C, H, W]) and ``P.labels.npy`` (int64 [N]).
Writers hold a ``filelock`` lock, write each file under a temporary name and move it into place with
``os.replace``; the images file is written last, so its presence means the entry is complete and readers
never see a partial file (pytest-xdist workers, several training runs on one machine).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

__all__ = ["cache_ready", "file_lock", "fingerprint", "load_cached", "save_cached"]


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Exclusive inter-process lock on ``path`` (created if missing) for the duration of the block
    (``filelock.FileLock``: flock on POSIX, msvcrt locking on Windows)."""
    from filelock import FileLock

    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path)):
        yield


def fingerprint(*parts: object) -> str:
    """First 16 hex digits of the SHA-256 of the parts' ``str`` joined by NUL: a cache key."""
    return hashlib.sha256("\x00".join(str(p) for p in parts).encode()).hexdigest()[:16]


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


def cache_ready(prefix: Path) -> bool:
    """Whether the entry ``prefix`` is complete (its images file, written last, exists)."""
    return _cache_files(prefix)[0].is_file()


def save_cached(prefix: Path, images: np.ndarray, labels: np.ndarray) -> None:
    """Write the entry ``prefix`` atomically, labels first (call under :func:`file_lock`)."""
    images_path, labels_path = _cache_files(prefix)
    _atomic_save_npy(labels_path, labels)
    _atomic_save_npy(images_path, images)


def load_cached(prefix: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read the entry ``prefix``: (images, labels)."""
    images_path, labels_path = _cache_files(prefix)
    return np.load(images_path), np.load(labels_path)
