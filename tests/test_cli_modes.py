"""``adaptive-dp train`` modes of issue 16: ``--non-private``, ``--grad-sample-mode`` (ghost clipping included),
progress that a log file can hold, and the one-line account of what a run did."""

from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch
from train_helpers import run_cli

from adaptive_dp.data import audit_split, load_dataset
from adaptive_dp.models import build_model
from adaptive_dp.training.checkpoint import load_checkpoint
from adaptive_dp.training.progress import LINES_PER_EPOCH, EpochProgress, progress_mode
from adaptive_dp.training.setup import FASTEST_GRAD_SAMPLE_MODE, resolve_grad_sample_mode
from adaptive_dp.training.summary import leakage_summary, outcome_line
from adaptive_dp.training.tracking import read_history

TINY = [
    "--dataset",
    "digits",
    "--epochs",
    "1",
    "--batch-size",
    "128",
    "--no-progress",
    "--wandb-mode",
    "disabled",
]
pytestmark = pytest.mark.filterwarnings("ignore:Secure RNG turned off", "ignore:Full backward hook is firing")


def _cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = run_cli(argv)
    return code, out.getvalue(), err.getvalue()


# --- --non-private -----------------------------------------------------------------------------------------------
def _plain_sgd_reference(*, lr: float = 0.5, batch_size: int = 128, seed: int = 0) -> dict[str, torch.Tensor]:
    """One epoch of a hand-written plain SGD loop on the same examples, order and initialisation."""
    full = load_dataset("digits", split="train")
    train_set, _ = audit_split(full, fraction=0.02, seed=seed)
    info = full.info
    model = build_model("small-cnn", in_channels=info.in_channels, num_classes=info.num_classes,
                        image_size=info.image_size, seed=seed)  # fmt: skip
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    loader = torch.utils.data.DataLoader(
        train_set, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed)
    )
    for x, y in loader:
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model.state_dict()


def test_non_private_run_is_plain_sgd_with_epsilon_infinite(tmp_path):
    code, stdout, _ = _cli([*TINY, "--non-private", "--out", str(tmp_path)])
    assert code == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert (
        summary["non_private"] is True and summary["epsilon"] is None and summary["odometer_epsilon"] is None
    )
    assert summary["guarantee_epsilon"] is None and summary["mi_readings"] == 0
    assert summary["noise_multiplier_range"] == [0.0, 0.0] and summary["grad_sample_mode"] is None
    history = read_history(tmp_path)
    assert all(r["epsilon"] is None and r["mi"] is None and "loss" in r for r in history)
    assert summary["steps"] == len(history) == 11  # ceil(1408 / 128): fixed-size shuffled batches
    weights = load_checkpoint(tmp_path)["model_state_dict"]
    for name, tensor in _plain_sgd_reference().items():
        assert torch.allclose(weights[name], tensor, atol=1e-6), name
    assert stdout.splitlines()[0] == outcome_line(summary) and "ε = ∞" in stdout


@pytest.mark.parametrize(
    "given",
    [
        ["--target-mi", "0.5"],
        ["--noise-multiplier", "1.0"],
        ["--controller", "linear"],
        ["--target-epsilon", "3"],
    ],
)
def test_non_private_refuses_dp_options(tmp_path, given):
    code, _, err = _cli([*TINY, "--non-private", *given, "--out", str(tmp_path / "out")])
    assert code == 2 and "--non-private" in err and given[0] in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


# --- --grad-sample-mode --------------------------------------------------------------------------------------------
def test_auto_grad_sample_mode_is_the_measured_fastest():
    for model, mode in FASTEST_GRAD_SAMPLE_MODE.items():
        assert resolve_grad_sample_mode("auto", model=model) == mode
    assert resolve_grad_sample_mode("auto", model="vit-tiny") == "hooks"  # not measured: opacus' default
    assert resolve_grad_sample_mode("ew", model="small-cnn") == "ew"
    with pytest.raises(ValueError, match="grad_sample_mode"):
        resolve_grad_sample_mode("fast", model="small-cnn")


@pytest.fixture(scope="module")
def hooks_and_ghost(tmp_path_factory):
    """The same seeded run (monitor on, a reading every 3 steps) with the auto mode and with ghost clipping."""
    runs = {}
    for mode in ("auto", "ghost"):
        out = tmp_path_factory.mktemp(mode)
        code, stdout, _ = _cli([*TINY, "--monitor-every", "3", "--grad-sample-mode", mode, "--out", str(out)])
        assert code == 0
        runs[mode] = (
            json.loads((out / "summary.json").read_text()),
            read_history(out),
            load_checkpoint(out),
            stdout,
        )
    return runs


def test_ghost_clipping_trains_the_same_model_as_per_sample_hooks(hooks_and_ghost):
    """Ghost clipping computes the same clipped sum without storing per-sample gradients: with the same batches
    and noise the two runs agree up to float rounding, and the monitor reads in both modes."""
    (auto, auto_history, auto_state, _), (ghost, ghost_history, ghost_state, _) = (
        hooks_and_ghost["auto"],
        hooks_and_ghost["ghost"],
    )
    assert auto["grad_sample_mode"] == FASTEST_GRAD_SAMPLE_MODE["small-cnn"] == "hooks"
    assert ghost["grad_sample_mode"] == "ghost" and ghost["mi_readings"] == auto["mi_readings"] >= 3
    assert [r["epsilon"] for r in ghost_history] == [r["epsilon"] for r in auto_history]
    for a, g in zip(auto_history, ghost_history):
        assert (a["mi"] is None) == (g["mi"] is None)
        if a["mi"] is not None:
            assert g["mi"] == pytest.approx(a["mi"], abs=1e-3)
    for name, tensor in auto_state["model_state_dict"].items():
        assert torch.allclose(ghost_state["model_state_dict"][name], tensor, atol=1e-4), name


