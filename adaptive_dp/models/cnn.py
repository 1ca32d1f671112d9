"""Opacus-compatible image classifiers, by ``--model`` name.

Every model here uses GroupNorm (or no normalisation), never BatchNorm, so that opacus can compute
per-sample gradients (BatchNorm mixes the examples of a batch, which breaks both per-sample gradients and
the DP guarantee). :func:`build_model` checks this with ``opacus.validators.ModuleValidator``.

Names (``MODELS``, filled by each class's :func:`register_model` decorator):

- ``"small-cnn"`` — a small tanh CNN for 8×8, 28×28 and 32×32 inputs (adaptive pooling); the default.
- ``"tanh-cnn"`` — the CIFAR-10 CNN of Papernot et al. 2021 ("Tempered Sigmoid Activations for Deep
  Learning with Differential Privacy"), the standard DP-SGD baseline on CIFAR-10.
- ``"resnet20"`` — ResNet-20 (He et al. 2016) with GroupNorm instead of BatchNorm.
- ``"lenet"`` — the sigmoid LeNet of DLG (Zhu et al. 2019, "Deep Leakage from Gradients") with its
  U(−0.5, 0.5) initialisation, for gradient-inversion experiments.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "DEFAULT_MODEL",
    "MODELS",
    "DLGLeNet",
    "ResNet20",
    "SmallCNN",
    "TanhCNN",
    "build_model",
    "register_model",
    "validate_model",
]

DEFAULT_MODEL = "small-cnn"

#: Groups per GroupNorm layer in ResNet-20 (De et al. 2022, "Unlocking High-Accuracy Differentially
#: Private Image Classification through Scale", use 16 groups); capped at the channel count.
GROUPNORM_GROUPS = 16

ModelBuilder = Callable[..., nn.Module]
Builder = TypeVar("Builder", bound=ModelBuilder)

#: ``--model`` name → class taking keyword arguments ``in_channels``, ``num_classes``, ``image_size``
#: (filled by :func:`register_model`; the CLI's ``--model`` choices).
MODELS: dict[str, ModelBuilder] = {}


def register_model(name: str) -> Callable[[Builder], Builder]:
    """Decorator registering a model class (or factory) under ``name`` in :data:`MODELS`.

    The class must accept the keyword arguments ``in_channels``, ``num_classes`` and ``image_size`` and
    map [B, in_channels, image_size, image_size] float inputs to [B, num_classes] logits; it must be
    trainable by opacus (no BatchNorm: :func:`build_model` runs :func:`validate_model`).

    Raises:
        ValueError: if ``name`` is already registered.
    """

    def decorator(builder: Builder) -> Builder:
        if name in MODELS:
            taken_by = getattr(MODELS[name], "__name__", MODELS[name])
            raise ValueError(f"model name {name!r} already registered ({taken_by}); pick another name")
        MODELS[name] = builder
        return builder

    return decorator


@register_model("small-cnn")
class SmallCNN(nn.Module):
    """A small tanh CNN for any image size ≥ 4 (8×8 digits, 28×28 MNIST, 32×32 CIFAR-10).

    conv3×3(16) – tanh – adaptive avg-pool to max(4, size // 2) – conv3×3(32) – tanh – adaptive avg-pool
    to 4×4 – fc(64) – tanh – fc(num_classes). About 38 k parameters; a DP-SGD step at batch 256 on 28×28
    takes tens of milliseconds on one CPU core. Tanh rather than ReLU because bounded activations keep
    clipped DP-SGD gradients informative (Papernot et al. 2021).

    Input [B, in_channels, image_size, image_size] float; output [B, num_classes] logits.
    """

    def __init__(self, *, in_channels: int, num_classes: int, image_size: int) -> None:
        super().__init__()
        mid = max(4, image_size // 2)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 16, kernel_size=3, padding=1),
            nn.Tanh(),
            nn.AdaptiveAvgPool2d(mid),
            nn.Conv2d(16, 32, kernel_size=3, padding=1),
            nn.Tanh(),
            nn.AdaptiveAvgPool2d(4),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(32 * 4 * 4, 64),
            nn.Tanh(),
            nn.Linear(64, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


@register_model("tanh-cnn")
class TanhCNN(nn.Module):
    """The CIFAR-10 CNN of Papernot et al. 2021 (Table 1 of "Tempered Sigmoid Activations ..."), tanh.

    conv3×3(32) – conv3×3(32) – maxpool2 – conv3×3(64) – conv3×3(64) – maxpool2 – conv3×3(128) –
    conv3×3(128) – maxpool2 – fc(128) – fc(num_classes), tanh after every conv and the hidden fc, padding 1.
    On 32×32 inputs the flattened size is 128·4·4 = 2048 (≈ 550 k parameters); for other sizes it is
    128·⌊size/8⌋², so ``image_size`` must be ≥ 8.

    Input [B, in_channels, image_size, image_size] float; output [B, num_classes] logits.
    """

    def __init__(self, *, in_channels: int, num_classes: int, image_size: int) -> None:
        super().__init__()
        if image_size < 8:
            raise ValueError(f"tanh-cnn needs image_size >= 8 (three 2×2 max-pools), got {image_size}")
        layers: list[nn.Module] = []
        channels = in_channels
        for width in (32, 64, 128):
            layers += [
                nn.Conv2d(channels, width, kernel_size=3, padding=1),
                nn.Tanh(),
                nn.Conv2d(width, width, kernel_size=3, padding=1),
                nn.Tanh(),
                nn.MaxPool2d(2),
            ]
            channels = width
        self.features = nn.Sequential(*layers)
        side = image_size // 8
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(128 * side * side, 128),
            nn.Tanh(),
            nn.Linear(128, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(GROUPNORM_GROUPS, channels), channels)


class BasicBlock(nn.Module):
    """ResNet basic block (two 3×3 convs) with GroupNorm and the parameter-free "option A" shortcut.

    Option A (He et al. 2016, Sec. 4.2, the CIFAR ResNets): when the block downsamples, the shortcut takes
    every second pixel and zero-pads the new channels, so the shortcut has no weights.
    """

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.norm1 = _group_norm(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.norm2 = _group_norm(planes)
        self.stride = stride
        self.pad_channels = planes - in_planes

    def _shortcut(self, x: Tensor) -> Tensor:
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.pad_channels > 0:
            half = self.pad_channels // 2
            x = F.pad(x, (0, 0, 0, 0, half, self.pad_channels - half))
        return x

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return F.relu(out + self._shortcut(x))


@register_model("resnet20")
class ResNet20(nn.Module):
    """ResNet-20 for CIFAR (He et al. 2016, "Deep Residual Learning", Sec. 4.2) with GroupNorm.

    conv3×3(16) – 3 stages × 3 basic blocks with 16/32/64 channels (stride 2 at the start of stages 2 and 3)
    – global average pool – fc(num_classes); 6·3 + 2 = 20 weighted layers, ≈ 270 k parameters. BatchNorm
    is replaced by GroupNorm with up to 16 groups so opacus can compute per-sample gradients.

    Input [B, in_channels, H, W] float (any size ≥ 4); output [B, num_classes] logits.
    """

    def __init__(
        self, *, in_channels: int, num_classes: int, image_size: int, blocks_per_stage: int = 3
    ) -> None:
        super().__init__()
        del image_size  # global average pooling makes the network size-agnostic
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, 16, kernel_size=3, padding=1, bias=False),
            _group_norm(16),
            nn.ReLU(),
        )
        stages: list[nn.Module] = []
        in_planes = 16
        for stage, planes in enumerate((16, 32, 64)):
            for block in range(blocks_per_stage):
                stride = 2 if stage > 0 and block == 0 else 1
                stages.append(BasicBlock(in_planes, planes, stride))
                in_planes = planes
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        out = self.pool(self.stages(self.stem(x)))
        return self.fc(torch.flatten(out, 1))


def _same_pad_conv_out(size: int, stride: int) -> int:
    # kernel 5, padding 2: floor((size + 4 - 5) / stride) + 1
    return (size - 1) // stride + 1


@register_model("lenet")
class DLGLeNet(nn.Module):
    """The sigmoid LeNet of DLG (Zhu et al. 2019, "Deep Leakage from Gradients", their reference code).

    conv5×5(12, stride 2, pad 2) – sigmoid – conv5×5(12, stride 2, pad 2) – sigmoid – conv5×5(12, stride 1,
    pad 2) – sigmoid – fc(num_classes). Every weight AND bias is drawn from U(−0.5, 0.5) as in DLG (a
    twice-differentiable, smooth network whose gradients are easy to invert). The flattened size is
    12·⌈⌈size/2⌉/2⌉² (768 for 32×32, as in DLG).

    Input [B, in_channels, image_size, image_size] float; output [B, num_classes] logits.
    """

    def __init__(self, *, in_channels: int, num_classes: int, image_size: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, 12, kernel_size=5, padding=2, stride=2),
            nn.Sigmoid(),
            nn.Conv2d(12, 12, kernel_size=5, padding=2, stride=2),
            nn.Sigmoid(),
            nn.Conv2d(12, 12, kernel_size=5, padding=2, stride=1),
            nn.Sigmoid(),
        )
        side = _same_pad_conv_out(_same_pad_conv_out(image_size, 2), 2)
        self.fc = nn.Linear(12 * side * side, num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """DLG's ``weights_init``: every weight and bias ~ U(−0.5, 0.5)."""
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.uniform_(module.weight, -0.5, 0.5)
                nn.init.uniform_(module.bias, -0.5, 0.5)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(self.body(x), 1))


