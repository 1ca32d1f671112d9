"""Attacks on the gradients DP-SGD releases: the ground truth the MI reading is checked against.

* :mod:`~adaptive_dp.attacks.inversion` — gradient inversion: DLG, iDLG, Inverting Gradients;
* :mod:`~adaptive_dp.attacks.identification` — identification among candidates;
* :mod:`~adaptive_dp.attacks.i2f` — the I²F lower bound on reconstruction error;
* :mod:`~adaptive_dp.attacks.metrics` — PSNR, SSIM, MSE of reconstructions.
"""

from adaptive_dp.attacks.identification import IdentificationResult, identification_attack, identify
from adaptive_dp.attacks.inversion import AttackResult, dlg, idlg, inverting_gradients, release_gradient

__all__ = [
    "AttackResult",
    "IdentificationResult",
    "dlg",
    "identification_attack",
    "identify",
    "idlg",
    "inverting_gradients",
    "release_gradient",
]
