"""Epoch-time breakdown: where one CIFAR-10 epoch of DP-SGD goes, beside the non-private floor and plain opacus.

The same model (same initial weights), the same training split (CIFAR-10 JPEG minus the CLI's 2 % audit split)
and batch size 256 under these set-ups, each a hand-written training loop whose phases are timed:

* ``floor`` — non-private: plain SGD over pre-made batches (tensors stacked once, no data path at all);
* ``nonprivate`` — non-private: plain SGD over the CLI's shuffled ``DataLoader`` (what ``--non-private`` runs);
* ``opacus_<mode>`` — ``opacus.PrivacyEngine`` (Poisson sampling, its RDP accountant, σ = 1, C = 1) in each
  ``grad_sample_mode`` of ``--modes`` (default hooks, functorch, ghost: per-sample gradients from backward hooks /
  ``torch.func``, or ghost clipping's two backward passes);
* ``dp_pid_<mode>`` — ``AdaptivePrivacyEngine`` with the PID controller at 0.5 nats and the likelihood-ratio
  monitor on the audit split every 10 steps, in each mode of ``--adaptive-modes`` (default hooks, ghost), with
  the CLI's per-step logging (the history record, ``history.jsonl`` and W&B offline, as ``adaptive-dp train``).

Phases of a step (process CPU time with one torch thread — the step's own cost on a shared machine — and wall
time): ``data`` (next batch of the loader: the Poisson sampler and collation), ``forward_backward`` (forward,
loss, backward; per-sample gradients are computed inside it), then inside ``optimizer.step()``, cut by public
hooks (opacus' ``attach_step_hook`` around its accountant hook, the adaptive optimizer's
``attach_pre_noise_hook`` / ``attach_post_step_hook``): ``clip`` (clip + accumulate + the σ decision),
``noise``, ``clip_noise`` (both, plain opacus), ``accountant`` (opacus' hook: the RDP step), ``booking_update``
(the Rényi filter / odometer booking and the parameter update), ``update``, ``monitor`` (the leakage reading,
every 10th step) and ``logging``. Derived: per-sample gradients = a set-up's ``forward_backward`` minus the
floor's (same batch size on average).

Set-ups run in interleaved blocks (round robin, the order rotated each round) so that load drifts hit all alike;
per-step means are scaled to one epoch (1/q steps). Ratios: the fastest ``dp_pid`` mode (without the logging) over
the fastest plain-opacus mode (target ≤ 1.1), also paired per round and per mode; ``nonprivate`` over ``floor``
(target ≤ 1.5). The full mode also times ``adaptive-dp train`` for one epoch (DP + PID in the fastest DP + PID
mode where the CLI takes ``--grad-sample-mode``, and ``--non-private`` where the CLI has it) from its
``summary.json`` (wall time; the CLI process gets ``OMP_NUM_THREADS`` = ``--threads``).

    python benchmarks/epoch.py --quick     # small-cnn, 40 steps per set-up (≤ 3 min on 2 cores)
    python benchmarks/epoch.py             # small-cnn and tanh-cnn, one epoch per set-up, plus the CLI epochs
    python benchmarks/epoch.py --smoke     # digits, 4 steps: the plumbing only (the benchmarks' contract test)

Writes ``benchmarks/results/epoch.{json,md}`` and prints one JSON object as the last stdout line.
"""

from __future__ import annotations

import copy
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import _common
from _common import fmt, markdown_table

NAME = "epoch"
BATCH = 256
AUDIT_FRACTION = 0.02  # the CLI's default audit split
MONITOR_EVERY = 10
TARGET_MI = 0.5
PHASES = (
    "data",
    "forward_backward",
    "clip",
    "noise",
    "clip_noise",
    "accountant",
    "booking_update",
    "update",
    "monitor",
    "logging",
)
TARGETS = {"dp_pid_vs_opacus_fastest": 1.1, "nonprivate_vs_floor": 1.5}
WARMUP_STEPS = 2


class PhaseClock:
    """Process CPU and wall seconds per phase, summed over the timed steps (laps are ignored while inactive)."""

    def __init__(self) -> None:
        self.cpu: dict[str, float] = {}
        self.wall: dict[str, float] = {}
        self.active = False
        self._mark = (0.0, 0.0)

    def start(self) -> None:
        self._mark = (time.process_time(), time.perf_counter())

    def lap(self, phase: str) -> None:
        now = (time.process_time(), time.perf_counter())
        if self.active:
            self.cpu[phase] = self.cpu.get(phase, 0.0) + now[0] - self._mark[0]
            self.wall[phase] = self.wall.get(phase, 0.0) + now[1] - self._mark[1]
        self._mark = now


