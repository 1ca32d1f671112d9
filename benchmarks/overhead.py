"""Training-step overhead of AdaptivePrivacyEngine against opacus' PrivacyEngine.

Four set-ups of the same model (same initial weights, same batch of 256 CIFAR-10-shaped examples per step):

* ``nonprivate`` — plain PyTorch SGD;
* ``opacus`` — ``opacus.PrivacyEngine`` (per-sample gradients, clipping, noise, accountant hook);
* ``ours_every10`` — ``AdaptivePrivacyEngine`` with a PID controller, a 0.5-nat ceiling and the
  likelihood-ratio monitor on 64 audit examples, reading every 10 steps (the default);
* ``ours_every1`` — the same, reading before every step.

Steps are timed in blocks of 10 (so ``ours_every10`` pays exactly one reading per block); the blocks of the
four set-ups are interleaved (round robin, rotating the order each repetition) so that machine load drifts
hit all of them alike, and the median seconds per step over repetitions is reported: process CPU time on a
CPU (with one torch thread it is the step's own cost, while wall time on a shared machine mostly measures the
other jobs; wall medians are kept in the JSON too), synchronised wall time on a GPU. Ratios are against
opacus: ``ratio_default`` = ours_every10 / opacus (target ≤ 1.05), ``ratio_every_step`` = ours_every1 / opacus
(target ≤ 1.5); the top-level values are the worst over the models. Also recorded: the same ratios paired
within each repetition (median of per-repetition ratios), the cost of each monitor reading the engines take
(timed inside the runs, same clock) and the every-step engine's step time without its readings — on a shared
CPU the block-to-block noise (±15 %) is larger than the 5 % being tested, and these show where the time goes.

Usage::

    python benchmarks/overhead.py            # small-cnn and resnet20, 7 repetitions
    python benchmarks/overhead.py --quick    # small-cnn only, 3 repetitions
    python benchmarks/overhead.py --smoke    # small-cnn, 1 repetition (the plumbing only)

Writes ``overhead.json`` and ``overhead.md`` to ``--out-dir`` (default ``benchmarks/results``; rows of models not
timed in this run are kept unless ``--fresh``), prints the Markdown table, then one JSON object as the last stdout
line: ``ratio_default`` and ``ratio_every_step`` (worst over the models) and per model (``models``) the median ms
per step of each set-up, the same ratios, the paired ratios, opacus / non-private and the monitor's ms per reading.
"""

from __future__ import annotations

import copy
import json
import platform
import statistics
import time
import warnings
from pathlib import Path

import _common  # first: puts the repository on sys.path
import torch
from opacus import PrivacyEngine
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from adaptive_dp.models.cnn import build_model
from adaptive_dp.privacy_engine import AdaptivePrivacyEngine

SETUPS = ("nonprivate", "opacus", "ours_every10", "ours_every1")
BATCH = 256
AUDIT = 64
BLOCK = 10
TARGETS = {"ratio_default": 1.05, "ratio_every_step": 1.5}
ENGINES: dict[str, AdaptivePrivacyEngine] = {}  # the latest engine of each "ours" set-up


def _data(device: torch.device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(BATCH, 3, 32, 32, generator=g).to(device)
    y = torch.randint(0, 10, (BATCH,), generator=g).to(device)
    audit = (
        torch.randn(AUDIT, 3, 32, 32, generator=g).to(device),
        torch.randint(0, 10, (AUDIT,), generator=g).to(device),
    )
    # the loader only fixes q = 1/8 and the expected batch size; the timed steps reuse one batch
    loader = DataLoader(
        TensorDataset(torch.randn(8 * BATCH, 3, 32, 32), torch.randint(0, 10, (8 * BATCH,))), batch_size=BATCH
    )
    return x, y, audit, loader


def _make(setup: str, base: nn.Module, loader: DataLoader, audit) -> tuple[nn.Module, torch.optim.Optimizer]:
    model = copy.deepcopy(base)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    if setup == "nonprivate":
        return model, optimizer
    common = dict(
        module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0
    )
    if setup == "opacus":
        model, optimizer, _ = PrivacyEngine(accountant="rdp").make_private(**common)
        return model, optimizer
    every = 10 if setup == "ours_every10" else 1
    engine = AdaptivePrivacyEngine()
    model, optimizer, _ = engine.make_private(
        **common,
        target_mi=0.5,
        controller="pid",
        audit_data=audit,
        monitor_every=every,
        sigma_min=0.3,
        sigma_max=20.0,
    )
    ENGINES[setup] = engine  # the benchmark times the engine's monitor readings through it
    return model, optimizer


def _steps(model, optimizer, x, y, *, steps: int) -> None:
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()


def _block(model, optimizer, x, y, device) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) per step over one block."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start, cpu_start = time.perf_counter(), time.process_time()
    _steps(model, optimizer, x, y, steps=BLOCK)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / BLOCK, (time.process_time() - cpu_start) / BLOCK


