"""Public pretraining + DP fine-tuning vs DP from scratch, at equal ε budgets (CIFAR-10).

The claim of the literature (e.g. Yu et al. 2022, De et al. 2022, Li et al. 2022): a model pretrained on public
data and fine-tuned with DP-SGD beats a model trained with DP-SGD from scratch at the same ε. Measured here on
CPU-sized models and runs:

1. **Public pretraining** (``adaptive_dp.training.pretrain.pretrain``): ``vit-tiny`` trained non-privately on a
   seeded public split of the CIFAR-10 training set (``--public-examples``); its test accuracy is the
   ``public_pretrain_accuracy`` column (what the public data alone gives).
2. For each ε budget (``--epsilons``, δ = 1e-5, a hard ``--target-epsilon``: the Rényi filter's guarantee) and
   the PID controller at the same MI ceiling (``--target-mi`` nats, likelihood-ratio monitor on the audit
   split), three DP-SGD runs through ``adaptive_dp.training.train`` on the same private examples (the training
   set minus the public split minus the audit split, optionally a seeded subset ``--private-examples``):

   - ``scratch``: ``small-cnn`` from random initialisation (the best CNN here on short runs), SGD + momentum,
     the same epochs as the fine-tuning runs; ``scratch5``: the same for 5 epochs (a stronger baseline);
   - ``lora``: ``vit-tiny`` from the public checkpoint, LoRA rank 8 on q/v projections + the head, Adam;
   - ``full``: ``vit-tiny`` from the public checkpoint, every parameter trained, Adam.

Every run (pretraining included) runs in a fresh subprocess, so its peak memory is the ``ru_maxrss`` of that
process (``resource.getrusage``: peak resident set of the whole run — interpreter, torch, the data set in
memory, training, monitor readings and evaluation). ``seconds_per_epoch`` is the training loop's own epoch time
(steps + monitor readings, without the test evaluation). The report also cites (does not rerun) the step time
and memory of opacus' grad-sample modes and the monitor reading's cost from
``benchmarks/results/finetune_speed.json``.

    python benchmarks/finetune.py --smoke --quick   # seconds, digits: the plumbing only
    python benchmarks/finetune.py --quick           # ≤ 3 min on 2 cores: CIFAR-10, 1 000 public / 1 024 private, ε = 3
    python benchmarks/finetune.py                   # full mode: 10 000 public, 10 000 private, ε = 1, 3, 8
    python benchmarks/finetune.py --methods scratch # only some runs; invocations of the same mode are merged

Writes ``benchmarks/results/finetune.{json,md}`` (after every finished run, so a partial run leaves its rows)
and prints one JSON object as the last stdout line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import _common
from _common import fmt, markdown_table

NAME = "finetune"
DELTA = 1e-5
METHODS = ("scratch", "scratch5", "lora", "full")
SCRATCH = ("scratch", "scratch5")
METHOD_LABELS = {
    "scratch": "DP from scratch (small-cnn), the same epochs as the fine-tuning runs",
    "scratch5": "DP from scratch (small-cnn), 5 epochs (a stronger baseline: more steps at the same ε)",
    "lora": "vit-tiny public ckpt + DP LoRA r=8 + head",
    "full": "vit-tiny public ckpt + DP full fine-tuning",
}
ACCURACY_KEYS = {
    "scratch": "scratch_accuracy",
    "scratch5": "scratch_5_epochs_accuracy",
    "lora": "lora_accuracy",
    "full": "full_finetune_accuracy",
}
LORA_RANK = 8
#: accuracy differences (points) under this are within the noise (±0.5 standard error per 10 000-image accuracy)
NOISE_POINTS = 1.5
LORA_TARGETS = "q_proj,v_proj"

#: per-method optimiser settings of the private runs (not tuned per ε: one setting per method)
METHOD_SETTINGS: dict[str, dict[str, Any]] = {
    "scratch": {"model": "small-cnn", "optimizer": "sgd", "lr": 0.25, "momentum": 0.9},
    "scratch5": {"model": "small-cnn", "optimizer": "sgd", "lr": 0.25, "momentum": 0.9, "epochs": 5},
    "lora": {"model": "vit-tiny", "optimizer": "adam", "lr": 1e-3, "lora_rank": LORA_RANK},
    "full": {"model": "vit-tiny", "optimizer": "adam", "lr": 2e-4, "lora_rank": 0},
}


@dataclasses.dataclass(frozen=True)
class Plan:
    """Sizes of one configuration (see the module docstring)."""

    dataset: str = "cifar10"
    epsilons: tuple[float, ...] = (1.0, 3.0, 8.0)
    target_mi: float = 0.5
    public_examples: int = 10000
    pretrain_epochs: int = 5
    pretrain_batch_size: int = 128
    pretrain_lr: float = 1e-3
    private_examples: int | None = None
    epochs: int = 1
    batch_size: int = 256
    monitor_every: int = 10
    audit_fraction: float = 0.02
    test_examples: int | None = None


#: the committed full run: sized to fit a shared 2-core machine (see the .md: the load average there)
FULL = Plan(pretrain_epochs=3, private_examples=10000)
QUICK = Plan(
    epsilons=(3.0,),
    public_examples=1000,
    pretrain_epochs=1,
    private_examples=1024,
    batch_size=128,
    test_examples=2000,
)
SMOKE = Plan(
    dataset="digits",
    epsilons=(3.0,),
    public_examples=300,
    pretrain_epochs=1,
    pretrain_batch_size=64,
    private_examples=256,
    batch_size=64,
    monitor_every=4,
)


# ---------------------------------------------------------------------------------------------- worker side
def _maxrss_mib() -> float:
    """Peak resident set size of this process so far (MiB; Linux reports ``ru_maxrss`` in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _base_indices(subset) -> list[int]:
    """Indices into the root data set of a (possibly nested) ``Subset``."""
    from torch.utils.data import Subset

    if not isinstance(subset, Subset):
        return list(range(len(subset)))
    inner = _base_indices(subset.dataset)
    return [inner[i] for i in subset.indices]


def _root(dataset):
    from torch.utils.data import Subset

    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return dataset


def _private_pool(full, config, *, public_examples: int, seed: int):
    """``(train indices, audit Subset)`` of a run without ``init``, exactly as ``train --init`` carves them
    (:func:`adaptive_dp.training.finetune.private_splits`): the public split leaves first, the audit split is
    carved from the rest, the remainder is the private training pool."""
    from torch.utils.data import Subset

    from adaptive_dp.data import audit_split
    from adaptive_dp.training.public_split import carve_public_split

    public = set(carve_public_split(len(full), public_examples, seed=seed))
    pool = [i for i in range(len(full)) if i not in public]
    train, audit = audit_split(Subset(full, pool), fraction=config.audit_fraction, seed=config.seed)
    return [pool[i] for i in train.indices], Subset(full, [pool[i] for i in audit.indices])


def _patch_private_set(spec: dict[str, Any]) -> None:
    """Make ``train`` train on the private set of ``spec``: the training set minus the public split minus the
    audit split — for the scratch runs too, so every method trains on the same private examples and is
    monitored on the same audit split — optionally a seeded subset of it (``private_examples``)."""
    import torch
    from torch.utils.data import Subset

    from adaptive_dp.training import loop

    original = getattr(loop, "_finetune_original_load_data", loop.load_data)
    loop._finetune_original_load_data = original  # in-process (--smoke) runs patch it once per run

    def load_data(config):
        data = original(config)
        full = _root(data.train_set)
        if config.init:  # train --init removed the public split and carved the audit split already
            train, audit = _base_indices(data.train_set), data.audit_set
        else:
            train, audit = _private_pool(
                full, config, public_examples=spec["public_examples"], seed=spec["seed"]
            )
        n = spec.get("private_examples")
        if n is not None and n < len(train):
            perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(spec["seed"] + 17))
            train = sorted(train[i] for i in perm[:n].tolist())
        test = data.test_set
        if spec.get("test_examples") and spec["test_examples"] < len(test):
            perm = torch.randperm(len(test), generator=torch.Generator().manual_seed(spec["seed"] + 29))
            test = Subset(test, sorted(perm[: spec["test_examples"]].tolist()))
        return dataclasses.replace(data, train_set=Subset(full, train), audit_set=audit, test_set=test)

    loop.load_data = load_data


