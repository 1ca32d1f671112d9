"""Private fine-tuning of a publicly pretrained model: ``adaptive-dp train --init CKPT [--lora-rank R]``.

``--init`` names the ``checkpoint.pt`` of ``adaptive-dp pretrain`` (:mod:`adaptive_dp.training.pretrain`). Three
things follow from it, all here:

* the data (:func:`private_splits`): the private pool is the training set *minus* the public examples the
  checkpoint records (:mod:`adaptive_dp.training.public_split`); the audit split is carved from that pool and the
  rest is trained on, so public, audit and private-training examples are pairwise disjoint;
* the model (:func:`build_run_model`): the registered model with the pretrained weights, then
  :func:`adaptive_dp.models.lora.apply_lora` — rank r ≥ 1 freezes it and adds trainable LoRA adapters beside the
  trainable classification head; rank 0 (or None) trains every parameter (full fine-tuning);
* the trained model of a fine-tuning run (:func:`with_adapters`): resume and ``load_trained_model`` rebuild the
  same adapters before loading the run's state dict.

Only the trainable parameters take part in DP-SGD: opacus clips and noises them alone, and the leakage monitor
reads the per-sample gradients of exactly these parameters (``requires_grad``). The frozen base is public (a
function of the public split only) and stays bit-identical. torch is imported inside the functions.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adaptive_dp.training.config import TrainConfig
from adaptive_dp.training.public_split import check_split_record

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

__all__ = [
    "LORA_HEAD",
    "PRETRAIN_FORMAT",
    "build_run_model",
    "check_init_matches",
    "init_checkpoint_path",
    "load_init",
    "lora_target_names",
    "private_splits",
    "with_adapters",
]

#: file format tag of the ``checkpoint.pt`` written by ``adaptive-dp pretrain``.
PRETRAIN_FORMAT = "adaptive_dp.pretrain/1"
#: the modules trained in full beside the adapters (the classification head of the HF models).
LORA_HEAD = ("classifier",)
#: the format tag of a ``train`` run's checkpoint (:data:`adaptive_dp.training.checkpoint.CHECKPOINT_FORMAT`).
_TRAIN_FORMAT = "adaptive_dp.checkpoint/1"


def init_checkpoint_path(init: str | os.PathLike) -> Path:
    """``init`` itself, or ``init/checkpoint.pt`` when ``init`` is a folder (the pretrain run's ``--out``)."""
    path = Path(init)
    return path / "checkpoint.pt" if path.is_dir() else path


def load_init(init: str | os.PathLike) -> dict[str, Any]:
    """Read the pretrain checkpoint ``init`` (a ``checkpoint.pt`` or the folder holding it).

    Returns:
        The checkpoint: ``format``, ``model``, ``dataset``, ``dataset_info``, ``model_state_dict``,
        ``public_split`` (:func:`adaptive_dp.training.public_split.split_record`), ``options``,
        ``test_accuracy``; plus ``path``.

    Raises:
        ValueError: no file there, a file torch cannot read, or a file that is not a pretrain checkpoint (e.g.
            the checkpoint of a ``train`` run); the message names the fix.
    """
    import torch

    path = init_checkpoint_path(init)
    fix = "pass the checkpoint.pt that `adaptive-dp pretrain --out DIR` wrote (DIR/checkpoint.pt)"
    if not path.is_file():
        raise ValueError(f"--init {init}: no such file; {fix}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises RuntimeError, EOFError, pickle errors ... on damage
        detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:120]
        raise ValueError(f"--init {path} cannot be read ({type(exc).__name__}: {detail}); {fix}") from None
    found = state.get("format") if isinstance(state, dict) else None
    if found != PRETRAIN_FORMAT:
        what = (
            "the checkpoint of an `adaptive-dp train` run"
            if found == _TRAIN_FORMAT
            else "not a pretrain checkpoint"
        )
        raise ValueError(f"--init {path} is {what} (format {found!r}, expected {PRETRAIN_FORMAT!r}); {fix}")
    state["path"] = str(path)
    return state


def check_init_matches(config: TrainConfig, state: Mapping[str, Any]) -> None:
    """Refuse a run whose ``--model`` or ``--dataset`` differs from the pretrain checkpoint's, or whose
    ``--lora-targets`` (with ``--lora-rank`` ≥ 1) name no linear layer of its model.

    Raises:
        ValueError: naming the option, the values and the fix.
    """
    from adaptive_dp.data.registry import canonical_name

    if config.model != state["model"]:
        raise ValueError(
            f"--model {config.model} differs from the model of --init {state['path']} ({state['model']}): pass "
            f"--model {state['model']}, or pretrain a {config.model} first"
        )
    if canonical_name(config.dataset) != canonical_name(state["dataset"]):
        raise ValueError(
            f"--dataset {config.dataset} differs from the data set of --init {state['path']} ({state['dataset']}): "
            f"pass --dataset {state['dataset']}, or pretrain on {config.dataset} first"
        )
    if config.lora_rank:
        _check_targets(config, state)


def _check_targets(config: TrainConfig, state: Mapping[str, Any]) -> None:
    """Refuse ``lora_targets`` that name no weight matrix of the pretrained model (before the run folder is
    claimed; :func:`adaptive_dp.models.lora.apply_lora` checks the module types when it adapts them)."""
    layers = {
        key.rsplit(".", 1)[0]
        for key, tensor in state["model_state_dict"].items()
        if key.endswith(".weight") and getattr(tensor, "ndim", 0) == 2
    }
    missing = [
        name
        for name in lora_target_names(config.lora_targets)
        if not any(layer == name or layer.endswith("." + name) for layer in layers)
    ]
    if missing:
        leaves = ", ".join(sorted({layer.rsplit(".", 1)[-1] for layer in layers}))
        raise ValueError(
            f"--lora-targets: no linear layer named {', '.join(missing)} in {state['model']}; choose among: {leaves}"
        )


def private_splits(config: TrainConfig, full_train_set) -> tuple[Any, Any, int]:
    """The private training set and the audit split of a fine-tuning run (``config.init`` set).

    The public indices recorded in the init checkpoint are removed from ``full_train_set``; the audit split
    (``audit_fraction``, seeded by ``seed``, :func:`adaptive_dp.data.audit_split`) is carved from what is left
    and the remainder is trained on. Both are ``Subset`` views of ``full_train_set`` whose ``indices`` are
    indices into it (so the run checkpoint's ``audit_indices`` are too).

    Args:
        config: the run's options (``init``, ``model``, ``dataset``, ``audit_fraction``, ``seed``).
        full_train_set: the data set's whole training split (N examples).

    Returns:
        ``(train_set, audit_set or None, pool_size)``: pool_size = N − public examples.

    Raises:
        ValueError: see :func:`load_init`, :func:`check_init_matches` and
            :func:`adaptive_dp.training.public_split.check_split_record`.
    """
    from torch.utils.data import Subset

    from adaptive_dp.data import audit_split
    from adaptive_dp.leakage.audit import audit_indices

    state = load_init(config.init)
    check_init_matches(config, state)
    public = set(
        check_split_record(state["public_split"], train_size=len(full_train_set), source=state["path"])
    )
    pool = Subset(full_train_set, [i for i in range(len(full_train_set)) if i not in public])
    if not config.audit_fraction:
        return pool, None, len(pool)
    train, audit = audit_split(pool, fraction=config.audit_fraction, seed=config.seed)
    flat = [Subset(full_train_set, audit_indices(part)) for part in (train, audit)]
    return flat[0], flat[1], len(pool)


def lora_target_names(targets: str) -> tuple[str, ...]:
    """``"q_proj,v_proj"`` → ``("q_proj", "v_proj")`` (blanks around names dropped)."""
    return tuple(name.strip() for name in str(targets).split(",") if name.strip())


def with_adapters(model: nn.Module, options: TrainConfig | Mapping[str, Any]) -> nn.Module:
    """``model`` with the LoRA adapters of a fine-tuning run (``options``: its TrainConfig or saved config).

    Rank ``lora_rank`` ≥ 1: :func:`adaptive_dp.models.lora.apply_lora` on ``lora_targets`` with the head
    :data:`LORA_HEAD` trainable and the adapters initialised from ``seed``; rank 0 or None: ``model`` with every
    parameter trainable. Without ``init`` ``model`` is returned unchanged.

    Raises:
        ValueError: a target that matches no layer of the model (the message lists those that would).
        ImportError: without the ``hf`` extra (peft).
    """
    from adaptive_dp.models.lora import apply_lora

    get = options.get if isinstance(options, Mapping) else lambda name, default=None: getattr(options, name)
    if not get("init"):
        return model
    return apply_lora(
        model,
        rank=int(get("lora_rank") or 0),
        targets=lora_target_names(get("lora_targets", "q_proj,v_proj")),
        head=LORA_HEAD,
        seed=int(get("seed", 0)),
    )


def build_run_model(config: TrainConfig, info, *, pretrained: bool = True) -> nn.Module:
    """The model a run trains: ``build_model(config.model)`` initialised from ``seed``; with ``init`` it gets the
    pretrained weights (``pretrained``) and the adapters (:func:`with_adapters`).

    Args:
        config: the run's options.
        info: the data set's :class:`adaptive_dp.data.DatasetInfo` (channels, classes, image size).
        pretrained: load the init checkpoint's weights (False when a state dict that holds them follows).

    Returns:
        The module on CPU; input [B, C, H, W] float, output [B, K] logits.

    Raises:
        ValueError: see :func:`load_init`, :func:`check_init_matches` and :func:`with_adapters`.
    """
    from adaptive_dp.models.cnn import build_model

    model = build_model(
        config.model,
        in_channels=info.in_channels,
        num_classes=info.num_classes,
        image_size=info.image_size,
        seed=config.seed,
    )
    if not config.init:
        return model
    if pretrained:
        state = load_init(config.init)
        check_init_matches(config, state)
        model.load_state_dict(state["model_state_dict"])
    return with_adapters(model, config)
