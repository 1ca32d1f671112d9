"""Distributed data-parallel DP-SGD: ranks, the shared σ, Poisson sharding and timeouts instead of hangs.

The set-up follows opacus' own distributed support (opacus 1.6): the model is wrapped in
``opacus.distributed.DifferentiallyPrivateDistributedDataParallel`` (DPDDP: parameters broadcast from rank 0,
no collective in forward or backward) before ``make_private``, which then builds a
``DistributedDPOptimizer`` (each rank clips its own per-sample gradients, only rank 0 adds the noise
N(0, σ²C²), the noisy sums are all-reduced) and a ``DPDataLoader(distributed=True)`` (each rank Poisson-samples
its own shard at the global sample rate q, so the global batch is a Poisson sample of the whole training set
and the accountant books q — the same q as one process with the same expected global batch size).

What this module adds for :class:`adaptive_dp.privacy_engine.AdaptivePrivacyEngine`:

* :func:`init_distributed`: join the process group torchrun describes (``RANK``, ``WORLD_SIZE``,
  ``MASTER_ADDR``, ``MASTER_PORT``), gloo on CPU, nccl on GPU, with a bounded timeout;
* :func:`broadcast_object`: rank 0's decision (σ and its record) sent to every rank each step, so the rank
  that adds the noise and every rank's accountant and Rényi filter see the identical σ at the same step;
* :func:`collective_errors`: a failed or timed-out collective (a rank died or hangs) becomes one
  :class:`DistributedError` naming the rank, the operation and the timeout, instead of a hang;
* :func:`distributed_poisson_loader`: opacus' distributed Poisson sampler skips a rank's empty batch, which
  puts the ranks out of step; this one yields it (opacus handles empty batches), so every rank takes the same
  number of steps;
* :class:`RankTracker`: rank 0 writes ``history.jsonl`` / W&B; every rank writes ``history.rank<R>.jsonl``.

"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.distributed as dist
from opacus.distributed import DifferentiallyPrivateDistributedDataParallel as DPDDP
from opacus.grad_sample import AbstractGradSampleModule
from opacus.utils.uniform_sampler import DistributedUniformWithReplacementSampler
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "DistributedContext",
    "DistributedError",
    "RankTracker",
    "all_gather_object",
    "barrier",
    "broadcast_object",
    "collective_errors",
    "distributed_poisson_loader",
    "exit_after_failure",
    "get_rank",
    "get_world_size",
    "init_distributed",
    "is_distributed",
    "launched_by_torchrun",
    "rank_history_path",
    "shutdown",
    "unwrap_distributed",
    "wrap_model",
]

#: default bound (seconds) on joining the process group and on every collective.
DEFAULT_TIMEOUT_S = 60.0
_TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class DistributedError(RuntimeError):
    """A collective failed or timed out: another rank died, hangs, or the ranks are out of step."""


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands in the process group.

    Attributes:
        rank: this process' rank in [0, world_size).
        world_size: number of processes.
        local_rank: rank on this machine (the GPU index with nccl).
        backend: "gloo" or "nccl".
        timeout_s: bound on every collective, seconds.
    """

    rank: int
    world_size: int
    local_rank: int
    backend: str
    timeout_s: float

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0 (the rank that decides σ, runs the monitor and tracks the run)."""
        return self.rank == 0


def launched_by_torchrun() -> bool:
    """Whether the environment describes a process group of more than one process (``WORLD_SIZE`` > 1)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def is_distributed() -> bool:
    """Whether a torch.distributed process group of more than one process is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    """This process' rank (0 without a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    """Number of processes (1 without a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _check_timeout(timeout_s: float) -> float:
    if (
        isinstance(timeout_s, bool)
        or not isinstance(timeout_s, (int, float))
        or not (math.isfinite(timeout_s) and timeout_s > 0)
    ):
        raise ValueError(f"timeout_s must be a finite number of seconds > 0, got {timeout_s!r}")
    return float(timeout_s)


