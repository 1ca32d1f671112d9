"""The leakage-estimator interface and its registry: what the monitor hands an estimator, what it gets back.

An estimator turns the audit examples' clipped per-sample gradients (and, if it asks for them, their data
features) at noise multiplier σ into an MI estimate in nats (:class:`~adaptive_dp.leakage.bounds.MIEstimate`).
Classes register themselves by name with :func:`register_estimator`; :data:`ESTIMATORS` is that registry, the
one list of estimator names (the monitor's ``estimator=``, the engine's and the CLI's choices). Importing
:mod:`adaptive_dp.leakage` registers the built-in ones:

- ``"likelihood-ratio"`` — :class:`~adaptive_dp.leakage.likelihood_ratio.LikelihoodRatioEstimator`;
- ``"token-mine"`` — :class:`~adaptive_dp.leakage.token_mine.TokenMINEEstimator`.

A new estimator subclasses :class:`LeakageEstimator`, takes its options as keyword-only constructor
arguments (those named like an :class:`EstimatorContext` field are filled in by the monitor; the others are
the options a user may pass to ``LeakageMonitor(..., **options)``) and is decorated
``@register_estimator("name")``.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import torch
from torch import Tensor

from adaptive_dp.leakage.bounds import MIEstimate

__all__ = [
    "ESTIMATORS",
    "EstimatorContext",
    "LeakageEstimator",
    "build_estimator",
    "check_estimator",
    "register_estimator",
]


@dataclass(frozen=True)
class EstimatorContext:
    """What the monitor knows and passes to an estimator's constructor (the arguments it accepts by name).

    Attributes:
        layer_shapes: shapes of the trainable parameters, in per-sample gradient order.
        feature_dim: width F of the data features (None when the estimator does not use them).
        device: where the gradients live.
        token_encoder: a ``TOKEN_ENCODERS`` name or a :class:`~adaptive_dp.leakage.tokens.TokenEncoder`.
        seed: seeds the estimator's own randomness (never the global generators).
    """

    layer_shapes: Sequence[tuple[int, ...]]
    feature_dim: int | None
    device: torch.device
    token_encoder: Any
    seed: int


class LeakageEstimator:
    """Base class of the leakage estimators.

    Class attributes:
        name: the registry name (set by :func:`register_estimator`).
        needs_features: the monitor passes the audit examples' data features [N, F] to :meth:`estimate`.
        requires_noise: the estimator needs σ > 0 (the monitor refuses σ = 0 before computing gradients).
        reads_gram: the estimator needs only the [N, N] centred Gram matrix of the clipped audit gradients and
            implements :meth:`estimate_from_gram`; the monitor then computes that matrix layer by layer
            (:mod:`adaptive_dp.leakage.gram`) instead of materialising the [N, P] per-sample gradients.
    """

    name: ClassVar[str] = ""
    needs_features: ClassVar[bool] = False
    requires_noise: ClassVar[bool] = False
    reads_gram: ClassVar[bool] = False

    @classmethod
    def option_names(cls) -> frozenset[str]:
        """The user options: keyword-only constructor arguments that are not :class:`EstimatorContext` fields."""
        context = {f.name for f in dataclasses.fields(EstimatorContext)}
        params = inspect.signature(cls.__init__).parameters.values()
        return frozenset(p.name for p in params if p.kind is p.KEYWORD_ONLY and p.name not in context)

    def estimate(
        self,
        clean: list[Tensor],
        *,
        noise_multiplier: float,
        max_grad_norm: float,
        generator: torch.Generator,
        features: Tensor | None = None,
    ) -> MIEstimate:  # pragma: no cover
        """MI (nats) between an audit example and its release clip_C(g) + N(0, σ²C²I).

        Args:
            clean: one [N, *p.shape] tensor per trainable parameter: the audit examples' clipped gradients.
                The estimator may modify them in place (the monitor does not reuse them).
            noise_multiplier: σ ≥ 0.
            max_grad_norm: C > 0, the total clipping norm (the noise std is σ·C).
            generator: the monitor's generator, on the gradients' device, for the noise draws.
            features: [N, F] data features when :attr:`needs_features`, else None.
        """
        raise NotImplementedError

    def estimate_from_gram(
        self, gram: Tensor, *, noise_multiplier: float, max_grad_norm: float, generator: torch.Generator
    ) -> MIEstimate:  # pragma: no cover
        """MI (nats) from the [N, N] centred Gram matrix (H G̃ H, G̃ of the clipped audit gradients, float64).

        Only for estimators with :attr:`reads_gram`; the same estimate as :meth:`estimate` on the gradients
        whose centred Gram matrix ``gram`` is (the arguments as there).
        """
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """The estimator's state (learned parts, buffers, generators); {} for a stateless one."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""


#: Leakage estimators by name: the registry :func:`register_estimator` fills.
ESTIMATORS: dict[str, type[LeakageEstimator]] = {}

_E = TypeVar("_E", bound=type[LeakageEstimator])


def register_estimator(name: str) -> Callable[[_E], _E]:
    """Class decorator: register a :class:`LeakageEstimator` subclass under ``name`` (sets ``cls.name``).

    Raises:
        ValueError: if ``name`` is already taken by another class.
    """

    def decorate(cls: _E) -> _E:
        if ESTIMATORS.get(name, cls) is not cls:
            raise ValueError(f"estimator name {name!r} is already registered to {ESTIMATORS[name].__name__}")
        cls.name = name
        ESTIMATORS[name] = cls
        return cls

    return decorate


def check_estimator(name: str, options: dict[str, Any]) -> type[LeakageEstimator]:
    """The registered class of estimator ``name``, after checking that it takes ``options``.

    Raises:
        ValueError: an unknown name, or an option the estimator does not take.
    """
    if name not in ESTIMATORS:
        raise ValueError(f"unknown estimator {name!r}; choose one of {sorted(ESTIMATORS)}")
    cls = ESTIMATORS[name]
    allowed = cls.option_names()
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ValueError(
            f"option(s) {unknown} do not apply to estimator {name!r}; its options are "
            f"{sorted(allowed) or 'none'}"
        )
    return cls


def build_estimator(name: str, context: EstimatorContext, **options: Any) -> LeakageEstimator:
    """The estimator ``name`` built from the monitor's ``context`` and the user's ``options``.

    Raises:
        ValueError: an unknown name, an option the estimator does not take, or a bad option value.
    """
    cls = check_estimator(name, options)
    accepted = inspect.signature(cls.__init__).parameters
    given = {f.name: getattr(context, f.name) for f in dataclasses.fields(context) if f.name in accepted}
    return cls(**given, **options)
