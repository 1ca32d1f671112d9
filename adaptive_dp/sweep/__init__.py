"""``adaptive-dp sweep``: a grid of ``adaptive-dp train`` runs and its ε–MI–accuracy frontier.

One module per concept: ``options`` (the sweep's options, derived from ``train``'s parser), ``grid`` (the product
grid and run names), ``runner`` (train subprocesses, resuming), ``frontier`` (rows, Pareto front, best run per
budget), ``plots`` (``frontier.png``), ``wandb_outputs`` (``sweep.yaml`` and the W&B frontier table) and
``report`` (progress lines and the printed summary). Stdlib at import time; torch is only imported by the runs.
"""

from adaptive_dp.sweep.frontier import best_by_budget, pareto_front, read_rows
from adaptive_dp.sweep.grid import Grid, GridRun, run_name
from adaptive_dp.sweep.runner import run_grid, run_state

__all__ = [
    "Grid",
    "GridRun",
    "best_by_budget",
    "pareto_front",
    "read_rows",
    "run_grid",
    "run_name",
    "run_state",
]
