"""The in-memory image data set every loader returns, and per-channel (de)normalisation."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset

from adaptive_dp.data.registry import DatasetInfo

__all__ = ["ImageDataset", "denormalize", "normalize"]


def _channel_stats(info: DatasetInfo, like: Tensor) -> tuple[Tensor, Tensor]:
    dtype = like.dtype if like.is_floating_point() else torch.float32
    mean = torch.tensor(info.mean, dtype=dtype, device=like.device).view(-1, 1, 1)
    std = torch.tensor(info.std, dtype=dtype, device=like.device).view(-1, 1, 1)
    if like.dim() < 3 or like.shape[-3] != len(info.mean):
        raise ValueError(
            f"expected images [..., {len(info.mean)}, H, W] for {info.name}, got shape {tuple(like.shape)}"
        )
    return mean, std


def normalize(x01: Tensor, info: DatasetInfo) -> Tensor:
    """Standardise images per channel: (x01 − mean) / std with ``info``'s statistics.

    Args:
        x01: [..., C, H, W] images with values in [0, 1], any device.
        info: the data set's :class:`DatasetInfo` (C must equal ``info.in_channels``).

    Returns:
        A new float tensor of the same shape, on the same device.

    Raises:
        ValueError: if the channel dimension does not match ``info``.
    """
    mean, std = _channel_stats(info, x01)
    return (x01 - mean) / std


def denormalize(x: Tensor, info: DatasetInfo) -> Tensor:
    """Invert :func:`normalize`: x · std + mean, back to the [0, 1] pixel scale (not clamped).

    Args:
        x: [..., C, H, W] normalised images, any device.
        info: the data set's :class:`DatasetInfo`.

    Returns:
        A new float tensor of the same shape, on the same device.

    Raises:
        ValueError: if the channel dimension does not match ``info``.
    """
    mean, std = _channel_stats(info, x)
    return x * std + mean


def _checked_targets(images: Tensor, targets: Tensor, info: DatasetInfo) -> Tensor:
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(
            f"images must be a uint8 tensor [N, C, H, W], got {images.dtype} {tuple(images.shape)}"
        )
    if images.shape[1] != info.in_channels:
        raise ValueError(f"{info.name} has {info.in_channels} channel(s), images have {images.shape[1]}")
    targets = torch.as_tensor(targets, dtype=torch.long)
    if targets.shape != (images.shape[0],):
        raise ValueError(f"targets must be [N] = [{images.shape[0]}], got {tuple(targets.shape)}")
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= info.num_classes):
        raise ValueError(
            f"labels must lie in [0, {info.num_classes}), got [{targets.min()}, {targets.max()}]"
        )
    return targets


class ImageDataset(Dataset):
    """Images held in memory as uint8, served normalised.

    Attributes:
        images: uint8 tensor [N, C, H, W] (pixel values 0..255).
        targets: int64 tensor [N] of labels in ``range(info.num_classes)``.
        info: the :class:`DatasetInfo` (name, classes, mean/std used for normalisation).

    ``dataset[i]`` returns ``(x, y)``: x float32 [C, H, W] = normalize(images[i] / 255, info), y an int.
    Item access is a handful of tensor ops (opacus' Poisson loader calls it per example), and
    ``__getitems__`` normalises a whole batch of indices at once (used by ``torch.utils.data.DataLoader``).
    Data sets of at most ``FLOAT_CACHE_LIMIT`` pixel values (digits, the MNIST/Fashion-MNIST test splits)
    keep a normalised float32 copy, made on first access; larger ones (MNIST train: 47 M values, CIFAR-10
    train: 154 M) normalise on the fly. Treat ``images`` as read-only once items have been read (the cached
    copy would not see later in-place edits); build a new ``ImageDataset`` instead.

    Raises:
        ValueError: images not uint8 [N, C, H, W] with ``info.in_channels`` channels, targets not [N], or
            labels outside [0, ``info.num_classes``).
    """

    FLOAT_CACHE_LIMIT = 16_000_000

    def __init__(self, images: Tensor, targets: Tensor, info: DatasetInfo) -> None:
        self.targets = _checked_targets(images, targets, info)
        self.images = images
        self.info = info
        channels = images.shape[1]
        # x = uint8 · scale + shift  ==  (uint8 / 255 − mean) / std
        std = torch.tensor(info.std, dtype=torch.float32).view(channels, 1, 1)
        mean = torch.tensor(info.mean, dtype=torch.float32).view(channels, 1, 1)
        self._scale = 1.0 / (255.0 * std)
        self._shift = -mean / std
        self._normalised: Tensor | None = None

    def __len__(self) -> int:
        return self.images.shape[0]

    def _float_images(self) -> Tensor | None:
        if self._normalised is None and self.images.numel() <= self.FLOAT_CACHE_LIMIT:
            self._normalised = self.images.float() * self._scale + self._shift
        return self._normalised

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        cached = self._float_images()
        if cached is not None:
            return cached[index], int(self.targets[index])
        return self.images[index].float() * self._scale + self._shift, int(self.targets[index])

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[Tensor, int]]:
        index = torch.as_tensor(list(indices), dtype=torch.long)
        cached = self._float_images()
        x = cached[index] if cached is not None else self.images[index].float() * self._scale + self._shift
        return list(zip(x.unbind(0), self.targets[index].tolist()))

    def __repr__(self) -> str:
        return f"ImageDataset({self.info.name}, n={len(self)}, shape={tuple(self.images.shape[1:])})"
