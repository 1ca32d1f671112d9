"""``adaptive-dp train --canaries``: the one-run canary audit's files, summary field and option checks."""

from __future__ import annotations

import json

import pytest
import torch
from train_helpers import run_cli

from adaptive_dp.auditing import audit_from_scores
from adaptive_dp.training.config import TrainConfig

pytestmark = pytest.mark.filterwarnings(
    "ignore:Optimal order is the smallest alpha",
    "ignore:Optimal order is the largest alpha",
    "ignore:Secure RNG turned off",
    "ignore:Full backward hook is firing",
)

COMMON = ["--dataset", "digits", "--audit-fraction", "0", "--wandb-mode", "disabled", "--no-progress"]


@pytest.fixture(scope="module")
def canary_run(tmp_path_factory):
    """σ = 0 (clipping only, ε = ∞) with 200 gradient canaries: the audit's power check."""
    out = tmp_path_factory.mktemp("canaries")
    code = run_cli(
        COMMON
        + ["--epochs", "2", "--max-grad-norm", "10", "--noise-multiplier", "0", "--canaries", "200"]
        + ["--out", str(out)]
    )
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    report = json.loads((out / "canary_audit.json").read_text())
    return out, summary, report


def test_clipping_only_run_is_audited_far_above_zero(canary_run):
    out, summary, report = canary_run
    assert summary["epsilon"] == float("inf")  # σ = 0: no formal guarantee at all
    assert report["mode"] == "gradient" and report["canaries"] == 200
    assert report["epsilon_lower_bound"] > 1.0
    assert summary["empirical_epsilon"] == pytest.approx(report["epsilon_lower_bound"])
    assert report["delta"] == summary["delta"]
    assert (out / "canary_audit.png").stat().st_size > 0
    assert summary["outputs"]["canary_plot"] == str(out / "canary_audit.png")


def test_saved_scores_reproduce_the_bound_and_separate_the_canaries(canary_run):
    _, _, report = canary_run
    scores = torch.tensor(report["scores"], dtype=torch.float64)
    included = torch.tensor(report["included"])
    assert scores.shape == included.shape == (200,)
    # at σ = 0 an included canary's gradient (norm C) enters the updates unmasked: its score is far higher
    assert scores[included].median() > scores[~included].quantile(0.9)
    again = audit_from_scores(
        scores=scores,
        included=included,
        delta=report["delta"],
        confidence=report["confidence"],
        mode="gradient",
    )
    assert again.epsilon_lower_bound == pytest.approx(report["epsilon_lower_bound"])
    assert (again.guesses, again.correct, again.k) == (report["guesses"], report["correct"], report["k"])


def test_run_without_canaries_has_null_empirical_epsilon(tmp_path):
    assert run_cli(COMMON + ["--epochs", "1", "--batch-size", "256", "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["empirical_epsilon"] is None and summary["canaries"] == 0
    assert not (tmp_path / "canary_audit.json").exists() and not (tmp_path / "canary_audit.png").exists()
    assert "canary_audit" not in summary["outputs"]


@pytest.mark.parametrize(
    ("options", "fix"),
    [
        ({"canaries": 1}, "integer >= 2"),
        ({"canaries": -3}, "integer >= 2"),
        ({"canaries": 10, "canary_mode": "white-box"}, "gradient, input"),
        ({"canaries": 10, "canary_kind": "gauss"}, "dirac, random"),
        ({"canaries": 10, "optimizer": "adam"}, "--canary-mode input"),
    ],
)
def test_bad_canary_options_are_refused(options, fix):
    with pytest.raises(ValueError, match=fix):
        TrainConfig(**options).validate()


def test_non_private_refuses_canaries():
    with pytest.raises(ValueError, match="--canaries"):
        TrainConfig(non_private=True, canaries=10).validate()
    TrainConfig(
        canaries=10, canary_mode="input", optimizer="adam"
    ).validate()  # input canaries: any optimizer
