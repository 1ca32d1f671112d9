"""Shared pytest fixtures.

Real data sets are found through the ``ADAPTIVE_DP_DATA`` setting (CI points it at ``../shared/data``);
when it is unset, ``../shared/data`` beside the repository is used if present. Tests that need a data set
that is not there are skipped with the reason, never silently passed.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def _configure_threads() -> None:
    # The suite runs tiny models: one intra-op thread per process is several times faster than two and keeps
    # results independent of the machine's core count; `pytest -n 2` then uses both cores with two processes.
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a hard dependency
        return
    torch.set_num_threads(1)


_configure_threads()
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


def data_root_or_none() -> Path | None:
    """The real-data root: ``$ADAPTIVE_DP_DATA``, else ``../shared/data`` beside the repo, else None."""
    env = os.environ.get("ADAPTIVE_DP_DATA")
    if env:
        return Path(env)
    candidate = REPO_ROOT.parent / "shared" / "data"
    return candidate if candidate.is_dir() else None


@pytest.fixture(scope="session")
def data_root() -> Path:
    """Root of the real data sets; skips the test when none is configured."""
    root = data_root_or_none()
    if root is None or not root.is_dir():
        pytest.skip(
            "real data not available: set ADAPTIVE_DP_DATA to the folder holding mnist/, cifar10-jpeg/ ..."
        )
    return root


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Keep extracted/decoded data caches in one per-session folder, not in the user's home."""
    cache = os.environ.get("ADAPTIVE_DP_CACHE") or str(
        tmp_path_factory.getbasetemp().parent / "adaptive_dp_cache"
    )
    monkeypatch.setenv("ADAPTIVE_DP_CACHE", cache)
