"""Cost of the leakage monitor, and the MI(σ) curve of each estimator.

Three measurements:

1. **Milliseconds per monitor call** (``LeakageMonitor.read``) for each estimator — the likelihood-ratio
   critic and the privacy-token estimator (``token-mine``) with each token encoder — beside one opacus
   DP-SGD training step, on the CIFAR-10 CNN (``tanh-cnn``, Papernot et al. 2021) and ResNet-20 (GroupNorm),
   CIFAR-10 (JPEG) shapes, 64 audit examples, one step on a batch of 256 training examples.
2. **Peak extra memory of tokenising** ResNet-20's per-sample gradients for a batch of 64 (target < 1 GiB):
   the process's peak resident memory (``VmHWM``, reset through ``/proc/self/clear_refs``) minus its
   resident memory just before the call, with the gradients already in memory.
3. **MI(σ) curves** per estimator over a log grid of σ (nats; InfoNCE, capped at log N), and the σ at which
   each curve reaches the floor (first σ with MI < 0.05 nats): the tanh CNN at initialisation on CIFAR-10
   audit images (the DESIGN.md calibration setting) and the small tanh CNN trained 300 SGD steps on the 8×8
   digits (the tests' setting, most per-example gradients below C).

    python benchmarks/monitor_cost.py --quick      # ≤ 3 min on 2 cores
    python benchmarks/monitor_cost.py              # full: more repeats, N = 256 on the curves
    python benchmarks/monitor_cost.py --smoke      # seconds: tanh-cnn, two estimators (the plumbing only)

Writes ``benchmarks/results/monitor_cost.{json,md}``; the last stdout line is one JSON object.
"""

from __future__ import annotations

import json
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

import _common
from _common import fmt, markdown_table

NAME = "monitor_cost"
MAX_GRAD_NORM = 1.0
FLOOR = 0.05
CONFIGS = [
    ("likelihood-ratio", None),
    ("token-mine", "projection"),
    ("token-mine", "span"),
    ("token-mine", "autoencoder"),
    ("token-mine", "transformer"),
]
ENCODERS = ("projection", "span", "autoencoder", "transformer")


def _label(estimator: str, encoder: str | None) -> str:
    return estimator if encoder is None else f"{estimator}/{encoder}"


def _cifar(seed: int, data_dir: str | None) -> tuple[Any, Any, str]:
    """(audit 64+, training 256) tensors of CIFAR-10 (JPEG) test images, or random ones if it is missing."""
    import torch

    from adaptive_dp.data.datasets import load_dataset

    try:
        root = _common.data_root(data_dir)
        dataset = load_dataset("cifar10", split="test", data_dir=root)
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:512].tolist()
        xs, ys = zip(*[dataset[i] for i in order])
        x, y = torch.stack(xs), torch.tensor(ys)
        source = "CIFAR-10 (JPEG) test images"
    except (FileNotFoundError, OSError, ValueError) as exc:
        warnings.warn(f"CIFAR-10 not available ({exc}); using random images of the same shape", stacklevel=2)
        g = torch.Generator().manual_seed(seed)
        x, y = torch.randn(512, 3, 32, 32, generator=g), torch.randint(0, 10, (512,), generator=g)
        source = "random 3×32×32 images (CIFAR-10 not found)"
    return (x[:256], y[:256]), (x[256:], y[256:]), source


