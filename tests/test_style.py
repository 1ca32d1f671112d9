"""CI enforces the code style: ``ruff check`` and ``ruff format --check`` over the repository (pyproject settings)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _ruff() -> list[str]:
    exe = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    if exe is None:
        pytest.skip("ruff is not installed (pip install -e '.[dev]')")
    return [exe]


@pytest.mark.parametrize("args", [["check", "."], ["format", "--check", "."]], ids=["check", "format"])
def test_ruff(args):
    result = subprocess.run([*_ruff(), *args], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, f"ruff {' '.join(args)} found problems:\n{result.stdout}\n{result.stderr}"
