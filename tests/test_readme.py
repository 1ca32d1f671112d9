"""The README is executable documentation: its Python snippets run, and CI runs its test command."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def _command_after(marker: str) -> str:
    lines = README.splitlines()
    i = lines.index(f"<!-- {marker} -->")
    assert lines[i + 1].startswith("```"), f"a fenced block must follow <!-- {marker} -->"
    return lines[i + 2].strip()


def test_ci_runs_the_readme_test_command():
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    command = _command_after("test-command")
    assert "pytest" in command and "constraints.txt" in command
    # .ci/run extracts the command from README.md by the same marker; make sure that extraction is what runs.
    assert "<!-- test-command -->" in ci and 'bash -euo pipefail -c "$TEST_COMMAND"' in ci


def test_quick_command_trains_on_the_embedded_default():
    command = _command_after("quick-command")
    assert "constraints.txt" in command and "adaptive-dp train" in command and "--dataset digits" in command


@pytest.mark.parametrize("index", range(len(_python_blocks(README))))
def test_readme_python_snippet_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = _python_blocks(README)[index]
    exec(compile(code, f"README.md[python block {index}]", "exec"), {"__name__": "__readme__"})
