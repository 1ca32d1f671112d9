"""Where data files are looked for and cached, and the two errors a missing or broken file raises.

The data root (:func:`get_data_root`) is the ``data_dir`` argument (``--data-dir``), else
``$ADAPTIVE_DP_DATA``, else ``get_cache_dir()/data``; decoded copies go under :func:`get_cache_dir`
(``$ADAPTIVE_DP_CACHE``, else ``~/.cache/adaptive_dp``).
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = [
    "CACHE_ENV",
    "DATA_ENV",
    "CorruptDataError",
    "DataNotFoundError",
    "get_cache_dir",
    "get_data_root",
]

DATA_ENV = "ADAPTIVE_DP_DATA"
CACHE_ENV = "ADAPTIVE_DP_CACHE"


class DataNotFoundError(FileNotFoundError):
    """A data set's files are not where they were looked for; the message says where and how to get them."""


class CorruptDataError(ValueError):
    """A data file exists but cannot be parsed (truncated download, wrong file); re-download it."""


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