def bench_model(name: str, *, reps: int, device: torch.device) -> dict:
    """Median seconds per step of the four set-ups for one model, and the ratios against opacus."""
    x, y, audit, loader = _data(device)
    base = build_model(name, in_channels=3, num_classes=10, image_size=32, seed=0).to(device)
    built = {s: _make(s, base, loader, audit) for s in SETUPS}
    for s in SETUPS:  # warm-up (allocator, first hook calls): two steps, no reading (history is 0, 1 → 2)
        _steps(*built[s], x, y, steps=2)
    reading_times = {s: _time_readings(ENGINES[s]) for s in ("ours_every10", "ours_every1")}
    outside: dict[str, list[float]] = {
        s: [] for s in reading_times
    }  # step time less the readings in the block
    wall: dict[str, list[float]] = {s: [] for s in SETUPS}
    cpu: dict[str, list[float]] = {s: [] for s in SETUPS}
    for rep in range(reps):
        order = SETUPS[rep % len(SETUPS) :] + SETUPS[: rep % len(SETUPS)]
        for s in order:
            before = len(reading_times[s]) if s in reading_times else 0
            w, c = _block(*built[s], x, y, device)
            if s in reading_times:
                outside[s].append((w if device.type != "cpu" else c) - sum(reading_times[s][before:]) / BLOCK)
            wall[s].append(w)
            cpu[s].append(c)
        print(
            f"  {name} rep {rep + 1}/{reps}: "
            + ", ".join(f"{s} {wall[s][-1] * 1e3:.1f} ms (cpu {cpu[s][-1] * 1e3:.1f})" for s in SETUPS),
            flush=True,
        )
    # On a CPU shared with other jobs, wall time mostly measures the others; with one torch thread the
    # process CPU time is the step's own cost. On a GPU, wall time (synchronised) is the cost.
    timed = cpu if device.type == "cpu" else wall
    median = {s: statistics.median(v) for s, v in timed.items()}
    return {
        "parameters": sum(p.numel() for p in base.parameters()),
        "clock": "process CPU time" if device.type == "cpu" else "wall time",
        "seconds_per_step_median": median,
        "wall_seconds_per_step_median": {s: statistics.median(v) for s, v in wall.items()},
        "seconds_per_step_all": timed,
        "opacus_over_nonprivate": median["opacus"] / median["nonprivate"],
        "ratio_default": median["ours_every10"] / median["opacus"],
        "ratio_every_step": median["ours_every1"] / median["opacus"],
        # the same ratios paired within each repetition (the four blocks of a repetition run back to back,
        # so a load change between repetitions cancels), then the median over repetitions
        "ratio_default_paired": statistics.median(
            a / b for a, b in zip(timed["ours_every10"], timed["opacus"])
        ),
        "ratio_every_step_paired": statistics.median(
            a / b for a, b in zip(timed["ours_every1"], timed["opacus"])
        ),
        "monitor_ms_per_reading_median": 1e3 * statistics.median(reading_times["ours_every1"]),
        "monitor_ms_per_reading_median_every10": 1e3 * statistics.median(reading_times["ours_every10"]),
        # diagnostic: the engine's step time without its monitor readings (the same clock)
        "seconds_per_step_excluding_readings_median": {s: statistics.median(v) for s, v in outside.items()},
    }


def _time_readings(engine: AdaptivePrivacyEngine) -> list[float]:
    """Record the cost of each of the engine's monitor readings: process CPU seconds, synchronised wall on a GPU."""
    times: list[float] = []
    read = engine.monitor.read
    cuda = engine.monitor.device.type == "cuda"
    clock = time.perf_counter if cuda else time.process_time

    def timed(**kwargs):
        if cuda:
            torch.cuda.synchronize()
        start = clock()
        reading = read(**kwargs)
        if cuda:
            torch.cuda.synchronize()
        times.append(clock() - start)
        return reading

    engine.monitor.read = timed
    return times


