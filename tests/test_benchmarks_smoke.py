"""Smoke tests of the benchmarks.

The contract every ``benchmarks/*.py`` keeps (benchmarks/README.md): a run ends with ONE JSON object as the last
line of stdout and writes its result files to ``--out-dir``. It is checked on each script's tiniest
configuration (``--quick --smoke``, seconds; digits or random tensors where no data root is set).

The validation benchmarks (leakage_validity.py, policies.py) are also imported and their core functions run on a
minimal configuration on scikit-learn's 8×8 digits (offline) and checked against independent truths: opacus'
own RDP accountant for the rescaled schedules, the Rényi filter's guarantee, and the monotone effect of σ on a
real attack.
"""

from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
from contextlib import redirect_stdout
from dataclasses import replace
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import _common  # noqa: E402
import leakage_validity  # noqa: E402
import policies  # noqa: E402


def test_print_summary_is_one_json_line_with_nan_as_null():
    buffer = io.StringIO()
    with redirect_stdout(buffer):
        print("progress line")
        _common.print_summary({"rho": float("nan"), "nested": {"x": (1.5, float("inf"))}})
    last = buffer.getvalue().strip().splitlines()[-1]
    assert json.loads(last) == {"rho": None, "nested": {"x": [1.5, None]}}


def test_data_root_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="--data-dir"):
        _common.data_root(tmp_path / "missing")


def test_spearman_ties_and_constant_sides():
    assert leakage_validity.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    # ties at a cap get average ranks: still a perfect monotone relation
    assert leakage_validity.spearman([1, 2, 3, 3], [1, 2, 3, 4]) == pytest.approx(0.9486833, rel=1e-6)
    assert leakage_validity.spearman([1, 1, 1, 1], [1, 2, 3, 4]) is None


def test_leakage_validity_core_on_digits():
    # the --smoke grid, with two attacked images and the quick mode's learning rate
    config = replace(leakage_validity.SMOKE, n_attack=2, lr=leakage_validity.QUICK.lr)
    out = leakage_validity.run_dataset("digits", config=config, progress=False)
    assert {st["model"] for st in out["stages"]} == {"small-cnn", "lenet"}
    assert len(out["points"]) == 2 * 2 * 3
    for st in out["stages"]:
        lr = st["meters"]["likelihood-ratio"]
        assert lr[0] > lr[-1]  # more noise, less measured leakage
        assert max(lr) <= st["cap"] + 1e-9  # InfoNCE never exceeds log N
        assert st["identification"][0] >= st["identification"][-1]
    corr = out["correlations"]
    assert corr["sigma"]["likelihood-ratio"] < 0
    assert corr["identification"]["likelihood-ratio"] > 0.5  # the LR meter tracks the identification attack
    head = leakage_validity.headline({"digits": out})
    for key in (
        "spearman_mi_identification",
        "spearman_mi_psnr",
        "spearman_i2f_psnr",
        "spearman_mi_sigma",
        "recommended_estimator",
    ):
        assert key in head
    assert head["recommended_estimator"] in out["meters"]


def test_recommendation_prefers_the_training_free_meter_within_the_tie_margin():
    def dataset(lr_rho, other_rho):
        corr = {
            "identification": {"likelihood-ratio": lr_rho, "token-mine/span": other_rho},
            "psnr": {"likelihood-ratio": 0.5, "token-mine/span": 0.5},
            "sigma": {"likelihood-ratio": -0.9, "token-mine/span": -0.9},
        }
        return {"meters": ["likelihood-ratio", "token-mine/span"], "correlations": corr}

    margin = leakage_validity.TIE_MARGIN
    assert leakage_validity.headline({"a": dataset(0.95, 0.95 + margin / 2)})["recommended_estimator"] == (
        "likelihood-ratio"
    )
    assert leakage_validity.headline({"a": dataset(0.95, 0.95 + 2 * margin)})["recommended_estimator"] == (
        "token-mine/span"
    )
    # the worst data set decides
    assert (
        leakage_validity.headline({"a": dataset(0.99, 0.8), "b": dataset(0.9, 0.97)})["recommended_estimator"]
        == "likelihood-ratio"
    )


@pytest.mark.parametrize("script", [leakage_validity, policies], ids=["leakage_validity", "policies"])
def test_report_only_rebuilds_the_report_from_the_json(tmp_path, script):
    results = BENCHMARKS / "results" / f"{script.NAME}.json"
    (tmp_path / f"{script.NAME}.json").write_text(results.read_text())
    with redirect_stdout(io.StringIO()):
        summary = script.main(["--report-only", "--out-dir", str(tmp_path)])
    committed = json.loads(results.read_text())
    if script is leakage_validity:
        expected = leakage_validity.headline(committed["by_dataset"])["recommended_estimator"]
        assert summary["recommended_estimator"] == expected
    else:
        assert summary["best"] == committed["best"]  # nothing re-run: the same rows win
    text = (tmp_path / f"{script.NAME}.md").read_text()
    assert "rebuilt from the committed JSON" in text and (tmp_path / f"{script.NAME}.png").stat().st_size > 0
    for name in committed["by_dataset"]:
        assert f"## {name}" in text and f"--dataset {name}`" in text
    with pytest.raises(SystemExit, match="no full-mode results"):
        script.main(["--report-only", "--out-dir", str(tmp_path / "empty")])


