"""The leakage monitor: one audit batch + the current σ → an MI reading (nats), training step untouched.

A reading simulates what one DP-SGD step would release about each audit example: its per-sample
gradient, clipped to C (``max_grad_norm``) as the optimizer clips, plus the Gaussian noise N(0, σ²C²) the
optimizer adds — the worst case of a batch of one — and estimates the mutual information between *which*
audit example it was and that noisy gradient. The estimators are registered by name (``ESTIMATORS``,
:mod:`adaptive_dp.leakage.estimators`):

- ``"likelihood-ratio"`` — model-aware and training-free: the optimal critic for the Gaussian mechanism,
  T(x_j, g̃_i) = −‖g̃_i − g_j‖²/(2σ²C²), over all N×N audit pairs with InfoNCE; capped at log N
  (:class:`~adaptive_dp.leakage.likelihood_ratio.LikelihoodRatioEstimator`).
- ``"token-mine"`` — the learned privacy-token estimator (Meng et al. 2025, arXiv 2502.02913) made
  model-aware (:class:`~adaptive_dp.leakage.token_mine.TokenMINEEstimator`).

How the gradients are reached (``gradient_path``, :data:`GRADIENT_PATHS`): the likelihood-ratio critic needs
only the N×N Gram matrix of the clipped audit gradients, so by default it is built layer by layer from one
batched forward and backward pass (:mod:`adaptive_dp.leakage.gram`: per-layer Gram matrices from activations and
output gradients, then clipped and centred), at memory of one layer's activations and per-sample gradients at
a time instead of the [N, P] per-sample gradient matrix (``benchmarks/results/finetune_speed.md`` measures both);
a model the Gram path refuses (a ValueError: tied parameters, a layer that is not batch-first, ...) falls back
to materialised per-sample gradients with a logged warning, and token-mine always uses those. Either way the
reading is the same to float rounding, and ghost clipping is read like any other grad-sample mode.

Side effects (none on training): per-sample gradients are computed with ``torch.func`` on a hook-free copy
of the wrapped module fed the live parameters (:mod:`adaptive_dp.leakage.gradients`: a ``GradSampleModule``
keeps its hooks on the wrapped module, so going through it again would fire them), so nothing is written to
``p.grad_sample``/``p.grad``/``p.summed_grad`` of the training model, and all randomness comes from the
monitor's own ``torch.Generator`` on the model's device — the training step is the same with the monitor on
or off. The audit examples must be public or held out, never trained on: σ may depend only on public data
and DP outputs, and the audit examples themselves get no DP protection (``docs/accounting.md``).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import adaptive_dp.leakage.likelihood_ratio  # noqa: F401  (registers "likelihood-ratio" in ESTIMATORS)
import adaptive_dp.leakage.token_mine  # noqa: F401  (registers "token-mine" in ESTIMATORS)
from adaptive_dp.leakage.audit import audit_tensors
from adaptive_dp.leakage.estimators import ESTIMATORS, EstimatorContext, build_estimator, check_estimator
from adaptive_dp.leakage.features import FeatureExtractor
from adaptive_dp.leakage.gradients import (
    clip_factors,
    hook_free_copy,
    per_sample_gradients,
    per_sample_norms,
    scale_per_sample,
    total_clipping_norm,
)
from adaptive_dp.leakage.gram import centre_gram, clipped_gram, parameter_grams
from adaptive_dp.leakage.tokens import TOKEN_ENCODERS, TokenEncoder

__all__ = ["ESTIMATORS", "GRADIENT_PATHS", "LeakageMonitor", "LeakageReading", "MonitorError"]

logger = logging.getLogger(__name__)

#: How a reading gets at the audit gradients (the monitor's ``gradient_path``): ``"auto"`` — the layer-wise
#: Gram matrix for an estimator that reads only that (likelihood-ratio), falling back to materialised
#: per-sample gradients when the Gram path refuses the model; ``"gram"`` — the Gram path, no fallback (its
#: failure is a :class:`MonitorError`); ``"materialised"`` — the [N, *p.shape] per-sample gradients.
GRADIENT_PATHS = ("auto", "gram", "materialised")


class MonitorError(RuntimeError):
    """A leakage reading could not be taken (non-finite gradients, audit data that do not fit the model, ...).

    The engine treats it as a failed reading (fail closed: σ_max).
    """


@dataclass(frozen=True)
class LeakageReading:
    """One monitor reading; ``LeakageReading(**dataclasses.asdict(r)) == r`` (checkpoints store it so).

    Attributes:
        estimator: the estimator's name (an ``ESTIMATORS`` key).
        mi: estimated MI between the audit example and its released noisy gradient, nats.
        critic_gap: mean critic score on matched minus mismatched (shuffled) pairs (critic units, not nats).
        stderr: standard error of ``mi`` over the noise draw, nats.
        n: number of audit examples (matched pairs) in the estimate.
        seconds: wall time of the reading.
        cap: the largest value the estimator can report (log n), nats.
        noise_multiplier: the σ the reading was taken at.
        audit_loss: mean loss (the monitor's ``loss_fn``; nats for cross-entropy) of the n audit examples at
            the parameters of the reading, in eval mode — a public/held-out metric, from the forward passes
            of the per-sample gradients (no extra pass).
    """

    estimator: str
    mi: float
    critic_gap: float
    stderr: float
    n: int
    seconds: float
    cap: float | None = None
    noise_multiplier: float | None = None
    audit_loss: float | None = None

    @property
    def mi_gap(self) -> float:
        """Deprecated name of :attr:`critic_gap` (it is a difference of critic scores, not an MI)."""
        warnings.warn(
            "LeakageReading.mi_gap is deprecated; use critic_gap (a difference of critic scores, not nats)",
            DeprecationWarning,
            stacklevel=2,
        )
        return self.critic_gap

    @classmethod
    def from_dict(cls, state: Mapping[str, Any]) -> LeakageReading:
        """A reading from ``dataclasses.asdict`` output, also one saved before the rename (key ``mi_gap``).

        Raises:
            ValueError: unknown or missing keys, or both ``mi_gap`` and ``critic_gap``.
        """
        values = dict(state)
        if "mi_gap" in values:
            if "critic_gap" in values:
                raise ValueError("a reading has either critic_gap or the old mi_gap, not both")
            values["critic_gap"] = values.pop("mi_gap")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(fields))
        missing = sorted(n for n, f in fields.items() if n not in values and f.default is dataclasses.MISSING)
        if unknown or missing:
            raise ValueError(f"not a LeakageReading: unknown keys {unknown}, missing keys {missing}")
        return cls(**values)


def _unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside a GradSampleModule (any mode, ghost clipping included), else ``model``.

    The monitor never goes through opacus' hooks: it differentiates a hook-free copy of this module fed the
    live parameters, so the training model's grad-sample mode does not matter.
    """
    inner = getattr(model, "_module", None)
    if isinstance(inner, nn.Module) and hasattr(model, "hooks_enabled"):
        return inner
    return model


def _check_sigma(noise_multiplier: float, estimator: str) -> float:
    try:
        sigma = float(noise_multiplier)
    except (TypeError, ValueError):
        raise ValueError(f"noise_multiplier must be a number, got {noise_multiplier!r}") from None
    if not (math.isfinite(sigma) and sigma >= 0):
        raise ValueError(f"noise_multiplier must be finite and >= 0, got {noise_multiplier!r}")
    if sigma <= 0 and ESTIMATORS[estimator].requires_noise:
        others = sorted(n for n, c in ESTIMATORS.items() if not c.requires_noise)
        raise ValueError(
            f"the {estimator} estimator needs noise_multiplier > 0 (its critic divides by σ²C²), "
            f"got {noise_multiplier}; to read at σ = 0 use estimator= one of {others}"
        )
    return sigma


class LeakageMonitor:
    """Measures gradient leakage on an audit split, without touching the training step.

    Args:
        model: the ``GradSampleModule`` returned by ``PrivacyEngine.make_private`` (any grad-sample mode,
            ghost clipping included), or a plain module.
        audit_data: public or held-out examples (never trained on): a map-style Dataset of (x, y), a
            DataLoader over one, or tensors ``(x [N, ...], y [N])`` (checked by
            :func:`adaptive_dp.leakage.audit.as_audit_dataset`); the first ``max_audit`` are used.
        max_grad_norm: C, the optimizer's clipping norm (or per-layer norms with ``clipping="per_layer"``).
        estimator: an ``ESTIMATORS`` name: ``"likelihood-ratio"`` (default) or ``"token-mine"``.
        token_encoder: a ``TOKEN_ENCODERS`` name for ``"token-mine"`` (default ``"span"``), or an encoder.
        seed: seeds the monitor's own generator (noise draws) and learned parts.
        max_audit: cap on N (default 256).
        clipping: ``"flat"`` (default) or ``"per_layer"``, as given to ``make_private``.
        loss_fn: per-example loss ``loss_fn(logits [1, K], target [1]) -> scalar``; default cross-entropy.
        batch_size: audit examples per vmap call of the materialised path (the Gram path takes all N in one
            batched pass).
        feature_layers, pooled_size: passed to :class:`FeatureExtractor` (estimators that use data features).
        gradient_path: :data:`GRADIENT_PATHS` — ``"auto"`` (default): an estimator that reads only the [N, N]
            Gram matrix (``reads_gram``: likelihood-ratio) gets it layer by layer from one batched pass
            (:func:`~adaptive_dp.leakage.gram.parameter_grams`, never the N×P per-sample gradients), and a
            model the Gram path refuses (ValueError: tied parameters, non-batch-first layers, ...) falls back to
            materialised per-sample gradients, logged once and kept for later readings; ``"gram"``: the Gram
            path or a :class:`MonitorError`; ``"materialised"``: per-sample gradients (what token-mine always
            uses). Both paths give the same reading up to float rounding (≤ 1e-6 relative, tested).
        **estimator_options: the estimator's own options (its keyword-only constructor arguments):
            token-mine's ``token_dim``, ``train_draws``, ``replay_size``, ``encoder_steps``, ``critic_steps``,
            ``lr``, ``sigma_tolerance``, ``objective``, ``ema_decay``; likelihood-ratio's ``noise_draws``.

    Per-sample gradients (and features) are computed in eval mode on the hook-free copy, so dropout is off
    and no random number is drawn from the global generators.

    Attributes:
        last_path: ``"gram"`` or ``"materialised"``, how the last reading got its gradients (None before one).

    Raises:
        ValueError: empty audit data, < 2 examples, unknown estimator/encoder/option/gradient path,
            non-positive C.
    """

    def __init__(
        self,
        model: nn.Module,
        audit_data: Any,
        *,
        max_grad_norm: float | Sequence[float],
        estimator: str = "likelihood-ratio",
        token_encoder: str | TokenEncoder = "span",
        seed: int = 0,
        max_audit: int = 256,
        clipping: str = "flat",
        loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
        batch_size: int = 64,
        feature_layers: Sequence[str] | None = None,
        pooled_size: int = 2,
        gradient_path: str = "auto",
        **estimator_options: Any,
    ) -> None:
        estimator_cls = check_estimator(estimator, estimator_options)
        if gradient_path not in GRADIENT_PATHS:
            raise ValueError(f"gradient_path must be one of {GRADIENT_PATHS}, got {gradient_path!r}")
        if gradient_path == "gram" and not (estimator_cls.reads_gram and not estimator_cls.needs_features):
            raise ValueError(f"the {estimator} estimator needs per-sample gradients, not their Gram matrix")
        if isinstance(token_encoder, str) and token_encoder not in TOKEN_ENCODERS:
            raise ValueError(
                f"unknown token encoder {token_encoder!r}; choose one of {sorted(TOKEN_ENCODERS)}"
            )
        if clipping not in ("flat", "per_layer"):
            raise ValueError(f"clipping must be 'flat' or 'per_layer', got {clipping!r}")
        if max_audit < 2:
            raise ValueError(f"max_audit must be >= 2, got {max_audit}")
        total_clipping_norm(max_grad_norm)
        self.model = model
        self._module = _unwrap(model)
        self.max_grad_norm = max_grad_norm
        self.per_layer = clipping == "per_layer"
        self.estimator_name = estimator
        self.seed = int(seed)
        self.loss_fn = loss_fn or F.cross_entropy
        self.batch_size = int(batch_size)
        self._names = [n for n, p in self._module.named_parameters() if p.requires_grad]
        if not self._names:
            raise ValueError("the model has no trainable parameters")
        self.device = next(self._module.parameters()).device
        x, y = audit_tensors(audit_data, max_examples=int(max_audit))
        if x.shape[0] < 2:
            raise ValueError(f"audit_data has {x.shape[0]} example(s); the estimators need at least 2")
        self.x, self.y = x.to(self.device), y.to(self.device)
        with torch.random.fork_rng(devices=[]):
            self._shadow = hook_free_copy(self._module)
        self._generator = torch.Generator(device=self.device).manual_seed(self.seed)
        params = dict(self._module.named_parameters())
        self.layer_shapes = [tuple(params[n].shape) for n in self._names]
        self._extractor = None
        feature_dim = None
        if estimator_cls.needs_features:
            self._extractor = FeatureExtractor(self._shadow, layers=feature_layers, pooled_size=pooled_size)
            feature_dim = self._features_now().shape[1]
        context = EstimatorContext(
            layer_shapes=self.layer_shapes,
            feature_dim=feature_dim,
            device=self.device,
            token_encoder=token_encoder,
            seed=self.seed,
        )
        self._estimator = build_estimator(estimator, context, **estimator_options)
        self.gradient_path = gradient_path
        self._gram_refusal: str | None = None  # why the Gram path refused this model (then: materialised)
        self.last_path: str | None = None
        self.readings = 0

    # -- pieces ------------------------------------------------------------------------------------

    def _live_state(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        named = dict(self._module.named_parameters())
        params = {n: named[n].detach() for n in self._names}
        frozen = {n: p.detach() for n, p in named.items() if n not in params}
        buffers = {n: b.detach() for n, b in self._module.named_buffers()}
        return params, {**frozen, **buffers}

    def _features_now(self) -> Tensor:
        params, rest = self._live_state()
        from torch.func import functional_call

        def forward(x: Tensor) -> Tensor:
            return functional_call(self._shadow, (params, rest), (x,))

        return self._extractor(self.x, forward=forward)

    def _clipped_gradients(self, max_grad_norm: float | Sequence[float]) -> tuple[list[Tensor], Tensor]:
        """(clipped per-sample gradients [N, *p.shape] per parameter, per-example losses [N])."""
        params, rest = self._live_state()
        try:
            grads, losses = per_sample_gradients(
                self._shadow, params, rest, self.x, self.y, loss_fn=self.loss_fn, batch_size=self.batch_size
            )
        except (RuntimeError, ValueError, IndexError) as exc:
            raise MonitorError(
                f"per-sample gradients failed on audit inputs of shape {tuple(self.x.shape)} and targets "
                f"{tuple(self.y.shape)}: {exc}; pass audit examples shaped like the training batches"
            ) from exc
        grads = [g if g.is_contiguous() else g.contiguous() for g in grads]  # own memory: clipped in place
        norms = per_sample_norms(grads)  # [N, L]: any NaN/inf entry makes its norm non-finite
        self._check_finite(norms)
        c = max_grad_norm if self.per_layer else total_clipping_norm(max_grad_norm)
        factors = clip_factors(norms, c, per_layer=self.per_layer)
        return scale_per_sample(grads, factors, inplace=True), losses

    def _check_finite(self, per_parameter: Tensor) -> None:
        """Raise :class:`MonitorError` naming the first parameter with a non-finite entry in ``per_parameter``
        ([N, L]: per example and parameter, a norm or squared norm of the per-sample gradient)."""
        finite = torch.isfinite(per_parameter)
        if not bool(finite.all()):
            name = self._names[int((~finite).any(dim=0).nonzero()[0, 0])]
            raise MonitorError(
                f"non-finite per-sample gradient for parameter {name!r} on the audit data; "
                "the model has diverged (lower the learning rate) or the audit inputs hold NaN"
            )

    def _clipped_centred_gram(self, max_grad_norm: float | Sequence[float]) -> tuple[Tensor, Tensor]:
        """(H G̃ H [N, N] float64, per-example losses [N]) through the Gram path, no N×P gradients.

        Raises:
            ValueError, RuntimeError, ...: whatever :func:`~adaptive_dp.leakage.gram.parameter_grams` raises
                (the caller falls back or fails).
            MonitorError: a per-sample gradient is NaN or inf (its squared norm, a diagonal entry, is not finite).
        """
        params, rest = self._live_state()
        dtype = torch.float32 if self.device.type == "mps" else torch.float64  # MPS has no float64
        grams, losses = parameter_grams(
            self._shadow, self.x, self.y, loss_fn=self.loss_fn, params=params, buffers=rest, dtype=dtype
        )
        self._check_finite(torch.stack([grams[name].diagonal() for name in self._names], dim=1))
        c = max_grad_norm if self.per_layer else total_clipping_norm(max_grad_norm)
        return centre_gram(clipped_gram(grams, c, per_layer=self.per_layer)), losses

    def _gram_or_none(self, max_grad_norm: float | Sequence[float]) -> tuple[Tensor, Tensor] | None:
        """The Gram path's (centred Gram, losses), or None where the materialised path must be taken.

        None for ``gradient_path="materialised"``, an estimator that needs the gradients themselves, or a model
        the Gram path refused before; a refusal now (ValueError: kept for later readings; any other error of
        the pass: this reading only) is logged and gives None, or a :class:`MonitorError` for ``"gram"``.
        """
        estimator = type(self._estimator)
        if (
            self.gradient_path == "materialised"
            or not estimator.reads_gram
            or estimator.needs_features
            or self._gram_refusal is not None
        ):
            return None
        try:
            return self._clipped_centred_gram(max_grad_norm)
        except MonitorError:
            raise
        except (ValueError, RuntimeError, IndexError, TypeError, NotImplementedError) as exc:
            reason = f"{type(exc).__name__}: {exc}"
            if self.gradient_path == "gram":
                raise MonitorError(
                    f"the Gram path failed on audit inputs of shape {tuple(self.x.shape)} and targets "
                    f"{tuple(self.y.shape)}: {reason}"
                ) from exc
            if isinstance(exc, ValueError):
                self._gram_refusal = reason
            logger.warning(
                "leakage monitor: the layer-wise Gram path failed (%s); this %s materialised per-sample "
                "gradients",
                reason,
                "and every later reading use" if isinstance(exc, ValueError) else "reading uses",
            )
            return None

    def clean_gradients(self, *, max_grad_norm: float | Sequence[float] | None = None) -> list[Tensor]:
        """The audit examples' clipped per-sample gradients at the current parameters.

        Returns:
            One [N, *p.shape] tensor per trainable parameter (opacus' ``grad_sample`` order), clipped like
            the optimizer clips (:func:`adaptive_dp.leakage.gradients.clip_factors`).

        Raises:
            MonitorError: if a per-sample gradient is NaN or inf, or the audit data do not fit the model.
        """
        return self._clipped_gradients(self.max_grad_norm if max_grad_norm is None else max_grad_norm)[0]

    def read(
        self, *, noise_multiplier: float, max_grad_norm: float | Sequence[float] | None = None
    ) -> LeakageReading:
        """Take one reading at noise multiplier σ (and clipping norm C, default the constructor's).

        Cost: on the Gram path (likelihood-ratio, ``gradient_path`` "auto"/"gram"), one batched forward and
        backward pass over the N audit examples that builds the N×N Gram matrix layer by layer (memory: one
        layer's activations and output gradients at a time, never N×P); on the materialised path, one forward
        and backward pass per audit example (vmapped, in chunks of ``batch_size``) and the [N, P] clipped
        gradients. Either pass also gives ``audit_loss``; plus one forward pass for the data features of an
        estimator that uses them.

        Args:
            noise_multiplier: σ of the step being simulated; the noise std is σ·C (C the total clipping
                norm). ≥ 0; the likelihood-ratio estimator needs > 0.
            max_grad_norm: C for this reading (e.g. an adaptive-clipping optimizer's current value).

        Returns:
            :class:`LeakageReading` (nats).

        Raises:
            ValueError: σ negative or non-finite (or 0 for an estimator that needs noise), bad C.
            MonitorError: non-finite gradients, audit data that do not fit the model, a failure of the forced
                Gram path, or an estimator failure on valid input.
        """
        start = time.perf_counter()
        sigma = _check_sigma(noise_multiplier, self.estimator_name)
        c_spec = self.max_grad_norm if max_grad_norm is None else max_grad_norm
        c = total_clipping_norm(c_spec)
        from_gram = self._gram_or_none(c_spec)
        if from_gram is not None:
            kernel, losses = from_gram
            self.last_path = "gram"
            est = self._estimator.estimate_from_gram(
                kernel, noise_multiplier=sigma, max_grad_norm=c, generator=self._generator
            )
        else:
            clean, losses = self._clipped_gradients(c_spec)
            self.last_path = "materialised"
            features = self._features_now() if self._extractor is not None else None
            est = self._estimator.estimate(
                clean, noise_multiplier=sigma, max_grad_norm=c, generator=self._generator, features=features
            )
        if not math.isfinite(est.mi):
            raise MonitorError(f"the {self.estimator_name} estimator returned a non-finite MI ({est.mi})")
        self.readings += 1
        return LeakageReading(
            estimator=self.estimator_name,
            mi=est.mi,
            critic_gap=est.critic_gap,
            stderr=est.stderr,
            n=est.n,
            seconds=time.perf_counter() - start,
            cap=est.cap,
            noise_multiplier=sigma,
            audit_loss=float(losses.double().mean()),
        )

    def mi_curve(self) -> Callable[[float], tuple[float, float]] | None:
        """σ′ ↦ (MI nats, stderr nats) on the audit gradients of the last reading, for a predictive controller.

        None before the first reading, and for estimators that cannot evaluate other σ′ (token-MINE: its critic
        is trained at the σ read).
        """
        curve = getattr(self._estimator, "mi_curve", None)
        return None if curve is None else curve()

    # -- state ---------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Estimator state (encoder, critic, optimisers, EMA, replay buffer) and the noise generator."""
        # deep copy: optimiser state_dicts alias live tensors (Adam's step counter), which a monitor loading
        # this state would otherwise share with this one
        return copy.deepcopy(
            {
                "estimator": self.estimator_name,
                "readings": self.readings,
                "generator": self._generator.get_state(),
                "state": self._estimator.state_dict(),
            }
        )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`. Raises ValueError if it belongs to another estimator."""
        if state.get("estimator") != self.estimator_name:
            raise ValueError(
                f"state is for estimator {state.get('estimator')!r}, this monitor uses "
                f"{self.estimator_name!r}"
            )
        self.readings = int(state["readings"])
        self._generator.set_state(state["generator"])
        self._estimator.load_state_dict(state["state"])
