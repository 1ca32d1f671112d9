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
* ``audit<N>_<mode>`` — the same in the first adaptive mode with the monitor capped at N audit examples
  (``--small-audit``, default 64, as ``overhead.py``; the monitor's own cap, which the CLI uses, is 256).

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
per-step means over the timed steps are scaled to one epoch (1/q steps; with ``--steps`` below an epoch this is
an extrapolation). Ratios: the fastest ``dp_pid`` mode (without the logging) over the fastest plain-opacus mode
(target ≤ 1.1), also paired per round, per mode, without the monitor's readings and projected for a reading every
20th step; ``nonprivate`` over ``floor`` (target ≤ 1.5). The full mode then times ``adaptive-dp train`` for one
epoch in ``--cli-rounds`` rounds of: ``--non-private``, the floor loop for as many steps, DP + PID
(``--target-mi 0.5``, everything else the CLI's defaults: PID, the likelihood-ratio monitor every 10 steps,
``--grad-sample-mode auto``), plain opacus' fastest mode for as many steps, each in its own process
(``OMP_NUM_THREADS`` = ``--threads``) and measured alike: process CPU time (``/proc``) and wall time between the
first and last progress lines (steps 20–192); each CLI run is divided by the loop run right after it, and the
medians over the rounds are reported. The 1-minute load average is recorded after every round.

    python benchmarks/epoch.py --quick     # small-cnn, 40 steps per set-up (≤ 3 min on 2 cores)
    python benchmarks/epoch.py             # small-cnn, one epoch per set-up, plus 2 rounds of the CLI epochs
    python benchmarks/epoch.py --smoke     # digits, 4 steps: the plumbing only (the benchmarks' contract test)
    python benchmarks/epoch.py --cli-only  # rerun the CLI rounds only, merged into the committed results

Writes ``benchmarks/results/epoch.{json,md}`` and prints one JSON object as the last stdout line.
"""

from __future__ import annotations

import argparse
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


def _dp_pid(base, train, audit, *, seed: int, mode: str, tracker, max_audit: int | None = None) -> Setup:
    """The adaptive engine (PID, monitor every 10 steps) in ``mode``, its phases cut by the optimizer's hooks;
    ``max_audit``: the monitor's cap on audit examples (default: the monitor's own, 256)."""
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
            monitor_options={} if max_audit is None else {"max_audit": max_audit},
        )
    model, optimizer, loader = out[0], out[1], out[-1]
    criterion = out[2] if mode == "ghost" else nn.CrossEntropyLoss()
    name = f"dp_pid_{mode}" if max_audit is None else f"audit{max_audit}_{mode}"
    setup = Setup(name, model, optimizer, criterion, _cycle(loader), after_step="monitor", engine=engine)
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
        **{
            f"audit{n}_{args.adaptive_modes[0]}": _dp_pid(
                base, train, audit, seed=seed, mode=args.adaptive_modes[0], tracker=tracker, max_audit=n
            )
            for n in args.small_audit
        },
    }


# ------------------------------------------------------------------------------------------------ timing


def time_setups(setups: dict[str, Setup], *, steps: int, block: int, label: str) -> list[float]:
    """Warm up, then ``steps`` timed steps per set-up in interleaved blocks (order rotated every round); returns
    the 1-minute load average after each round."""
    for setup in setups.values():
        setup.run(WARMUP_STEPS, timed=False)
    names = list(setups)
    done, loadavg = 0, []
    while done < steps:
        n = min(block, steps - done)
        shift = (done // block) % len(names)
        for name in names[shift:] + names[:shift]:
            setups[name].run(n, timed=True)
        done += n
        loadavg.append(os.getloadavg()[0])
        print(
            f"  {label}: {done}/{steps} steps: "
            + ", ".join(f"{k} {v.block_cpu[-1] * 1e3:.0f}" for k, v in setups.items())
            + " CPU ms/step",
            file=sys.stderr,
            flush=True,
        )
    return loadavg


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
    logging_ms, monitor_ms = dp["cpu_ms"].get("logging", 0.0), dp["cpu_ms"].get("monitor", 0.0)
    paired = [(d - logging_ms) / f for d, f in zip(dp["block_cpu_ms"], fast["block_cpu_ms"])]
    return {
        "opacus_fastest": fastest,
        "dp_pid_fastest": dp_fastest,
        "dp_pid_vs_opacus_fastest": dp["engine_cpu_ms_per_step"] / fast["cpu_ms_per_step"],
        "dp_pid_vs_opacus_fastest_paired": statistics.median(paired),
        "dp_pid_logged_vs_opacus_fastest": dp["cpu_ms_per_step"] / fast["cpu_ms_per_step"],
        # the same without the monitor's readings (the engine's own cost), and with a reading every 20th step
        "dp_pid_without_monitor_vs_opacus_fastest": (dp["engine_cpu_ms_per_step"] - monitor_ms)
        / fast["cpu_ms_per_step"],
        "dp_pid_monitor_every_20_vs_opacus_fastest": (dp["engine_cpu_ms_per_step"] - monitor_ms / 2)
        / fast["cpu_ms_per_step"],
        "monitor_share_of_dp_pid": monitor_ms / dp["engine_cpu_ms_per_step"],
        "small_audit_vs_opacus_fastest": {
            k: v["engine_cpu_ms_per_step"] / fast["cpu_ms_per_step"]
            for k, v in rows.items()
            if k.startswith("audit")
        },
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


def bench_model(model_name: str, data, *, args, log_dir: Path) -> tuple[dict[str, Any], dict[str, Setup]]:
    """Time the set-ups of one model: (per-set-up breakdowns and the ratios, the set-ups)."""
    from adaptive_dp.training.tracking import Tracker

    mode = "disabled" if args.smoke else args.wandb_mode
    with Tracker(log_dir / model_name, config={"benchmark": NAME, "model": model_name}, mode=mode) as tracker:
        setups = build_setups(model_name, data, args=args, tracker=tracker)
        steps_per_epoch = round(1 / setups[f"dp_pid_{args.adaptive_modes[0]}"].engine.sample_rate)
        loadavg = time_setups(setups, steps=args.steps, block=args.block, label=model_name)
    rows = {k: summarize(s, steps_per_epoch=steps_per_epoch) for k, s in setups.items()}
    result = {
        "steps_per_epoch": steps_per_epoch,
        "steps_timed": args.steps,
        "loadavg_per_round": loadavg,
        "setups": rows,
        **ratios(rows),
    }
    return result, setups


# ------------------------------------------------------------------------------------------------ the CLI


def _cli_command(name: str, *, seed: int, out: Path) -> list[str]:
    """``adaptive-dp train`` for one epoch of the small CNN on CIFAR-10, batch 256: DP + PID at the CLI's defaults
    (``--target-mi`` only: PID, the likelihood-ratio monitor every 10 steps, ``--grad-sample-mode auto``) or
    ``--non-private``."""
    extra = ["--target-mi", str(TARGET_MI)] if name == "dp_pid" else ["--non-private"]
    return [
        *("adaptive-dp train --dataset cifar10 --model small-cnn --epochs 1").split(),
        *("--batch-size", str(BATCH), "--seed", str(seed), "--wandb-mode", "offline"),
        *extra,
        *("--out", str(out)),
    ]


def _process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a running process (all its threads), from ``/proc/<pid>/stat``."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


#: the CLI's progress lines when stderr is not a terminal (``adaptive_dp.training.progress``); the reference loops
#: print the same
PROGRESS_LINE = r"epoch 1/1 step (\d+)/\d+: .*\(([0-9.]+) s\)"


def _child_window(argv: list[str], *, env: dict[str, str]) -> dict[str, Any]:
    """Run ``argv``; the CPU and wall ms per step between its first and last progress lines (the process' CPU
    time read from ``/proc`` as each line arrives: the steady state, without start-up, the first steps, a test
    evaluation or the outputs), and the whole process' CPU seconds."""
    import re
    import resource

    pattern = re.compile(PROGRESS_LINE)
    marks: list[tuple[int, float, float]] = []  # (step, process CPU s, wall s since the epoch began)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with subprocess.Popen(
        argv, env=env, cwd=_common.REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    ) as child:
        for line in child.stderr:
            match = pattern.search(line)
            if match:
                marks.append((int(match[1]), _process_cpu_s(child.pid), float(match[2])))
    if child.returncode or len(marks) < 2:
        raise RuntimeError(f"{' '.join(argv)} failed (exit {child.returncode}, {len(marks)} progress lines)")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    (s0, c0, w0), (s1, c1, w1) = marks[0], marks[-1]
    return {
        "process_cpu_s": after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime,
        "window_steps": s1 - s0,
        "cpu_ms_per_step": 1e3 * (c1 - c0) / (s1 - s0),
        "wall_ms_per_step": 1e3 * (w1 - w0) / (s1 - s0),
        "loadavg": list(os.getloadavg()),
    }


