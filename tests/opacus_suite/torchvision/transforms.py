"""``torchvision.transforms`` stand-in: ``Compose``, ``ToTensor``, ``Normalize`` (torchvision semantics)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image


class Compose:
    """Apply ``transforms`` in order (``torchvision.transforms.Compose``)."""

    def __init__(self, transforms: Sequence[Callable[[Any], Any]]):
        self.transforms = list(transforms)

    def __call__(self, img: Any) -> Any:
        for transform in self.transforms:
            img = transform(img)
        return img


class ToTensor:
    """PIL image or ``uint8`` array ``[H, W, C]`` -> float tensor ``[C, H, W]`` in [0, 1].

    Raises:
        TypeError: for anything but a PIL image or a numpy array.
    """

    def __call__(self, pic: Image.Image | np.ndarray) -> torch.Tensor:
        if isinstance(pic, Image.Image):
            pic = np.array(pic)
        if not isinstance(pic, np.ndarray):
            raise TypeError(f"ToTensor expects a PIL image or a numpy array, got {type(pic).__name__}")
        if pic.ndim == 2:
            pic = pic[:, :, None]
        tensor = torch.from_numpy(np.ascontiguousarray(pic.transpose(2, 0, 1)))
        if tensor.dtype == torch.uint8:
            return tensor.float().div(255)
        return tensor.float()


class Normalize:
    """``(x - mean) / std`` per channel of a float tensor ``[C, H, W]`` (``torchvision.transforms.Normalize``)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        self.mean = torch.as_tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.as_tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        return (tensor - self.mean) / self.std
