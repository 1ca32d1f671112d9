"""``adaptive-dp attack`` end to end on digits: attack.json schema, reconstructions.png, checkpoints, errors."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from adaptive_dp.cli import main


def _attack(tmp_path, *argv: str) -> dict:
    code = main(["attack", "--no-progress", "--out", str(tmp_path), *argv])
    assert code == 0
    text = (tmp_path / "attack.json").read_text()
    return json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))


def _check_png(path, *, columns: int) -> None:
    with Image.open(path) as image:
        width, height = image.size
    assert height > 200 and width > 100 * columns * 0.9  # two rows of `columns` panels


def test_dlg_writes_schema_and_figure(tmp_path):
    result = _attack(
        tmp_path,
        "--dataset",
        "digits",
        "--method",
        "dlg",
        "--n-images",
        "2",
        "--iterations",
        "60",
        "--restarts",
        "2",
        "--noise-multiplier",
        "0",
        "--max-grad-norm",
        "1",
    )
    assert set(result) == {"config", "images", "summary"}
    config = result["config"]
    assert config["method"] == "dlg" and config["dataset"] == "digits" and config["model"] == "lenet"
    assert (
        config["noise_multiplier"] == 0.0 and config["max_grad_norm"] == 1.0 and config["checkpoint"] is None
    )
    assert len(result["images"]) == 2
    for record in result["images"]:
        assert {"index", "psnr", "ssim", "mse", "i2f_lb", "label_correct", "seconds"} <= set(record)
        assert record["i2f_lb"] == 0.0  # no noise, no displacement
    summary = result["summary"]
    assert summary["median_psnr"] >= 25.0 and summary["median_ssim"] > 0.9
    _check_png(tmp_path / "reconstructions.png", columns=2)


def test_dlg_defaults_are_the_librarys(tmp_path):
    """Without ``--iterations`` / ``--restarts`` the CLI runs DLG with ``adaptive_dp.attacks.dlg``'s defaults
    (several starts probed, the best-matching one continued), and records them in attack.json."""
    from adaptive_dp.attacks.inversion import DLG_ITERATIONS, DLG_RESTARTS

    result = _attack(tmp_path, "--method", "dlg", "--n-images", "1", "--noise-multiplier", "0")
    config = result["config"]
    assert (config["iterations"], config["restarts"]) == (DLG_ITERATIONS, DLG_RESTARTS)
    assert result["summary"]["median_psnr"] >= 25.0


def test_noisy_ig_reports_i2f(tmp_path):
    result = _attack(
        tmp_path, "--method", "ig", "--n-images", "1", "--iterations", "50", "--noise-multiplier", "0.01"
    )
    record = result["images"][0]
    assert record["i2f_lb"] > 0 and record["label_correct"] in (True, False)
    assert result["config"]["iterations"] == 50 and result["summary"]["median_psnr"] == record["psnr"]


def test_identify_all_at_zero_noise(tmp_path):
    result = _attack(
        tmp_path, "--method", "identify", "--n-images", "8", "--candidates", "64", "--noise-multiplier", "0"
    )
    assert result["summary"]["identification_rate"] == 1.0
    assert result["summary"]["candidates"] == 64 and result["summary"]["chance"] == pytest.approx(1 / 64)
    assert all(r["identified"] for r in result["images"])
    _check_png(tmp_path / "reconstructions.png", columns=8)


def test_attack_a_trained_checkpoint(tmp_path):
    from adaptive_dp.training import TrainConfig, load_trained_model, train

    run_dir = tmp_path / "run"
    train(
        TrainConfig(
            dataset="digits",
            model="lenet",
            epochs=1,
            batch_size=128,
            noise_multiplier=0.7,
            wandb_mode="disabled",
            out=str(run_dir),
            device="cpu",
        ),
        progress=False,
    )
    out = tmp_path / "attack"
    result = _attack(
        out,
        "--checkpoint",
        str(run_dir / "checkpoint.pt"),
        "--method",
        "identify",
        "--n-images",
        "4",
        "--candidates",
        "16",
    )
    config = result["config"]
    # dataset, model, σ and C come from the checkpoint's run configuration
    assert config["dataset"] == "digits" and config["model"] == "lenet"
    assert config["noise_multiplier"] == pytest.approx(0.7) and config["max_grad_norm"] == 1.0
    assert 0.0 <= result["summary"]["identification_rate"] <= 1.0
    # the trained weights, not a fresh initialisation, were attacked
    trained, _ = load_trained_model(run_dir / "checkpoint.pt")
    from adaptive_dp.models import build_model

    fresh = build_model("lenet", in_channels=1, num_classes=10, image_size=8, seed=0)
    assert not torch.equal(trained.fc.weight, fresh.fc.weight)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--checkpoint", "/nonexistent/checkpoint.pt"], "no checkpoint"),
        (["--n-images", "0"], "--n-images"),
        (["--method", "identify", "--n-images", "8", "--candidates", "4"], "--candidates"),
        (["--noise-multiplier", "-1"], "--noise-multiplier"),
        (["--max-grad-norm", "0"], "--max-grad-norm"),
        (["--restarts", "0"], "--restarts"),
    ],
)
def test_bad_input_is_one_clear_error(tmp_path, capsys, argv, message):
    code = main(["attack", "--no-progress", "--out", str(tmp_path), *argv])
    assert code == 2
    err = capsys.readouterr().err
    assert "adaptive-dp attack: error:" in err and message in err


def _registered(option: str) -> list[str]:
    from adaptive_dp.data import DATASETS
    from adaptive_dp.models import MODELS

    return {"--method": [], "--model": list(MODELS), "--dataset": list(DATASETS)}[option]


@pytest.mark.parametrize("option", ["--method", "--model", "--dataset"])
def test_unknown_names_are_rejected_listing_the_registry(capsys, option):
    with pytest.raises(SystemExit) as exc:
        main(["attack", option, "nonsense"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'nonsense'" in err
    assert all(repr(name) in err for name in _registered(option))  # the choices are the registry's names


def test_dataset_aliases_pass_the_choices():
    from adaptive_dp.cli import build_parser

    args = build_parser().parse_args(["attack", "--dataset", "CIFAR_10", "--model", "lenet"])
    assert (args.dataset, args.model) == ("CIFAR_10", "lenet")  # load_dataset resolves the alias


def _imported_top_level(stderr: str) -> set[str]:
    """Top-level packages listed by ``python -X importtime`` (lines ``import time: self | cumulative | name``)."""
    return {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in stderr.splitlines() if "|" in line}


def test_module_help_works_without_importing_torch():
    """``python -m adaptive_dp.cli --help`` answers from the standard library (no torch: fast)."""
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "adaptive_dp.cli", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage: adaptive-dp" in result.stdout and "train" in result.stdout and "attack" in result.stdout
    imported = _imported_top_level(result.stderr)
    assert "adaptive_dp" in imported and not imported & {"torch", "opacus", "numpy"}


def test_console_script_help_lists_the_registries():
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    script = Path(sys.executable).with_name("adaptive-dp")
    script = str(script) if script.exists() else shutil.which("adaptive-dp")
    if script is None:
        pytest.skip("the adaptive-dp console script is not installed (pip install -e .)")
    top = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=120)
    assert top.returncode == 0 and "usage: adaptive-dp" in top.stdout, top.stderr[-2000:]
    result = subprocess.run([script, "attack", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    from adaptive_dp.data import DATASETS
    from adaptive_dp.models import MODELS

    unwrapped = "".join(result.stdout.split())  # argparse may wrap a long name at its hyphen
    assert all(name in unwrapped for name in [*MODELS, *DATASETS])  # --model/--dataset help
