"""``torchvision.datasets.FakeData`` stand-in: random PIL images and labels, reproducible per index."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset


class FakeData(Dataset):
    """``size`` random images of shape ``image_size`` ``(C, H, W)`` with labels in ``[0, num_classes)``.

    As in torchvision: example ``i`` is drawn from ``torch.manual_seed(i + random_offset)`` (the global RNG
    state is restored afterwards), the image is ``N(0, 1)`` noise turned into an 8-bit PIL image
    (``x * 255`` cast to ``uint8``), then ``transform`` is applied; the label is a Python int.

    Raises:
        IndexError: for an index outside ``[0, size)``.
    """

    def __init__(
        self,
        size: int = 1000,
        image_size: tuple[int, int, int] = (3, 224, 224),
        num_classes: int = 10,
        transform: Callable[[Any], Any] | None = None,
        target_transform: Callable[[int], Any] | None = None,
        random_offset: int = 0,
    ):
        self.size = size
        self.image_size = tuple(image_size)
        self.num_classes = num_classes
        self.transform = transform
        self.target_transform = target_transform
        self.random_offset = random_offset

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        if not 0 <= index < self.size:
            raise IndexError(f"{self.__class__.__name__} index {index} out of range [0, {self.size})")
        rng_state = torch.get_rng_state()
        torch.manual_seed(index + self.random_offset)
        img = torch.randn(*self.image_size)
        target = int(torch.randint(0, self.num_classes, size=(1,), dtype=torch.long)[0])
        torch.set_rng_state(rng_state)
        pixels = img.mul(255).byte().permute(1, 2, 0).numpy()
        image = Image.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels)
        if self.transform is not None:
            image = self.transform(image)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return image, target
