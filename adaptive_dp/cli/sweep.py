"""Run a grid of ``adaptive-dp train`` runs and chart their ε–MI–accuracy frontier.

Every ``train`` option that takes one value may take several (``--target-mi 0.3 1.0 --target-epsilon 2 8
--controller pid threshold --seed 0 1``); the sweep runs the product grid, each point a normal ``train`` run in
its own process (one at a time; ``--jobs N`` runs N at once) under ``--out DIR``:

- ``runs/<name>/`` each run's own outputs (``summary.json``, ``history.jsonl``, ``checkpoint.pt``, its offline
  W&B run; all runs in one W&B group); ``<name>`` joins the varying options, e.g. ``target-mi-0.3_target-epsilon-2``;
- ``logs/<name>.log`` each run's terminal output; ``plan.json`` the grid (run name → train arguments);
- ``frontier.json`` one row per finished run (accuracy, ε guarantee and odometer, MI, wall time; updated after
  every run), ``frontier.png`` (accuracy against ε with the Pareto front, and against the highest MI reading),
  ``wandb/`` one W&B run holding the frontier table, and ``sweep.yaml``, the same grid as a W&B sweep
  configuration for online agents (``wandb sweep DIR/sweep.yaml``).

Run the same command again to resume: finished runs are skipped, runs interrupted after an epoch continue
with ``train --resume``, runs interrupted before their first checkpoint start again; a finished run's results
are never rewritten. Ctrl-C (or SIGTERM) is passed on once to the runs in flight, which finish their step, write
their files and resume next time. ``--non-private`` adds ``train --non-private`` runs (ε = ∞) as the reference.
Exits 0 when every run has its results, 1 when some failed (their logs say why; the others' results are
written), 2 with one error line for bad input (every grid point is checked before any run starts), 130 / 143
after Ctrl-C / SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from adaptive_dp.sweep.grid import Grid, GridRun, validate_runs
from adaptive_dp.sweep.options import add_train_options, given_values, train_options


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``adaptive-dp sweep`` (its own, then those of ``train``, several values each)."""
    sweep = parser.add_argument_group("sweep (every train option below that takes a value may take several)")
    sweep.add_argument("--out", required=True, metavar="DIR", help="sweep folder (runs/, frontier.json, ...)")
    sweep.add_argument("--jobs", type=int, default=1, help="train processes at once (default: %(default)s)")
    sweep.add_argument(
        "--ceiling-tolerance",
        type=float,
        default=0.1,
        metavar="FRACTION",
        help="a run holds its MI ceiling when at most this share of its MI readings is over it (the "
        "first reading comes before any control); used by the printed summary (default: %(default)s)",
    )
    sweep.add_argument(
        "--wandb-group",
        default=None,
        help="W&B group of the sweep's runs (default: sweep-<DIR name>-<start time>, kept on resume)",
    )
    sweep.add_argument(
        "--non-private",
        action="store_true",
        help="also run `train --non-private` (ε = ∞; the grid's non-DP options only) as the reference row "
        "of the frontier",
    )
    add_train_options(parser)


def _check_plan(out: Path, runs: list[GridRun], group: str | None) -> dict[str, Any]:
    """Merge this grid into ``out/plan.json``; a run name already planned with other arguments is an error.

    Raises:
        ValueError: naming the run, both argument lists and the fix.
    """
    path = out / "plan.json"
    plan = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {"runs": {}}
    for run in runs:
        before = plan["runs"].get(run.name)
        if before is not None and before != list(run.argv):
            raise ValueError(
                f"{out} already holds run {run.name} made with `{' '.join(before)}`; this sweep would run it "
                f"with `{' '.join(run.argv)}`: use another --out, or delete {out / 'runs' / run.name}"
            )
        plan["runs"][run.name] = list(run.argv)
    plan["group"] = (
        group or plan.get("group") or f"sweep-{out.resolve().name}-{time.strftime('%Y%m%d-%H%M%S')}"
    )
    return plan


def _prepare(args: argparse.Namespace) -> tuple[Grid, list[GridRun], dict[str, Any], dict[str, Any]]:
    """Grid, runs, shared tracking options and plan of parsed ``args``; writes plan.json and sweep.yaml."""
    from adaptive_dp.sweep.wandb_outputs import sweep_config, write_sweep_yaml

    if not 0 <= args.ceiling_tolerance <= 1:
        raise ValueError(f"--ceiling-tolerance must be a fraction in [0, 1], got {args.ceiling_tolerance!r}")
    if args.jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {args.jobs}")
    options = train_options()
    axes, flags, shared = given_values(args, options)
    if getattr(args, "debug", False):  # the dispatcher's --debug: tracebacks in the runs' logs too
        shared["debug"] = True
    grid = Grid(axes=axes, flags=flags, options=options, non_private=args.non_private)
    runs = grid.runs()
    validate_runs(runs)
    out = Path(args.out)
    plan = _check_plan(out, runs, args.wandb_group)
    out.mkdir(parents=True, exist_ok=True)
    (out / "plan.json").write_text(json.dumps(plan, indent=2) + "\n", encoding="utf-8")
    project = shared.get("wandb_project", options["wandb_project"].default)
    notes = ["the non-private reference run is not part of this grid: `adaptive-dp train --non-private ...`"]
    config = sweep_config(grid, project=project, name=plan["group"])
    write_sweep_yaml(out / "sweep.yaml", config, notes=notes if grid.non_private else ())
    return grid, runs, shared, plan


