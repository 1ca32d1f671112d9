"""AdaptivePrivacyEngine under torch.distributed: 2 CPU processes (gloo) on 127.0.0.1, each test time-bounded.

The ranks are plain subprocesses started with torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR,
MASTER_PORT); each runs this file as a script (``python tests/test_distributed.py MODE OUT``) and writes what it
saw to ``OUT/rank<R>.<wrapper>.json``. The CLI test goes through torchrun itself.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

STEPS = 30
TIMEOUT_S = 8.0  # process-group timeout of the workers that lose a rank (the test measures how soon it fires)
# healthy runs: generous, so that a loaded CI machine (pytest-xdist beside two ranks on 2 cores) never makes a
# collective time out; under torch DDP a timeout inside backward aborts the process (torch's reducer)
HEALTHY_TIMEOUT_S = 60.0
WRAPPERS = ("dpddp", "torch-ddp")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(rank: int, world: int, port: int) -> dict[str, str]:
    env = dict(
        os.environ,
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
        WANDB_MODE="disabled",
    )
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    return env


def _launch(
    mode: str, out: Path, *, world: int = 2, timeout: float = 60.0, wait_for: tuple[int, ...] | None = None
) -> tuple[list[int | None], list[str], float]:
    """Start ``world`` ranks of this file in ``mode`` and wait for the ranks ``wait_for`` (default all), then
    kill the others; returns (exit codes, stderr tails, seconds until the awaited ranks ended)."""
    port = _free_port()
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, mode, str(out)],
            env=_env(r, world, port),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(world)
    ]
    errs = [""] * world
    try:
        for r in range(world) if wait_for is None else wait_for:
            _, err = procs[r].communicate(timeout=max(1.0, timeout - (time.perf_counter() - start)))
            errs[r] = err[-3000:]
        seconds = time.perf_counter() - start
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return [p.returncode for p in procs], errs, seconds


def _rank_results(out: Path, wrapper: str, world: int = 2) -> list[dict]:
    return [json.loads((out / f"rank{r}.{wrapper}.json").read_text()) for r in range(world)]


# -- the worker (runs in each rank's process) ------------------------------------------------------------------
def _synthetic(n: int, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    centres = torch.randn(4, 16, generator=torch.Generator().manual_seed(123))
    x = centres[y] + 0.8 * torch.randn(n, 16, generator=g)
    return x, y


def _worker(mode: str, out: Path) -> int:
    """One rank: ``mode`` "train" runs both wrappers in turn (one process start-up for both); "die" / "hang"
    lose rank 1 after 5 steps. Writes ``OUT/rank<R>.<wrapper>.json``; exit code 3 after a DistributedError."""
    import torch

    from adaptive_dp import distributed as ddp

    torch.set_num_threads(1)
    context = ddp.init_distributed(timeout_s=HEALTHY_TIMEOUT_S if mode == "train" else TIMEOUT_S)
    for wrapper in WRAPPERS if mode == "train" else ("dpddp",):
        result = _train_one(wrapper, mode, context)
        if result["error"] is None:
            result["gathered_sigmas"] = ddp.all_gather_object(
                result["sigmas"], what="gather of the σ histories"
            )
        (out / f"rank{context.rank}.{wrapper}.json").write_text(json.dumps(result))
        if result["error"] is not None:
            return 3
    ddp.shutdown()
    return 0


def _train_one(wrapper: str, mode: str, context) -> dict:
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from adaptive_dp import distributed as ddp
    from adaptive_dp.privacy_engine import AdaptivePrivacyEngine

    rank = context.rank
    torch.manual_seed(1000 + rank)  # different initial weights per rank: the wrapper must broadcast rank 0's
    net = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))
    # opacus' DPDDP (recommended), or torch's DDP, which opacus also accepts
    model = torch.nn.parallel.DistributedDataParallel(net) if wrapper == "torch-ddp" else ddp.wrap_model(net)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    x, y = _synthetic(640, seed=0)
    loader = DataLoader(TensorDataset(x, y), batch_size=64)  # global q = 64 / 640
    engine = AdaptivePrivacyEngine(accountant="rdp")
    common = dict(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        max_grad_norm=1.0,
        target_mi=0.05,
        controller="pid",
        audit_data=_synthetic(64, seed=1),
        monitor_every=3,
    )
    if wrapper == "torch-ddp":  # with a hard budget: the Rényi filter floors σ on every rank
        model, optimizer, loader = engine.make_private_with_epsilon(
            **common, target_epsilon=3.0, target_delta=1e-5, epochs=STEPS * 64 // 640
        )
    else:
        model, optimizer, loader = engine.make_private(**common, noise_multiplier=1.0, target_delta=1e-5)
    loader = ddp.distributed_poisson_loader(loader, generator=torch.Generator().manual_seed(7 + rank))
    error = None
    last_step_done = time.monotonic()
    try:
        while len(engine.history) < STEPS:
            for xb, yb in loader:
                optimizer.zero_grad(set_to_none=True)
                nn.functional.cross_entropy(model(xb), yb).backward()
                optimizer.step()
                last_step_done = time.monotonic()
                if mode == "die" and rank == 1 and len(engine.history) == 5:
                    os._exit(17)  # a rank dies abruptly
                if mode == "hang" and rank == 1 and len(engine.history) == 5:
                    time.sleep(60)  # a rank is stuck
                if len(engine.history) == STEPS:
                    break
    except ddp.DistributedError as exc:
        error = str(exc)
    return {
        "rank": rank,
        "error": error,
        "world_size": context.world_size,
        "stalled_s": time.monotonic() - last_step_done,  # from the last completed step to the end / the error
        "sigmas": [r["noise_multiplier"] for r in engine.history],
        "epsilons": [r["epsilon"] for r in engine.history],
        "mi": [r["mi"] for r in engine.history],
        "epsilon": float(engine.get_epsilon(1e-5)) if engine.history else None,
        "sample_rate": engine.sample_rate,
        "floors": [r["sigma_floor"] for r in engine.history],
        "guarantee_epsilon": engine.guarantee_epsilon,
        "monitor_on_this_rank": engine.monitor is not None,
        "params": [p.detach().flatten().tolist() for p in model.parameters()],
    }


# -- tests ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_rank_runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp")
    codes, errs, _ = _launch("train", out, timeout=80)
    assert codes == [0, 0], errs
    return out


@pytest.fixture(params=WRAPPERS)
def two_rank_run(two_rank_runs, request):
    """Rank results of 2-process training: opacus' DPDDP; torch's DDP with a hard ε budget (Rényi filter)."""
    return _rank_results(two_rank_runs, request.param)


def test_every_rank_books_the_same_sigma_and_epsilon(two_rank_run):
    r0, r1 = two_rank_run
    assert len(r0["sigmas"]) == STEPS
    assert r0["gathered_sigmas"] == r1["gathered_sigmas"] == [r0["sigmas"], r1["sigmas"]]
    assert r0["sigmas"] == r1["sigmas"]
    assert len(set(r0["sigmas"])) > 1, "the controller never moved σ: the test would not see a mismatch"
    assert r0["epsilons"] == r1["epsilons"] and r0["epsilon"] == r1["epsilon"]
    assert r0["mi"] == r1["mi"]  # rank 0's readings, broadcast with σ
    assert r0["monitor_on_this_rank"] and not r1["monitor_on_this_rank"]
    assert r0["floors"] == r1["floors"]
    assert r0["guarantee_epsilon"] == r1["guarantee_epsilon"]
    if r0["floors"][0] is not None:  # the budget run: floors computed on every rank, σ never below
        assert all(s >= f for s, f in zip(r0["sigmas"], r0["floors"]))
        assert r0["epsilon"] <= r0["guarantee_epsilon"] * 1.01
    else:  # a ceiling without a budget: the Rényi odometer, never below the composition
        assert r0["guarantee_epsilon"] >= r0["epsilon"]


def test_epsilon_equals_a_single_process_accountant_on_the_same_history(two_rank_run):
    from opacus.accountants import RDPAccountant

    r0, _ = two_rank_run
    assert r0["sample_rate"] == pytest.approx(64 / 640)  # the global batch's q, as one process would have
    reference = RDPAccountant()
    for sigma in r0["sigmas"]:
        reference.step(noise_multiplier=sigma, sample_rate=r0["sample_rate"])
    assert r0["epsilon"] == pytest.approx(reference.get_epsilon(1e-5), rel=1e-9)


def test_trained_parameters_are_identical_across_ranks(two_rank_run):
    import torch

    r0, r1 = two_rank_run
    for a, b in zip(r0["params"], r1["params"]):
        assert torch.equal(torch.tensor(a), torch.tensor(b))
    # and training moved them away from rank 0's initialisation
    torch.manual_seed(1000)
    init = torch.nn.Linear(16, 16).weight.flatten()
    assert not torch.allclose(torch.tensor(r0["params"][0]), init)


@pytest.mark.parametrize("mode", ["die", "hang"])
def test_a_lost_rank_makes_the_other_fail_with_a_clear_error_in_bounded_time(tmp_path, mode):
    codes, errs, _ = _launch(mode, tmp_path, timeout=60, wait_for=(0,))
    if mode == "die":
        assert codes[1] == 17
    assert codes[0] == 3, errs[0]
    r0 = json.loads((tmp_path / "rank0.dpddp.json").read_text())
    assert "rank 0 of 2" in r0["error"] and "another rank has probably died" in r0["error"], r0["error"]
    assert 5 <= len(r0["sigmas"]) <= 6  # it stopped at the step the other rank missed
    # bounded: a dead peer is noticed at the next collective, a stuck one after the process-group timeout
    assert r0["stalled_s"] < TIMEOUT_S + 10, r0
    if mode == "hang":
        assert r0["stalled_s"] > 0.8 * TIMEOUT_S, r0  # it was the timeout that ended the wait


def test_torchrun_cli_writes_rank_histories(tmp_path, data_root):
    out = tmp_path / "run"
    port = _free_port()
    env = _env(0, 1, port)
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name)
    env["ADAPTIVE_DP_DATA"] = str(data_root)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={port}",
        "-m",
        "adaptive_dp.cli",
        "train",
        "--dataset",
        "digits",
        "--epochs",
        "1",
        "--batch-size",
        "128",
        "--target-mi",
        "0.5",
        "--controller",
        "pid",
        "--monitor-every",
        "3",
        "--wandb-mode",
        "disabled",
        "--no-progress",
        "--dist-timeout",
        "20",
        "--out",
        str(out),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("results in") == 1  # rank 0 reports
    main = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    ranks = [
        [json.loads(line) for line in (out / f"history.rank{r}.jsonl").read_text().splitlines()]
        for r in (0, 1)
    ]
    assert len(main) == len(ranks[0]) == len(ranks[1]) > 5
    for field in ("step", "noise_multiplier", "epsilon", "mi", "sample_rate"):
        assert [r[field] for r in main] == [r[field] for r in ranks[0]] == [r[field] for r in ranks[1]]
    assert [r["rank"] for r in ranks[1]] == [1] * len(main)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["distributed"]["world_size"] == 2 and summary["steps"] == len(main)
    assert summary["sample_rate"] == main[0]["sample_rate"]
    assert (out / "checkpoint.pt").is_file()
    from adaptive_dp.training.loop import load_trained_model

    model, _ = load_trained_model(out)  # plain module keys: no DPDDP "module." prefix
    assert sum(p.numel() for p in model.parameters()) > 0


if __name__ == "__main__":
    code = _worker(sys.argv[1], Path(sys.argv[2]))
    # skip interpreter teardown on every path: after a DistributedError the broken gloo group can abort it, and
    # under heavy load gloo's destructor occasionally aborts (SIGABRT, -6) a healthy rank whose results are
    # already written and whose group was already left (ddp.shutdown); the exit code must say what happened.
    from adaptive_dp.distributed import exit_after_failure

    exit_after_failure(code)