def validate_model(model: nn.Module) -> None:
    """Check that opacus can train ``model`` with per-sample gradients.

    Args:
        model: any ``nn.Module``.

    Raises:
        ValueError: listing opacus ``ModuleValidator``'s messages (e.g. BatchNorm layers) and the fix:
            replace BatchNorm with GroupNorm, or call ``opacus.validators.ModuleValidator.fix(model)``.
    """
    from opacus.validators import ModuleValidator

    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        messages = "\n".join(f"  - {error}" for error in errors)
        raise ValueError(
            f"{type(model).__name__} is not compatible with opacus (DP-SGD needs per-sample gradients):\n"
            f"{messages}\n"
            "Fix: replace BatchNorm layers with GroupNorm (e.g. nn.GroupNorm(min(16, C), C)), or run "
            "`model = opacus.validators.ModuleValidator.fix(model)` before training."
        )


def _check_positive_int(name: str, value: int, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def build_model(
    name: str,
    *,
    in_channels: int,
    num_classes: int,
    image_size: int,
    seed: int | None = None,
) -> nn.Module:
    """Build a registered model, initialised from ``seed`` when given, and check it with opacus.

    Args:
        name: a registered name (``MODELS``: "small-cnn", "tanh-cnn", "resnet20", "lenet").
        in_channels: image channels (1 for MNIST/digits, 3 for CIFAR-10).
        num_classes: number of output logits; ≥ 1.
        image_size: side length H = W of the square input images (8, 28 or 32 here).
        seed: seeds the initialisation in a forked RNG (the global torch RNG is left untouched);
            None uses the global RNG.

    Returns:
        The module on CPU in training mode; input [B, in_channels, image_size, image_size] float, output
        [B, num_classes] logits. Move it with ``.to(device)``.

    Raises:
        ValueError: for an unknown name (listing the known ones), bad sizes, or a model opacus rejects
            (see :func:`validate_model`).
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(sorted(MODELS))}")
    _check_positive_int("in_channels", in_channels, 1)
    _check_positive_int("num_classes", num_classes, 1)
    _check_positive_int("image_size", image_size, 4)
    builder = MODELS[name]
    if seed is None:
        model = builder(in_channels=in_channels, num_classes=num_classes, image_size=image_size)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = builder(in_channels=in_channels, num_classes=num_classes, image_size=image_size)
    validate_model(model)
    return model