def test_rescaled_schedule_spends_the_budget_per_opacus():
    from opacus.accountants import RDPAccountant

    q, steps, target = 0.05, 60, 3.0
    s0 = policies.rescale_schedule("exponential", target_epsilon=target, sample_rate=q, total_steps=steps)
    sigmas = policies.schedule_sigmas("exponential", sigma_start=s0, total_steps=steps)
    assert sigmas[0] == pytest.approx(s0) and sigmas[-1] < sigmas[0]
    acc = RDPAccountant()
    for s in sigmas:
        acc.history.append((float(s), q, 1))
    assert acc.get_epsilon(delta=policies.DELTA) == pytest.approx(target, rel=1e-3)


def test_policies_core_on_digits():
    config = replace(
        policies.QUICK,
        epsilons=(3.0,),
        epochs=1,
        n_train=384,
        n_audit=16,
        n_test=200,
        budget_policies=("uniform", "linear", "pid"),
        ceiling_policies=("capacity", "threshold"),
        attack_iterations=2,
        id_trials=1,
    )
    out = policies.run_dataset("digits", config=config, progress=False)
    budget = {r["policy"]: r for r in out["budget"]}
    assert budget["uniform"]["odometer_epsilon"] <= 3.0 + 1e-2
    assert budget["linear"]["odometer_epsilon"] == pytest.approx(3.0, rel=1e-2)  # rescaled to spend it all
    assert budget["pid"]["guarantee_epsilon"] == pytest.approx(3.0)
    assert budget["pid"]["odometer_epsilon"] <= 3.0 + 1e-6  # the Rényi filter never overspends
    ceiling = {r["policy"]: r for r in out["ceiling"]}
    assert out["ceiling_info"]["sigma_capacity"] == pytest.approx(1 / math.sqrt(2 * config.ceiling))
    # the capacity bound I ≤ 1/(2σ²) = ceiling holds for the mean reading (single readings are noisy estimates)
    assert ceiling["capacity"]["mean_mi"] <= config.ceiling + 0.1
    assert ceiling["threshold"]["guarantee_epsilon"] is None
    for row in out["budget"] + out["ceiling"]:
        assert 0.0 <= row["accuracy"] <= 1.0 and row["steps"] > 0 and row["readings"] >= 1


# ------------------------------------------------------------------------------------ the last-line contract

#: every benchmark script (the shared helpers excepted): each must end its run with one JSON object on stdout
SCRIPTS = sorted(p.name for p in BENCHMARKS.glob("*.py") if p.name != "_common.py")
#: the heaviest smoke runs (15–20 CPU s each on one core: model builds, child processes), run with `-m slow`;
#: their core functions have fast tests above (policies) or elsewhere
HEAVY = {"finetune_speed.py", "monitor_cost.py", "policies.py"}


def test_every_benchmark_is_covered():
    """The contract below runs each script found; the known ones must be among them (the glob works)."""
    assert {
        "accountant.py",
        "attack_speed.py",
        "epoch.py",
        "leakage_validity.py",
        "monitor_cost.py",
        "overhead.py",
        "policies.py",
    } <= set(SCRIPTS)


@pytest.mark.parametrize(
    "script", [pytest.param(s, marks=pytest.mark.slow) if s in HEAVY else s for s in SCRIPTS]
)
def test_quick_smoke_run_ends_with_one_json_line(script, tmp_path):
    """``python benchmarks/<script> --quick --smoke`` (the tiniest configuration) exits 0, writes its results
    to ``--out-dir`` (never to the committed ``benchmarks/results``) and its last stdout line is a JSON object
    naming the mode it ran in."""

    def committed() -> dict[str, int]:
        return {p.name: p.stat().st_mtime_ns for p in (BENCHMARKS / "results").glob(f"{Path(script).stem}.*")}

    before = committed()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), "--quick", "--smoke", "--out-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    last = result.stdout.strip().splitlines()[-1]
    summary = json.loads(last)
    assert isinstance(summary, dict)
    assert summary.get("smoke") is True or summary.get("mode") == "smoke", summary
    assert any(p.suffix == ".json" for p in tmp_path.iterdir()), "no results written to --out-dir"
    assert committed() == before, "a smoke run touched the committed results"