def _execute(args: argparse.Namespace, runs: list[GridRun], shared: dict, plan: dict, extra: dict) -> list:
    """Run the grid with a progress line per run; frontier.json is rewritten after each."""
    from adaptive_dp.sweep.frontier import read_rows, write_frontier
    from adaptive_dp.sweep.report import Progress
    from adaptive_dp.sweep.runner import FINISHED, run_dir, run_grid, run_state

    out = Path(args.out)
    to_run = sum(run_state(run_dir(out, r.name)) != FINISHED for r in runs)
    print(
        f"sweep: {len(runs)} runs ({to_run} to run, {args.jobs} at a time) in {out}/ — W&B group {plan['group']}"
    )
    progress = Progress(total=len(runs), to_run=to_run, jobs=args.jobs)

    def on_done(outcome) -> None:
        rows = read_rows(out, runs)
        write_frontier(out / "frontier.json", rows, **extra)
        row = next((r for r in rows if r["name"] == outcome.run.name), None)
        print(progress.line(outcome, row), flush=True)

    return run_grid(runs, out=out, jobs=args.jobs, group=plan["group"], shared=shared, on_done=on_done)


def run(args: argparse.Namespace) -> int:
    """Run the sweep; print progress, the frontier and the best run per budget.

    Returns:
        0 when every run has its results; 1 when some failed; 2 for bad input (one error line); 130 / 143 when
        stopped by Ctrl-C / SIGTERM (the runs in flight write their files and resume on the next invocation).
    """
    from adaptive_dp.cli import report_failure
    from adaptive_dp.sweep.runner import SweepInterrupted

    try:
        grid, runs, shared, plan = _prepare(args)
    except ValueError as exc:
        return report_failure("sweep", exc, debug=getattr(args, "debug", False))
    extra = {"group": plan["group"], "axes": grid.axes, "ceiling_tolerance": args.ceiling_tolerance}
    try:
        outcomes = _execute(args, runs, shared, plan, extra)
    except SweepInterrupted as exc:
        print(
            f"\nsweep {exc}: the runs in flight wrote their files, finished runs are kept "
            f"({args.out}/frontier.json); run the same command again to resume",
            file=sys.stderr,
        )
        return exc.exit_code
    failed = [
        {"name": o.run.name, "returncode": o.returncode, "log": str(o.log)} for o in outcomes if not o.ok
    ]
    _finish(args, grid, runs, shared, {**extra, "failed": failed})
    return 1 if failed else 0


def _finish(args: argparse.Namespace, grid: Grid, runs: list[GridRun], shared: dict, extra: dict) -> None:
    """Write frontier.json, frontier.png and the W&B frontier run; print the frontier and the summary."""
    from adaptive_dp.sweep.frontier import read_rows, write_frontier
    from adaptive_dp.sweep.plots import plot_frontier
    from adaptive_dp.sweep.report import budget_summary, frontier_table
    from adaptive_dp.sweep.wandb_outputs import log_frontier_run

    out = Path(args.out)
    rows = read_rows(out, runs)
    extra["pareto_front"] = [r["name"] for r in rows if r["on_front"]]
    write_frontier(out / "frontier.json", rows, **extra)
    for failure in extra["failed"]:
        print(f"FAILED: {failure['name']} (exit {failure['returncode']}; log {failure['log']})")
    if not any(not r["non_private"] and r["test_accuracy"] is not None for r in rows):
        print("no private run finished with a test accuracy: no frontier to draw")
        return
    image = plot_frontier(rows, out / "frontier.png", title=f"{extra['group']}: ε–MI–accuracy frontier")
    project = shared.get("wandb_project", grid.options["wandb_project"].default)
    wandb_dir = log_frontier_run(
        rows, out=out, axes=grid.varying, group=extra["group"], project=project,
        mode=shared.get("wandb_mode"), image=image,
    )  # fmt: skip
    print(f"\nfrontier ({len(rows)} runs, * = on the ε–accuracy Pareto front):")
    print(frontier_table(rows))
    print()
    print(budget_summary(rows, tolerance=args.ceiling_tolerance))
    print(f"\nresults in {out}/: frontier.json, frontier.png, sweep.yaml, runs/")
    if wandb_dir is not None:
        print(f"  W&B frontier table run: {wandb_dir}")
