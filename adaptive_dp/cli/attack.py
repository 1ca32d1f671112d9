"""Attack the gradient DP-SGD releases for single examples: DLG, iDLG, Inverting Gradients or identification.

Each of ``--n-images`` held-out images (the data set's test split, never trained on) is released as one
DP-SGD step would release it — its per-sample gradient clipped to ``--max-grad-norm`` C plus noise
N(0, σ²C²) — on the model at its (seeded) initialisation or loaded from ``--checkpoint``. Reconstruction
attacks report PSNR/SSIM/MSE against the original; ``identify`` links each release to one of
``--candidates`` test images (nearest clipped gradient) and reports the success rate against chance.
Every image also gets the expected I²F lower bound (Zhang et al. 2023) at that σ.

Writes ``OUT/attack.json`` and ``OUT/reconstructions.png`` (originals above reconstructions / identified
candidates).
"""

from __future__ import annotations

import argparse

from adaptive_dp.cli import RegistryChoices, report_failure

METHODS = ("dlg", "idlg", "ig", "identify")
#: IG's default: 4800 Adam steps (Geiping et al.); DLG/iDLG take the library's defaults
#: (``attacks.inversion.DLG_ITERATIONS`` L-BFGS iterations, ``DLG_RESTARTS`` starts probed), read at run time so that
#: ``adaptive-dp --help`` imports no torch.
IG_ITERATIONS = 4800