def _markdown(result: dict) -> str:
    lines = [
        "# Training-step overhead: AdaptivePrivacyEngine vs opacus PrivacyEngine",
        "",
        f"Device: {result['device']} ({result['torch_threads']} torch threads); batch {BATCH} CIFAR-10-shaped "
        f"examples, {AUDIT} audit examples, likelihood-ratio monitor + PID; interleaved repetitions of "
        f"{BLOCK}-step blocks (round robin, rotating order), medians of {'process CPU time per step (the machine is shared; one torch thread)' if result['device'] == 'cpu' else 'wall time per step'}.",
        "",
        "| model | params | reps | non-private ms/step | opacus ms/step | ours (every 10) ms/step | ours (every step) "
        "ms/step | monitor ms/reading | ratio default (≤ 1.05) | ratio every step (≤ 1.5) | paired ratios "
        "(default, every step) | command |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]

    def opt(value, spec: str) -> str:
        return "—" if value is None else format(value, spec)

    for name, r in result["models"].items():
        m = r["seconds_per_step_median"]
        lines.append(
            f"| {name} | {r['parameters']:,} | {r['reps']} | {m['nonprivate'] * 1e3:.1f} | {m['opacus'] * 1e3:.1f} | "
            f"{m['ours_every10'] * 1e3:.1f} | {m['ours_every1'] * 1e3:.1f} | "
            f"{opt(r.get('monitor_ms_per_reading_median'), '.1f')} | {r['ratio_default']:.3f} | "
            f"{r['ratio_every_step']:.3f} | {opt(r.get('ratio_default_paired'), '.3f')}, "
            f"{opt(r.get('ratio_every_step_paired'), '.3f')} | `{r['command']}` |"
        )
    lines += ["", "Where the time goes (same clock; the engine's readings timed inside the runs):", ""]
    for name, r in result["models"].items():
        if r.get("monitor_ms_per_reading_median") is None:
            continue
        m = r["seconds_per_step_median"]
        rest = r["seconds_per_step_excluding_readings_median"]["ours_every1"]
        reading = r["monitor_ms_per_reading_median"] / 1e3
        estimate = (m["opacus"] + max(rest - m["opacus"], 0.0) + reading / BLOCK) / m["opacus"]
        lines.append(
            f"- {name}: one monitor reading {reading * 1e3:.1f} ms ({reading / m['opacus']:.2f} opacus steps); the "
            f"every-step engine's step without its reading {rest * 1e3:.1f} ms vs opacus {m['opacus'] * 1e3:.1f} ms; "
            f"so monitor_every = 10 should cost ≈ {estimate:.3f}× opacus (reading / 10 plus any engine excess)."
        )
    lines += [
        "",
        f"Worst over models: ratio_default = {result['ratio_default']:.3f} (target ≤ {TARGETS['ratio_default']}), "
        f"ratio_every_step = {result['ratio_every_step']:.3f} (target ≤ {TARGETS['ratio_every_step']}).",
        "",
    ]
    return "\n".join(lines)


def _per_model(r: dict) -> dict:
    """The per-model figures of the last-line JSON: ms per step of each set-up and the ratios."""
    keys = (
        "ratio_default",
        "ratio_every_step",
        "ratio_default_paired",
        "ratio_every_step_paired",
        "opacus_over_nonprivate",
        "monitor_ms_per_reading_median",
        "reps",
    )
    return {
        "ms_per_step": {s: round(v * 1e3, 2) for s, v in r["seconds_per_step_median"].items()},
        **{k: r.get(k) for k in keys},
    }


def main(argv: list[str] | None = None) -> dict:
    parser = _common.base_parser(__doc__.split("\n\n")[0])
    parser.add_argument(
        "--models", nargs="+", default=None, help="models to time (default small-cnn resnet20)"
    )
    parser.add_argument(
        "--reps", type=int, default=None, help="interleaved repetitions (default 7, quick 3, smoke 1)"
    )
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--fresh", action="store_true", help="drop rows of models not timed in this run")
    args = _common.parse_args(parser, argv)
    _common.setup_torch(args.threads)
    warnings.filterwarnings("ignore")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    models = args.models or (["small-cnn"] if args.quick or args.smoke else ["small-cnn", "resnet20"])
    reps = args.reps or (1 if args.smoke else 3 if args.quick else 7)
    results = {}
    out = Path(args.out_dir)
    previous = out / "overhead.json"
    if not args.fresh and previous.is_file():  # keep other models' rows from an earlier run
        results.update(json.loads(previous.read_text()).get("models", {}))
    for name in models:
        results[name] = {
            "command": _common.command_line(),
            "reps": reps,
            **bench_model(name, reps=reps, device=device),
        }
    result = {
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "quick": args.quick,
        "smoke": args.smoke,
        "batch_size": BATCH,
        "audit_size": AUDIT,
        "block_steps": BLOCK,
        "targets": TARGETS,
        "models": results,
        "ratio_default": max(r["ratio_default"] for r in results.values()),
        "ratio_every_step": max(r["ratio_every_step"] for r in results.values()),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "overhead.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "overhead.md").write_text(_markdown(result))
    print(_markdown(result))
    summary = {
        "benchmark": "overhead",
        "quick": args.quick,
        "smoke": args.smoke,
        "ratio_default": result["ratio_default"],
        "ratio_every_step": result["ratio_every_step"],
        "models": {name: _per_model(r) for name, r in results.items()},
    }
    _common.print_summary(summary)
    return summary


if __name__ == "__main__":
    main()