def _pretrain_worker(spec: dict[str, Any]) -> dict[str, Any]:
    from adaptive_dp.training.pretrain import PretrainConfig, pretrain

    config = PretrainConfig(
        dataset=spec["dataset"],
        model="vit-tiny",
        public_examples=spec["public_examples"],
        epochs=spec["pretrain_epochs"],
        batch_size=spec["pretrain_batch_size"],
        lr=spec["pretrain_lr"],
        optimizer="adam",
        seed=spec["seed"],
        data_dir=spec["data_dir"],
        out=spec["out"],
    )
    started = time.perf_counter()
    result = pretrain(config, progress=spec.get("progress", False), overwrite=True)
    return {
        "test_accuracy": result["test_accuracy"],
        "public_examples": result.get("public_examples", spec["public_examples"]),
        "checkpoint": str(result["checkpoint"]),
        "seconds": float(result.get("seconds", time.perf_counter() - started)),
        "peak_memory_mib": _maxrss_mib(),
    }


def _train_worker(spec: dict[str, Any]) -> dict[str, Any]:
    from adaptive_dp.training import TrainConfig, train

    _patch_private_set(spec)
    settings = METHOD_SETTINGS[spec["method"]]
    options: dict[str, Any] = {
        "dataset": spec["dataset"],
        "data_dir": spec["data_dir"],
        "model": settings["model"],
        "epochs": settings.get("epochs", spec["epochs"]),
        "batch_size": spec["batch_size"],
        "lr": settings["lr"],
        "optimizer": settings["optimizer"],
        "momentum": settings.get("momentum", 0.0),
        "target_epsilon": spec["epsilon"],
        "delta": DELTA,
        "target_mi": spec["target_mi"],
        "controller": "pid",
        "audit_fraction": spec["audit_fraction"],
        "monitor_every": spec["monitor_every"],
        "seed": spec["seed"],
        "device": "cpu",
        "wandb_mode": "disabled",
        "out": spec["out"],
    }
    if spec["method"] not in SCRATCH:
        options.update(init=spec["checkpoint"], lora_rank=settings["lora_rank"], lora_targets=LORA_TARGETS)
    load_before, cpu_before = os.getloadavg()[0], time.process_time()
    summary = train(TrainConfig(**options), progress=spec.get("progress", False), overwrite=True)
    cpu_seconds = time.process_time() - cpu_before
    times = summary.get("epoch_times_s") or []
    return {
        "test_accuracy": summary["test_accuracy"],
        "guarantee_epsilon": summary["guarantee_epsilon"],
        "odometer_epsilon": summary["odometer_epsilon"],
        "sigma_range": summary["noise_multiplier_range"],
        "initial_sigma": summary["initial_noise_multiplier"],
        "mean_mi": summary["mean_mi"],
        "max_mi": summary["max_mi"],
        "fraction_over_ceiling": summary["fraction_over_ceiling"],
        "mi_readings": summary["mi_readings"],
        "steps": summary["steps"],
        "stopped_early": summary["stopped_early"],
        "stop_reason": summary["stop_reason"],
        "sample_rate": summary["sample_rate"],
        "seconds_per_epoch": sum(times) / len(times) if times else None,
        "wall_time_s": summary["wall_time_s"],
        "grad_sample_mode": summary["grad_sample_mode"],
        "sizes": {k: summary["dataset"].get(k) for k in ("train_size", "audit_size", "test_size")},
        "audit_examples_read": summary["audit_examples_read"],
        "settings": {k: v for k, v in settings.items()},
        "load_average_1min": [load_before, os.getloadavg()[0]],
        "cpu_seconds": cpu_seconds,
        "peak_memory_mib": _maxrss_mib(),
    }