def init_distributed(
    *, backend: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S, device: str | None = None
) -> DistributedContext:
    """Join the process group described by torchrun's environment, with a bounded timeout.

    Args:
        backend: "gloo" or "nccl"; None: nccl when ``device`` is CUDA, else gloo.
        timeout_s: seconds; bounds joining the group and every later collective (a rank that died or hangs
            makes the others fail with :class:`DistributedError` after at most this long).
        device: "cpu", "cuda" or None (CUDA when torch sees a GPU); with nccl, ``cuda:LOCAL_RANK`` becomes
            the current device.

    Returns:
        :class:`DistributedContext`. If a group is initialised already it is used as it is.

    Raises:
        ValueError: ``RANK`` / ``WORLD_SIZE`` / ``MASTER_ADDR`` / ``MASTER_PORT`` missing (launch with
            ``torchrun --nproc_per_node=N -m adaptive_dp.cli train ...``), bad ``timeout_s`` or backend.
        DistributedError: the other ranks did not join within ``timeout_s``.
    """
    timeout_s = _check_timeout(timeout_s)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_initialized():
        return DistributedContext(
            rank=dist.get_rank(),
            world_size=dist.get_world_size(),
            local_rank=local_rank,
            backend=str(dist.get_backend()),
            timeout_s=timeout_s,
        )
    missing = [name for name in _TORCHRUN_ENV if name not in os.environ]
    if missing:
        raise ValueError(
            f"no process group described: {', '.join(missing)} not set; launch with "
            "`torchrun --nproc_per_node=N -m adaptive_dp.cli train ...` (torchrun sets them)"
        )
    cuda = torch.cuda.is_available() if device in (None, "auto") else str(device).startswith("cuda")
    backend = backend or ("nccl" if cuda else "gloo")
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"unknown backend {backend!r}; use 'gloo' (CPU) or 'nccl' (GPU)")
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    where = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
    try:
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    except (RuntimeError, ValueError) as exc:  # DistStoreError / DistNetworkError are RuntimeErrors
        raise DistributedError(
            f"rank {os.environ['RANK']}: could not join the {backend} process group at {where} within "
            f"{timeout_s:g} s ({type(exc).__name__}: {exc}); check that all {os.environ['WORLD_SIZE']} ranks "
            "were started and MASTER_ADDR/MASTER_PORT reach rank 0"
        ) from exc
    return DistributedContext(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=local_rank,
        backend=backend,
        timeout_s=timeout_s,
    )


def shutdown() -> None:
    """Leave the process group (no-op without one).

    A barrier first, so that no rank tears its connections down while a peer is still finishing the last
    collective (gloo can abort the peer's interpreter then); a failing barrier (a peer already gone) is
    ignored, the group is destroyed either way.
    """
    if dist.is_available() and dist.is_initialized():
        with contextlib.suppress(RuntimeError):
            dist.barrier()
        dist.destroy_process_group()


def exit_after_failure(code: int) -> NoReturn:
    """End this process with ``code`` after a :class:`DistributedError`, skipping interpreter teardown.

    Once a peer has died, the gloo process group cannot be torn down cleanly: its destructor can abort the
    interpreter (``terminate called without an active exception``, SIGABRT, exit code -6) after the error
    was handled, so the exit code would no longer say what happened. Everything this library writes is
    flushed when written (history JSONL, summary, checkpoint); this flushes stdout/stderr and calls
    ``os._exit(code)``.
    """
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(int(code))