def _run_cli(command: list[str], *, env: dict[str, str]) -> dict[str, Any]:
    """One CLI run (:func:`_child_window`), plus its epoch's wall seconds, steps and mode from ``summary.json``."""
    out = _child_window([sys.executable, "-m", "adaptive_dp.cli", *command[1:]], env=env)
    summary = json.loads((Path(command[-1]) / "summary.json").read_text(encoding="utf-8"))
    out.update(
        epoch_wall_s=summary["epoch_times_s"][0],
        steps=summary["steps"],
        grad_sample_mode=summary.get("grad_sample_mode"),
    )
    return out


def reference_loop(name: str, *, steps: int, data_dir, seed: int) -> None:
    """The hand-written ``name`` loop (``floor`` or ``opacus_<mode>``) for ``steps`` steps in this process, printing
    the CLI's progress lines (every 20th step and the last): the CLI runs' reference, measured the same way."""
    from adaptive_dp.models import build_model

    train, _, info = load_split("cifar10", data_dir=data_dir, seed=seed)
    base = build_model(
        "small-cnn",
        in_channels=info.in_channels,
        num_classes=info.num_classes,
        image_size=info.image_size,
        seed=seed,
    )
    if name == "floor":
        setup = _plain(name, base, _premade(train, seed=seed, count=min(steps, len(train) // BATCH)))
    else:
        setup = _opacus(name[len("opacus_") :], base, train, seed=seed)
    setup.run(WARMUP_STEPS, timed=False)
    start = time.perf_counter()
    for step in range(1, steps + 1):
        setup.run(1, timed=False)
        if step % 20 == 0 or step == steps:
            print(
                f"epoch 1/1 step {step}/{steps}: ({time.perf_counter() - start:.1f} s)",
                file=sys.stderr,
                flush=True,
            )


def time_cli(*, fastest: str, data_dir, threads: int, seed: int, rounds: int, work: Path) -> dict[str, Any]:
    """``rounds`` rounds of: ``adaptive-dp train --non-private`` (one epoch), the floor loop for as many steps,
    ``adaptive-dp train --target-mi`` (DP + PID, one epoch), plain opacus' fastest mode for as many steps. Every run
    is a child process with ``OMP_NUM_THREADS`` = ``threads``, measured the same way (:func:`_child_window`), and
    each CLI run is divided by the reference loop run right after it (same load)."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "ADAPTIVE_DP_DATA": str(_common.data_root(data_dir)),
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
    }
    pairs = {"nonprivate": "floor", "dp_pid": fastest}
    out: dict[str, Any] = {"reference": pairs, "rounds": []}
    for r in range(rounds):
        record: dict[str, Any] = {}
        for name, reference in pairs.items():
            command = _cli_command(name, seed=seed, out=work / f"{name}-{r}")
            run = _run_cli(command, env=env)
            loop_argv = [sys.executable, str(Path(__file__).resolve()), "--reference-loop", reference]
            loop_argv += ["--steps", str(run["steps"]), "--seed", str(seed), "--threads", str(threads)]
            run["loop"] = _child_window(loop_argv, env=env)
            run["ratio_cpu"] = run["cpu_ms_per_step"] / run["loop"]["cpu_ms_per_step"]
            run["ratio_wall"] = run["wall_ms_per_step"] / run["loop"]["wall_ms_per_step"]
            record[name] = run
            out["command_" + name] = " ".join(command[:-2])
            print(
                f"  cli round {r + 1}/{rounds}: {name} {run['cpu_ms_per_step']:.0f} CPU ms/step vs {reference} "
                f"{run['loop']['cpu_ms_per_step']:.0f} ({run['ratio_cpu']:.3f}); wall ratio {run['ratio_wall']:.3f}"
                f"; load {run['loadavg'][0]:.2f}",
                file=sys.stderr,
                flush=True,
            )
        out["rounds"].append(record)
    for name in pairs:
        runs = [rec[name] for rec in out["rounds"]]
        out[name] = {
            "cpu_ms_per_step": statistics.median(x["cpu_ms_per_step"] for x in runs),
            "loop_cpu_ms_per_step": statistics.median(x["loop"]["cpu_ms_per_step"] for x in runs),
            "ratio_cpu": statistics.median(x["ratio_cpu"] for x in runs),
            "wall_ms_per_step": statistics.median(x["wall_ms_per_step"] for x in runs),
            "loop_wall_ms_per_step": statistics.median(x["loop"]["wall_ms_per_step"] for x in runs),
            "ratio_wall": statistics.median(x["ratio_wall"] for x in runs),
            "epoch_wall_s": statistics.median(x["epoch_wall_s"] for x in runs),
            "steps": runs[0]["steps"],
            "grad_sample_mode": runs[0]["grad_sample_mode"],
            "process_cpu_s": statistics.median(x["process_cpu_s"] for x in runs),
        }
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
    if payload.get("cli_command"):
        extra["Breakdown"] = (
            f"from `{payload['command']}` ({payload['seconds']:.0f} s); the CLI section from the command above"
        )
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
            f"- Without the monitor's readings: {model['dp_pid_without_monitor_vs_opacus_fastest']:.3f}; with a "
            f"reading every 20th step instead of every 10th (projected from the measured cost per reading): "
            f"{model['dp_pid_monitor_every_20_vs_opacus_fastest']:.3f}; the monitor is "
            f"{100 * model['monitor_share_of_dp_pid']:.0f} % of the DP + PID step. With the monitor capped at "
            + (
                ", ".join(
                    f"{k[len('audit') :].split('_')[0]} audit examples ({k}): {v:.3f}"
                    for k, v in model["small_audit_vs_opacus_fastest"].items()
                )
                or "fewer audit examples: not timed"
            )
            + ".",
            f"- Non-private loop with the DataLoader / floor: **{model['nonprivate_vs_floor']:.3f}** (target ≤ "
            f"{TARGETS['nonprivate_vs_floor']}); fastest opacus / floor {model['opacus_fastest_vs_floor']:.2f}; "
            f"DP + PID / floor {model['dp_pid_vs_floor']:.2f}.",
            f"- Monitor: {dp['readings']} readings, {fmt(dp['monitor_ms_per_reading'])} CPU ms each; σ "
            f"{dp['sigma_range'][0]:.3g}–{dp['sigma_range'][1]:.3g} over the timed steps.",
            "",
        ]
    lines += _cli_lines(payload.get("cli"))
    load = payload["loadavg"]
    lines += [
        f"Load average (1, 5, 15 min) at the start {_load(load['start'])}, at the end {_load(load['end'])}"
        + (
            f"; CLI rounds: at their start {_load(load['cli_start'])}, at their end {_load(load['cli_end'])}"
            if "cli_start" in load
            else ""
        )
        + "; 2 cores shared with other jobs throughout.",
        "",
    ]
    return "\n".join(lines)


def _load(values) -> str:
    return "/".join(f"{v:.2f}" for v in values)


def _cli_lines(cli: dict[str, Any] | None) -> list[str]:
    """The report's section on ``adaptive-dp train``'s epochs beside the hand-written loops."""
    if not cli:
        return []
    lines = [
        "## `adaptive-dp train`, one epoch, each beside a hand-written loop in its own process",
        "",
        f"{len(cli['rounds'])} rounds of: the CLI's epoch, then the hand-written loop for as many steps right "
        "after it (same load), each in its own process (`OMP_NUM_THREADS=1`) and measured the same way: the "
        "process' CPU time (/proc) and wall time between its first and last progress lines (steps 20–192: no "
        "start-up, data loading, test evaluation or outputs; W&B's separate service process is outside); medians "
        "over the rounds.",
        "",
    ]
    header = [
        "CLI run",
        "CPU ms/step",
        "loop",
        "loop CPU ms/step",
        "CLI / loop CPU (paired)",
        "target",
        "wall ms/step",
        "loop wall ms/step",
        "CLI / loop wall (paired)",
        "CLI epoch wall s (steps)",
    ]
    targets = {"nonprivate": TARGETS["nonprivate_vs_floor"], "dp_pid": TARGETS["dp_pid_vs_opacus_fastest"]}
    rows = [
        [
            f"`{cli['command_' + name]}`"
            + (f" ({cli[name]['grad_sample_mode']})" if name == "dp_pid" else ""),
            cli[name]["cpu_ms_per_step"],
            f"`{cli['reference'][name]}`",
            cli[name]["loop_cpu_ms_per_step"],
            f"**{cli[name]['ratio_cpu']:.3f}**",
            f"≤ {targets[name]}",
            cli[name]["wall_ms_per_step"],
            cli[name]["loop_wall_ms_per_step"],
            cli[name]["ratio_wall"],
            f"{cli[name]['epoch_wall_s']:.1f} ({cli[name]['steps']})",
        ]
        for name in cli["reference"]
    ]
    lines += [markdown_table(header, rows), ""]
    per_round = "; ".join(
        ", ".join(
            f"{k} CPU {v['ratio_cpu']:.3f}, wall {v['ratio_wall']:.3f} (load {v['loadavg'][0]:.2f})"
            for k, v in rec.items()
        )
        for rec in cli["rounds"]
    )
    return lines + [f"- Per round: {per_round}.", ""]


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
        "dp_pid_without_monitor_vs_opacus_fastest": max(
            m["dp_pid_without_monitor_vs_opacus_fastest"] for m in models.values()
        ),
        "small_audit_vs_opacus_fastest": {k: m["small_audit_vs_opacus_fastest"] for k, m in models.items()},
        "cli_dp_pid_vs_opacus_fastest": (cli.get("dp_pid") or {}).get("ratio_cpu"),
        "cli_nonprivate_vs_floor": (cli.get("nonprivate") or {}).get("ratio_cpu"),
        "cli_dp_pid_vs_opacus_fastest_wall": (cli.get("dp_pid") or {}).get("ratio_wall"),
        "cli_nonprivate_vs_floor_wall": (cli.get("nonprivate") or {}).get("ratio_wall"),
        "loadavg": payload["loadavg"],
        "seconds": payload["seconds"],
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = _common.base_parser(__doc__.splitlines()[0])
    parser.add_argument(
        "--models",
        nargs="+",
        default=None,
        help="models (default: small-cnn; tanh-cnn also works)",
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
    parser.add_argument(
        "--small-audit",
        nargs="*",
        type=int,
        default=[64],
        help="also time DP + PID (first --adaptive-modes mode) with the monitor capped at these many audit "
        "examples (default 64, as overhead.py; the monitor's own cap is 256)",
    )
    parser.add_argument("--no-cli", action="store_true", help="full mode: skip timing `adaptive-dp train`")
    parser.add_argument(
        "--cli-rounds",
        type=int,
        default=2,
        help="full mode: rounds of the CLI epochs and their loops (default 2)",
    )
    parser.add_argument(
        "--cli-only",
        action="store_true",
        help="rerun only the CLI rounds and merge them into the results of --out-dir (kept: the breakdown)",
    )
    parser.add_argument("--reference-loop", default=None, help=argparse.SUPPRESS)  # internal: a CLI reference
    args = _common.parse_args(parser, argv)
    _common.setup_torch(args.threads)
    if args.reference_loop:
        reference_loop(args.reference_loop, steps=args.steps, data_dir=args.data_dir, seed=args.seed)
        return {}
    os.environ.setdefault("WANDB_SILENT", "true")
    started = time.time()
    out_dir = Path(args.out_dir)
    if args.cli_only:
        payload = json.loads((out_dir / f"{NAME}.json").read_text(encoding="utf-8"))
        payload["loadavg"]["cli_start"] = list(os.getloadavg())
        with tempfile.TemporaryDirectory() as tmp:
            payload["cli"] = _time_cli(payload["models"], args=args, work=Path(tmp))
        payload["loadavg"]["cli_end"] = list(os.getloadavg())
        payload["cli_command"] = _common.command_line()
    else:
        payload = _measure(args, started=started)
    _common.write_json(out_dir / f"{NAME}.json", payload)
    _common.write_markdown(out_dir / f"{NAME}.md", markdown(payload, started=started))
    summary = headline(payload)
    _common.print_summary(summary)
    return summary


def _time_cli(models: dict[str, Any], *, args, work: Path) -> dict[str, Any]:
    return time_cli(
        fastest=models["small-cnn"]["opacus_fastest"],
        data_dir=args.data_dir,
        threads=args.threads,
        seed=args.seed,
        rounds=args.cli_rounds,
        work=work,
    )


def _measure(args, *, started: float) -> dict[str, Any]:
    """The breakdown of every model, then (full mode, small-cnn) the CLI rounds: the results' payload."""
    dataset = "digits" if args.smoke else "cifar10"
    data = load_split(dataset, data_dir=args.data_dir, seed=args.seed)
    args.block = args.block or (2 if args.smoke else MONITOR_EVERY)
    args.steps = args.steps or (4 if args.smoke else 40 if args.quick else math.ceil(len(data[0]) / BATCH))
    names = args.models or ["small-cnn"]
    loadavg = {"start": list(os.getloadavg())}
    with tempfile.TemporaryDirectory() as tmp:
        models = {m: bench_model(m, data, args=args, log_dir=Path(tmp))[0] for m in names}
        cli = None
        if not (args.quick or args.smoke or args.no_cli) and "small-cnn" in models:
            cli = _time_cli(models, args=args, work=Path(tmp) / "cli")
    loadavg["end"] = list(os.getloadavg())
    return {
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
        "loadavg": loadavg,
        "seconds": round(time.time() - started, 1),
    }


if __name__ == "__main__":
    main()