def worker_main(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one job (pretraining or one private run); returns its result (printed as the last line)."""
    _common.setup_torch(spec["threads"])
    started = time.perf_counter()
    result = _pretrain_worker(spec) if spec["kind"] == "pretrain" else _train_worker(spec)
    return {**spec, **result, "process_seconds": time.perf_counter() - started}


# ---------------------------------------------------------------------------------------------- main side
def _run_subprocess(spec: dict[str, Any], log: Path) -> dict[str, Any]:
    """One job in a fresh process (same niceness as this one); its stderr goes to ``log``; returns its last
    stdout line (a JSON object)."""
    command = [sys.executable, __file__, "--worker", json.dumps(spec)]
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"]), "WANDB_MODE": "disabled"}
    with open(log, "w", encoding="utf-8") as handle:
        proc = subprocess.run(command, stdout=subprocess.PIPE, stderr=handle, text=True, env=env, check=False)
    handle_text = proc.stdout
    Path(str(log) + ".stdout").write_text(handle_text, encoding="utf-8")
    if proc.returncode != 0:
        tail = log.read_text(encoding="utf-8")[-3000:]
        raise RuntimeError(f"job {spec['kind']}/{spec.get('method')}/{spec.get('epsilon')} failed:\n{tail}")
    return json.loads(handle_text.strip().splitlines()[-1])


def _key(result: dict[str, Any]) -> str:
    return "pretrain" if result["kind"] == "pretrain" else f"{result['method']}@{fmt(result['epsilon'])}"


def _load_previous(path: Path, *, quick: bool, smoke: bool) -> dict[str, dict]:
    if not path.exists():
        return {}
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if old.get("quick") != quick or bool(old.get("smoke")) != smoke:
        return {}
    return dict(old.get("runs", {}))


def rows(runs: dict[str, dict], epsilons: list[float]) -> list[dict[str, Any]]:
    """One row per ε: the accuracy of every method and, per private method, the leakage, time and memory."""
    pretrain = runs.get("pretrain", {})
    out = []
    for eps in epsilons:
        row: dict[str, Any] = {"epsilon": eps}
        per: dict[str, dict] = {m: runs.get(f"{m}@{fmt(eps)}") or {} for m in METHODS}
        for method in METHODS:
            row[ACCURACY_KEYS[method]] = per[method].get("test_accuracy")
        row["public_pretrain_accuracy"] = pretrain.get("test_accuracy")
        for field in ("mean_mi", "max_mi", "fraction_over_ceiling", "seconds_per_epoch", "peak_memory_mib"):
            row[field] = {m: per[m].get(field) for m in METHODS}
        out.append(row)
    return out


def verdict(table: list[dict[str, Any]]) -> dict[str, Any]:
    """Per ε: does the best public-pretrained DP method beat DP from scratch (and the public model alone)?"""
    out = {}
    for row in table:
        fine = [row[k] for k in ("lora_accuracy", "full_finetune_accuracy") if row.get(k) is not None]
        scratch, public = row.get("scratch_accuracy"), row.get("public_pretrain_accuracy")
        if not fine or scratch is None:
            continue
        best = max(fine)
        scratch_runs = [
            row[k] for k in ("scratch_accuracy", "scratch_5_epochs_accuracy") if row.get(k) is not None
        ]
        out[fmt(row["epsilon"])] = {
            "best_finetune_accuracy": best,
            "scratch_accuracy": scratch,
            "best_scratch_accuracy": max(scratch_runs),
            "finetune_minus_scratch": best - scratch,
            "finetune_minus_best_scratch": best - max(scratch_runs),
            "finetune_beats_scratch": best > scratch,
            "finetune_beats_best_scratch": best > max(scratch_runs),
            "finetune_minus_public_only": None if public is None else best - public,
        }
    return out


def _speed_citation() -> dict[str, Any] | None:
    """The step and monitor-reading figures of ``benchmarks/results/finetune_speed.json`` (not rerun here)."""
    path = _common.RESULTS_DIR / "finetune_speed.json"
    if not path.exists():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    return {
        "source": "benchmarks/results/finetune_speed.json",
        "command": data.get("command"),
        "config": data.get("config"),
        "steps": [
            {k: r.get(k) for k in ("model", "tuning", "mode", "step_ms", "step_cpu_ms", "peak_extra_mib")}
            for r in data.get("steps", [])
        ],
        "readings": [
            {
                k: r.get(k)
                for k in ("model", "tuning", "path", "reading_ms", "reading_cpu_ms", "peak_extra_mib")
            }
            for r in data.get("readings", [])
        ],
    }


def _speed_section(speed: dict[str, Any] | None) -> list[str]:
    if not speed:
        return [
            "(benchmarks/results/finetune_speed.json not found: run `python benchmarks/finetune_speed.py`)"
        ]
    steps = {(r["model"], r["tuning"], r["mode"]): r for r in speed["steps"]}
    reads = {(r["model"], r["tuning"], r["path"]): r for r in speed["readings"]}
    table = []
    for model, tuning in sorted({(m, t) for m, t, _ in steps}, key=lambda k: (k[0] != "vit-tiny", k[1])):
        row: list[Any] = [model, tuning]
        for mode in ("hooks", "functorch", "ghost"):
            r = steps.get((model, tuning, mode), {})
            row.append(f"{fmt(r.get('step_ms'))} ms / {fmt(r.get('peak_extra_mib'))} MiB")
        hooks = steps.get((model, tuning, "hooks"), {}).get("step_ms")
        for path in ("materialised", "gram"):
            r = reads.get((model, tuning, path), {})
            share = r["reading_ms"] / hooks if hooks and r.get("reading_ms") else None
            row.append(
                f"{fmt(r.get('reading_ms'))} ms / {fmt(r.get('peak_extra_mib'))} MiB ({fmt(share, 2)}× a step)"
            )
        table.append(row)
    cfg = speed.get("config") or {}
    header = [
        "model",
        "tuning",
        "hooks step",
        "functorch step",
        "ghost step",
        "monitor reading (materialised)",
        "monitor reading (Gram path)",
    ]
    return [
        f"Cited from `{speed['source']}` (command `{speed.get('command')}`, not rerun here): one DP-SGD step at "
        f"batch {cfg.get('batch')} (median wall ms / peak extra resident MiB of that step) per opacus "
        f"grad-sample mode, and one likelihood-ratio monitor reading on N = {cfg.get('n_audit')} audit examples "
        "(wall ms / peak extra MiB, and its cost in hooks steps; with the monitor every 10 steps, a reading adds "
        "a tenth of that per step).",
        "",
        markdown_table(header, table),
    ]


def _run_table(runs: dict[str, dict], epsilons: list[float]) -> str:
    header = [
        "ε budget",
        "method",
        "test acc",
        "guarantee ε",
        "odometer ε",
        "σ range",
        "steps",
        "mean MI",
        "max MI",
        "frac > ceiling",
        "s / epoch",
        "run CPU s",
        "peak MiB",
        "private / audit / test",
    ]
    table = []
    for eps in epsilons:
        for method in METHODS:
            r = runs.get(f"{method}@{fmt(eps)}")
            if not r:
                table.append([eps, method, *["not run"] + [None] * 11])
                continue
            sizes = r.get("sizes") or {}
            lo, hi = r.get("sigma_range") or (None, None)
            table.append(
                [
                    eps,
                    method,
                    r["test_accuracy"],
                    r["guarantee_epsilon"],
                    r["odometer_epsilon"],
                    f"{fmt(lo)}–{fmt(hi)}",
                    r["steps"],
                    r["mean_mi"],
                    r["max_mi"],
                    r["fraction_over_ceiling"],
                    r["seconds_per_epoch"],
                    r.get("cpu_seconds"),
                    r["peak_memory_mib"],
                    f"{sizes.get('train_size')} / {sizes.get('audit_size')} / {sizes.get('test_size')}",
                ]
            )
    return markdown_table(header, table)


def _verdict_text(payload: dict[str, Any]) -> list[str]:
    v = payload["verdict"]
    if not v:
        return ["No ε has both a scratch and a fine-tuning row yet: no verdict."]
    lines = []
    for eps, d in v.items():
        gap = d["finetune_minus_scratch"]
        lines.append(
            f"- ε = {eps}: best public-pretrained DP fine-tuning {d['best_finetune_accuracy']:.3f} vs DP from "
            f"scratch at the same epochs {d['scratch_accuracy']:.3f} ({100 * gap:+.1f} points), vs the best "
            f"scratch run {d['best_scratch_accuracy']:.3f} ({100 * d['finetune_minus_best_scratch']:+.1f} points)"
            + (
                ""
                if d["finetune_minus_public_only"] is None
                else f"; vs the public checkpoint alone {100 * d['finetune_minus_public_only']:+.1f} points"
            )
        )
    lines += _observations(payload)
    wins = sum(d["finetune_beats_scratch"] for d in v.values())
    best_wins = sum(d["finetune_beats_best_scratch"] for d in v.values())
    clear = sum(d["finetune_minus_best_scratch"] > NOISE_POINTS / 100 for d in v.values())
    lost = sum(d["finetune_minus_best_scratch"] < -NOISE_POINTS / 100 for d in v.values())
    lines.append(
        f"- **Verdict: fine-tuning beats DP from scratch at the same epochs at {wins} of {len(v)} budgets, and the "
        f"best scratch run at {best_wins} of {len(v)} (clearly, by more than {NOISE_POINTS:g} points, at {clear}; "
        f"clearly behind at {lost}).** "
        + (
            "The claim holds here."
            if clear == len(v)
            else "The claim holds here only against a from-scratch baseline given the same (short) training; a "
            "from-scratch CNN trained longer at the same ε matches or beats the pretrained ViT."
        )
    )
    return lines


def _observations(payload: dict[str, Any]) -> list[str]:
    """What the runs say beyond the accuracies: whether the budget or the ceiling set σ, and the CPU cost."""
    runs = [r for k, r in payload["runs"].items() if k != "pretrain" and r.get("epsilon") is not None]
    ceiling_bound = [r for r in runs if r["epsilon"] > 1.0 and r.get("odometer_epsilon") is not None]
    lines = []
    if ceiling_bound:
        sig = [x for r in ceiling_bound for x in (r.get("sigma_range") or [])]
        share = [r["odometer_epsilon"] / r["epsilon"] for r in ceiling_bound]
        lines.append(
            f"- At ε > 1 the MI ceiling, not the budget, set σ: the PID kept σ at {min(sig):.2f}–{max(sig):.2f} and "
            f"the runs spent {min(share):.0%}–{max(share):.0%} of their ε (odometer / budget), which is why the "
            "accuracies barely change between ε = 3 and 8."
        )
    cpu = {m: [r["cpu_seconds"] for r in runs if r["method"] == m and r.get("cpu_seconds")] for m in METHODS}
    if all(cpu[m] for m in ("scratch5", "lora", "full")):
        mean = {m: sum(v) / len(v) for m, v in cpu.items() if v}
        lines.append(
            "- CPU cost per run (whole `train` call): "
            + ", ".join(f"{m} {mean[m]:.0f} s" for m in METHODS if m in mean)
            + "; the public pretraining adds "
            + f"{fmt((payload['runs'].get('pretrain') or {}).get('seconds'))} s wall once."
        )
    return lines


def markdown(payload: dict[str, Any], *, started: float) -> str:
    plan = payload["plan"]
    runs = payload["runs"]
    pre = runs.get("pretrain") or {}
    commands = sorted({r.get("command") for r in runs.values() if r.get("command")})
    loads = [x for r in runs.values() for x in (r.get("load_average_1min") or [])]
    extra = {
        "Commands of the merged invocations": "; ".join(f"`{c}`" for c in commands) or "–",
        "Torch threads": f"{payload['threads']} per run (each run in its own subprocess; `--jobs` runs at a "
        "time, see the commands)",
        "Load average (1 min) at the start/end of the runs": (
            f"{min(loads):.2f}–{max(loads):.2f} (2 cores shared with other jobs)" if loads else "–"
        ),
        "Runs' wall time": f"{sum(float(r.get('wall_seconds') or 0) for r in runs.values()):.0f} s summed over "
        f"{len(runs)} runs (some ran in parallel)",
        **(
            {"Report": "rebuilt from the JSON (no run in this invocation; the run commands are listed above)"}
            if payload.get("rebuilt")
            else {}
        ),
        "Peak memory": "`resource.getrusage(RUSAGE_SELF).ru_maxrss` of the fresh subprocess of each run (peak "
        "resident set of the whole run: interpreter, torch, the data set, training, monitor, evaluation)",
    }
    sizes = next((r.get("sizes") for r in runs.values() if r.get("sizes")), {}) or {}
    steps = {m: next((r["steps"] for k, r in runs.items() if k.startswith(m + "@")), None) for m in METHODS}
    lines = [
        f"# Public pretraining + DP fine-tuning vs DP from scratch{' (QUICK MODE)' if payload['quick'] else ''}",
        "",
        _common.provenance_block(
            quick=payload["quick"], smoke=payload["smoke"], started=started, extra=extra
        ),
        "",
        "## Setting",
        "",
        f"- Data: {plan['dataset']} training set ({sizes.get('test_size')} test images for every private run's "
        "accuracy"
        + (
            "; a seeded subset — the public checkpoint's is on the whole test set"
            if plan.get("test_examples")
            else ""
        )
        + "). "
        f"Public split: {plan['public_examples']} examples (seeded, seed {payload['seed']}), never in the "
        f"private set. Audit split: {plan['audit_fraction']:g} of the training set (the monitor reads "
        "256 of them), never trained on privately. Private set: the rest"
        + (f", a seeded subset of {plan['private_examples']}" if plan["private_examples"] else "")
        + f" ({sizes.get('train_size')} examples), the same for every method.",
        f"- Public pretraining: vit-tiny, Adam lr {pre.get('pretrain_lr', plan['pretrain_lr']):g}, batch "
        f"{pre.get('pretrain_batch_size', plan['pretrain_batch_size'])}, "
        f"{pre.get('pretrain_epochs', plan['pretrain_epochs'])} epochs on the {pre.get('public_examples')} "
        f"public examples, non-private: test accuracy {fmt(pre.get('test_accuracy'))} in "
        f"{fmt(pre.get('seconds'))} s, peak {fmt(pre.get('peak_memory_mib'))} MiB.",
        f"- Private runs (`adaptive_dp.training.train`): DP-SGD, Poisson sampling at expected batch "
        f"{plan['batch_size']}, {plan['epochs']} epoch(s) (steps: "
        + ", ".join(f"{m} {steps[m]}" for m in METHODS if steps[m] is not None)
        + f"), C = 1, δ = {DELTA:g}, hard budget `--target-epsilon` ε (Rényi filter) and the PID at the MI "
        f"ceiling `--target-mi {plan['target_mi']:g}` nats (likelihood-ratio monitor every "
        f"{plan['monitor_every']} steps).",
        "- Methods: "
        + "; ".join(
            f"**{m}** = {METHOD_LABELS[m]} ({', '.join(f'{k} {v}' for k, v in METHOD_SETTINGS[m].items())})"
            for m in METHODS
        )
        + ". One optimiser setting per method, not tuned per ε.",
        "",
        "## Accuracy at equal ε",
        "",
        markdown_table(
            [
                "ε (δ = 1e-5)",
                "DP from scratch (small-cnn)",
                "DP from scratch, 5 epochs",
                "DP LoRA (vit-tiny, public ckpt)",
                "DP full fine-tuning (vit-tiny, public ckpt)",
                "public checkpoint alone (no private data)",
            ],
            [
                [
                    r["epsilon"],
                    r["scratch_accuracy"],
                    r["scratch_5_epochs_accuracy"],
                    r["lora_accuracy"],
                    r["full_finetune_accuracy"],
                    r["public_pretrain_accuracy"],
                ]
                for r in payload["rows"]
            ],
        ),
        "",
        "## Every private run",
        "",
        _run_table(runs, plan["epsilons"]),
        "",
        "MI in nats per audit example (likelihood-ratio estimate, capped at log 256 = 5.55); 'frac > ceiling' = "
        f"share of readings over {plan['target_mi']:g} nats. s / epoch = the training loop's epoch time (steps "
        "and monitor readings; the test evaluation excluded), wall-clock on a shared machine, so it varies with the "
        "load (see the load average above); run CPU s = CPU seconds of the whole `train` call (set-up, epochs, "
        "evaluation, outputs), the steadier figure.",
        "",
        "## Verdict",
        "",
        *_verdict_text(payload),
        "",
        *payload.get("discussion", []),
        "",
        LR_NOTE if not (payload["quick"] or payload["smoke"]) else "",
        "",
        "## Speed and memory of DP fine-tuning (cited)",
        "",
        *_speed_section(payload.get("speed")),
    ]
    return "\n".join(lines)


DISCUSSION = [
    "Caveats: CPU-sized models and runs — vit-tiny (0.54 M parameters) pretrained for a few epochs on "
    "10 000 images of the *same* distribution (a public split of CIFAR-10 itself, not ImageNet-scale "
    "pretraining), one or two private epochs, one seed, one optimiser setting per method (no per-ε tuning), "
    "and the PID holding the MI ceiling, which can add noise above the budget's even share. Test accuracies "
    "on 10 000 images have a standard error of about ±0.5 points; differences under ~1.5 points are noise.",
]


#: how the fine-tuning learning rates were chosen (a check outside this script, before the full run)
LR_NOTE = (
    "Learning rates of the fine-tuning runs: Adam lr 1e-3 for LoRA + head (the usual DP-LoRA setting) and 2e-4 "
    "for full fine-tuning; not tuned. A short check before the full run (a 3-epoch public checkpoint, uniform "
    "σ = 1, 40 steps) scored on the first 2 000 test images, which in this copy of CIFAR-10 are only classes "
    "0–1 (the test set is ordered by class), so it could not rank learning rates and was discarded. Tuning them "
    "(and the batch size: larger batches cut the noise per step at a σ the ceiling fixes) is the first thing "
    "to try with more compute."
)


def _headline(payload: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"benchmark": NAME, "quick": payload["quick"], "smoke": payload["smoke"]}
    for row in payload["rows"]:
        eps = fmt(row["epsilon"])
        for key in ACCURACY_KEYS.values():
            out[f"{key}/eps{eps}"] = row[key]
    out["public_pretrain_accuracy"] = (payload["runs"].get("pretrain") or {}).get("test_accuracy")
    out["finetune_beats_scratch"] = {
        eps: d["finetune_beats_scratch"] for eps, d in payload["verdict"].items()
    }
    out["finetune_beats_best_scratch"] = {
        eps: d["finetune_beats_best_scratch"] for eps, d in payload["verdict"].items()
    }
    return out


def _jobs(args, plan: Plan, work: Path, methods: list[str]) -> tuple[dict | None, list[dict]]:
    base = {
        "threads": args.threads,
        "seed": args.seed,
        "dataset": plan.dataset,
        "data_dir": str(_common.data_root(args.data_dir)) if plan.dataset != "digits" else None,
        "public_examples": plan.public_examples,
        "progress": not args.smoke,
        "command": _common.command_line(),
    }
    pretrain = None
    if "pretrain" in methods:
        pretrain = {
            **base,
            "kind": "pretrain",
            "pretrain_epochs": plan.pretrain_epochs,
            "pretrain_batch_size": plan.pretrain_batch_size,
            "pretrain_lr": plan.pretrain_lr,
            "out": str(work / "pretrain"),
        }
    runs = []
    order = sorted(plan.epsilons, reverse=True)  # the most informative budget (largest ε) first
    for eps in order:
        for method in ("scratch", "full", "lora", "scratch5"):
            if method not in methods:
                continue
            runs.append(
                {
                    **base,
                    "kind": "train",
                    "method": method,
                    "epsilon": eps,
                    "target_mi": plan.target_mi,
                    "private_examples": plan.private_examples,
                    "epochs": plan.epochs,
                    "batch_size": plan.batch_size,
                    "monitor_every": plan.monitor_every,
                    "audit_fraction": plan.audit_fraction,
                    "test_examples": plan.test_examples,
                    "checkpoint": None,
                    "out": str(work / f"{method}-eps{fmt(eps)}"),
                }
            )
    return pretrain, runs


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = _common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument(
        "--methods",
        default=None,
        help="comma-separated jobs to run: pretrain, scratch, scratch5, lora, full (default all; --smoke: all but "
        "scratch5; '' runs nothing and rebuilds the report); results of earlier "
        "invocations of the same mode are merged",
    )
    parser.add_argument(
        "--epsilons", default=None, help="comma-separated ε budgets (default 1,3,8; --quick 3)"
    )
    parser.add_argument("--target-mi", type=float, default=None, help="PID ceiling, nats (default 0.5)")
    parser.add_argument("--public-examples", type=int, default=None, help="public split (default 10000)")
    parser.add_argument(
        "--pretrain-epochs", type=int, default=None, help="public pretraining epochs (default 3)"
    )
    parser.add_argument(
        "--private-examples",
        type=int,
        default=None,
        help="seeded subset of the private set (default 10000; --quick 1024)",
    )
    parser.add_argument("--epochs", type=int, default=None, help="private epochs (default 1)")
    parser.add_argument("--batch-size", type=int, default=None, help="expected private batch (default 256)")
    parser.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="runs at a time, each in its own process (default 2; --smoke 1)",
    )
    parser.add_argument(
        "--merge-from",
        action="append",
        help="also merge the runs of this finetune.json (e.g. of an invocation with another --out-dir); its "
        "runs replace those of the same key in the results folder's file, this invocation's replace both",
    )
    parser.add_argument(
        "--work-dir", default=None, help="run folders and the public checkpoint (default runs/finetune-bench)"
    )
    args = _common.parse_args(parser, argv)
    if args.worker is not None:
        result = worker_main(json.loads(args.worker))
        _common.print_summary(result)
        return result
    _common.setup_torch(args.threads)
    started = time.time()
    plan = SMOKE if args.smoke else QUICK if args.quick else FULL
    overrides = {
        "epsilons": tuple(float(e) for e in args.epsilons.split(",")) if args.epsilons else None,
        "target_mi": args.target_mi,
        "public_examples": args.public_examples,
        "pretrain_epochs": args.pretrain_epochs,
        "private_examples": args.private_examples,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
    }
    plan = dataclasses.replace(plan, **{k: v for k, v in overrides.items() if v is not None})
    default_methods = "pretrain,scratch,lora,full" if args.smoke else "pretrain,scratch,scratch5,lora,full"
    methods = [
        m.strip() for m in (default_methods if args.methods is None else args.methods).split(",") if m.strip()
    ]
    args.jobs = args.jobs or (1 if args.smoke else 2)
    unknown = set(methods) - {"pretrain", *METHODS}
    if unknown:
        parser.error(f"unknown --methods {sorted(unknown)}; choose from pretrain, {', '.join(METHODS)}")
    out_dir = Path(args.out_dir)
    work = Path(
        args.work_dir
        or (
            tempfile.mkdtemp(prefix="finetune-", dir=out_dir)
            if args.smoke
            else _common.REPO_ROOT / "runs" / ("finetune-bench-quick" if args.quick else "finetune-bench")
        )
    )
    work.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"{NAME}.json"
    merged_from: dict[str, dict] = {}
    for path in args.merge_from or []:
        merged_from.update(_load_previous(Path(path), quick=args.quick, smoke=args.smoke))
    mine: dict[str, dict] = {}
    runs = {**_load_previous(json_path, quick=args.quick, smoke=args.smoke), **merged_from}
    speed = _speed_citation()
    payload: dict[str, Any] = {}
    failed: dict[str, str] = {}

    def record(result: dict[str, Any]) -> None:
        mine[_key(result)] = result
        # re-read the file: another invocation of the same mode may have written runs since this one started
        runs.update({**_load_previous(json_path, quick=args.quick, smoke=args.smoke), **merged_from, **mine})
        table = rows(runs, list(plan.epsilons))
        payload.update(
            {
                "benchmark": NAME,
                "quick": args.quick,
                "smoke": args.smoke,
                "seed": args.seed,
                "jobs": args.jobs,
                "threads": args.threads,
                "failed": failed,
                "rebuilt": not mine,
                "command": _common.command_line(),
                "machine": _common.machine_description(),
                "plan": dataclasses.asdict(plan),
                "method_settings": METHOD_SETTINGS,
                "rows": table,
                "verdict": verdict(table),
                "discussion": DISCUSSION,
                "runs": runs,
                "speed": speed,
            }
        )
        _common.write_json(json_path, payload)
        _common.write_markdown(out_dir / f"{NAME}.md", markdown(payload, started=started))

    def run(spec: dict[str, Any]) -> dict[str, Any]:
        t0 = time.time()
        if args.smoke:  # the plumbing only: in this process
            _common.setup_torch(args.threads)
            result = worker_main(spec)
        else:
            log = work / f"{_key(spec) if spec['kind'] == 'train' else 'pretrain'}.log"
            result = _run_subprocess(spec, log)
        result["wall_seconds"] = time.time() - t0
        print(
            f"{_key(result)}: test accuracy {fmt(result.get('test_accuracy'))}, "
            f"{fmt(result.get('seconds_per_epoch') or result.get('seconds'))} s, "
            f"peak {fmt(result.get('peak_memory_mib'))} MiB, wall {result['wall_seconds']:.0f} s",
            flush=True,
        )
        return result

    pretrain_spec, train_specs = _jobs(args, plan, work, methods)
    needs_ckpt = [s for s in train_specs if s["method"] not in SCRATCH]
    scratch = [s for s in train_specs if s["method"] in SCRATCH]
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        pretrain_future = pool.submit(run, pretrain_spec) if pretrain_spec is not None else None  # first
        scratch_futures = [pool.submit(run, s) for s in scratch]  # no checkpoint needed: start at once
        if pretrain_future is not None:
            try:
                record(pretrain_future.result())
            except RuntimeError as exc:
                failed["pretrain"] = str(exc)[-2000:]
                print(f"FAILED pretrain: {str(exc)[-2000:]}", file=sys.stderr, flush=True)
        checkpoint = (runs.get("pretrain") or {}).get("checkpoint")
        if needs_ckpt and not (checkpoint and Path(checkpoint).exists()):
            for future in as_completed(scratch_futures):
                record(future.result())
            raise SystemExit(
                "lora/full need the public checkpoint: add pretrain to --methods (or keep the work dir of a "
                f"run that did; looked for {checkpoint})"
            )
        futures = {pool.submit(run, {**s, "checkpoint": checkpoint}): s for s in needs_ckpt}
        futures.update(zip(scratch_futures, scratch))
        for future in as_completed(futures):
            try:
                record(future.result())
            except RuntimeError as exc:  # one failed run does not lose the others
                failed[_key(futures[future])] = str(exc)[-2000:]
                print(f"FAILED {_key(futures[future])}: {str(exc)[-2000:]}", file=sys.stderr, flush=True)
    if not payload and runs:  # nothing ran: rebuild the report from the JSON
        record(dict(next(iter(runs.values()))))
        payload["rebuilt"] = True
        _common.write_json(json_path, payload)
        _common.write_markdown(out_dir / f"{NAME}.md", markdown(payload, started=started))
    headline = (
        _headline(payload) if payload else {"benchmark": NAME, "quick": args.quick, "smoke": args.smoke}
    )
    headline["seconds"] = round(time.time() - started, 1)
    _common.print_summary(headline)
    return headline


if __name__ == "__main__":
    main()
