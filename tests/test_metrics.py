"""PSNR / SSIM / MSE against analytic values."""

from __future__ import annotations

import math

import pytest
import torch

from adaptive_dp.attacks.metrics import ReconstructionQuality, evaluate_reconstructions, mse, psnr, ssim


def _image(shape=(3, 32, 32), seed=0):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 0.8 + 0.1


def test_constant_offset_has_analytic_mse_and_psnr():
    x = _image()
    c = 0.05
    y = x + c  # stays within [0, 1]: x ∈ [0.1, 0.9]
    assert mse(y, x) == pytest.approx(c**2, rel=1e-6)
    assert psnr(y, x) == pytest.approx(10 * math.log10(1 / c**2), rel=1e-6)  # 26.02 dB
    # PSNR scales with the data range: the same error in a [0, 255]-range image is 20·log10(255) dB better
    assert psnr(y * 255, x * 255, data_range=255.0) == pytest.approx(10 * math.log10(255**2 / (255 * c) ** 2))


def test_identical_images():
    x = _image((1, 8, 8))
    assert psnr(x, x) == math.inf
    assert ssim(x, x) == pytest.approx(1.0)
    assert mse(x, x) == 0.0


def test_ssim_orders_structure():
    x = _image((1, 28, 28))
    noisy = (x + 0.05 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    unrelated = _image((1, 28, 28), seed=7)
    assert 1.0 > ssim(noisy, x) > ssim(unrelated, x)
    assert ssim(unrelated, x) < 0.3
    # small 8×8 images (window shrunk to 7) and colour images (channel_axis) both work
    assert -1.0 <= ssim(_image((1, 8, 8), seed=2), _image((1, 8, 8), seed=3)) <= 1.0
    assert ssim(_image(seed=4), _image(seed=4)) == pytest.approx(1.0)


def test_evaluate_batch():
    x = torch.stack([_image(seed=i) for i in range(3)])
    y = (x + 0.02).clamp(0, 1)
    out = evaluate_reconstructions(y, x)
    assert len(out) == 3 and all(isinstance(q, ReconstructionQuality) for q in out)
    assert out[1].psnr == pytest.approx(psnr(y[1], x[1]))
    assert set(out[0].as_dict()) == {"psnr", "ssim", "mse"}


def test_bad_inputs():
    x = _image((1, 8, 8))
    with pytest.raises(ValueError, match="same shape"):
        psnr(x, _image((1, 8, 9)))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        psnr(x * 3, x)
    with pytest.raises(ValueError, match="NaN"):
        mse(torch.full_like(x, float("nan")), x)
    with pytest.raises(ValueError, match="at least 3"):
        ssim(_image((1, 2, 2)), _image((1, 2, 2)))
    with pytest.raises(ValueError, match="batch"):
        psnr(x.unsqueeze(0), x.unsqueeze(0))
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        evaluate_reconstructions(x, x)
    with pytest.raises(ValueError, match="data_range"):
        psnr(x, x, data_range=0.0)