@dataclass
class Setup:
    """One timed training loop: model, optimizer, a batch source and the phase clock its hooks lap."""

    name: str
    model: Any
    optimizer: Any
    criterion: Any
    next_batch: Any
    after_step: str  # the phase the time between the last hook and the end of optimizer.step() belongs to
    clock: PhaseClock = field(default_factory=PhaseClock)
    engine: Any = None
    log: Any = None
    steps: int = 0
    block_cpu: list[float] = field(default_factory=list)  # CPU seconds per step of each timed block

    def run(self, n: int, *, timed: bool) -> None:
        """``n`` training steps; with ``timed`` their phases are added to the clock."""
        clock, start_cpu = self.clock, time.process_time()
        clock.active = timed
        for _ in range(n):
            clock.start()
            x, y = self.next_batch()
            clock.lap("data")
            self.optimizer.zero_grad(set_to_none=True)
            loss = self.criterion(self.model(x), y)
            loss.backward()
            clock.lap("forward_backward")
            self.optimizer.step()
            clock.lap(self.after_step)
            if self.log is not None:
                self.log(loss)
                clock.lap("logging")
        if timed:
            self.steps += n
            self.block_cpu.append((time.process_time() - start_cpu) / n)
        clock.active = False


# ------------------------------------------------------------------------------------------------ data


def load_split(dataset: str, *, data_dir: str | None, seed: int):
    """(training set, audit set, info): the CLI's split (``audit_split`` at 2 %, seeded)."""
    from adaptive_dp.data import audit_split, load_dataset

    root = None if dataset == "digits" else _common.data_root(data_dir)
    full = load_dataset(dataset, split="train", data_dir=root)
    train, audit = audit_split(full, fraction=AUDIT_FRACTION, seed=seed)
    return train, audit, full.info


def _loader(train, *, seed: int, shuffle: bool = True):
    """The CLI's training loader (``make_loaders``): shuffled, batch 256, seeded generator."""
    import torch
    from torch.utils.data import DataLoader

    return DataLoader(train, batch_size=BATCH, shuffle=shuffle, generator=torch.Generator().manual_seed(seed))


def _cycle(loader):
    """A function returning the loader's next batch, starting a new pass when one ends."""
    state = {"it": iter(loader)}

    def next_batch():
        try:
            return next(state["it"])
        except StopIteration:
            state["it"] = iter(loader)
            return next(state["it"])

    return next_batch


def _premade(train, *, seed: int, count: int):
    """``count`` full batches stacked once (the floor's data: no sampler, no collation in the loop)."""
    loader = _loader(train, seed=seed)
    batches = []
    while len(batches) < count:
        batches += [b for b in loader if len(b[1]) == BATCH][: count - len(batches)]
    state = {"i": 0}

    def next_batch():
        batch = batches[state["i"] % len(batches)]
        state["i"] += 1
        return batch

    return next_batch


# ------------------------------------------------------------------------------------------------ set-ups


def _time_accountant(optimizer, clock: PhaseClock, *, before: str) -> None:
    """Re-attach opacus' accountant step hook inside laps: ``before`` ends at it, ``accountant`` is its own."""
    hook = optimizer.step_hook

    def timed(opt) -> None:
        clock.lap(before)
        hook(opt)
        clock.lap("accountant")

    optimizer.attach_step_hook(timed)


def _plain(name: str, base, next_batch) -> Setup:
    import torch
    from torch import nn

    model = copy.deepcopy(base)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    return Setup(name, model, optimizer, nn.CrossEntropyLoss(), next_batch, after_step="update")


def _opacus(mode: str, base, train, *, seed: int) -> Setup:
    import torch
    from opacus import PrivacyEngine
    from torch import nn

    model = copy.deepcopy(base)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    out = PrivacyEngine(accountant="rdp").make_private(
        module=model,
        optimizer=optimizer,
        criterion=nn.CrossEntropyLoss(),
        data_loader=_loader(train, seed=seed),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        grad_sample_mode=mode,
    )
    criterion = (
        out[2] if mode == "ghost" else nn.CrossEntropyLoss()
    )  # ghost clipping returns its loss wrapper
    setup = Setup(f"opacus_{mode}", out[0], out[1], criterion, _cycle(out[-1]), after_step="update")
    _time_accountant(setup.optimizer, setup.clock, before="clip_noise")
    return setup