@contextlib.contextmanager
def collective_errors(what: str) -> Iterator[None]:
    """Turn a failed collective inside the block into one :class:`DistributedError`.

    Args:
        what: the operation, for the message (e.g. "all-reduce of the noisy gradients at step 12").

    Raises:
        DistributedError: for any RuntimeError raised inside the block (wrap collectives only).
    """
    try:
        yield
    except DistributedError:
        raise
    except RuntimeError as exc:
        raise DistributedError(
            f"rank {get_rank()} of {get_world_size()}: {what} failed ({type(exc).__name__}: "
            f"{str(exc).strip().splitlines()[0] if str(exc).strip() else exc!r}); another rank has probably died "
            "or is stuck (see its log), or the ranks are out of step; every collective is bounded by the "
            "process-group timeout (--dist-timeout)"
        ) from exc


def broadcast_object(obj: Any, *, src: int = 0, what: str = "broadcast") -> Any:
    """``obj`` from rank ``src`` on every rank (picklable objects; ``obj`` is ignored on the other ranks).

    Raises:
        DistributedError: the broadcast failed or timed out.
    """
    box = [obj if dist.get_rank() == src else None]
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    with collective_errors(what):
        dist.broadcast_object_list(box, src=src, device=device)
    return box[0]


def all_gather_object(obj: Any, *, what: str = "all-gather") -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank.

    Raises:
        DistributedError: the gather failed or timed out.
    """
    out: list[Any] = [None] * dist.get_world_size()
    with collective_errors(what):
        dist.all_gather_object(out, obj)
    return out


def barrier(*, what: str = "barrier") -> None:
    """Wait for every rank (bounded by the process-group timeout).

    Raises:
        DistributedError: a rank did not arrive.
    """
    with collective_errors(what):
        if dist.get_backend() == "gloo":
            dist.monitored_barrier(wait_all_ranks=True)  # names the missing ranks
        else:
            dist.barrier()


def wrap_model(model: nn.Module) -> nn.Module:
    """``model`` in opacus' DPDDP (parameters broadcast from rank 0; no collective in forward/backward), ready
    for ``make_private``, which then builds the distributed DP optimizer and Poisson loader.

    Raises:
        ValueError: no process group (call :func:`init_distributed` first).
        DistributedError: the initial broadcast failed.
    """
    if not is_distributed():
        raise ValueError(
            "wrap_model needs an initialised process group of > 1 process: call init_distributed() "
            "under torchrun first"
        )
    with collective_errors("broadcast of the initial parameters from rank 0"):
        return DPDDP(model)


def unwrap_distributed(module: nn.Module) -> nn.Module:
    """The plain model inside a GradSampleModule and/or DPDDP / torch DDP wrapper (``module`` if none)."""
    inner = module._module if isinstance(module, AbstractGradSampleModule) else module
    while isinstance(inner, (DPDDP, DDP)):
        inner = inner.module
    return inner


def distributed_poisson_loader(private_loader: DataLoader, *, generator=None) -> DataLoader:
    """A copy of opacus' distributed Poisson ``DPDataLoader`` that also yields a rank's empty batches.

    opacus' ``DistributedUniformWithReplacementSampler`` skips an empty local batch, so that rank takes one
    step fewer and the ranks fall out of step (the last collective then waits for ever). This loader keeps
    the shard, the sample rate q and the number of batches per epoch (1 / q) and yields every batch,
    empty ones included (opacus' collate function and optimizer handle empty batches).

    Args:
        private_loader: the loader ``make_private`` returned for a DPDDP model (``distributed=True``).
        generator: torch.Generator for the Poisson draws; use a different seed on every rank (the same seed
            would draw the same inclusion pattern on every shard). Default: the loader's.

    Returns:
        DataLoader with ``sample_rate`` and ``distributed`` attributes like opacus'.

    Raises:
        ValueError: if ``private_loader`` is not a distributed Poisson loader.
    """
    sampler = private_loader.batch_sampler
    if not isinstance(sampler, DistributedUniformWithReplacementSampler):
        raise ValueError(
            "expected the loader make_private returns for a distributed model (DPDDP-wrapped before "
            "make_private, poisson_sampling=True)"
        )
    batches = _EveryBatchSampler(
        total_size=sampler.total_size,
        sample_rate=sampler.sample_rate,
        shuffle=sampler.shuffle,
        shuffle_seed=sampler.shuffle_seed,
        steps=sampler.num_batches,
        generator=generator or sampler.generator,
    )
    loader = DataLoader(
        private_loader.dataset,
        batch_sampler=batches,
        collate_fn=private_loader.collate_fn,
        num_workers=private_loader.num_workers,
        pin_memory=private_loader.pin_memory,
    )
    loader.sample_rate = sampler.sample_rate
    loader.distributed = True
    return loader


class _EveryBatchSampler(DistributedUniformWithReplacementSampler):
    """opacus' distributed Poisson sampler (same shard, same RNG use), yielding empty local batches too."""

    def __iter__(self):
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.shuffle_seed + self.epoch)
            indices = torch.randperm(self.total_size, generator=g)
        else:
            indices = torch.arange(self.total_size)
        indices = indices[self.rank : self.total_size : self.num_replicas]
        for _ in range(self.num_batches):
            mask = torch.rand(self.num_samples, generator=self.generator) < self.sample_rate
            yield indices[mask.nonzero(as_tuple=False).reshape(-1)]