def _defaults(method: str) -> tuple[int | None, int]:
    """(iterations, restarts) of ``method`` when the options are not given."""
    if method in ("dlg", "idlg"):
        from adaptive_dp.attacks.inversion import DLG_ITERATIONS, DLG_RESTARTS

        return DLG_ITERATIONS, DLG_RESTARTS
    return (IG_ITERATIONS if method == "ig" else None), 1


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``adaptive-dp attack`` to ``parser``."""
    data = parser.add_argument_group("data and model")
    data.add_argument(
        "--dataset",
        default=None,
        metavar="NAME",
        choices=RegistryChoices(
            "adaptive_dp.data:DATASETS", resolve="adaptive_dp.data.registry:canonical_name"
        ),
        help="%(choices)s (default: the checkpoint's, else digits)",
    )
    data.add_argument("--data-dir", default=None, help="data root (default: $ADAPTIVE_DP_DATA)")
    data.add_argument(
        "--model",
        default=None,
        metavar="NAME",
        choices=RegistryChoices("adaptive_dp.models:MODELS"),
        help="%(choices)s (default: the checkpoint's, else lenet, DLG's sigmoid LeNet)",
    )
    data.add_argument(
        "--checkpoint",
        default=None,
        help="OUT/checkpoint.pt of `adaptive-dp train` (default: the model at its seeded initialisation)",
    )
    data.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default="cpu", help="(default: %(default)s)"
    )

    privacy = parser.add_argument_group("release")
    privacy.add_argument(
        "--noise-multiplier",
        type=float,
        default=None,
        help="σ of the released gradient (default: the checkpoint's, else 0 = clipping only)",
    )
    privacy.add_argument(
        "--max-grad-norm",
        type=float,
        default=None,
        help="clipping norm C (default: the checkpoint's, else 1.0)",
    )

    attack = parser.add_argument_group("attack")
    attack.add_argument("--method", choices=METHODS, default="dlg", help="(default: %(default)s)")
    attack.add_argument("--n-images", type=int, default=4, help="images attacked (default: %(default)s)")
    attack.add_argument(
        "--candidates",
        type=int,
        default=64,
        help="candidate set size N for --method identify (default: %(default)s)",
    )
    attack.add_argument(
        "--iterations",
        type=int,
        default=None,
        help="optimiser iterations (default: the library's for dlg/idlg, 4800 for ig)",
    )
    attack.add_argument(
        "--restarts",
        type=int,
        default=None,
        help="random restarts, best match kept (default: the library's for dlg/idlg, 1 otherwise)",
    )
    attack.add_argument(
        "--tv-weight", type=float, default=1e-4, help="IG total-variation weight (default: %(default)s)"
    )
    attack.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seeds the image choice, model initialisation, noise and dummies (default: %(default)s)",
    )
    attack.add_argument("--out", default=None, help="output folder (default: runs/attack-<UTC timestamp>)")
    attack.add_argument("--no-progress", action="store_true", help="no progress bars")


def _check_args(args: argparse.Namespace) -> None:
    if args.n_images < 1:
        raise ValueError(f"--n-images must be >= 1, got {args.n_images}")
    if args.method == "identify" and args.candidates < max(2, args.n_images):
        raise ValueError(
            f"--candidates must be >= max(2, --n-images) = {max(2, args.n_images)}, got {args.candidates}"
        )
    if args.iterations is not None and args.iterations < 1:
        raise ValueError(f"--iterations must be >= 1, got {args.iterations}")
    if args.restarts is not None and args.restarts < 1:
        raise ValueError(f"--restarts must be >= 1, got {args.restarts}")


def _load(args: argparse.Namespace):
    """(plain model taking [0, 1] images, DatasetInfo, config dict) from the checkpoint or an initialisation."""
    from adaptive_dp.data import load_dataset
    from adaptive_dp.models import build_model
    from adaptive_dp.training import load_trained_model
    from adaptive_dp.training.setup import resolve_device

    device = resolve_device(args.device)
    run_config: dict = {}
    if args.checkpoint is not None:
        model, run_config = load_trained_model(args.checkpoint, map_location=device)
        for option in ("dataset", "model"):
            given = getattr(args, option)
            if given is not None and given != run_config[option]:
                raise ValueError(
                    f"--{option} {given} does not match the checkpoint's {run_config[option]}; drop --{option}"
                )
        dataset_name, model_name = run_config["dataset"], run_config["model"]
    else:
        dataset_name, model_name = args.dataset or "digits", args.model or "lenet"
    dataset = load_dataset(dataset_name, split="test", data_dir=args.data_dir)
    info = dataset.info
    if args.checkpoint is None:
        model = build_model(
            model_name,
            in_channels=info.in_channels,
            num_classes=info.num_classes,
            image_size=info.image_size,
            seed=args.seed,
        ).to(device)
    sigma = (
        args.noise_multiplier
        if args.noise_multiplier is not None
        else run_config.get("noise_multiplier", 0.0)
    )
    clip = args.max_grad_norm if args.max_grad_norm is not None else run_config.get("max_grad_norm", 1.0)
    if sigma is None or not sigma >= 0:
        raise ValueError(f"--noise-multiplier must be >= 0, got {sigma}")
    if clip is None or not clip > 0:
        raise ValueError(f"--max-grad-norm must be > 0, got {clip}")
    config = {
        "dataset": info.name,
        "model": model_name,
        "checkpoint": args.checkpoint,
        "method": args.method,
        "noise_multiplier": float(sigma),
        "max_grad_norm": float(clip),
        "n_images": args.n_images,
        "candidates": args.candidates if args.method == "identify" else None,
        "iterations": args.iterations or _defaults(args.method)[0],
        "restarts": args.restarts or _defaults(args.method)[1],
        "tv_weight": args.tv_weight,
        "seed": args.seed,
        "device": str(device),
        "split": "test",
    }
    return model, dataset, config


def _images(dataset, indices, device):
    import torch

    idx = torch.as_tensor(indices)
    return (dataset.images[idx].to(torch.float32) / 255.0).to(device), dataset.targets[idx].to(device)


def _finite(value):
    import math

    return value if value is None or math.isfinite(value) else None


def _reconstruct(model, x, y, config, *, index, seed, progress):
    import torch

    from adaptive_dp import attacks
    from adaptive_dp.attacks.metrics import evaluate_reconstructions

    sigma, clip, method = config["noise_multiplier"], config["max_grad_norm"], config["method"]
    gen = torch.Generator(device=x.device).manual_seed(seed)
    released = attacks.release_gradient(
        model, x, y, noise_multiplier=sigma, max_grad_norm=clip, generator=gen
    )
    common = dict(
        image_shape=tuple(x.shape[1:]),
        max_grad_norm=clip,
        iterations=config["iterations"],
        seed=seed,
        restarts=config["restarts"],
        progress=progress,
    )
    if method == "dlg":
        result = attacks.dlg(model, released, **common)
    elif method == "idlg":
        result = attacks.idlg(model, released, **common)
    else:
        result = attacks.inverting_gradients(model, released, tv_weight=config["tv_weight"], **common)
    quality = evaluate_reconstructions(result.reconstruction, x)[0]
    record = {
        "index": index,
        "psnr": _finite(quality.psnr),
        "ssim": quality.ssim,
        "mse": quality.mse,
        "label_correct": bool(result.labels[0].item() == y[0].item()),
        "seconds": result.seconds,
    }
    return record, result.reconstruction[0]


def _i2f(model, x, y, config):
    from adaptive_dp.attacks.i2f import expected_i2f_lower_bound

    reading = expected_i2f_lower_bound(
        model,
        x,
        y,
        noise_multiplier=config["noise_multiplier"],
        max_grad_norm=config["max_grad_norm"],
        probes=4,
        seed=config["seed"],
    )
    return _finite(reading.value)


def _plot(originals, shown, titles, path, *, bottom_label):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = len(originals)
    fig, axes = plt.subplots(2, k, figsize=(1.6 * k + 0.6, 3.6), squeeze=False)
    for j in range(k):
        for row, image in ((0, originals[j]), (1, shown[j])):
            ax = axes[row][j]
            array = image.detach().cpu().clamp(0, 1).permute(1, 2, 0).numpy()
            ax.imshow(
                array[..., 0] if array.shape[-1] == 1 else array,
                cmap="gray" if array.shape[-1] == 1 else None,
                vmin=0,
                vmax=1,
            )
            ax.set_xticks([])
            ax.set_yticks([])
        axes[1][j].set_title(titles[j], fontsize=7)
    axes[0][0].set_ylabel("original", fontsize=8)
    axes[1][0].set_ylabel(bottom_label, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _identify_all(model, dataset, order, config, *, n_images, seed):
    """Release each of the first ``n_images`` candidates' gradients and link it back: (records, shown, titles, summary)."""
    import time

    import torch

    from adaptive_dp.attacks import clipped_per_sample_gradients, identify

    device = next(model.parameters()).device
    cand_x, cand_y = _images(dataset, order, device)
    clean = clipped_per_sample_gradients(model, cand_x, cand_y, max_grad_norm=config["max_grad_norm"])
    gen = torch.Generator(device="cpu").manual_seed(seed)
    records, shown, titles = [], [], []
    for j in range(n_images):
        noise = torch.randn(clean.shape[1], generator=gen).to(device)
        released = clean[j] + config["noise_multiplier"] * config["max_grad_norm"] * noise
        start = time.perf_counter()
        guess = int(identify(released, clean)[0])
        seconds = time.perf_counter() - start
        records.append(
            {
                "index": order[j],
                "identified": guess == j,
                "guess": order[guess],
                "i2f_lb": _i2f(model, cand_x[j : j + 1], cand_y[j : j + 1], config),
                "seconds": seconds,
            }
        )
        shown.append(cand_x[guess])
        titles.append("✓" if guess == j else "✗")
    summary = {
        "identification_rate": sum(r["identified"] for r in records) / len(records),
        "chance": 1.0 / config["candidates"],
        "candidates": config["candidates"],
    }
    return records, shown, titles, summary


