"""Speed and memory of DP fine-tuning a ViT: opacus' grad-sample modes, and the monitor's Gram path.

Two measurements, on CIFAR-10-shaped inputs (3×32×32, 10 classes; random pixels — the cost does not depend on
the values), C = 1, σ = 1, one torch thread:

1. **One DP-SGD step** (forward, backward, per-sample clipping, noise, update; fixed batches of ``--batch``)
   through ``AdaptivePrivacyEngine`` (no monitor: opacus' own step) in each ``grad_sample_mode`` — ``hooks``,
   ``functorch``, ``ghost`` (fast gradient clipping, two backward passes, no per-sample gradients) — for
   ``vit-tiny`` and the 4× larger ``vit-small``, full fine-tuning and LoRA (rank 8 on the query/value
   projections + the head).
2. **One leakage-monitor reading** (``LeakageMonitor.read``, likelihood-ratio estimator, N audit examples)
   by each of the monitor's ``gradient_path``s: ``"materialised"`` ([N, P] per-sample gradients by
   vmap(grad), clipped, centred Gram matrix) and ``"gram"`` (the default's path:
   :func:`adaptive_dp.leakage.gram.parameter_grams` → ``clipped_gram`` → ``centre_gram`` →
   ``estimate_from_gram``: one batched pass, per-layer Gram contributions, never N×P).

Each configuration runs in its own process. Times: median wall and CPU milliseconds after one warm-up (the
machine is shared: CPU time is the steadier figure). Memory (CPU, no GPU here): the process's peak resident
memory ``VmHWM`` during one more step/reading minus its resident memory ``VmRSS`` just before it (no gradients
held then: the step's per-sample gradients, summed gradients and activations all count), with
glibc's mmap threshold lowered to 64 KiB for that measurement (``mallopt``) so freed tensors go back to the
OS and resident memory tracks live tensors (the timed runs use the default allocator settings).

    python benchmarks/finetune_speed.py --smoke      # vit-tiny, batch 4, N = 4, in one process: the plumbing only
    python benchmarks/finetune_speed.py --quick      # vit-tiny only, batch 32, N = 32 (≤ 3 min on 2 cores)
    python benchmarks/finetune_speed.py              # vit-tiny and vit-small, batch 64, N = 64
    python benchmarks/finetune_speed.py --part readings   # rerun the readings only; keep the steps of the
                                                          # committed JSON of the same mode (merged)

Writes ``benchmarks/results/finetune_speed.{json,md}``; the last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import _common
from _common import markdown_table

NAME = "finetune_speed"
MODES = ("hooks", "functorch", "ghost")
PATHS = ("materialised", "gram")
TUNINGS = ("full", "lora")
LORA_RANK = 8
M_MMAP_THRESHOLD = -3  # glibc <malloc.h>


# ---------------------------------------------------------------------------------------------- worker side
def _memory_kib() -> tuple[int, int]:
    status = Path("/proc/self/status").read_text()
    fields = {
        line.split(":")[0]: int(line.split()[1]) for line in status.splitlines() if line.startswith("Vm")
    }
    return fields["VmHWM"], fields["VmRSS"]


def _peak_extra_mib(run) -> float | None:
    """Peak resident memory of ``run()`` above the resident memory before it (MiB), None off Linux/glibc."""
    import ctypes
    import gc

    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, 64 * 1024)
        gc.collect()
        libc.malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current VmRSS
        _, before = _memory_kib()
    except OSError:
        run()
        return None
    run()
    peak, _ = _memory_kib()
    return (peak - before) / 1024


def _model(name: str, tuning: str, seed: int):
    from adaptive_dp.models import build_model
    from adaptive_dp.models.lora import apply_lora

    model = build_model(name, in_channels=3, num_classes=10, image_size=32, seed=seed)
    return apply_lora(model, rank=LORA_RANK if tuning == "lora" else 0, seed=seed)


def _timed(run, repeats: int) -> tuple[float, float]:
    """Median (wall, CPU) ms of ``run()`` over ``repeats`` calls after one warm-up call."""
    wall, cpu = [], []
    for _ in range(repeats + 1):
        start, start_cpu = time.perf_counter(), time.process_time()
        run()
        wall.append(1000 * (time.perf_counter() - start))
        cpu.append(1000 * (time.process_time() - start_cpu))
    return statistics.median(wall[1:]), statistics.median(cpu[1:])


def _step_worker(spec: dict[str, Any]) -> dict[str, Any]:
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from adaptive_dp.privacy_engine import AdaptivePrivacyEngine

    model = _model(spec["model"], spec["tuning"], spec["seed"])
    g = torch.Generator().manual_seed(spec["seed"])
    batch = spec["batch"]
    x, y = torch.randn(batch, 3, 32, 32, generator=g), torch.randint(0, 10, (batch,), generator=g)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    out = AdaptivePrivacyEngine().make_private(
        module=model,
        optimizer=optimizer,
        data_loader=DataLoader(TensorDataset(x, y), batch_size=batch),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        grad_sample_mode=spec["mode"],
        poisson_sampling=False,
    )
    private, optimizer = out[0], out[1]
    criterion = out[2] if spec["mode"] == "ghost" else nn.CrossEntropyLoss()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        criterion(private(x), y).backward()
        optimizer.step()

    wall, cpu = _timed(step, spec["repeats"])
    optimizer.zero_grad(set_to_none=True)  # the last step's per-sample and summed gradients are not "before"
    return {
        "step_ms": wall,
        "step_cpu_ms": cpu,
        "peak_extra_mib": _peak_extra_mib(step),
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def _reading_fn(spec: dict[str, Any], model, audit):
    """A function taking one likelihood-ratio monitor reading (σ = 1, C = 1) by ``spec["path"]``; returns the MI.

    Raises:
        RuntimeError: the monitor took another path than the one forced (it never should).
    """
    from adaptive_dp.leakage.monitor import LeakageMonitor

    monitor = LeakageMonitor(
        model,
        audit,
        max_grad_norm=1.0,
        max_audit=len(audit[0]),
        seed=spec["seed"],
        gradient_path=spec["path"],
    )

    def read() -> float:
        mi = monitor.read(noise_multiplier=1.0).mi
        if monitor.last_path != spec["path"]:
            raise RuntimeError(f"the monitor read by {monitor.last_path}, not {spec['path']}")
        return mi

    return read


def _reading_worker(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    model = _model(spec["model"], spec["tuning"], spec["seed"]).eval()
    g = torch.Generator().manual_seed(spec["seed"] + 1)
    n = spec["n_audit"]
    audit = (torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g))
    read = _reading_fn(spec, model, audit)
    first_mi = read()  # the first reading (same seed in both paths: the same noise draws)
    wall, cpu = _timed(read, spec["repeats"])
    return {
        "reading_ms": wall,
        "reading_cpu_ms": cpu,
        "peak_extra_mib": _peak_extra_mib(read),
        "mi": first_mi,
    }


def worker_main(spec: dict[str, Any]) -> None:
    """Run one configuration (in a fresh process) and print its result as one JSON line."""
    _common.setup_torch(spec["threads"])
    print(json.dumps(_run_in_process(spec)))


# ---------------------------------------------------------------------------------------------- main side
def _run_worker(spec: dict[str, Any]) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"worker {spec} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _run_in_process(spec: dict[str, Any]) -> dict[str, Any]:
    result = _step_worker(spec) if spec["part"] == "step" else _reading_worker(spec)
    return {**spec, **result}


def _specs(args, models: list[str]) -> tuple[list[dict], list[dict]]:
    base = {"seed": args.seed, "threads": args.threads}
    steps = [
        {
            **base,
            "part": "step",
            "model": m,
            "tuning": t,
            "mode": mode,
            "batch": args.batch,
            "repeats": args.repeats,
        }
        for m in models
        for t in TUNINGS
        for mode in MODES
    ]
    readings = [
        {
            **base,
            "part": "reading",
            "model": m,
            "tuning": t,
            "path": path,
            "n_audit": args.n_audit,
            "repeats": args.repeats,
        }
        for m in models
        for t in TUNINGS
        for path in PATHS
    ]
    return steps, readings


def _ratios(rows: list[dict], key: str, a: str, b: str, field: str) -> list[str]:
    """'model/tuning: x.x×' of row ``a``'s ``field`` over row ``b``'s, rows told apart by ``key``."""
    table = {(r["model"], r["tuning"], r[key]): r[field] for r in rows}
    out = []
    for model, tuning, name in table:
        if name == a and table.get((model, tuning, b)) and table[(model, tuning, a)] is not None:
            out.append(f"{model}/{tuning} {table[(model, tuning, a)] / table[(model, tuning, b)]:.2f}×")
    return out


def _findings(payload: dict[str, Any]) -> str:
    steps, readings = payload["steps"], payload["readings"]
    lines = [
        "- Monitor reading, peak memory materialised / Gram path: "
        + ", ".join(_ratios(readings, "path", "materialised", "gram", "peak_extra_mib")),
        "- Monitor reading, CPU time materialised / Gram path: "
        + ", ".join(_ratios(readings, "path", "materialised", "gram", "reading_cpu_ms")),
        "- DP-SGD step, peak memory hooks / ghost: "
        + ", ".join(_ratios(steps, "mode", "hooks", "ghost", "peak_extra_mib")),
        "- DP-SGD step, CPU time ghost / hooks: "
        + ", ".join(_ratios(steps, "mode", "ghost", "hooks", "step_cpu_ms")),
    ]
    return "\n".join(lines)


def _report(payload: dict[str, Any], started: float) -> str:
    step_rows = [
        [
            r["model"],
            r["tuning"],
            r["trainable"],
            r["mode"],
            r["step_ms"],
            r["step_cpu_ms"],
            r["peak_extra_mib"],
        ]
        for r in payload["steps"]
    ]
    reading_rows = [
        [
            r["model"],
            r["tuning"],
            r["path"],
            r["reading_ms"],
            r["reading_cpu_ms"],
            r["peak_extra_mib"],
            r["mi"],
        ]
        for r in payload["readings"]
    ]
    cfg = payload["config"]
    extra = {
        "Inputs": "CIFAR-10 shape (3×32×32, 10 classes), random pixels (cost does not depend on values)",
        "Setting": f"batch {cfg['batch']}, N = {cfg['n_audit']} audit examples, C = 1, σ = 1, LoRA rank "
        f"{LORA_RANK} on q_proj/v_proj + head, {cfg['repeats']} timed repeats after 1 warm-up, each "
        "configuration in its own process",
        "Memory": "VmHWM − VmRSS around one more step/reading, started with no gradients held (CPU resident "
        "memory, MiB; glibc mmap threshold 64 KiB for that measurement)",
    }
    for part, command in payload.get("kept", {}).items():
        extra[f"Kept {part}"] = (
            f"the {part} rows are those of an earlier run, `{command}` (this run: `--part`)"
        )
    step_header = [
        "model",
        "tuning",
        "trainable params",
        "grad_sample_mode",
        "wall ms",
        "CPU ms",
        "peak extra MiB",
    ]
    reading_header = ["model", "tuning", "path", "wall ms", "CPU ms", "peak extra MiB", "MI (nats)"]
    return "\n\n".join(
        [
            "# DP fine-tuning of a ViT: grad-sample modes and the monitor's Gram path",
            _common.provenance_block(
                quick=payload["quick"], smoke=payload["smoke"], started=started, extra=extra
            ),
            "## Summary",
            _findings(payload),
            "## One DP-SGD step",
            markdown_table(step_header, step_rows),
            "## One likelihood-ratio monitor reading",
            markdown_table(reading_header, reading_rows),
            "Both rows are `LeakageMonitor.read` (σ = 1, C = 1, default options) with `gradient_path` forced: "
            "`materialised` = [N, P] per-sample gradients by vmap(grad) in chunks of `batch_size` = 64, clipped, "
            'centred Gram matrix; `gram` (what the default `"auto"` takes for the likelihood-ratio estimator) = '
            "`parameter_grams` → `clipped_gram` → `centre_gram` → `estimate_from_gram` (per-layer contributions "
            "from the activations and output gradients of one batched pass, never N×P). Both use the same seed and "
            "draw the same noise: their MI columns agree to float rounding "
            f"(max relative difference {payload['headline']['max_mi_rel_diff_gram_vs_materialised']:.1e}, "
            "`max_mi_rel_diff_gram_vs_materialised` in the JSON headline: both sum their products in float64, "
            "but their float32 per-sample gradients come from different operation orders). The wall column "
            "counts waiting for a shared core; CPU ms is the figure to compare. LoRA models are at the start of "
            "fine-tuning (B = 0, seeded A).",
        ]
    )


def _headline(payload: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"benchmark": NAME, "quick": payload["quick"], "smoke": payload["smoke"]}
    for r in payload["steps"]:
        key = f"{r['model']}/{r['tuning']}/{r['mode']}"
        out[f"step_ms/{key}"] = round(r["step_ms"], 1)
        out[f"step_mib/{key}"] = None if r["peak_extra_mib"] is None else round(r["peak_extra_mib"], 1)
    for r in payload["readings"]:
        key = f"{r['model']}/{r['tuning']}/{r['path']}"
        out[f"reading_ms/{key}"] = round(r["reading_ms"], 1)
        out[f"reading_mib/{key}"] = None if r["peak_extra_mib"] is None else round(r["peak_extra_mib"], 1)
    by_key = {(r["model"], r["tuning"], r["path"]): r["mi"] for r in payload["readings"]}
    out["max_mi_rel_diff_gram_vs_materialised"] = max(
        abs(by_key[(m, t, "gram")] - mi) / max(abs(mi), 1e-12)
        for (m, t, path), mi in by_key.items()
        if path == "materialised"
    )
    return out


def _previous(path: Path, args, models: list[str]) -> dict[str, Any]:
    """The committed results a ``--part`` run keeps the other part of.

    Raises:
        SystemExit: no readable results of the same mode, models, batch and N at ``path``.
    """
    if args.part == "all":
        return {}
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        old = {}
    cfg = old.get("config", {})
    same = (
        bool(old.get("quick")) == args.quick
        and bool(old.get("smoke")) == args.smoke
        and cfg.get("models") == models
        and (cfg.get("batch"), cfg.get("n_audit")) == (args.batch, args.n_audit)
    )
    if not same:
        raise SystemExit(f"--part {args.part}: no results of this mode and configuration in {path} to keep")
    return old


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = _common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=None, help="training batch (default 64; --quick 32)")
    parser.add_argument("--n-audit", type=int, default=None, help="audit examples (default 64; --quick 32)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (default 5; --quick 2)")
    parser.add_argument(
        "--part",
        choices=("all", "steps", "readings"),
        default="all",
        help="run only the DP-SGD steps or only the monitor readings; the other part comes from the JSON "
        "already in --out-dir (same mode, same models), its command recorded",
    )
    args = _common.parse_args(parser, argv)
    if args.worker is not None:
        worker_main(json.loads(args.worker))
        return {}
    _common.setup_torch(args.threads)
    started = time.time()
    args.batch = args.batch or (4 if args.smoke else 32 if args.quick else 64)
    args.n_audit = args.n_audit or (4 if args.smoke else 32 if args.quick else 64)
    args.repeats = args.repeats or (1 if args.smoke else 2 if args.quick else 5)
    models = ["vit-tiny"] if args.quick or args.smoke else ["vit-tiny", "vit-small"]
    step_specs, reading_specs = _specs(args, models)
    run = _run_in_process if args.smoke else _run_worker  # smoke: the plumbing only, no fresh processes
    payload = {
        "benchmark": NAME,
        "quick": args.quick,
        "smoke": args.smoke,
        "command": _common.command_line(),
        "machine": _common.machine_description(),
        "config": {
            "batch": args.batch,
            "n_audit": args.n_audit,
            "repeats": args.repeats,
            "lora_rank": LORA_RANK,
            "models": models,
            "seed": args.seed,
        },
    }
    previous = _previous(Path(args.out_dir) / f"{NAME}.json", args, models)
    for part, specs in (("steps", step_specs), ("readings", reading_specs)):
        if args.part in ("all", part):
            payload[part] = [run(s) for s in specs]
        else:
            payload[part] = previous[part]
            payload.setdefault("kept", {})[part] = previous.get("kept", {}).get(part) or previous["command"]
    payload["headline"] = _headline(payload)
    payload["seconds"] = round(time.time() - started, 1)
    out_dir = Path(args.out_dir)
    _common.write_json(out_dir / f"{NAME}.json", payload)
    _common.write_markdown(out_dir / f"{NAME}.md", _report(payload, started))
    _common.print_summary(payload["headline"])
    return payload["headline"]


if __name__ == "__main__":
    main()
