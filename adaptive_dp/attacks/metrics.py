"""Reconstruction quality: PSNR (dB), SSIM and MSE between a reconstruction and the original image.

Both images are in the data's own range [0, ``data_range``] (here [0, 1]; see
:func:`adaptive_dp.attacks.with_normalization`). PSNR and SSIM come from scikit-image
(``skimage.metrics``), not hand-rolled.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from torch import Tensor

__all__ = ["ReconstructionQuality", "evaluate_reconstructions", "mse", "psnr", "ssim"]

#: scikit-image's default SSIM window (Wang et al. 2004 use 7×7 with uniform weights in skimage).
DEFAULT_SSIM_WINDOW = 7


def _to_numpy_pair(
    reconstruction: Tensor, original: Tensor, data_range: float
) -> tuple[np.ndarray, np.ndarray]:
    if not isinstance(reconstruction, Tensor) or not isinstance(original, Tensor):
        raise TypeError("reconstruction and original must be torch tensors")
    if reconstruction.shape != original.shape:
        raise ValueError(
            f"reconstruction and original must have the same shape, got {tuple(reconstruction.shape)} and "
            f"{tuple(original.shape)}"
        )
    if original.dim() not in (2, 3):
        raise ValueError(
            f"expected one image [C, H, W] or [H, W], got shape {tuple(original.shape)}; use "
            "evaluate_reconstructions for a batch"
        )
    if not (data_range > 0 and math.isfinite(data_range)):
        raise ValueError(f"data_range must be positive and finite, got {data_range}")
    a = reconstruction.detach().to("cpu").double()
    b = original.detach().to("cpu").double()
    for name, t in (("reconstruction", a), ("original", b)):
        if not np.isfinite(t.numpy()).all():
            raise ValueError(f"{name} contains NaN or inf")
        lo, hi = float(t.min()), float(t.max())
        if lo < -1e-6 or hi > data_range + 1e-6:
            raise ValueError(
                f"{name} must lie in [0, {data_range:g}] (the data's own range), got [{lo:.3g}, {hi:.3g}]; "
                "denormalize it first (adaptive_dp.data.denormalize) or pass the right data_range"
            )
    return a.numpy(), b.numpy()


def mse(reconstruction: Tensor, original: Tensor, *, data_range: float = 1.0) -> float:
    """Mean squared error over all pixels and channels.

    Args:
        reconstruction, original: one image each, [C, H, W] or [H, W], values in [0, ``data_range``].
        data_range: the images' value range (1.0 for [0, 1]).

    Returns:
        MSE in squared data units.

    Raises:
        ValueError: for shape mismatch, non-finite values or values outside [0, data_range].
    """
    a, b = _to_numpy_pair(reconstruction, original, data_range)
    from skimage.metrics import mean_squared_error

    return float(mean_squared_error(b, a))


def psnr(reconstruction: Tensor, original: Tensor, *, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio 10·log10(data_range² / MSE), in dB (``skimage.metrics``).

    Args:
        reconstruction, original: one image each, [C, H, W] or [H, W], values in [0, ``data_range``].
        data_range: the images' value range (1.0 for [0, 1]).

    Returns:
        PSNR in dB; ``inf`` for identical images.

    Raises:
        ValueError: for shape mismatch, non-finite values or values outside [0, data_range].
    """
    a, b = _to_numpy_pair(reconstruction, original, data_range)
    if np.array_equal(a, b):
        return float("inf")
    from skimage.metrics import peak_signal_noise_ratio

    return float(peak_signal_noise_ratio(b, a, data_range=data_range))


def _ssim_window(height: int, width: int) -> int:
    side = min(height, width, DEFAULT_SSIM_WINDOW)
    if side % 2 == 0:
        side -= 1
    if side < 3:
        raise ValueError(f"SSIM needs images at least 3×3, got {height}×{width}")
    return side


def ssim(reconstruction: Tensor, original: Tensor, *, data_range: float = 1.0) -> float:
    """Structural similarity (Wang et al. 2004) via ``skimage.metrics.structural_similarity``.

    The window is 7×7, shrunk to the largest odd size ≤ the image's smaller side for small images (8×8
    digits use 7); colour images are compared per channel and averaged (``channel_axis=0``).

    Args:
        reconstruction, original: one image each, [C, H, W] or [H, W], values in [0, ``data_range``].
        data_range: the images' value range (1.0 for [0, 1]).

    Returns:
        SSIM in [−1, 1] (1 = identical).

    Raises:
        ValueError: for shape mismatch, values outside range, or images smaller than 3×3.
    """
    a, b = _to_numpy_pair(reconstruction, original, data_range)
    from skimage.metrics import structural_similarity

    if a.ndim == 3 and a.shape[0] == 1:
        a, b = a[0], b[0]
    win = _ssim_window(a.shape[-2], a.shape[-1])
    channel_axis = 0 if a.ndim == 3 else None
    return float(structural_similarity(b, a, data_range=data_range, win_size=win, channel_axis=channel_axis))


@dataclass(frozen=True)
class ReconstructionQuality:
    """PSNR (dB), SSIM and MSE of one reconstruction against its original."""

    psnr: float
    ssim: float
    mse: float

    def as_dict(self) -> dict[str, float]:
        """The fields as a plain dict."""
        return asdict(self)


def evaluate_reconstructions(
    reconstructions: Tensor, originals: Tensor, *, data_range: float = 1.0
) -> list[ReconstructionQuality]:
    """PSNR, SSIM and MSE for every image of a batch.

    Args:
        reconstructions, originals: [B, C, H, W] with values in [0, ``data_range``].
        data_range: the images' value range.

    Returns:
        One :class:`ReconstructionQuality` per image, in batch order.

    Raises:
        ValueError: for shape mismatch, a tensor that is not 4-D, or values outside range.
    """
    if reconstructions.dim() != 4 or originals.dim() != 4:
        raise ValueError(
            f"expected batches [B, C, H, W], got {tuple(reconstructions.shape)} and {tuple(originals.shape)}"
        )
    if reconstructions.shape != originals.shape:
        raise ValueError(
            f"reconstructions and originals must have the same shape, got {tuple(reconstructions.shape)} and "
            f"{tuple(originals.shape)}"
        )
    return [
        ReconstructionQuality(
            psnr=psnr(r, o, data_range=data_range),
            ssim=ssim(r, o, data_range=data_range),
            mse=mse(r, o, data_range=data_range),
        )
        for r, o in zip(reconstructions, originals)
    ]
