"""The W&B side of a sweep: ``DIR/sweep.yaml`` (a W&B sweep configuration equivalent to the grid, for online
agents) and one W&B run per sweep holding the frontier as a ``wandb.Table``.

``sweep.yaml`` follows W&B's sweep configuration format (https://docs.wandb.ai/guides/sweeps/define-sweep-configuration):
``method: grid``, one ``parameters`` entry per ``train`` option the sweep was given, named by its command-line
option without the leading ``--`` (``target-mi: {values: [0.3, 1.0]}``; one value: ``{value: ...}``; a flag:
``{value: true}``), and ``command`` running ``python -m adaptive_dp.cli train`` with W&B's
``${args_no_boolean_flags}`` macro (``--target-mi=0.3 ... --log-private-metrics``). Use it with
``wandb sweep DIR/sweep.yaml`` then ``wandb agent ENTITY/PROJECT/SWEEP_ID``; each agent run writes its outputs
under ``runs/<UTC timestamp>`` of the agent's working folder (``train``'s default ``--out``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from adaptive_dp.sweep.frontier import SUMMARY_FIELDS
from adaptive_dp.sweep.grid import Grid

logger = logging.getLogger(__name__)

#: the W&B history key of a run's test accuracy (``adaptive_dp.training.tracking.WANDB_KEYS``).
ACCURACY_KEY = "test/accuracy"
#: the command W&B agents run (W&B's macros: ``${env}``, ``${interpreter}``, ``${args_no_boolean_flags}``).
AGENT_COMMAND = ["${env}", "${interpreter}", "-m", "adaptive_dp.cli", "train", "${args_no_boolean_flags}"]


def sweep_config(grid: Grid, *, project: str, name: str) -> dict[str, Any]:
    """The W&B sweep configuration of ``grid`` (a plain dict; see the module docstring).

    Args:
        grid: the sweep's grid (axes and flags).
        project: the W&B project of the agents' runs.
        name: the W&B sweep name.
    """
    parameters: dict[str, dict[str, Any]] = {}
    for dest, values in grid.axes.items():
        key = grid.options[dest].flag.removeprefix("--")
        parameters[key] = {"values": list(values)} if len(values) > 1 else {"value": values[0]}
    for dest in grid.flags:
        parameters[grid.options[dest].flag.removeprefix("--")] = {"value": True}
    return {
        "program": "adaptive-dp",
        "name": name,
        "project": project,
        "method": "grid",
        "metric": {"name": ACCURACY_KEY, "goal": "maximize"},
        "parameters": parameters,
        "command": list(AGENT_COMMAND),
    }


def write_sweep_yaml(
    path: str | os.PathLike, config: Mapping[str, Any], *, notes: Sequence[str] = ()
) -> Path:
    """Write a sweep configuration as YAML (PyYAML, installed with wandb) with a header saying how to use it
    and the ``notes`` (comment lines)."""
    import yaml

    path = Path(path)
    header = (
        "# W&B sweep configuration equivalent to this `adaptive-dp sweep` grid, for online agents:\n"
        f"#   wandb sweep {path.name}    then    wandb agent ENTITY/PROJECT/SWEEP_ID\n"
        "# (`program` is informational: `command` runs `python -m adaptive_dp.cli train --option=value ...`)\n"
    ) + "".join(f"# {note}\n" for note in notes)
    path.write_text(
        header + yaml.safe_dump(dict(config), sort_keys=False, allow_unicode=True), encoding="utf-8"
    )
    return path


def frontier_table_rows(
    rows: Sequence[Mapping[str, Any]], axes: Sequence[str]
) -> tuple[list[str], list[list]]:
    """Columns and data of the frontier table: name, the sweep's axes, the summary figures, on_front."""
    columns = ["name", *axes, *SUMMARY_FIELDS, "on_front"]
    data = [
        [
            row["name"],
            *(row["options"].get(a) for a in axes),
            *(row.get(k) for k in SUMMARY_FIELDS),
            row.get("on_front"),
        ]
        for row in rows
    ]
    return columns, data


def log_frontier_run(
    rows: Sequence[Mapping[str, Any]],
    *,
    out: str | os.PathLike,
    axes: Sequence[str],
    group: str,
    project: str,
    mode: str | None,
    image: str | os.PathLike | None = None,
) -> Path | None:
    """Log the frontier as one W&B run (``job_type="sweep-frontier"``, in ``group``) under ``out/wandb/``: a
    ``wandb.Table`` ``frontier`` (:func:`frontier_table_rows`) and the ``frontier.png`` image.

    Args:
        rows: frontier rows (:func:`adaptive_dp.sweep.frontier.read_rows`).
        out: the sweep folder.
        axes: the sweep's axes (destinations) for the table's columns.
        group: the W&B group of the sweep's runs.
        project: W&B project.
        mode: W&B mode ("offline", "online", "disabled"; None: ``$WANDB_MODE``, else online with an API key,
            else offline — as ``train``).
        image: the frontier figure to attach, if any.

    Returns:
        The W&B run folder, or None when W&B is disabled or failed (a failure is logged, never raised: the
        sweep's results are in ``frontier.json`` either way).
    """
    from adaptive_dp.training.tracking import resolve_wandb_mode

    mode = resolve_wandb_mode(mode)
    if mode == "disabled" or not rows:
        return None
    try:
        import wandb

        run = wandb.init(
            dir=str(out), project=project, group=group, name=f"{group}-frontier", job_type="sweep-frontier",
            mode=mode, config={"axes": list(axes), "runs": len(rows)}, settings=wandb.Settings(silent=True),
        )  # fmt: skip
        columns, data = frontier_table_rows(rows, axes)
        payload: dict[str, Any] = {"frontier": wandb.Table(columns=columns, data=data)}
        if image is not None and Path(image).is_file():
            payload["frontier_plot"] = wandb.Image(str(image))
        run.log(payload)
        folder = Path(run.dir).parent
        run.finish()
        return folder
    except Exception as exc:  # noqa: BLE001 - tracking never fails the sweep
        logger.warning("W&B frontier run failed (frontier.json is written): %s: %s", type(exc).__name__, exc)
        return None