def _dp_pid(base, train, audit, *, seed: int, mode: str, tracker) -> Setup:
    """The adaptive engine (PID, monitor every 10 steps) in ``mode``, its phases cut by the optimizer's hooks."""
    import torch
    from torch import nn

    from adaptive_dp.privacy_engine import AdaptivePrivacyEngine

    model = copy.deepcopy(base)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    engine = AdaptivePrivacyEngine(accountant="rdp")
    with warnings.catch_warnings():  # "target_mi without a privacy budget": the odometer is all we time
        warnings.simplefilter("ignore", UserWarning)
        out = engine.make_private(
            module=model,
            optimizer=optimizer,
            criterion=nn.CrossEntropyLoss(),
            data_loader=_loader(train, seed=seed),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            grad_sample_mode=mode,
            target_mi=TARGET_MI,
            controller="pid",
            audit_data=audit,
            monitor_every=MONITOR_EVERY,
            seed=seed,
        )
    model, optimizer, loader = out[0], out[1], out[-1]
    criterion = out[2] if mode == "ghost" else nn.CrossEntropyLoss()
    setup = Setup(
        f"dp_pid_{mode}", model, optimizer, criterion, _cycle(loader), after_step="monitor", engine=engine
    )
    optimizer.attach_pre_noise_hook(lambda _: setup.clock.lap("clip"))
    _time_accountant(optimizer, setup.clock, before="noise")
    optimizer.attach_post_step_hook(lambda _: setup.clock.lap("booking_update"))
    setup.log = _cli_logger(engine, optimizer, tracker, sample_rate=1 / len(loader))
    return setup


def _cli_logger(engine, optimizer, tracker, *, sample_rate: float):
    """What ``adaptive-dp train`` does after each step: the batch loss, the history record, the tracker."""
    from adaptive_dp.training.records import adaptive_fields, make_step_record, step_epsilon

    state = {"step": 0}

    def log(loss) -> None:
        state["step"] += 1
        loss.item()  # the CLI reads the batch loss for its progress bar
        record = make_step_record(
            step=state["step"],
            epoch=1,
            noise_multiplier=optimizer.noise_multiplier,
            epsilon=step_epsilon(engine, 1e-5),
            sample_rate=sample_rate,
            lr=optimizer.param_groups[0]["lr"],
            **adaptive_fields(engine),
        )
        tracker.log_step(record)

    return log


