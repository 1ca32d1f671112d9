"""LoRA adapters for DP fine-tuning, with ``peft`` (optional extra ``.[hf]``).

LoRA (Hu et al. 2022, "LoRA: Low-Rank Adaptation of Large Language Models") freezes a pretrained weight W₀
and trains a low-rank update: a targeted linear layer computes W₀x + (α/r)·B A x with A [r, d_in] and
B [d_out, r] (B starts at zero, so the adapted model starts as the pretrained one). Under DP-SGD only A, B
and the classification head are trained, so they are all that DP-SGD releases: the per-sample gradients
opacus clips, the noise, and the leakage the monitor measures are over these parameters only; the frozen
base is bit-identical before and after training (Yu et al. 2022, "Differentially Private Fine-tuning of
Language Models").

The adapters are ``peft``'s (``LoraConfig`` + ``get_peft_model``): A and B are plain ``nn.Linear`` layers
(``lora_A.default``, ``lora_B.default``), so opacus computes their per-sample gradients in every
``grad_sample_mode`` (checked against per-example autograd by ``tests/test_lora_grad_samples.py``, the
guard against opacus issue #820).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["DEFAULT_LORA_HEAD", "DEFAULT_LORA_TARGETS", "apply_lora", "matching_modules"]

#: The attention projections LoRA adapts by default: query and value, as in Hu et al. 2022 (Sec. 7.1);
#: the module names of ``transformers``' ViT (``attention.q_proj``, ``attention.v_proj``).
DEFAULT_LORA_TARGETS = ("q_proj", "v_proj")

#: The classification head kept trainable beside the adapters (``ViTForImageClassification.classifier``).
DEFAULT_LORA_HEAD = ("classifier",)

_ADAPTABLE = (nn.Linear, nn.Conv2d, nn.Embedding)


def matching_modules(model: nn.Module, names: Sequence[str]) -> dict[str, nn.Module]:
    """Modules whose qualified name equals one of ``names`` or ends with ``"." + name`` (peft's rule).

    Args:
        model: any module.
        names: module names or name suffixes, e.g. ``("q_proj", "v_proj")`` or ``("hf.classifier",)``.

    Returns:
        qualified name → module, in ``model.named_modules()`` order.
    """
    return {
        qualified: module
        for qualified, module in model.named_modules()
        if any(qualified == name or qualified.endswith("." + name) for name in names)
    }


def _check_rank(rank: int) -> int:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
        raise ValueError(f"rank must be an integer >= 0 (0 = full fine-tuning), got {rank!r}")
    return rank


def _check_names(model: nn.Module, names: Sequence[str], *, what: str, kinds: tuple[type, ...]) -> None:
    if isinstance(names, str):
        raise ValueError(f"{what} must be a sequence of module names, e.g. ({names!r},), not a string")
    found = matching_modules(model, names)
    missing = [n for n in names if not any(q == n or q.endswith("." + n) for q in found)]
    wrong = sorted(q for q, m in found.items() if not isinstance(m, kinds))
    if missing or wrong:
        leaves = sorted({q.rsplit(".", 1)[-1] for q, m in model.named_modules() if isinstance(m, kinds)})
        problem = (
            f"no module named {missing}"
            if missing
            else f"modules {wrong} are not {[k.__name__ for k in kinds]}"
        )
        raise ValueError(f"{what}: {problem} in {type(model).__name__}; its names that fit are {leaves}")


def apply_lora(
    model: nn.Module,
    *,
    rank: int,
    targets: Sequence[str] = DEFAULT_LORA_TARGETS,
    alpha: float | None = None,
    dropout: float = 0.0,
    head: Sequence[str] = DEFAULT_LORA_HEAD,
    seed: int | None = None,
) -> nn.Module:
    """Freeze ``model`` and add trainable LoRA adapters to its ``targets``; keep the ``head`` trainable.

    Call it after loading the pretrained weights and before ``make_private``; give the optimizer the
    returned model's parameters (frozen ones get no gradient, so opacus neither clips nor noises them).
    ``model`` is changed in place (peft injects the adapters into it and freezes it).

    Args:
        model: a logit model, e.g. ``build_model("vit-tiny", ...)`` or :func:`load_local_pretrained`'s.
        rank: r, the adapters' rank; 0 = full fine-tuning (no adapters: every parameter trainable, ``model``
            itself returned).
        targets: names (or name suffixes) of the ``nn.Linear`` / ``nn.Conv2d`` / ``nn.Embedding`` layers to
            adapt; default the attention query and value projections.
        alpha: LoRA's α; the update is scaled by α / r. None = r (scale 1).
        dropout: dropout on the adapters' input during training (0 = none; the monitor reads in eval mode).
        head: names (or suffixes) of modules trained in full beside the adapters (the classification head).
        seed: seeds the adapters' initialisation (peft draws A at random, B = 0) in a forked RNG, leaving the
            global torch RNG untouched; None draws from the global RNG.

    Returns:
        ``peft.PeftModel`` around ``model`` (same forward: [B, ...] inputs → [B, K] logits) whose trainable
        parameters are the adapters (``...lora_A.default.weight``, ``...lora_B.default.weight``) and the head;
        for ``rank=0``, ``model`` with every parameter trainable.

    Raises:
        ValueError: ``rank`` not an integer ≥ 0, ``alpha`` ≤ 0, ``dropout`` outside [0, 1), or a target or
            head name that matches no suitable module (the message lists the names that would).
        ImportError: without the ``hf`` extra (``pip install -e ".[hf]"``).

    Source: Hu et al. 2022, "LoRA", Eq. 3 (h = W₀x + BAx, scaled by α/r); peft ``LoraConfig``.
    """
    if _check_rank(rank) == 0:
        return model.requires_grad_(True)
    if alpha is not None and not alpha > 0:
        raise ValueError(f"alpha must be > 0 (the update is scaled by alpha / rank), got {alpha!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    _check_names(model, targets, what="LoRA targets", kinds=_ADAPTABLE)
    _check_names(model, head, what="head", kinds=(nn.Module,))
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as exc:  # pragma: no cover - the hf extra is installed in CI
        raise ImportError(
            'LoRA needs the optional "hf" extra: pip install -e ".[hf]" (installs peft)'
        ) from exc
    config = LoraConfig(
        r=rank,
        lora_alpha=float(rank if alpha is None else alpha),
        target_modules=list(targets),
        lora_dropout=float(dropout),
        bias="none",
    )
    with torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        adapted = get_peft_model(model, config)
    for module in matching_modules(adapted, head).values():
        module.requires_grad_(True)
    return adapted