def rank_history_path(out: str | os.PathLike, rank: int) -> Path:
    """``OUT/history.rank<R>.jsonl``: rank R's own step records."""
    return Path(out) / f"history.rank{int(rank)}.jsonl"


class RankTracker:
    """Tracking under DDP: rank 0's :class:`adaptive_dp.training.tracking.Tracker` (W&B + ``history.jsonl``) plus, on
    every rank, ``OUT/history.rank<R>.jsonl`` (one JSON line per step, flushed) for checking that the ranks agree.

    Args:
        out_dir: the run's output folder.
        rank: this process' rank.
        main: the Tracker on rank 0; None on the other ranks (they write only their rank file).

    Has the Tracker methods the training loop uses (``log_step``, ``log_epoch``, ``log_image``, ``finish``,
    context manager) and its path attributes (those of rank 0's files on every rank).
    """

    def __init__(self, out_dir: str | os.PathLike, *, rank: int, main: Any = None) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.rank = int(rank)
        self.main = main
        self.rank_history_path = rank_history_path(self.out_dir, self.rank)
        self.history_path = self.out_dir / "history.jsonl"
        self.summary_path = self.out_dir / "summary.json"
        self._file = open(self.rank_history_path, "w", encoding="utf-8")  # noqa: SIM115 - closed in finish()

    @property
    def mode(self) -> str:
        return self.main.mode if self.main is not None else "disabled"

    @property
    def wandb_dir(self) -> Path | None:
        return self.main.wandb_dir if self.main is not None else None

    @property
    def wandb_file(self) -> Path | None:
        return self.main.wandb_file if self.main is not None else None

    def log_step(self, record: Mapping[str, Any]) -> None:
        """Write the step to this rank's file and, on rank 0, to the main tracker."""
        from adaptive_dp.training.tracking import jsonable

        self._file.write(json.dumps(jsonable({**record, "rank": self.rank})) + "\n")
        self._file.flush()
        if self.main is not None:
            self.main.log_step(record)

    def log_epoch(self, record: Mapping[str, Any]) -> None:
        if self.main is not None:
            self.main.log_epoch(record)

    def log_image(self, path: str | os.PathLike, key: str) -> None:
        if self.main is not None:
            self.main.log_image(path, key)

    def finish(self, summary: Mapping[str, Any] | None = None, *, exit_code: int = 0) -> None:
        """Close this rank's file; rank 0 also finishes the main tracker (summary.json, W&B)."""
        if not self._file.closed:
            self._file.close()
        if self.main is not None:
            self.main.finish(summary, exit_code=exit_code)

    def __enter__(self) -> RankTracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.finish(exit_code=0 if exc_type is None else 1)
