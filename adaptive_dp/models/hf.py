"""Hugging Face ``transformers`` image classifiers as plain logit models (optional extra ``.[hf]``).

A ``transformers`` model returns a ``ModelOutput``; opacus, the leakage monitor, the attacks and the training
loop expect a module mapping [B, C, H, W] images to [B, K] logits. :class:`HFImageClassifier` is the one
place that turns the first into the second (``outputs.logits``). Nothing here reaches a model hub: models
are built from a config (:mod:`adaptive_dp.models.vit`) or loaded from a local ``save_pretrained``
directory (:func:`load_local_pretrained`).

Attention runs in the ``"eager"`` implementation (plain matmul + softmax): it is twice differentiable, so
gradient-inversion attacks and the I²F bound, which differentiate per-sample gradients with respect to the
input, work through it; PyTorch's fused ``scaled_dot_product_attention`` kernels are not.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import ModuleType

from torch import Tensor, nn

__all__ = ["ATTENTION_IMPLEMENTATION", "HFImageClassifier", "load_local_pretrained", "require_transformers"]

#: The attention implementation every model built or loaded here uses (twice differentiable).
ATTENTION_IMPLEMENTATION = "eager"


def require_transformers() -> ModuleType:
    """The ``transformers`` module.

    Raises:
        ImportError: naming the extra to install (``pip install -e ".[hf]"``) when it is missing.
    """
    try:
        import transformers
    except ImportError as exc:  # pragma: no cover - the hf extra is installed in CI
        raise ImportError(
            'the transformer models need the optional "hf" extra: pip install -e ".[hf]" '
            "(installs transformers and peft)"
        ) from exc
    return transformers


class HFImageClassifier(nn.Module):
    """A ``transformers`` image-classification model as a logit model: ``forward(x) = hf(pixel_values=x).logits``.

    Args:
        model: a ``transformers`` model for image classification (e.g. ``ViTForImageClassification``), or a
            peft model around one; it is kept as the attribute ``hf``.

    Input [B, C, H, W] float pixels (the model config's ``num_channels`` and ``image_size``); output [B, K]
    logits (K = the config's ``num_labels``).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.hf = model

    def forward(self, x: Tensor) -> Tensor:
        return self.hf(pixel_values=x).logits


def load_local_pretrained(path: str | os.PathLike, *, num_classes: int | None = None) -> HFImageClassifier:
    """Load a user's ``save_pretrained`` directory as an :class:`HFImageClassifier`, offline.

    ``transformers.AutoModelForImageClassification.from_pretrained(path, local_files_only=True)`` with eager
    attention: nothing is downloaded. With ``num_classes`` different from the saved head, the head is
    re-initialised for ``num_classes`` labels (``ignore_mismatched_sizes``); the body keeps its weights.

    Args:
        path: a directory written by ``model.save_pretrained(path)`` (a ``config.json`` and the weights), e.g.
            ``build_model("vit-tiny", ...).hf.save_pretrained(path)``.
        num_classes: number of output logits; None keeps the saved head.

    Returns:
        The model on CPU in eval mode (``transformers``' default after loading); call ``.train()`` to train.

    Raises:
        ValueError: if ``path`` is not a directory holding a ``config.json``, or ``num_classes`` < 1.
        ImportError: without the ``hf`` extra.
    """
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise ValueError(
            f"{folder} is not a save_pretrained directory (no config.json there); pass the folder written by "
            "model.save_pretrained(folder) — models are never downloaded from a hub here"
        )
    if num_classes is not None and (
        isinstance(num_classes, bool) or int(num_classes) != num_classes or num_classes < 1
    ):
        raise ValueError(f"num_classes must be an integer >= 1 or None, got {num_classes!r}")
    transformers = require_transformers()
    extra = {} if num_classes is None else {"num_labels": int(num_classes), "ignore_mismatched_sizes": True}
    model = transformers.AutoModelForImageClassification.from_pretrained(
        folder, local_files_only=True, attn_implementation=ATTENTION_IMPLEMENTATION, **extra
    )
    return HFImageClassifier(model)
