"""AdaptivePrivacyCallback under Lightning's ``strategy="ddp"``: 2 CPU processes (gloo), σ decided once for both.

The test runs this file as a script (``python tests/test_lightning_ddp.py OUT``); Lightning's DDP launcher starts
the second rank by running the same command again, and each rank writes what it saw to ``OUT/rank<R>.json``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

WORLD = 2
TIMEOUT_S = 300


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ddp_ranks_use_the_same_sigma_and_stay_in_sync(tmp_path):
    pytest.importorskip("lightning.pytorch")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK")}
    env.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), OMP_NUM_THREADS="1", WANDB_MODE="disabled"
    )
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, __file__, str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    r0, r1 = ranks
    assert r0["sigma"] == r1["sigma"] and r0["epsilon"] == r1["epsilon"]  # one decision, booked by both
    assert len(r0["sigma"]) == r0["steps_per_epoch"] and len(set(r0["sigma"])) > 2  # every step; σ adapted
    assert r0["readings"] > 0 and r0["readings"] == r1["readings"]  # rank 0 reads, every rank records
    assert r0["parameters"] == r1["parameters"]  # the all-reduced noisy update keeps the replicas identical
    # each rank Poisson-samples its half of the training set at the global q: local batches of N·q/2 on average
    expected_local = r0["train_size"] * r0["sample_rate"] / WORLD
    for r in ranks:
        assert abs(r["mean_batch"] - expected_local) < 0.25 * expected_local


def _main(out: Path) -> None:
    """One rank (run by the test, and again by Lightning's launcher for rank 1)."""
    import lightning.pytorch as pl
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from test_lightning import DigitsData, DigitsNet

    from adaptive_dp.lightning import AdaptivePrivacyCallback

    torch.set_num_threads(1)
    sizes: list[int] = []

    class BatchSizes(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            sizes.append(len(batch[1]))

    callback = AdaptivePrivacyCallback(
        noise_multiplier=1.0, max_grad_norm=1.0, target_mi=0.3, audit_fraction=0.1, monitor_every=3
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=WORLD,
        strategy="ddp",
        use_distributed_sampler=False,
        max_epochs=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        enable_checkpointing=False,
        callbacks=[callback, BatchSizes()],
    )
    model = DigitsNet()
    trainer.fit(model, datamodule=DigitsData())
    history = callback.engine.history
    result = {
        "sigma": [r["noise_multiplier"] for r in history],
        "epsilon": callback.engine.get_epsilon(1e-5),
        "readings": sum(r["mi"] is not None for r in history),
        "parameters": [p.detach().double().sum().item() for p in model.parameters()],
        "steps_per_epoch": len(trainer.train_dataloader),
        "sample_rate": callback.engine.sample_rate,
        "train_size": len(trainer.train_dataloader.dataset),
        "mean_batch": sum(sizes) / len(sizes),
    }
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    _main(Path(sys.argv[1]))
