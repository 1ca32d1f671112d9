"""Attacks on the gradients DP-SGD releases: the ground truth the MI reading is checked against.

* :mod:`~adaptive_dp.attacks.release` — the released gradient, clipped per-sample gradients (the leakage
  monitor's own, :mod:`adaptive_dp.leakage.gradients`), and the [0, 1]-image model wrapper;
* :mod:`~adaptive_dp.attacks.inversion` — gradient inversion: DLG, iDLG, Inverting Gradients;
* :mod:`~adaptive_dp.attacks.identification` — identification among candidates;
* :mod:`~adaptive_dp.attacks.i2f` — the I²F lower bound on reconstruction error;
* :mod:`~adaptive_dp.attacks.metrics` — PSNR, SSIM, MSE of reconstructions.
"""

from adaptive_dp.attacks.identification import IdentificationResult, identification_attack, identify
from adaptive_dp.attacks.inversion import AttackResult, dlg, idlg, inverting_gradients
from adaptive_dp.attacks.release import clipped_per_sample_gradients, release_gradient, with_normalization

__all__ = [
    "AttackResult",
    "IdentificationResult",
    "clipped_per_sample_gradients",
    "dlg",
    "identification_attack",
    "identify",
    "idlg",
    "inverting_gradients",
    "release_gradient",
    "with_normalization",
]
