"""Mutual-information estimators, in nats: the public import path (``adaptive_dp.mine`` re-exports it).

Three layers, each in its own module:

* bound functions on critic scores (:mod:`adaptive_dp.leakage.bounds`) — :func:`dv_lower_bound`
  (Donsker–Varadhan), :func:`infonce_lower_bound` (InfoNCE), :func:`smile_lower_bound` (SMILE) and
  :func:`mine_loss` (the DV bound with MINE's moving-average gradient correction), and :class:`MIEstimate`;
* learned critics (:mod:`adaptive_dp.leakage.mine_trainer`) — :class:`MINETrainer` trains a critic T(x, z)
  (see :mod:`adaptive_dp.leakage.critics`) and evaluates the bound on held-out pairs; :func:`estimate_mi` /
  :func:`estimate_mi_detailed` wrap it for any two tensors [N, dx], [N, dz] (options: :class:`MIEstimatorOptions`);
* the model-aware, training-free critic for the Gaussian mechanism (:mod:`adaptive_dp.leakage.likelihood_ratio`)
  — :func:`likelihood_ratio_scores`, :func:`likelihood_ratio_mi` — and the independent truth it is checked
  against, :func:`gaussian_capacity_bound`.

Matched pairs are (x[i], z[i]); mismatched (shuffled) pairs are (x[i], z[j]), j ≠ i. The critic gap is the
mean critic score on matched pairs minus the mean on mismatched pairs.

Example:
    >>> import torch
    >>> from adaptive_dp.leakage.mine import gaussian_capacity_bound, infonce_lower_bound
    >>> round(float(infonce_lower_bound(100.0 * torch.eye(4))), 4)  # a perfect critic reaches the cap log 4
    1.3863
    >>> round(gaussian_capacity_bound(torch.eye(4), noise_std=1.0), 4)  # 4 unit-norm gradients, σC = 1: ≤ 0.5
    0.3347
"""

from adaptive_dp.leakage.bounds import (
    MIEstimate,
    dv_lower_bound,
    infonce_lower_bound,
    mine_loss,
    smile_lower_bound,
)
from adaptive_dp.leakage.likelihood_ratio import (
    gaussian_capacity_bound,
    likelihood_ratio_mi,
    likelihood_ratio_scores,
)
from adaptive_dp.leakage.mine_trainer import (
    MIEstimatorOptions,
    MINETrainer,
    estimate_mi,
    estimate_mi_detailed,
    gaussianise,
)

__all__ = [
    "MIEstimate",
    "MIEstimatorOptions",
    "MINETrainer",
    "dv_lower_bound",
    "estimate_mi",
    "estimate_mi_detailed",
    "gaussian_capacity_bound",
    "gaussianise",
    "infonce_lower_bound",
    "likelihood_ratio_mi",
    "likelihood_ratio_scores",
    "mine_loss",
    "smile_lower_bound",
]
