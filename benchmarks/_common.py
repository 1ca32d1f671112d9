"""Shared helpers of the benchmark scripts: arguments, the machine, result files, the last-line JSON.

Every script in ``benchmarks/`` runs as ``python benchmarks/<name>.py [--quick] [...]``, writes
``benchmarks/results/<name>.{json,md,png}`` and prints one JSON object (its headline numbers) as the last
line of stdout. Data sets are read from ``--data-dir``, else ``$ADAPTIVE_DP_DATA``, else ``../shared/data``
beside the repository (:func:`data_root`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = Path(__file__).resolve().parent / "results"
DATA_ENV = "ADAPTIVE_DP_DATA"

if str(REPO_ROOT) not in sys.path:  # the scripts run from a checkout, without installing the package
    sys.path.insert(0, str(REPO_ROOT))


def base_parser(description: str) -> argparse.ArgumentParser:
    """An argument parser with the options every benchmark takes.

    Options: ``--quick`` (≤ 3 min on 2 cores), ``--smoke`` (the tiniest configuration, seconds: it checks the
    plumbing, its numbers mean nothing; the benchmarks' contract test runs it), ``--data-dir`` (data root),
    ``--out-dir`` (results folder, default ``benchmarks/results``), ``--seed`` (default 0), ``--threads`` (torch
    intra-op threads, default 1).
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="small configuration: ≤ 3 minutes on 2 cores")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="tiniest configuration (seconds; checks the plumbing, the numbers mean nothing)",
    )
    parser.add_argument(
        "--data-dir", default=None, help=f"data root (default ${DATA_ENV}, else ../shared/data)"
    )
    parser.add_argument(
        "--out-dir",
        default=None,
        help="where the .json/.md/.png go (default benchmarks/results; --smoke: a new temporary "
        "folder, so a smoke run never touches the committed results)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of data subsets, models and noise")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the options of :func:`base_parser`; fills in ``out_dir`` (``benchmarks/results``, or a new temporary
    folder for ``--smoke``)."""
    args = parser.parse_args(argv)
    if args.out_dir is None:
        args.out_dir = tempfile.mkdtemp(prefix="adaptive-dp-smoke-") if args.smoke else str(RESULTS_DIR)
    return args


def data_root(data_dir: str | os.PathLike | None = None) -> Path:
    """The data root: ``data_dir``, else ``$ADAPTIVE_DP_DATA``, else ``../shared/data`` beside the repo.

    Raises:
        FileNotFoundError: if the folder does not exist; the message names ``--data-dir`` / ``$ADAPTIVE_DP_DATA``.
    """
    if data_dir is not None:
        root = Path(data_dir)
    elif os.environ.get(DATA_ENV):
        root = Path(os.environ[DATA_ENV])
    else:
        root = REPO_ROOT.parent / "shared" / "data"
    if not root.is_dir():
        raise FileNotFoundError(
            f"data root {root} does not exist; pass --data-dir DIR or set ${DATA_ENV} to the folder holding "
            "mnist/ and cifar10-jpeg/"
        )
    return root


def setup_torch(threads: int = 1) -> None:
    """One intra-op thread by default (the benchmark machine has 2 cores shared by several jobs)."""
    import torch

    if threads < 1:
        raise ValueError(f"--threads must be >= 1, got {threads}")
    torch.set_num_threads(threads)
    for message in ("Secure RNG turned off", "Optimal order is the", "Full backward hook is firing"):
        warnings.filterwarnings("ignore", message=message)


def machine_description() -> dict[str, Any]:
    """Where the numbers were measured: CPU model, cores, torch threads, GPU (none expected), versions."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        import opacus

        opacus_version = opacus.__version__
    except ImportError:  # pragma: no cover - opacus is a hard dependency
        opacus_version = None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "opacus": opacus_version,
        "platform": platform.platform(),
    }


def command_line() -> str:
    """The exact command that produced the results (``python benchmarks/<script> <args>``)."""
    script = Path(sys.argv[0])
    try:
        script = script.resolve().relative_to(REPO_ROOT)
    except ValueError:
        pass
    return " ".join(["python", str(script), *sys.argv[1:]])


def _clean(value: Any) -> Any:
    """JSON-safe copy: NaN/inf → None, numpy scalars → Python numbers, tuples → lists."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 1) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(path: str | os.PathLike, payload: dict[str, Any]) -> Path:
    """Write ``payload`` as indented JSON (NaN/inf written as null); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_clean(payload), indent=2, sort_keys=False) + "\n", encoding="utf-8")
    return path


