"""Checkpoint → new process → resume reproduces the uninterrupted run's σ and ε.

The run has everything that carries state: a PID controller, the leakage monitor (its noise generator),
the Rényi filter of a budget, the incremental accountant and the optimizer's momentum. The uninterrupted
run and the interrupted one reseed the global RNG at the same step, so data sampling and noise match; the
resumed process must then produce the same σ for every later step, the same readings and the same ε.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(
    """
    import json, sys, warnings
    warnings.simplefilter("ignore")
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset
    from adaptive_dp.privacy_engine import AdaptivePrivacyEngine

    torch.set_num_threads(1)

    def build():
        torch.manual_seed(0)
        x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
        audit = (torch.randn(24, 8), torch.randint(0, 3, (24,)))
        model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
        engine = AdaptivePrivacyEngine()
        model, optimizer, loader = engine.make_private_with_epsilon(
            module=model, optimizer=optimizer, data_loader=DataLoader(TensorDataset(x, y), batch_size=16),
            target_epsilon=6.0, target_delta=1e-5, epochs=4, max_grad_norm=1.0, target_mi=0.4,
            controller="pid", audit_data=audit, monitor_every=2, sigma_min=0.3, sigma_max=8.0,
        )
        return engine, model, optimizer, loader

    def train(engine, model, optimizer, loader, steps, seed):
        torch.manual_seed(seed)
        for _ in range(steps):
            xb, yb = next(iter(loader))
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(xb), yb).backward()
            optimizer.step()

    def report(engine):
        return {"history": engine.history, "epsilon": engine.get_epsilon(1e-5),
                "guarantee": engine.guarantee_epsilon}

    mode, path = sys.argv[1], sys.argv[2]
    engine, model, optimizer, loader = build()
    if mode == "full":
        train(engine, model, optimizer, loader, 5, seed=1)
        train(engine, model, optimizer, loader, 7, seed=2)
    elif mode == "first":
        train(engine, model, optimizer, loader, 5, seed=1)
        engine.save_checkpoint(path=path, module=model, optimizer=optimizer)
    else:
        engine.load_checkpoint(path=path, module=model, optimizer=optimizer)
        train(engine, model, optimizer, loader, 7, seed=2)
    print("RESULT" + json.dumps(report(engine)))
    """
)


def _run(mode: str, path: Path, script: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run(
        [sys.executable, str(script), mode, str(path)],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(ln for ln in done.stdout.splitlines() if ln.startswith("RESULT"))
    return json.loads(line[len("RESULT") :])


def test_resume_in_a_new_process_reproduces_sigma_and_epsilon(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    checkpoint = tmp_path / "checkpoint.pt"
    full = _run("full", checkpoint, script)
    first = _run("first", checkpoint, script)
    resumed = _run("resume", checkpoint, script)

    assert len(full["history"]) == 12 and len(first["history"]) == 5
    assert resumed["history"][:5] == first["history"]  # the saved history comes back as it was
    assert len(resumed["history"]) == 12
    sigmas = [r["noise_multiplier"] for r in full["history"]]
    assert len(set(sigmas)) > 2, "the controller should have moved σ"
    for ours, reference in zip(resumed["history"], full["history"]):
        for key in ("step", "noise_multiplier", "sigma_floor", "epsilon", "mi", "critic_gap"):
            if reference[key] is None:
                assert ours[key] is None
            else:
                assert ours[key] == pytest.approx(reference[key], rel=1e-9, abs=1e-12), (key, ours["step"])
    assert resumed["epsilon"] == pytest.approx(full["epsilon"], rel=1e-12)
    assert resumed["guarantee"] == pytest.approx(full["guarantee"], rel=1e-12) and full["guarantee"] <= 6.0
