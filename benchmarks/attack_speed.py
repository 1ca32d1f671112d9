"""Attack cost vs one I²F reading, and leakage against σ on CIFAR-10 (JPEG) with DLG's LeNet at init.

Part 1 (speed): on digits and CIFAR-10, for each image, the seconds DLG (L-BFGS, up to 2000 iterations,
stopping on a plateau) and Inverting Gradients (Adam, 4800 iterations; 1000 with ``--quick``) take to
converge on one released gradient (clipped at C = 1 plus noise σ = 1e-3), against one I²F lower-bound
reading ‖Jδ‖/λ_max(JJᵀ) on the same image and noise (Zhang et al. 2023; target: ≥ 100× faster).
Times are CPU seconds of this single-threaded process (``time.process_time``), robust to other load on the
machine; wall seconds are recorded too.

Part 2 (sweep, CIFAR-10): median PSNR of DLG, iDLG (2 restarts) and IG, the identification rate among 256 candidates,
and the expected I²F lower bound, against the noise multiplier σ.

DLG runs one start of up to :data:`DLG_ITERATIONS` L-BFGS iterations (iDLG two full starts), as when the
committed results were measured (the library's default DLG probes several starts and continues the best-matching
one for longer: ``adaptive_dp.attacks.inversion.dlg``).

Usage: ``python benchmarks/attack_speed.py [--quick | --smoke] [--data-dir DIR] [--out-dir benchmarks/results]``
(``--smoke``: digits only, one image, 20 iterations, no sweep — the plumbing only).
Writes ``attack_speed.json`` and ``attack_speed.md``; the last stdout line is one JSON object (summary).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import _common  # first: puts the repository on sys.path
import torch

from adaptive_dp.attacks.i2f import expected_i2f_lower_bound, i2f_lower_bound  # noqa: E402
from adaptive_dp.attacks.identification import identification_curve  # noqa: E402
from adaptive_dp.attacks.inversion import (  # noqa: E402
    dlg,
    idlg,
    inverting_gradients,
    release_gradient,
    with_normalization,
)
from adaptive_dp.attacks.metrics import psnr  # noqa: E402
from adaptive_dp.data.datasets import DataNotFoundError, load_dataset  # noqa: E402
from adaptive_dp.models.cnn import build_model  # noqa: E402

CLIP = 1.0
SPEED_SIGMA = 1e-3
#: one DLG start of up to this many L-BFGS iterations (stopping on a plateau), the setting of the committed results
DLG_ITERATIONS = 2000


def _data_dir(arg: str | None) -> str | None:
    try:
        return str(_common.data_root(arg))
    except FileNotFoundError:
        return None  # digits needs no files; the CIFAR-10 parts are skipped with a note


def _setup(name: str, data_dir: str | None):
    ds = load_dataset(name, split="test", data_dir=data_dir)
    info = ds.info
    model = with_normalization(
        build_model(
            "lenet",
            in_channels=info.in_channels,
            num_classes=info.num_classes,
            image_size=info.image_size,
            seed=0,
        ),
        info.mean,
        info.std,
    )
    return ds, model


def _image(ds, i):
    return ds.images[i : i + 1].to(torch.float32) / 255.0, ds.targets[i : i + 1]


def _timed(fn, *args, **kwargs):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn(*args, **kwargs)
    return out, time.process_time() - cpu, time.perf_counter() - wall


def _release(model, x, y, sigma, seed):
    gen = torch.Generator().manual_seed(seed)
    return release_gradient(model, x, y, noise_multiplier=sigma, max_grad_norm=CLIP, generator=gen)


def speed(
    name: str,
    data_dir: str | None,
    *,
    n_images: int,
    ig_iterations: int,
    dlg_iterations: int = DLG_ITERATIONS,
) -> list[dict]:
    ds, model = _setup(name, data_dir)
    shape = tuple(ds.images.shape[1:])
    # warm-up (one-time torch.func / allocator costs) on an image that is not timed
    xw, yw = _image(ds, len(ds) - 1)
    i2f_lower_bound(
        model,
        xw,
        yw,
        _release(model, xw, yw, SPEED_SIGMA, 0) - _release(model, xw, yw, 0.0, 0),
        max_grad_norm=CLIP,
    )
    dlg(
        model,
        _release(model, xw, yw, 0.0, 0),
        image_shape=shape,
        max_grad_norm=CLIP,
        iterations=3,
        restarts=1,
    )
    rows = []
    for i in range(n_images):
        x, y = _image(ds, i)
        clean = _release(model, x, y, 0.0, seed=i)
        released = _release(model, x, y, SPEED_SIGMA, seed=i)
        delta = released - clean  # the DP noise of this release
        r_dlg, dlg_cpu, dlg_wall = _timed(
            dlg,
            model,
            released,
            image_shape=shape,
            max_grad_norm=CLIP,
            seed=i,
            iterations=dlg_iterations,
            restarts=1,
        )
        r_ig, ig_cpu, ig_wall = _timed(
            inverting_gradients,
            model,
            released,
            image_shape=shape,
            max_grad_norm=CLIP,
            iterations=ig_iterations,
            seed=i,
        )
        lb, lb_cpu, lb_wall = _timed(i2f_lower_bound, model, x, y, delta, max_grad_norm=CLIP)
        ex, ex_cpu, ex_wall = _timed(
            expected_i2f_lower_bound, model, x, y, noise_multiplier=SPEED_SIGMA, max_grad_norm=CLIP, probes=4
        )
        rows.append(
            {
                "dataset": name,
                "image": i,
                "sigma": SPEED_SIGMA,
                "dlg_iterations": r_dlg.iterations,
                "dlg_psnr": psnr(r_dlg.reconstruction[0], x[0]),
                "dlg_cpu_s": dlg_cpu,
                "dlg_wall_s": dlg_wall,
                "ig_iterations": r_ig.iterations,
                "ig_psnr": psnr(r_ig.reconstruction[0], x[0]),
                "ig_cpu_s": ig_cpu,
                "ig_wall_s": ig_wall,
                "i2f_lb": lb.value,
                "i2f_cpu_s": lb_cpu,
                "i2f_wall_s": lb_wall,
                "i2f_expected": ex.value,
                "i2f_expected_cpu_s": ex_cpu,
                "dlg_over_i2f": dlg_cpu / lb_cpu,
                "ig_over_i2f": ig_cpu / lb_cpu,
            }
        )
        print(
            json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in rows[-1].items()}),
            file=sys.stderr,
            flush=True,
        )
    return rows


def sweep(
    data_dir: str | None, *, sigmas, n_images: int, ig_iterations: int, id_sigmas, candidates: int
) -> dict:
    ds, model = _setup("cifar10", data_dir)
    shape = tuple(ds.images.shape[1:])
    recon = []
    for sigma in sigmas:
        values = {"dlg": [], "idlg": [], "ig": [], "i2f_expected": [], "idlg_label_correct": []}
        for i in range(n_images):
            x, y = _image(ds, i)
            released = _release(model, x, y, sigma, seed=100 + i)  # same noise direction for every σ
            r_dlg = dlg(
                model,
                released,
                image_shape=shape,
                max_grad_norm=CLIP,
                seed=i,
                iterations=DLG_ITERATIONS,
                restarts=1,
            )
            r_idlg = idlg(
                model,
                released,
                image_shape=shape,
                max_grad_norm=CLIP,
                restarts=2,
                seed=i,
                iterations=DLG_ITERATIONS,
                probe_iterations=DLG_ITERATIONS,
            )  # two full runs
            r_ig = inverting_gradients(
                model, released, image_shape=shape, max_grad_norm=CLIP, iterations=ig_iterations, seed=i
            )
            values["dlg"].append(psnr(r_dlg.reconstruction[0], x[0]))
            values["idlg"].append(psnr(r_idlg.reconstruction[0], x[0]))
            values["ig"].append(psnr(r_ig.reconstruction[0], x[0]))
            values["idlg_label_correct"].append(bool(r_idlg.labels[0] == y[0]))
            values["i2f_expected"].append(
                expected_i2f_lower_bound(
                    model, x, y, noise_multiplier=sigma, max_grad_norm=CLIP, probes=4
                ).value
            )
        row = {
            "sigma": sigma,
            "dlg_median_psnr": statistics.median(values["dlg"]),
            "idlg_median_psnr": statistics.median(values["idlg"]),
            "ig_median_psnr": statistics.median(values["ig"]),
            "idlg_label_accuracy": sum(values["idlg_label_correct"]) / n_images,
            "i2f_expected_median": statistics.median(values["i2f_expected"]),
            "psnr": {k: values[k] for k in ("dlg", "idlg", "ig")},
        }
        recon.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "psnr"}), file=sys.stderr, flush=True)
    images = ds.images[:candidates].to(torch.float32) / 255.0
    curve = identification_curve(
        model,
        images,
        ds.targets[:candidates],
        noise_multipliers=id_sigmas,
        max_grad_norm=CLIP,
        trials_per_candidate=4,
        seed=0,
    )
    ident = [
        {
            "sigma": r.noise_multiplier,
            "rate": r.rate,
            "stderr": r.stderr,
            "chance": r.chance,
            "trials": r.trials,
            "candidates": r.candidates,
        }
        for r in curve
    ]
    return {
        "dataset": "cifar10",
        "model": "lenet (DLG init, seed 0)",
        "max_grad_norm": CLIP,
        "n_images": n_images,
        "ig_iterations": ig_iterations,
        "reconstruction": recon,
        "identification": ident,
    }


def _markdown(result: dict) -> str:
    lines = [
        "# Attack cost vs one I²F reading; leakage vs σ (CIFAR-10 JPEG)",
        "",
        f"Generated by `{result['command']}`. "
        "DLG's sigmoid LeNet at its U(−0.5, 0.5) initialisation (seed 0), C = 1, single-example releases. "
        "Times are CPU seconds of one single-threaded process.",
        "",
        f"## Seconds per image to converge vs one I²F lower-bound reading (σ = {SPEED_SIGMA:g})",
        "",
        "| data | image | DLG its | DLG PSNR | DLG s | IG its | IG PSNR | IG s | I²F_lb s | DLG/I²F | IG/I²F |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["speed"]:
        lines.append(
            f"| {r['dataset']} | {r['image']} | {r['dlg_iterations']} | {r['dlg_psnr']:.1f} | "
            f"{r['dlg_cpu_s']:.2f} | {r['ig_iterations']} | {r['ig_psnr']:.1f} | {r['ig_cpu_s']:.2f} | "
            f"{r['i2f_cpu_s']:.3f} | {r['dlg_over_i2f']:.0f}× | {r['ig_over_i2f']:.0f}× |"
        )
    for note in result.get("notes", []):
        lines += ["", f"Note: {note}"]
    sw = result.get("sweep")
    if sw:
        lines += [
            "",
            f"## CIFAR-10: median PSNR (dB) over {sw['n_images']} images vs σ "
            f"(IG {sw['ig_iterations']} iterations)",
            "",
            "| σ | DLG | iDLG | IG | iDLG label acc. | E[I²F_lb] |",
            "|---|---|---|---|---|---|",
        ]
        for r in sw["reconstruction"]:
            lines.append(
                f"| {r['sigma']:g} | {r['dlg_median_psnr']:.1f} | {r['idlg_median_psnr']:.1f} | "
                f"{r['ig_median_psnr']:.1f} | {r['idlg_label_accuracy']:.2f} | {r['i2f_expected_median']:.3g} |"
            )
        ident = sw["identification"]
        lines += [
            "",
            f"## CIFAR-10: identification among {ident[0]['candidates']} candidates "
            f"({ident[0]['trials']} releases, chance {ident[0]['chance']:.4f})",
            "",
            "| σ | rate | s.e. |",
            "|---|---|---|",
        ]
        for r in ident:
            lines.append(f"| {r['sigma']:g} | {r['rate']:.3f} | {r['stderr']:.3f} |")
    return "\n".join(lines) + "\n"


def _summary(result: dict, *, quick: bool, smoke: bool) -> dict:
    """The last-line JSON: per data set the median I²F seconds and DLG / IG cost in I²F readings."""
    summary = {"benchmark": "attack_speed", "quick": quick, "smoke": smoke}
    for name in ("digits", "cifar10"):
        rows = [r for r in result["speed"] if r["dataset"] == name]
        if rows:
            summary[f"{name}_i2f_s"] = round(statistics.median(r["i2f_cpu_s"] for r in rows), 4)
            summary[f"{name}_dlg_over_i2f"] = round(statistics.median(r["dlg_over_i2f"] for r in rows), 1)
            summary[f"{name}_ig_over_i2f"] = round(statistics.median(r["ig_over_i2f"] for r in rows), 1)
    summary["seconds"] = round(result["seconds"], 1)
    return summary


def main(argv=None) -> int:
    parser = _common.base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--no-sweep", action="store_true", help="skip the CIFAR-10 σ sweep")
    args = _common.parse_args(parser, argv)
    _common.setup_torch(args.threads)
    data_dir = _data_dir(args.data_dir)
    n_speed, ig_its, dlg_its = (
        (1, 20, 20) if args.smoke else (1, 1000, DLG_ITERATIONS) if args.quick else (2, 4800, DLG_ITERATIONS)
    )
    start = time.perf_counter()
    result = {
        "benchmark": "attack_speed",
        "command": _common.command_line(),
        "config": {
            "quick": args.quick,
            "smoke": args.smoke,
            "speed_sigma": SPEED_SIGMA,
            "max_grad_norm": CLIP,
            "ig_iterations": ig_its,
            "dlg_iterations": dlg_its,
            "torch": torch.__version__,
            "threads": args.threads,
        },
        "speed": [],
        "notes": [],
    }
    for name in ("digits",) if args.smoke else ("digits", "cifar10"):
        try:
            result["speed"] += speed(
                name, data_dir, n_images=n_speed, ig_iterations=ig_its, dlg_iterations=dlg_its
            )
        except DataNotFoundError as exc:
            result["notes"].append(f"{name} skipped: {str(exc).splitlines()[0]}")
    if not (args.no_sweep or args.smoke):
        try:
            if args.quick:
                result["sweep"] = sweep(
                    data_dir,
                    sigmas=[0.0, 1e-3, 1e-2],
                    n_images=1,
                    ig_iterations=500,
                    id_sigmas=[0.0, 1e-2, 0.1, 1.0],
                    candidates=64,
                )
            else:
                result["sweep"] = sweep(
                    data_dir,
                    sigmas=[0.0, 1e-4, 1e-3, 1e-2],
                    n_images=2,
                    ig_iterations=1000,
                    id_sigmas=[0.0, 1e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0],
                    candidates=256,
                )
        except DataNotFoundError as exc:
            result["notes"].append(f"cifar10 sweep skipped: {str(exc).splitlines()[0]}")
    result["seconds"] = time.perf_counter() - start
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "attack_speed.json").write_text(json.dumps(result, indent=2, allow_nan=False))
    (out / "attack_speed.md").write_text(_markdown(result))
    _common.print_summary(_summary(result, quick=args.quick, smoke=args.smoke))
    return 0


if __name__ == "__main__":
    sys.exit(main())