def build_setups(model_name: str, data, *, args, tracker) -> dict[str, Setup]:
    """The set-ups of one model (see the module doc), from the same initial weights."""
    from adaptive_dp.models import build_model

    train, audit, info = data
    seed = args.seed
    base = build_model(
        model_name,
        in_channels=info.in_channels,
        num_classes=info.num_classes,
        image_size=info.image_size,
        seed=seed,
    )
    premade = _premade(train, seed=seed, count=min(args.steps + WARMUP_STEPS, len(train) // BATCH))
    return {
        "floor": _plain("floor", base, premade),
        "nonprivate": _plain("nonprivate", base, _cycle(_loader(train, seed=seed))),
        **{f"opacus_{m}": _opacus(m, base, train, seed=seed) for m in args.modes},
        **{
            f"dp_pid_{m}": _dp_pid(base, train, audit, seed=seed, mode=m, tracker=tracker)
            for m in args.adaptive_modes
        },
    }


# ------------------------------------------------------------------------------------------------ timing


def time_setups(setups: dict[str, Setup], *, steps: int, block: int, label: str) -> None:
    """Warm up, then ``steps`` timed steps per set-up in interleaved blocks (order rotated every round)."""
    for setup in setups.values():
        setup.run(WARMUP_STEPS, timed=False)
    names = list(setups)
    done = 0
    while done < steps:
        n = min(block, steps - done)
        shift = (done // block) % len(names)
        for name in names[shift:] + names[:shift]:
            setups[name].run(n, timed=True)
        done += n
        print(
            f"  {label}: {done}/{steps} steps: "
            + ", ".join(f"{k} {v.block_cpu[-1] * 1e3:.0f}" for k, v in setups.items())
            + " CPU ms/step",
            file=sys.stderr,
            flush=True,
        )


def summarize(setup: Setup, *, steps_per_epoch: int) -> dict[str, Any]:
    """Per-step milliseconds per phase (CPU and wall) and the epoch they scale to."""
    cpu = {p: 1e3 * setup.clock.cpu.get(p, 0.0) / setup.steps for p in PHASES if p in setup.clock.cpu}
    wall = {p: 1e3 * setup.clock.wall.get(p, 0.0) / setup.steps for p in PHASES if p in setup.clock.wall}
    out = {
        "steps": setup.steps,
        "cpu_ms": cpu,
        "wall_ms": wall,
        "cpu_ms_per_step": sum(cpu.values()),
        "wall_ms_per_step": sum(wall.values()),
        "epoch_cpu_s": sum(cpu.values()) * steps_per_epoch / 1e3,
        "epoch_wall_s": sum(wall.values()) * steps_per_epoch / 1e3,
        "block_cpu_ms": [1e3 * b for b in setup.block_cpu],
    }
    if setup.engine is not None:
        timed = setup.engine.history[-setup.steps :]
        readings = sum(1 for r in timed if r.get("mi") is not None)
        out["readings"] = readings
        out["monitor_ms_per_reading"] = cpu.get("monitor", 0.0) * setup.steps / readings if readings else None
        out["engine_cpu_ms_per_step"] = out["cpu_ms_per_step"] - cpu.get("logging", 0.0)
        out["sigma_range"] = [
            min(r["noise_multiplier"] for r in timed),
            max(r["noise_multiplier"] for r in timed),
        ]
    return out


def ratios(rows: dict[str, dict]) -> dict[str, Any]:
    """Headline ratios of one model (CPU time per step): DP + PID (its fastest mode, without the logging) over
    plain opacus' fastest mode, the same per mode, and the non-private loop over the floor."""
    opacus = {k: v for k, v in rows.items() if k.startswith("opacus_")}
    adaptive = {k: v for k, v in rows.items() if k.startswith("dp_pid_")}
    fastest = min(opacus, key=lambda k: opacus[k]["cpu_ms_per_step"])
    dp_fastest = min(adaptive, key=lambda k: adaptive[k]["engine_cpu_ms_per_step"])
    dp, fast, floor = rows[dp_fastest], opacus[fastest], rows["floor"]
    logging_ms = dp["cpu_ms"].get("logging", 0.0)
    paired = [(d - logging_ms) / f for d, f in zip(dp["block_cpu_ms"], fast["block_cpu_ms"])]
    return {
        "opacus_fastest": fastest,
        "dp_pid_fastest": dp_fastest,
        "dp_pid_vs_opacus_fastest": dp["engine_cpu_ms_per_step"] / fast["cpu_ms_per_step"],
        "dp_pid_vs_opacus_fastest_paired": statistics.median(paired),
        "dp_pid_logged_vs_opacus_fastest": dp["cpu_ms_per_step"] / fast["cpu_ms_per_step"],
        "dp_pid_vs_opacus_same_mode": {
            k: v["engine_cpu_ms_per_step"] / rows[f"opacus_{k[len('dp_pid_') :]}"]["cpu_ms_per_step"]
            for k, v in adaptive.items()
            if f"opacus_{k[len('dp_pid_') :]}" in rows
        },
        "nonprivate_vs_floor": rows["nonprivate"]["cpu_ms_per_step"] / floor["cpu_ms_per_step"],
        "opacus_fastest_vs_floor": fast["cpu_ms_per_step"] / floor["cpu_ms_per_step"],
        "dp_pid_vs_floor": dp["cpu_ms_per_step"] / floor["cpu_ms_per_step"],
        "per_sample_gradients_ms": {
            k: v["cpu_ms"]["forward_backward"] - floor["cpu_ms"]["forward_backward"]
            for k, v in rows.items()
            if k not in ("floor", "nonprivate")
        },
    }


def bench_model(model_name: str, data, *, args, log_dir: Path) -> dict[str, Any]:
    """Time the six set-ups of one model; per-set-up breakdowns and the ratios."""
    from adaptive_dp.training.tracking import Tracker

    mode = "disabled" if args.smoke else args.wandb_mode
    with Tracker(log_dir / model_name, config={"benchmark": NAME, "model": model_name}, mode=mode) as tracker:
        setups = build_setups(model_name, data, args=args, tracker=tracker)
        steps_per_epoch = round(1 / setups[f"dp_pid_{args.adaptive_modes[0]}"].engine.sample_rate)
        time_setups(setups, steps=args.steps, block=args.block, label=model_name)
    rows = {k: summarize(s, steps_per_epoch=steps_per_epoch) for k, s in setups.items()}
    return {"steps_per_epoch": steps_per_epoch, "steps_timed": args.steps, "setups": rows, **ratios(rows)}


# ------------------------------------------------------------------------------------------------ the CLI


def _cli_options() -> str:
    """``adaptive-dp train --help``: which options this checkout's CLI has (``--non-private`` may be missing)."""
    result = subprocess.run(
        [sys.executable, "-m", "adaptive_dp.cli", "train", "--help"],
        capture_output=True,
        text=True,
        cwd=_common.REPO_ROOT,
        check=False,
    )
    return result.stdout


def time_cli(*, data_dir: str | None, threads: int, seed: int, mode: str, work: Path) -> dict[str, Any]:
    """One epoch of ``adaptive-dp train`` (small CNN, CIFAR-10, batch 256) per set-up: the epoch's wall seconds
    from ``summary.json`` and the whole process' CPU seconds (start-up, data, test evaluation included). DP + PID
    runs in ``mode`` where the CLI takes ``--grad-sample-mode`` (else in its only mode, hooks)."""
    import resource

    runs = {
        "dp_pid": [
            "--target-mi",
            str(TARGET_MI),
            "--controller",
            "pid",
            "--monitor-every",
            str(MONITOR_EVERY),
        ]
    }
    options = _cli_options()
    out: dict[str, Any] = {"dp_pid_mode": mode if "--grad-sample-mode" in options else "hooks"}
    if "--grad-sample-mode" in options:
        runs["dp_pid"] += ["--grad-sample-mode", mode]
    if "--non-private" in options:
        runs["nonprivate"] = ["--non-private"]
    else:
        out["nonprivate"] = {
            "available": False,
            "note": "this checkout's `adaptive-dp train` has no --non-private",
        }
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "ADAPTIVE_DP_DATA": str(_common.data_root(data_dir)),
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
    }
    for name, extra in runs.items():
        command = [
            "adaptive-dp",
            "train",
            "--dataset",
            "cifar10",
            "--model",
            "small-cnn",
            "--epochs",
            "1",
            "--batch-size",
            str(BATCH),
            "--seed",
            str(seed),
            "--no-progress",
            "--wandb-mode",
            "offline",
            "--out",
            str(work / name),
            *extra,
        ]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        subprocess.run(
            [sys.executable, "-m", "adaptive_dp.cli", *command[1:]],
            env=env,
            cwd=_common.REPO_ROOT,
            check=True,
            stdout=subprocess.DEVNULL,
        )
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        summary = json.loads((work / name / "summary.json").read_text(encoding="utf-8"))
        out[name] = {
            "available": True,
            "command": " ".join(command[: -2 - len(extra)] + extra),
            "epoch_wall_s": summary["epoch_times_s"][0],
            "steps": summary["steps"],
            "process_cpu_s": after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime,
        }
    return out


def cli_ratios(cli: dict[str, Any], rows: dict[str, dict]) -> dict[str, Any]:
    """CLI epoch (wall) over the hand-written loop's epoch (wall per step × the CLI's steps)."""

    def loop_epoch(name: str, steps: int) -> float:
        return rows[name]["wall_ms_per_step"] * steps / 1e3

    loop = f"dp_pid_{cli['dp_pid_mode']}"
    out = {"cli_dp_pid_vs_loop_wall": None, "cli_nonprivate_vs_floor_wall": None}
    if loop in rows:
        out["cli_dp_pid_vs_loop_wall"] = cli["dp_pid"]["epoch_wall_s"] / loop_epoch(
            loop, cli["dp_pid"]["steps"]
        )
    if cli["nonprivate"]["available"]:
        run = cli["nonprivate"]
        out["cli_nonprivate_vs_floor_wall"] = run["epoch_wall_s"] / loop_epoch("floor", run["steps"])
    return out


# ------------------------------------------------------------------------------------------------ report


#: the report's columns: (title, phases summed)
COLUMNS = (
    ("data", ("data",)),
    ("forward + backward", ("forward_backward",)),
    ("clip + noise", ("clip", "noise", "clip_noise")),
    ("accountant", ("accountant",)),
    ("update (DP + PID: + booking)", ("update", "booking_update")),
    ("monitor", ("monitor",)),
    ("logging", ("logging",)),
)


def _breakdown_table(model: dict[str, Any]) -> str:
    fastest_name = model["opacus_fastest"]
    header = [
        "set-up",
        *(title for title, _ in COLUMNS),
        "of which per-sample grads",
        "total",
        "wall total",
        f"epoch CPU s ({model['steps_per_epoch']} steps)",
        "× floor",
        f"× {fastest_name}",
    ]
    rows = model["setups"]
    floor, fastest = rows["floor"]["cpu_ms_per_step"], rows[fastest_name]["cpu_ms_per_step"]
    table = []
    for name, r in rows.items():
        cells = [
            sum(r["cpu_ms"][p] for p in phases if p in r["cpu_ms"])
            if any(p in r["cpu_ms"] for p in phases)
            else None
            for _, phases in COLUMNS
        ]
        table.append(
            [
                f"`{name}`",
                *cells,
                model["per_sample_gradients_ms"].get(name),
                r["cpu_ms_per_step"],
                r["wall_ms_per_step"],
                r["epoch_cpu_s"],
                r["cpu_ms_per_step"] / floor,
                r["cpu_ms_per_step"] / fastest,
            ]
        )
    return markdown_table(header, table)


def markdown(payload: dict[str, Any], *, started: float) -> str:
    extra = {
        "Data": payload["data"],
        "Set-ups": "see the script's docstring; CPU ms per step per phase (process "
        "CPU time, one torch thread; wall total beside it), interleaved blocks of "
        f"{payload['block']} steps, {payload['steps']} timed steps per set-up after {WARMUP_STEPS} warm-up steps",
    }
    mode = " (SMOKE MODE)" if payload["smoke"] else " (QUICK MODE)" if payload["quick"] else ""
    lines = [
        f"# Epoch-time breakdown{mode}",
        "",
        _common.provenance_block(
            quick=payload["quick"], smoke=payload["smoke"], started=started, extra=extra
        ),
        "",
        "Milliseconds per step (CPU) per phase:",
        "",
    ]
    for name, model in payload["models"].items():
        dp = model["setups"][model["dp_pid_fastest"]]
        same = ", ".join(f"{k} {v:.3f}" for k, v in model["dp_pid_vs_opacus_same_mode"].items())
        lines += [
            f"## {name}",
            "",
            _breakdown_table(model),
            "",
            f"- {model['dp_pid_fastest']} (without logging) / {model['opacus_fastest']}: "
            f"**{model['dp_pid_vs_opacus_fastest']:.3f}** (paired per round "
            f"{model['dp_pid_vs_opacus_fastest_paired']:.3f}; with logging "
            f"{model['dp_pid_logged_vs_opacus_fastest']:.3f}; target ≤ {TARGETS['dp_pid_vs_opacus_fastest']}); "
            f"DP + PID / opacus in the same mode: {same}.",
            f"- Non-private loop with the DataLoader / floor: **{model['nonprivate_vs_floor']:.3f}** (target ≤ "
            f"{TARGETS['nonprivate_vs_floor']}); fastest opacus / floor {model['opacus_fastest_vs_floor']:.2f}; "
            f"DP + PID / floor {model['dp_pid_vs_floor']:.2f}.",
            f"- Monitor: {dp['readings']} readings, {fmt(dp['monitor_ms_per_reading'])} CPU ms each; σ "
            f"{dp['sigma_range'][0]:.3g}–{dp['sigma_range'][1]:.3g} over the timed steps.",
            "",
        ]
    cli = payload.get("cli")
    if cli:
        lines += ["## `adaptive-dp train`, one epoch (wall time from summary.json)", ""]
        for name, run in cli.items():
            if not isinstance(run, dict):
                continue
            lines.append(
                f"- {name}: "
                + (
                    f"`{run['command']}`: {run['epoch_wall_s']:.1f} s for {run['steps']} "
                    f"steps (whole process {run['process_cpu_s']:.1f} CPU s)"
                    if run["available"]
                    else run["note"]
                )
            )
        lines += [
            f"- CLI DP + PID epoch / hand-written loop (wall): {fmt(cli['cli_dp_pid_vs_loop_wall'])}; CLI "
            f"non-private epoch / floor (wall): {fmt(cli['cli_nonprivate_vs_floor_wall'])}.",
            "",
        ]
    return "\n".join(lines)


def headline(payload: dict[str, Any]) -> dict[str, Any]:
    """The JSON line: worst ratios over the models, and per model the epoch seconds of every set-up."""
    models = payload["models"]
    cli = payload.get("cli") or {}
    return {
        "benchmark": NAME,
        "quick": payload["quick"],
        "smoke": payload["smoke"],
        **{
            key: max(m[key] for m in models.values())
            for key in ("dp_pid_vs_opacus_fastest", "dp_pid_vs_opacus_fastest_paired", "nonprivate_vs_floor")
        },
        "opacus_fastest": {k: m["opacus_fastest"] for k, m in models.items()},
        "dp_pid_fastest": {k: m["dp_pid_fastest"] for k, m in models.items()},
        "dp_pid_vs_opacus_same_mode": {k: m["dp_pid_vs_opacus_same_mode"] for k, m in models.items()},
        "epoch_cpu_s": {
            k: {s: round(r["epoch_cpu_s"], 2) for s, r in m["setups"].items()} for k, m in models.items()
        },
        "cli_dp_pid_vs_loop_wall": cli.get("cli_dp_pid_vs_loop_wall"),
        "cli_nonprivate_vs_floor_wall": cli.get("cli_nonprivate_vs_floor_wall"),
        "seconds": payload["seconds"],
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = _common.base_parser(__doc__.splitlines()[0])
    parser.add_argument(
        "--models",
        nargs="+",
        default=None,
        help="models (default: small-cnn tanh-cnn; --quick and --smoke: small-cnn)",
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="timed steps per set-up (default: one epoch; --quick 40, --smoke 4)",
    )
    parser.add_argument("--block", type=int, default=None, help="steps per interleaved block (default 10)")
    parser.add_argument(
        "--modes",
        nargs="+",
        default=["hooks", "functorch", "ghost"],
        choices=["hooks", "functorch", "ew", "ghost"],
        help="plain opacus' grad_sample_modes",
    )
    parser.add_argument(
        "--adaptive-modes",
        nargs="+",
        default=["hooks", "ghost"],
        choices=["hooks", "functorch", "ew", "ghost"],
        help="the DP + PID set-ups' grad_sample_modes",
    )
    parser.add_argument(
        "--wandb-mode",
        default="offline",
        choices=["offline", "disabled"],
        help="W&B mode of the DP + PID set-up's logging (the CLI's default: offline)",
    )
    parser.add_argument("--no-cli", action="store_true", help="full mode: skip timing `adaptive-dp train`")
    args = _common.parse_args(parser, argv)
    _common.setup_torch(args.threads)
    os.environ.setdefault("WANDB_SILENT", "true")
    started = time.time()
    dataset = "digits" if args.smoke else "cifar10"
    data = load_split(dataset, data_dir=args.data_dir, seed=args.seed)
    args.block = args.block or (2 if args.smoke else MONITOR_EVERY)
    args.steps = args.steps or (4 if args.smoke else 40 if args.quick else math.ceil(len(data[0]) / BATCH))
    names = args.models or (["small-cnn"] if args.quick or args.smoke else ["small-cnn", "tanh-cnn"])
    with tempfile.TemporaryDirectory() as tmp:
        models = {m: bench_model(m, data, args=args, log_dir=Path(tmp)) for m in names}
        cli = None
        if not (args.quick or args.smoke or args.no_cli):
            small = models["small-cnn"]
            cli = time_cli(
                data_dir=args.data_dir,
                threads=args.threads,
                seed=args.seed,
                work=Path(tmp) / "cli",
                mode=small["dp_pid_fastest"][len("dp_pid_") :],
            )
            cli.update(cli_ratios(cli, models["small-cnn"]["setups"]))
    payload = {
        "benchmark": NAME,
        "quick": args.quick,
        "smoke": args.smoke,
        "command": _common.command_line(),
        "machine": _common.machine_description(),
        "data": f"{dataset} training split minus the 2 % audit "
        f"split ({len(data[0])} examples), batch {BATCH}",
        "steps": args.steps,
        "block": args.block,
        "targets": TARGETS,
        "models": models,
        "cli": cli,
        "seconds": round(time.time() - started, 1),
    }
    out_dir = Path(args.out_dir)
    _common.write_json(out_dir / f"{NAME}.json", payload)
    _common.write_markdown(out_dir / f"{NAME}.md", markdown(payload, started=started))
    summary = headline(payload)
    _common.print_summary(summary)
    return summary


if __name__ == "__main__":
    main()
