"""Non-private pretraining on a declared public split: ``adaptive-dp pretrain`` as a library function.

:func:`pretrain` carves ``public_examples`` examples off the data set's *training* set with a seeded permutation
(:func:`adaptive_dp.training.public_split.carve_public_split`), trains the model on them without privacy (plain
Adam or SGD, shuffled mini-batches), evaluates on the test set after every epoch and writes into ``out``:

* ``checkpoint.pt`` — ``format`` (:data:`adaptive_dp.training.finetune.PRETRAIN_FORMAT`), ``model`` (name),
  ``dataset``, ``dataset_info``, ``model_state_dict``, ``public_split`` (seed, count, training-set size, the
  sorted indices and their SHA-256), ``options`` (the :class:`PretrainConfig`), ``test_accuracy``; readable with
  ``torch.load(path, weights_only=True)``;
* ``public_split.json`` — the same split record;
* ``summary.json`` — test accuracy, public examples, seconds, paths.

``adaptive-dp train --init OUT/checkpoint.pt`` then fine-tunes the model privately on the rest of the training
set (see :mod:`adaptive_dp.training.finetune` and ``docs/finetuning.md``). The public examples get no privacy:
the pretrained weights may reveal them. A folder holding a run is refused (``overwrite`` moves it aside), as for
``train``. torch is imported inside the functions (``adaptive-dp --help`` stays fast).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adaptive_dp.training.config import DEVICES, OPTIMIZERS
from adaptive_dp.training.progress import EpochProgress, fmt

__all__ = ["PretrainConfig", "pretrain"]


@dataclass
class PretrainConfig:
    """All options of ``adaptive-dp pretrain``.

    Attributes:
        dataset: registered data set name ("digits", "mnist", "fashion-mnist", "cifar10").
        model: registered model name ("vit-tiny", "vit-small", or a CNN: "small-cnn", "tanh-cnn", "resnet20",
            "lenet"); LoRA fine-tuning needs the ViTs (their attention projections ``q_proj``, ``v_proj``).
        public_examples: examples of the training set declared public and trained on, in [1, N − 1].
        epochs: passes over the public split; ≥ 1.
        batch_size: mini-batch size (shuffled, the last batch may be smaller); ≥ 1.
        lr: learning rate (> 0).
        optimizer: "adam" or "sgd" (no momentum).
        seed: integer ≥ 0; seeds the public split, the initialisation and the batch order.
        data_dir: data root (None: ``$ADAPTIVE_DP_DATA``).
        out: output folder (None: ``runs/<UTC timestamp>``).
        device: "auto" (CUDA when torch sees a GPU), "cpu" or "cuda".
        test_batch_size: evaluation batch size; ≥ 1.
    """

    dataset: str = "cifar10"
    model: str = "vit-tiny"
    public_examples: int = 10000
    epochs: int = 5
    batch_size: int = 128
    lr: float = 1e-3
    optimizer: str = "adam"
    seed: int = 0
    data_dir: str | None = None
    out: str | None = None
    device: str = "auto"
    test_batch_size: int = 1024

    def validate(self) -> None:
        """Check every option (the data set's size bounds ``public_examples`` when the data are loaded).

        Raises:
            ValueError: naming the option, the value and what is allowed.
        """
        for name in ("public_examples", "epochs", "batch_size", "test_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {self.seed!r}")
        if (
            isinstance(self.lr, bool)
            or not isinstance(self.lr, (int, float))
            or not (math.isfinite(self.lr) and self.lr > 0)
        ):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr!r}")
        for name, allowed in (("optimizer", OPTIMIZERS), ("device", DEVICES)):
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"unknown {name} {getattr(self, name)!r}; choose one of: {', '.join(allowed)}"
                )
        from adaptive_dp.data.registry import canonical_name
        from adaptive_dp.models import MODELS

        canonical_name(self.dataset)  # ValueError listing the data sets
        if self.model not in MODELS:
            raise ValueError(f"unknown model {self.model!r}; choose one of: {', '.join(sorted(MODELS))}")

    def to_dict(self) -> dict[str, Any]:
        """The options as a plain dict (JSON-able)."""
        return dataclasses.asdict(self)


def pretrain(config: PretrainConfig, *, progress: bool = True, overwrite: bool = False) -> dict[str, Any]:
    """Train ``config.model`` without privacy on a seeded public split of the training set; write the outputs.

    Args:
        config: the options (validated here).
        progress: report progress (a tqdm bar per epoch on a terminal, a few lines per epoch otherwise, and one
            line per epoch with the test accuracy).
        overwrite: move a run found in ``config.out`` aside to ``OUT.old-<UTC time>`` instead of refusing.

    Returns:
        The summary (also ``OUT/summary.json``): ``test_accuracy`` (fraction in [0, 1], after the last epoch),
        ``test_accuracies`` (per epoch), ``public_examples``, ``checkpoint`` (path str), ``public_split_file``,
        ``public_split_sha256``, ``seconds`` (wall time), ``dataset``, ``model``, ``epochs``, ``steps``, ``out``,
        ``previous_run_moved_to`` and ``options``.

    Raises:
        ValueError: bad options, ``public_examples`` not below the training-set size; ``RunFolderError`` (a
            ValueError): the folder holds a run, is in use, or cannot be written.
        FileNotFoundError: (``adaptive_dp.data.DataNotFoundError``) the data set is not under the data root.
        OSError: a write failed (the checkpoint is written atomically).
    """
    from torch.utils.data import Subset

    from adaptive_dp.data import load_dataset
    from adaptive_dp.training.public_split import carve_public_split, split_record
    from adaptive_dp.training.rundir import claim
    from adaptive_dp.training.setup import default_out_dir, resolve_device

    t_start = time.perf_counter()
    config = dataclasses.replace(config)
    config.validate()
    device = resolve_device(config.device)
    full = load_dataset(config.dataset, split="train", data_dir=config.data_dir)
    test_set = load_dataset(config.dataset, split="test", data_dir=config.data_dir)
    indices = carve_public_split(len(full), config.public_examples, seed=config.seed)
    record = split_record(dataset=full.info.name, train_size=len(full), seed=config.seed, indices=indices)
    out = Path(config.out) if config.out else default_out_dir()
    config.out = str(out)
    lock, moved_to = claim(out, overwrite=overwrite)
    try:
        model, epochs = _fit(config, Subset(full, indices), test_set, device=device, show=progress)
        return _write_outputs(
            config, model, epochs, info=full.info, record=record, t_start=t_start, moved_to=moved_to
        )
    finally:
        lock.release()


def _fit(config: PretrainConfig, public_set, test_set, *, device, show: bool):
    """Seeded model, optimizer and loader; ``epochs`` passes over ``public_set``. Returns (model, epoch records)."""
    import torch
    from torch.nn import functional as F
    from torch.utils.data import DataLoader

    from adaptive_dp.models import build_model
    from adaptive_dp.training.loop import evaluate
    from adaptive_dp.training.setup import seed_everything

    seed_everything(config.seed)
    info = test_set.info
    model = build_model(
        config.model,
        in_channels=info.in_channels,
        num_classes=info.num_classes,
        image_size=info.image_size,
        seed=config.seed,
    ).to(device)
    if config.optimizer == "adam":
        optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=config.lr)
    generator = torch.Generator().manual_seed(config.seed)
    loader = DataLoader(public_set, batch_size=config.batch_size, shuffle=True, generator=generator)
    test_loader = DataLoader(test_set, batch_size=config.test_batch_size, shuffle=False)
    records: list[dict[str, Any]] = []
    for epoch in range(1, config.epochs + 1):
        t_epoch = time.perf_counter()
        model.train()
        bar = _PublicProgress(loader, epoch=epoch, epochs=config.epochs, show=show, loss_in_lines=True)
        losses = []
        for x, y in bar:
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x.to(device)), y.to(device))
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            bar.update_loss(losses[-1])
        bar.close()
        test = evaluate(model, test_loader, device=device)
        records.append(
            {
                "epoch": epoch,
                "train_loss": sum(losses) / len(losses),
                "test_accuracy": test["accuracy"],
                "test_loss": test["loss"],
                "epoch_time_s": time.perf_counter() - t_epoch,
            }
        )
        if show:
            print(
                f"pretrain epoch {epoch}: public train loss {records[-1]['train_loss']:.4f}, test accuracy "
                f"{test['accuracy']:.4f}, {records[-1]['epoch_time_s']:.1f} s",
                flush=True,
            )
    return model, records


class _PublicProgress(EpochProgress):
    """:class:`EpochProgress` for non-private training: only the batch loss (public data), no σ, ε or MI."""

    def update_loss(self, loss: float) -> None:
        """Report the step just taken and its batch loss."""
        self.steps += 1
        if self._bar is not None:
            self._bar.set_postfix_str(f"loss={fmt(loss)}", refresh=False)
        elif self.mode == "lines" and (self.steps % self.every == 0 or self.steps == self.total):
            elapsed = time.perf_counter() - self.t0
            print(
                f"{self.label} step {self.steps}/{self.total}: loss={fmt(loss)} ({elapsed:.1f} s)",
                file=self.stream,
            )
            self.stream.flush()


def _write_outputs(
    config: PretrainConfig, model, epochs, *, info, record, t_start: float, moved_to
) -> dict[str, Any]:
    """``checkpoint.pt`` (atomic), ``public_split.json`` and ``summary.json`` in ``config.out``; returns the
    summary."""
    from adaptive_dp.training.checkpoint import save_atomic
    from adaptive_dp.training.finetune import PRETRAIN_FORMAT

    out = Path(config.out)
    state = {
        "format": PRETRAIN_FORMAT,
        "model": config.model,
        "dataset": info.name,
        "dataset_info": dataclasses.asdict(info),
        "model_state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "public_split": record,
        "options": config.to_dict(),
        "test_accuracy": epochs[-1]["test_accuracy"],
    }
    checkpoint = save_atomic(out / "checkpoint.pt", state)
    split_file = out / "public_split.json"
    _write_json(split_file, record)
    summary = {
        "dataset": info.name,
        "model": config.model,
        "public_examples": record["count"],
        "public_split_seed": record["seed"],
        "public_split_sha256": record["sha256"],
        "train_size": record["train_size"],
        "epochs": len(epochs),
        "steps": len(epochs) * math.ceil(record["count"] / config.batch_size),
        "test_accuracy": epochs[-1]["test_accuracy"],
        "test_accuracies": [e["test_accuracy"] for e in epochs],
        "epoch_records": epochs,
        "seconds": time.perf_counter() - t_start,
        "checkpoint": str(checkpoint),
        "public_split_file": str(split_file),
        "out": str(out),
        "previous_run_moved_to": str(moved_to) if moved_to else None,
        "options": config.to_dict(),
    }
    _write_json(out / "summary.json", summary)
    return summary


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