def _time_dp_step(model_name: str, train: tuple, *, seed: int, repeats: int) -> tuple[float, float]:
    """Median (wall, CPU) ms of one opacus DP-SGD step (forward, backward, clip, noise, update), batch 256."""
    import torch
    import torch.nn.functional as F
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    from adaptive_dp.models.cnn import build_model

    model = build_model(model_name, in_channels=3, num_classes=10, image_size=32, seed=seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = DataLoader(TensorDataset(*train), batch_size=256)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gsm, opt, loader = PrivacyEngine().make_private(
            module=model,
            optimizer=opt,
            data_loader=loader,
            noise_multiplier=1.0,
            max_grad_norm=MAX_GRAD_NORM,
            poisson_sampling=False,
        )
    x, y = train
    wall, cpu = [], []
    for _ in range(repeats + 1):
        start, start_cpu = time.perf_counter(), time.process_time()
        opt.zero_grad()
        F.cross_entropy(gsm(x), y).backward()
        opt.step()
        wall.append(1000 * (time.perf_counter() - start))
        cpu.append(1000 * (time.process_time() - start_cpu))
    return statistics.median(wall[1:]), statistics.median(cpu[1:])


def _time_monitor(
    model_name: str, audit: tuple, *, seed: int, repeats: int, configs: list[tuple[str, str | None]]
) -> list[dict[str, Any]]:
    """Median ms per read (after one warm-up read) for each estimator / encoder, σ = 1."""
    import torch

    from adaptive_dp.leakage.monitor import LeakageMonitor
    from adaptive_dp.models.cnn import build_model

    model = build_model(model_name, in_channels=3, num_classes=10, image_size=32, seed=seed)
    rows = []
    for estimator, encoder in configs:
        start = time.perf_counter()
        monitor = LeakageMonitor(
            model,
            audit,
            max_grad_norm=MAX_GRAD_NORM,
            estimator=estimator,
            token_encoder=encoder or "autoencoder",
            seed=seed,
        )
        build_ms = 1000 * (time.perf_counter() - start)
        start = time.perf_counter()
        monitor.clean_gradients()
        grad_ms = 1000 * (time.perf_counter() - start)
        monitor.read(noise_multiplier=1.0)  # warm-up (caches, first optimiser steps)
        times, cpu = [], []
        for _ in range(repeats):
            start_cpu = time.process_time()
            times.append(1000 * monitor.read(noise_multiplier=1.0).seconds)
            cpu.append(1000 * (time.process_time() - start_cpu))
        rows.append(
            {
                "model": model_name,
                "estimator": _label(estimator, encoder),
                "n_audit": int(audit[0].shape[0]),
                "ms_per_read": statistics.median(times),
                "ms_per_read_min": min(times),
                "cpu_ms_per_read": statistics.median(cpu),
                "ms_per_sample_gradients": grad_ms,
                "ms_construct": build_ms,
                "parameters": sum(p.numel() for p in model.parameters()),
            }
        )
        del monitor
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return rows


_MEMORY_CHILD = """
import json, re, sys, time
from pathlib import Path
import torch
torch.set_num_threads(1)
sys.path.insert(0, sys.argv[3])
from adaptive_dp.leakage.tokens import build_token_encoder

def memory():
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"VmHWM:\\s+(\\d+)", status).group(1)), int(re.search(r"VmRSS:\\s+(\\d+)", status).group(1))

grads = torch.load(sys.argv[1])
encoder = build_token_encoder(sys.argv[2], layer_shapes=[tuple(g.shape[1:]) for g in grads], dim=64, seed=0)
Path("/proc/self/clear_refs").write_text("5")
_, before = memory()
start = time.perf_counter()
with torch.no_grad():
    if hasattr(encoder, "set_basis"):  # the span encoder fits its basis to these (clean) gradients first
        encoder.set_basis(grads)
    tokens = encoder(grads)
ms = 1000 * (time.perf_counter() - start)
peak, _ = memory()
print(json.dumps({"peak_extra_mib": (peak - before) / 1024, "ms": ms, "token_shape": list(tokens.shape)}))
"""


def _tokenise_memory(
    audit: tuple, *, seed: int, encoders: tuple[str, ...], dim: int = 64
) -> list[dict[str, Any]]:
    """Peak extra resident memory of tokenising ResNet-20's per-sample gradients for a batch of 64.

    Each encoder runs in a fresh Python process (so freed memory of earlier work cannot hide new
    allocations): it loads the gradients, resets the peak (``/proc/self/clear_refs``), tokenises once and
    reports ``VmHWM − VmRSS`` (peak minus resident before the call).
    """
    import subprocess
    import sys
    import tempfile

    import torch

    from adaptive_dp.leakage.monitor import LeakageMonitor
    from adaptive_dp.models.cnn import build_model

    model = build_model("resnet20", in_channels=3, num_classes=10, image_size=32, seed=seed)
    x, y = audit
    grads = LeakageMonitor(model, (x[:64], y[:64]), max_grad_norm=MAX_GRAD_NORM).clean_gradients()
    total = sum(g[0].numel() for g in grads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "grads.pt"
        torch.save([g.contiguous() for g in grads], path)
        for name in encoders:
            result = subprocess.run(
                [sys.executable, "-c", _MEMORY_CHILD, str(path), name, str(_common.REPO_ROOT)],
                capture_output=True,
                text=True,
                check=True,
            )
            child = json.loads(result.stdout.strip().splitlines()[-1])
            rows.append(
                {
                    "encoder": name,
                    "batch": 64,
                    "parameters": total,
                    "token_dim": dim,
                    **child,
                    "gradients_mib": sum(g.numel() for g in grads) * 4 / 2**20,
                    "dense_projection_mib": total * dim * 4 / 2**20,
                }
            )
    return rows


def _curve(model, audit, *, sigmas, seed: int, configs: list[tuple[str, str | None]]) -> list[dict[str, Any]]:
    from adaptive_dp.leakage.monitor import LeakageMonitor

    rows = []
    for estimator, encoder in configs:
        monitor = LeakageMonitor(
            model,
            audit,
            max_grad_norm=MAX_GRAD_NORM,
            estimator=estimator,
            token_encoder=encoder or "autoencoder",
            seed=seed,
        )
        readings = [monitor.read(noise_multiplier=s) for s in sigmas]
        floor = next((s for s, r in zip(sigmas, readings) if r.mi < FLOOR), None)
        rows.append(
            {
                "estimator": _label(estimator, encoder),
                "n": readings[0].n,
                "cap": readings[0].cap,
                "mi": [r.mi for r in readings],
                "stderr": [r.stderr for r in readings],
                "critic_gap": [r.critic_gap for r in readings],
                "floor_sigma": floor,
            }
        )
    return rows


def _trained_digits(seed: int, steps: int = 300):
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader

    from adaptive_dp.data.datasets import audit_split, load_dataset
    from adaptive_dp.models.cnn import build_model

    train, audit = audit_split(load_dataset("digits"), size=128, seed=seed)
    model = build_model("small-cnn", in_channels=1, num_classes=10, image_size=8, seed=seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loader = DataLoader(train, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(seed))
    step = 0
    while step < steps:
        for x, y in loader:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            step += 1
            if step == steps:
                break
    return model, audit


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = _common.base_parser(__doc__.splitlines()[0])
    args = _common.parse_args(parser, argv)
    _common.setup_torch(args.threads)
    started = time.time()
    import torch

    from adaptive_dp.models.cnn import build_model

    repeats = 1 if args.quick or args.smoke else 5
    train, audit_pool, source = _cifar(args.seed, args.data_dir)
    audit64 = (audit_pool[0][:64], audit_pool[1][:64])
    configs = CONFIGS[:2] if args.smoke else CONFIGS  # smoke: likelihood-ratio and token-mine/projection

    cost_rows, step_ms = [], {}
    for model_name in ("tanh-cnn",) if args.smoke else ("tanh-cnn", "resnet20"):
        step_ms[model_name] = _time_dp_step(model_name, train, seed=args.seed, repeats=repeats)
        cost_rows += _time_monitor(model_name, audit64, seed=args.seed, repeats=repeats, configs=configs)
    for row in cost_rows:
        row["dp_step_ms"], row["dp_step_cpu_ms"] = step_ms[row["model"]]
        row["read_per_step_wall"] = row["ms_per_read"] / row["dp_step_ms"]
        row["read_per_step_cpu"] = row["cpu_ms_per_read"] / row["dp_step_cpu_ms"]
    memory_rows = _tokenise_memory(
        audit64, seed=args.seed, encoders=("projection",) if args.smoke else ENCODERS
    )

    sigmas = [0.01, 0.03, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0, 4.0]
    if args.quick or args.smoke:
        sigmas = [0.1, 4.0] if args.smoke else [0.01, 0.1, 0.3, 1.0, 4.0]
    n_curve = 16 if args.smoke else 64 if args.quick else 256
    cifar_model = build_model("tanh-cnn", in_channels=3, num_classes=10, image_size=32, seed=args.seed)
    curves = {
        f"cifar10/tanh-cnn@init/N={n_curve}": _curve(
            cifar_model,
            (audit_pool[0][:n_curve], audit_pool[1][:n_curve]),
            sigmas=sigmas,
            seed=args.seed,
            configs=configs,
        )
    }
    digits_sigmas = [1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 0.7, 1.5, 4.0]
    if args.quick or args.smoke:
        digits_sigmas = [1e-3, 4.0] if args.smoke else [1e-3, 1e-2, 0.1, 0.7, 4.0]
    digits_steps = 20 if args.smoke else 300
    digits_model, digits_audit = _trained_digits(args.seed, steps=digits_steps)
    curves[f"digits/small-cnn@{digits_steps}-steps/N=128"] = _curve(
        digits_model, digits_audit, sigmas=digits_sigmas, seed=args.seed, configs=configs
    )
    del torch

    payload = {
        "name": NAME,
        "quick": bool(args.quick),
        "smoke": bool(args.smoke),
        "seed": args.seed,
        "data": source,
        "machine": _common.machine_description(),
        "command": _common.command_line(),
        "max_grad_norm": MAX_GRAD_NORM,
        "floor_nats": FLOOR,
        "cost": cost_rows,
        "tokenise_memory": memory_rows,
        "curves": {
            k: {"sigmas": sigmas if k.startswith("cifar") else digits_sigmas, "rows": v}
            for k, v in curves.items()
        },
        "seconds": time.time() - started,
    }
    out = Path(args.out_dir)
    _common.write_json(out / f"{NAME}.json", payload)

    md = [
        "# Leakage monitor: cost per call and MI(σ) curves\n",
        _common.provenance_block(quick=args.quick, smoke=args.smoke, started=started, extra={"Data": source}),
        "",
        "## Milliseconds per monitor call vs one DP-SGD step",
        "64 audit examples, σ = 1, C = 1; DP-SGD step = opacus forward + backward + clip + noise + update on "
        "a batch of 256. Medians after one warm-up call. Wall times depend on the load of the shared "
        "machine; CPU time (`time.process_time`, one torch thread) much less. `grads` = the audit per-sample "
        "gradients alone (torch.func on a hook-free copy, wall).",
        "",
        markdown_table(
            [
                "model",
                "estimator",
                "ms / read",
                "CPU ms / read",
                "ms grads",
                "DP step ms",
                "DP step CPU ms",
                "read / step (CPU)",
            ],
            [
                [
                    r["model"],
                    r["estimator"],
                    *(
                        f"{r[k]:.0f}"
                        for k in (
                            "ms_per_read",
                            "cpu_ms_per_read",
                            "ms_per_sample_gradients",
                            "dp_step_ms",
                            "dp_step_cpu_ms",
                        )
                    ),
                    f"{r['read_per_step_cpu']:.2f}",
                ]
                for r in cost_rows
            ],
        ),
        "",
        "## Peak extra memory of tokenising ResNet-20 per-sample gradients (batch 64, d = 64)",
        "Peak resident memory during `encoder(grads)` minus resident memory before (gradients already held). "
        "Target < 1 GiB; a dense P×d projection matrix would need the last column.",
        "",
        markdown_table(
            ["encoder", "P", "peak extra MiB", "ms", "gradients MiB", "dense P×d MiB"],
            [
                [
                    r["encoder"],
                    str(r["parameters"]),
                    f"{r['peak_extra_mib']:.1f}",
                    f"{r['ms']:.0f}",
                    f"{r['gradients_mib']:.1f}",
                    f"{r['dense_projection_mib']:.1f}",
                ]
                for r in memory_rows
            ],
        ),
        "",
        "## MI(σ) curves (nats; one reading per σ, ± standard error; floor = first σ with MI < 0.05)",
        "",
    ]
    for key, curve in payload["curves"].items():
        md.append(f"### {key}\n")
        header = ["estimator", *[f"σ={s:g}" for s in curve["sigmas"]], "floor σ"]
        rows = [
            [
                r["estimator"],
                *[f"{m:.3f}±{e:.3f}" for m, e in zip(r["mi"], r["stderr"])],
                fmt(r["floor_sigma"]),
            ]
            for r in curve["rows"]
        ]
        md += [markdown_table(header, rows), ""]
    _common.write_markdown(out / f"{NAME}.md", "\n".join(md))

    headline = {
        "name": NAME,
        "quick": bool(args.quick),
        "smoke": bool(args.smoke),
        "ms_per_read": {f"{r['model']}/{r['estimator']}": round(r["ms_per_read"], 1) for r in cost_rows},
        "cpu_ms_per_read": {
            f"{r['model']}/{r['estimator']}": round(r["cpu_ms_per_read"], 1) for r in cost_rows
        },
        "dp_step_ms": {k: round(v[0], 1) for k, v in step_ms.items()},
        "dp_step_cpu_ms": {k: round(v[1], 1) for k, v in step_ms.items()},
        "tokenise_peak_extra_mib": {
            r["encoder"]: None if r["peak_extra_mib"] is None else round(r["peak_extra_mib"], 1)
            for r in memory_rows
        },
        "floor_sigma": {f"{k}/{r['estimator']}": r["floor_sigma"] for k, c in curves.items() for r in c},
        "seconds": round(time.time() - started, 1),
    }
    _common.print_summary(headline)
    return headline


if __name__ == "__main__":
    main()
