"""Small Vision Transformers (HF ``ViTForImageClassification``) for 8×8, 28×28 and 32×32 images.

Registered beside the CNNs (``build_model("vit-tiny", in_channels=3, num_classes=10, image_size=32)``); built
from a ``ViTConfig``, never downloaded. Both use 4×4 patches (64 patches + the [CLS] token on 32×32, 49 + 1
on 28×28, 4 + 1 on 8×8), pre-LayerNorm blocks, GELU MLPs, no dropout, and LayerNorm only (no BatchNorm), so
opacus computes their per-sample gradients in every ``grad_sample_mode`` (checked by the tests against
per-example autograd). The classification head is the linear layer ``hf.classifier`` on the final [CLS]
state. The query/key/value projections have no bias (``qkv_bias=False``, as in BEiT for the key): the key
bias adds the same q·b to every score of a softmax row, so its gradient is identically zero and under DP-SGD
it would receive only noise.

============  ======  ======  =====  ===  ============================
name          hidden  layers  heads  MLP  parameters (3×32×32, 10 classes)
============  ======  ======  =====  ===  ============================
``vit-tiny``  128     4       4      256  0.54 M
``vit-small`` 256     4       8      512  2.14 M (≈ 4× vit-tiny)
============  ======  ======  =====  ===  ============================

``vit-tiny`` is sized to train on 2 CPU cores (a DP-SGD step at batch 64 on 32×32 takes about a second on
one core); ``vit-small`` is the 4× larger model of the speed and memory measurements
(``benchmarks/finetune_speed.py``).
"""

from __future__ import annotations

from typing import Any

from adaptive_dp.models.cnn import register_model
from adaptive_dp.models.hf import ATTENTION_IMPLEMENTATION, HFImageClassifier, require_transformers

__all__ = ["PATCH_SIZE", "VIT_SIZES", "build_vit", "vit_config"]

#: Side of the square patches (pixels).
PATCH_SIZE = 4

#: ``--model`` name → the ``ViTConfig`` fields that set its size.
VIT_SIZES: dict[str, dict[str, int]] = {
    "vit-tiny": {
        "hidden_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "intermediate_size": 256,
    },
    "vit-small": {
        "hidden_size": 256,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "intermediate_size": 512,
    },
}


def vit_config(size: str, *, in_channels: int, num_classes: int, image_size: int) -> Any:
    """The ``transformers.ViTConfig`` of a registered size for the data set's images and classes.

    Args:
        size: a :data:`VIT_SIZES` key (``"vit-tiny"``, ``"vit-small"``).
        in_channels: image channels (1 for MNIST/digits, 3 for CIFAR-10).
        num_classes: number of labels (the head's outputs).
        image_size: side H = W of the square images, ≥ :data:`PATCH_SIZE`.

    Returns:
        A ``ViTConfig`` with 4×4 patches, no dropout, no query/key/value bias and eager attention.

    Raises:
        ValueError: unknown ``size`` or ``image_size`` < 4.
    """
    if size not in VIT_SIZES:
        raise ValueError(f"unknown ViT size {size!r}; choose one of {sorted(VIT_SIZES)}")
    if image_size < PATCH_SIZE:
        raise ValueError(
            f"a ViT with {PATCH_SIZE}×{PATCH_SIZE} patches needs image_size >= {PATCH_SIZE}, got {image_size}"
        )
    transformers = require_transformers()
    return transformers.ViTConfig(
        image_size=image_size,
        patch_size=PATCH_SIZE,
        num_channels=in_channels,
        num_labels=num_classes,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        qkv_bias=False,
        attn_implementation=ATTENTION_IMPLEMENTATION,
        **VIT_SIZES[size],
    )


def build_vit(size: str, *, in_channels: int, num_classes: int, image_size: int) -> HFImageClassifier:
    """A freshly initialised ``ViTForImageClassification`` of a registered size, as a logit model.

    Initialised by ``transformers`` from the global torch RNG (truncated normal, std 0.02);
    :func:`adaptive_dp.models.build_model` seeds it. Input [B, in_channels, image_size, image_size] float;
    output [B, num_classes] logits.

    Raises:
        ValueError: see :func:`vit_config`.
        ImportError: without the ``hf`` extra (``pip install -e ".[hf]"``).
    """
    config = vit_config(size, in_channels=in_channels, num_classes=num_classes, image_size=image_size)
    return HFImageClassifier(require_transformers().ViTForImageClassification(config))


@register_model("vit-tiny")
def vit_tiny(*, in_channels: int, num_classes: int, image_size: int) -> HFImageClassifier:
    """``vit-tiny``: hidden 128, 4 layers, 4 heads, MLP 256 (:func:`build_vit`)."""
    return build_vit("vit-tiny", in_channels=in_channels, num_classes=num_classes, image_size=image_size)


@register_model("vit-small")
def vit_small(*, in_channels: int, num_classes: int, image_size: int) -> HFImageClassifier:
    """``vit-small``: hidden 256, 4 layers, 8 heads, MLP 512, ≈ 4× the parameters of ``vit-tiny``."""
    return build_vit("vit-small", in_channels=in_channels, num_classes=num_classes, image_size=image_size)