def fmt(value: Any, digits: int = 3) -> str:
    """A table cell: floats with ``digits`` significant digits, None/NaN as "–"."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return "–"
        return f"{value:.{digits}g}"
    return str(value)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]], *, digits: int = 3) -> str:
    """A GitHub Markdown table; cells formatted by :func:`fmt`."""
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(fmt(c, digits) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def provenance_block(
    *, quick: bool, started: float, extra: dict[str, Any] | None = None, smoke: bool = False
) -> str:
    """The Markdown lines every result file starts with: mode, exact command, machine, wall time."""
    machine = machine_description()
    gpu = machine["gpu"] or "no GPU"
    mode = (
        "SMOKE (`--smoke`: the plumbing only, the numbers mean nothing)"
        if smoke
        else "QUICK (`--quick`: a small configuration, not the full benchmark)"
        if quick
        else "full"
    )
    lines = [
        f"- **Mode:** {mode}",
        f"- **Command:** `{command_line()}`",
        f"- **Machine:** {machine['cores']} cores ({machine['cpu']}), {gpu}, torch {machine['torch']} with "
        f"{machine['torch_threads']} thread(s), opacus {machine['opacus']}, Python {machine['python']}",
        f"- **Wall time:** {time.time() - started:.0f} s; written {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
    ]
    for key, value in (extra or {}).items():
        lines.append(f"- **{key}:** {value}")
    return "\n".join(lines)


def write_markdown(path: str | os.PathLike, text: str) -> Path:
    """Write a Markdown result file; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text.rstrip() + "\n", encoding="utf-8")
    return path


def new_figure(ncols: int = 1, nrows: int = 1, *, size: tuple[float, float] = (4.5, 3.6)):
    """A matplotlib figure on the non-interactive Agg backend: ``(fig, axes)`` (axes always 2-D)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(nrows, ncols, figsize=(size[0] * ncols, size[1] * nrows), squeeze=False)
    return fig, axes


def save_figure(fig, path: str | os.PathLike) -> Path:
    """Save and close a figure (PNG, 120 dpi); returns the path."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def print_summary(summary: dict[str, Any]) -> None:
    """Print ``summary`` as ONE JSON line (the last line of stdout); NaN/inf become null."""
    sys.stdout.flush()
    print(json.dumps(_clean(summary), separators=(",", ":")), flush=True)


def merge_previous(
    path: Path, by_dataset: dict[str, dict], *, quick: bool, smoke: bool = False
) -> dict[str, dict]:
    """Per-data-set results of an earlier invocation of the same mode (smoke, quick or full) at ``path``,
    updated with ``by_dataset``: full runs may be split by ``--dataset`` and still end in one set of result
    files. An unreadable or other-mode file is ignored."""
    if not path.exists():
        return by_dataset
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return by_dataset
    if old.get("quick") != quick or bool(old.get("smoke")) != smoke:
        return by_dataset
    merged = dict(old.get("by_dataset", {}))
    merged.update(by_dataset)
    return merged


def add_report_only(parser: argparse.ArgumentParser) -> None:
    """``--report-only``: run nothing, rebuild the result files from the committed JSON."""
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="run nothing: rebuild the .json headline, .md and .png from the committed .json with "
        "the current report code",
    )


def per_dataset_results(
    args: argparse.Namespace, json_path: Path, datasets: list[str], run: Callable[[str], dict]
) -> tuple[dict[str, dict], float]:
    """The per-data-set results a validation script reports, and the wall time to print.

    Runs ``run(name)`` for each data set (stamping each result with the command that produced it) and merges
    the earlier invocations' data sets from ``json_path`` (:func:`merge_previous`); with ``--report-only``
    runs nothing and returns what ``json_path`` holds, with the data sets' run times summed as wall time.

    Raises:
        SystemExit: ``--report-only`` without results of this mode in ``json_path``.
    """
    started = time.time()
    if getattr(args, "report_only", False):
        by_dataset = merge_previous(json_path, {}, quick=args.quick, smoke=args.smoke)
        if not by_dataset:
            raise SystemExit(
                f"--report-only: no {'quick' if args.quick else 'full'}-mode results in {json_path}"
            )
        return by_dataset, started - sum(float(d.get("seconds", 0.0)) for d in by_dataset.values())
    by_dataset = {}
    for name in datasets:
        by_dataset[name] = run(name)
        by_dataset[name]["command"] = command_line()
    return merge_previous(json_path, by_dataset, quick=args.quick, smoke=args.smoke), started


def dataset_command(script: str, name: str, result: dict) -> str:
    """The command that produced one data set's results (older result files lack it: the documented one)."""
    return result.get("command") or f"python benchmarks/{script} --dataset {name}"


REBUILT_NOTE = {
    "Report": "rebuilt from the committed JSON (`--report-only`); the wall time is the data sets' "
    "run times summed, the run commands are on each data set's line"
}