def _reconstruct_all(model, dataset, order, originals, config, *, seed, progress):
    """Reconstruct each original from its released gradient: (records, shown, titles, summary)."""
    import statistics

    device = originals.device
    records, shown, titles = [], [], []
    for j in range(len(originals)):
        x, y = originals[j : j + 1], _images(dataset, [order[j]], device)[1]
        record, image = _reconstruct(model, x, y, config, index=order[j], seed=seed + j, progress=progress)
        record["i2f_lb"] = _i2f(model, x, y, config)
        records.append(record)
        shown.append(image)
        titles.append(f"{record['psnr']:.1f} dB" if record["psnr"] is not None else "exact")
    psnrs = [r["psnr"] if r["psnr"] is not None else float("inf") for r in records]
    summary = {
        "median_psnr": _finite(statistics.median(psnrs)),
        "median_ssim": statistics.median(r["ssim"] for r in records),
        "label_accuracy": sum(r["label_correct"] for r in records) / len(records),
    }
    return records, shown, titles, summary


def _out_dir(args: argparse.Namespace):
    from datetime import datetime, timezone
    from pathlib import Path

    out = (
        Path(args.out)
        if args.out
        else Path("runs") / datetime.now(timezone.utc).strftime("attack-%Y%m%d-%H%M%S")
    )
    out.mkdir(parents=True, exist_ok=True)
    return out


def attack(args: argparse.Namespace) -> dict:
    """Run the attack described by ``args``; write and return the ``attack.json`` content.

    Raises:
        ValueError: bad option values (one message naming the option), or more images asked for than the
            test split holds.
        FileNotFoundError: a missing checkpoint or data set (the message says where it was looked for).
    """
    import json

    import torch

    from adaptive_dp.attacks import with_normalization

    _check_args(args)
    raw_model, dataset, config = _load(args)
    info = dataset.info
    model = with_normalization(raw_model, info.mean, info.std)
    device = next(model.parameters()).device
    out = _out_dir(args)
    n_pick = config["candidates"] if args.method == "identify" else args.n_images
    if n_pick > len(dataset):
        raise ValueError(f"the {info.name} test split has {len(dataset)} images; asked for {n_pick}")
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(args.seed))[:n_pick].tolist()
    originals, _ = _images(dataset, order[: args.n_images], device)
    if args.method == "identify":
        records, shown, titles, summary = _identify_all(
            model, dataset, order, config, n_images=args.n_images, seed=args.seed
        )
    else:
        records, shown, titles, summary = _reconstruct_all(
            model, dataset, order, originals, config, seed=args.seed, progress=not args.no_progress
        )
    result = {"config": config, "images": records, "summary": summary}
    (out / "attack.json").write_text(json.dumps(result, indent=2, allow_nan=False))
    bottom_label = "identified" if args.method == "identify" else "reconstruction"
    _plot(list(originals), shown, titles, out / "reconstructions.png", bottom_label=bottom_label)
    result["out"] = str(out)
    return result


def run(args: argparse.Namespace) -> int:
    """Attack; print the summary and where the results went. Returns 0, or 2 with one error line for bad input
    (a damaged checkpoint included); ``--debug`` shows the traceback instead."""
    try:
        result = attack(args)
    except (ValueError, FileNotFoundError, TypeError) as exc:
        return report_failure("attack", exc, debug=getattr(args, "debug", False))
    config, summary = result["config"], result["summary"]
    parts = [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in summary.items()]
    print(
        f"{config['method']} on {config['dataset']} (σ = {config['noise_multiplier']:g}, "
        f"C = {config['max_grad_norm']:g}): " + ", ".join(parts)
    )
    print(f"results in {result['out']}/attack.json and reconstructions.png")
    return 0