# --- the printout ---------------------------------------------------------------------------------------------------
def test_outcome_line_says_what_happened():
    summary = {"noise_multiplier_range": [0.91, 1.73], "mi_readings": 12, "target_mi": 0.5, "readings_over_ceiling": 2,
               "delta": 1e-5, "odometer_epsilon": 2.71, "guarantee_epsilon": 3.0, "controller": "pid",
               "max_mi": 0.7, "steps": 120}  # fmt: skip
    assert outcome_line(summary) == (
        "σ 0.91–1.73 · 2 of 12 readings over the 0.5-nat ceiling · ε guarantee 3.00 (budget), odometer 2.71 at "
        "δ=1e-05"
    )
    odometer = {**summary, "guarantee_epsilon": 2.95, "guarantee_kind": "renyi-odometer"}
    assert outcome_line(odometer).endswith(
        "ε guarantee 2.95 (Rényi odometer, no budget), odometer 2.71 at δ=1e-05"
    )
    no_guarantee = {**summary, "guarantee_epsilon": None, "guarantee_kind": None}
    assert outcome_line(no_guarantee).endswith("ε odometer 2.71 at δ=1e-05 (no budget: not a guarantee)")
    fixed = {**summary, "noise_multiplier_range": [1.0, 1.0], "target_mi": None, "controller": None,
             "guarantee_epsilon": 2.71, "guarantee_kind": "composition"}  # fmt: skip
    assert outcome_line(fixed) == (
        "σ 1.00 · 12 readings, MI max 0.700 nats · ε 2.71 at δ=1e-05 (composition, σ fixed in advance)"
    )
    assert outcome_line({"non_private": True, "steps": 11}).startswith("non-private SGD")
    blind = {**summary, "meter_blind_steps": 4}
    assert " · blind meter held σ up on 4 steps · " in outcome_line(blind)


def test_leakage_summary_counts_readings_over_the_ceiling_and_blind_steps():
    history = [{"mi": 0.7, "meter_blind": False}, {"mi": None}, {"mi": 0.2, "meter_blind": True},
               {"mi": float("nan"), "meter_blind": True}, {"mi": 0.6}]  # fmt: skip
    figures = leakage_summary(history, target_mi=0.5)
    assert (
        figures["mi_readings"] == 3 and figures["failed_readings"] == 1 and figures["meter_blind_steps"] == 2
    )
    assert figures["readings_over_ceiling"] == 2 and figures["fraction_over_ceiling"] == 2 / 3


def test_cli_prints_the_outcome_line_first(hooks_and_ghost):
    summary, history, _, stdout = hooks_and_ghost["auto"]
    first = stdout.splitlines()[0]
    assert first == outcome_line(summary)
    readings = [r["mi"] for r in history if r["mi"] is not None]
    assert first.startswith("σ 1.00 · ") and f"{len(readings)} readings" in first
    # σ fixed in advance: the accountant's composition is the guarantee
    assert (
        summary["guarantee_kind"] == "composition" and summary["guarantee_epsilon"] == history[-1]["epsilon"]
    )
    assert first.endswith(f"ε {history[-1]['epsilon']:.2f} at δ=1e-05 (composition, σ fixed in advance)")


# --- progress -------------------------------------------------------------------------------------------------------
class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_a_bar_on_a_terminal_and_lines_elsewhere():
    assert progress_mode(True, _Terminal()) == "bar" and progress_mode(True, io.StringIO()) == "lines"
    assert progress_mode(False, _Terminal()) == "off"
    log = io.StringIO()  # a 1-epoch CIFAR-10 run at batch 64: 782 steps
    bar = EpochProgress(range(782), epoch=1, epochs=1, show=True, stream=log)
    for _ in bar:
        bar.update(loss=2.3, sigma=1.0, epsilon=0.5, mi=0.1)
    bar.close()
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and len(lines) <= LINES_PER_EPOCH + 1 and len(log.getvalue()) < 2000
    assert lines[-1].startswith("epoch 1/1 step 782/782: σ=1.000 ε=0.50 MI=0.100") and "loss" not in lines[-1]
    screen = _Terminal()
    bar = EpochProgress(range(50), epoch=1, epochs=1, show=True, stream=screen)
    for _ in bar:
        bar.update(loss=2.3, sigma=1.0, epsilon=0.5, mi=0.1)
    bar.close()
    assert "\r" in screen.getvalue() and "loss=2.300" in screen.getvalue()  # tqdm, on the user's own screen


def test_a_run_logged_to_a_file_has_no_carriage_returns(tmp_path):
    """``adaptive-dp train ... 2> run.log``: stderr is a file, so progress is a few plain lines, no bar."""
    argv = [
        *[a for a in TINY if a != "--no-progress"],
        "--audit-fraction",
        "0",
        "--out",
        str(tmp_path / "run"),
    ]
    with open(tmp_path / "run.log", "w", encoding="utf-8") as log, contextlib.redirect_stderr(log):
        code = run_cli(argv)
    text = (tmp_path / "run.log").read_text(encoding="utf-8")
    assert code == 0 and "\r" not in text and len(text.encode()) < 5_000
    steps = json.loads((tmp_path / "run" / "summary.json").read_text())["steps"]
    assert f"epoch 1/1 step {steps}/{steps}: σ=1.000" in text and "loss=" not in text  # a private metric
