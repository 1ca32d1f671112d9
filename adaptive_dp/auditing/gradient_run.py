"""White-box gradient canaries inside a real DP-SGD run (the white-box one-run audit).

A :class:`GradientCanaryRun` holds m canary gradients of norm C in the space of the trainable parameters and a
fair coin per canary (:func:`~adaptive_dp.auditing.canaries.draw_inclusion`). Attached to the adaptive DP
optimizer (:mod:`adaptive_dp.optimizers`) through its two public hooks, on every real optimizer step it

1. (pre-noise hook: σ decided, noise not drawn yet, parameters still θ_t) copies θ_t, lets each *included*
   canary join the step's Poisson sample independently with the run's sample rate q, and adds the selected
   canaries to the clipped gradient sum ``p.summed_grad`` — so the noise N(0, σ²C²) and the accountant treat
   each canary exactly like one more training example whose clipped gradient is the canary;
2. (post-step hook: after the update θ_{t+1}) adds the step to the white-box scores
   (:class:`~adaptive_dp.auditing.scoring.CanaryScorer`: Σ_t ⟨g_t, c_i⟩ with g_t recovered from θ_t, θ_{t+1}
   and the step's learning rate).

:meth:`GradientCanaryRun.audit` then turns the scores into ε̂ (:func:`~adaptive_dp.auditing.audit_from_scores`).
Virtual steps (``BatchMemoryManager``) reach neither hook: a canary is sampled once per real (logical) step.
q is not changed: canaries are extra examples and the accountant books the run's q as always.

Memory and cost: ``kind="random"`` keeps the dense [m, P] canaries on the parameters' device (4·m·P bytes,
O(m·P) per step) and is refused above :data:`MAX_DENSE_CANARY_FLOATS` floats; ``kind="dirac"`` (one
coordinate each, no cross-talk) is kept sparse (O(m) memory, O(P + m) per step) and fits any model.

Source: Steinke, Nasr & Jagielski, "Privacy Auditing with One (1) Training Run", NeurIPS 2023,
arXiv:2305.08846v1, Algorithm 1 and the white-box experiments (gradient canaries, scores from the model
updates); Nasr et al., "Tight Auditing of Differentially Private Machine Learning", USENIX Security 2023
(Dirac canaries).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from adaptive_dp import distributed as ddp
from adaptive_dp.auditing.audit import CanaryAudit, audit_from_scores
from adaptive_dp.auditing.canaries import canary_seeds, draw_inclusion, make_gradient_canaries
from adaptive_dp.auditing.scoring import CanaryScorer

__all__ = ["MAX_DENSE_CANARY_FLOATS", "GradientCanaryRun", "sgd_momentum"]

#: Largest m·P for dense (``kind="random"``) canaries: 5e7 floats = 200 MB in float32.
MAX_DENSE_CANARY_FLOATS = 50_000_000
_KINDS = ("random", "dirac")


def sgd_momentum(optimizer: torch.optim.Optimizer) -> float:
    """Momentum μ of a ``torch.optim.SGD`` whose updates the white-box scores can invert exactly.

    Supported: ``torch.optim.SGD`` with one learning rate for all parameter groups, ``nesterov=False``,
    ``dampening=0``, ``weight_decay=0``, ``maximize=False`` and one μ (0: plain SGD) for all groups
    (:mod:`adaptive_dp.auditing.scoring` explains why). Pass the torch optimizer, e.g. opacus'
    ``dp_optimizer.original_optimizer``; a DP optimizer is unwrapped the same way.

    Returns:
        μ (float in [0, 1)).

    Raises:
        ValueError: naming the setting to change, for any other optimizer (Adam, …) or setting.
    """
    optimizer = getattr(optimizer, "original_optimizer", optimizer)
    if not isinstance(optimizer, torch.optim.SGD):
        raise ValueError(
            f"gradient canaries support torch.optim.SGD (with or without momentum) only, got "
            f"{type(optimizer).__name__}: the scores invert SGD's update; use SGD or canary_mode='input'."
        )
    groups = optimizer.param_groups
    for name, wanted in (("nesterov", False), ("dampening", 0), ("weight_decay", 0), ("maximize", False)):
        if any(group.get(name, wanted) != wanted for group in groups):
            raise ValueError(f"gradient canaries need SGD with {name}={wanted!r}; set it in torch.optim.SGD.")
    for name in ("lr", "momentum"):
        if len({float(group[name]) for group in groups}) != 1:
            raise ValueError(f"gradient canaries need one {name} for all SGD parameter groups.")
    return float(groups[0]["momentum"])


def _check_params(params: object) -> list[nn.Parameter]:
    if not isinstance(params, Sequence) or not params or not all(isinstance(p, Tensor) for p in params):
        raise ValueError(
            "params must be a non-empty list of the trainable parameters, in the optimizer's order."
        )
    if len({p.device for p in params}) != 1:
        raise ValueError("gradient canaries need all trainable parameters on one device.")
    return list(params)


def _check_real(name: str, value: object, *, low: float, high: float, closed_high: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise ValueError(f"{name} must be a finite real number, got {value!r}.")
    value = float(value)
    if not (low < value and (value <= high if closed_high else value < high)):
        raise ValueError(f"{name} must lie in ({low}, {high}{']' if closed_high else ')'}, got {value}.")
    return value


class GradientCanaryRun:
    """White-box gradient canaries inside a DP-SGD run (Steinke, Nasr & Jagielski 2023, white-box setting).

    Args:
        count: m, the number of canaries; >= 2.
        params: the trainable parameters, in the DP optimizer's ``params`` order (the flat space of the
            canaries is their concatenation, P values).
        max_grad_norm: C, the clipping norm: each canary has norm C (if the optimizer's clipping norm changes,
            e.g. adaptive clipping, the canaries added at a step are rescaled to that step's norm).
        sample_rate: q, the run's Poisson sample rate (``engine.sample_rate``); in (0, 1].
        seed: seed of the canaries, the coin flips and the per-step sampling (three independent streams,
            :func:`~adaptive_dp.auditing.canaries.canary_seeds`); the data loader's and the noise's RNGs are
            never touched.
        kind: ``"random"`` (uniform directions, dense, m·P <= :data:`MAX_DENSE_CANARY_FLOATS`) or ``"dirac"``
            (one coordinate each, sparse; m <= P).
        momentum: μ of the SGD optimizer (:func:`sgd_momentum`); checked again at :meth:`attach`.

    Attributes:
        included: [m] bool coin flips (True: the canary may join the steps' samples).
        steps: real optimizer steps scored so far.

    Raises:
        ValueError: a count, rate or seed out of range, an unknown ``kind``, ``kind="random"`` too large for
            dense storage (the message names ``kind="dirac"``), or ``kind="dirac"`` with m > P.
    """

    def __init__(
        self,
        *,
        count: int,
        params: list[nn.Parameter],
        max_grad_norm: float,
        sample_rate: float,
        seed: int,
        kind: str = "random",
        momentum: float = 0.0,
    ) -> None:
        if isinstance(count, bool) or not isinstance(count, numbers.Integral) or count < 2:
            raise ValueError(f"count must be an int >= 2 (the audit guesses on two sides), got {count!r}.")
        if kind not in _KINDS:
            raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}.")
        self.params = _check_params(params)
        self.count, self.kind, self.seed = int(count), kind, seed
        self.max_grad_norm = _check_real(
            "max_grad_norm", max_grad_norm, low=0.0, high=math.inf, closed_high=False
        )
        self.sample_rate = _check_real("sample_rate", sample_rate, low=0.0, high=1.0, closed_high=True)
        self._numels = [p.numel() for p in self.params]
        dim = sum(self._numels)
        if kind == "random" and self.count * dim > MAX_DENSE_CANARY_FLOATS:
            raise ValueError(
                f"{self.count} random canaries over {dim} parameters need {self.count * dim:.3g} floats "
                f"(limit {MAX_DENSE_CANARY_FLOATS:.0e}); use kind='dirac' (sparse, O(m) memory) or fewer canaries."
            )
        canary_seed, inclusion_seed, sampling_seed = canary_seeds(seed=seed, streams=3)
        self._directions = make_gradient_canaries(
            count=self.count,
            dim=dim,
            max_grad_norm=self.max_grad_norm,
            kind=kind,
            seed=canary_seed,
            sparse=kind == "dirac",
        ).to(self.params[0].device)
        self.included = draw_inclusion(count=self.count, seed=inclusion_seed)
        self._sampler = torch.Generator().manual_seed(sampling_seed)
        self._scorer = CanaryScorer(directions=self._directions, momentum=momentum)
        self._before: Tensor | None = None  # θ_t of the step in progress
        self._attached = False

    @property
    def momentum(self) -> float:
        """μ the scores assume (the SGD optimizer's)."""
        return self._scorer.momentum

    @property
    def steps(self) -> int:
        """Real optimizer steps scored so far."""
        return self._scorer.steps

    def scores(self) -> Tensor:
        """[m] float64 white-box scores Σ_t ⟨g_t, c_i⟩ (a copy); higher means "more likely included"."""
        return self._scorer.scores()

    # ------------------------------------------------------------------ the hooks
    def attach(self, optimizer: Any) -> None:
        """Register the run's pre-noise and post-step hooks on the adaptive DP optimizer (once).

        Raises:
            ValueError: ``optimizer`` has no canary hooks (not an adaptive DP optimizer), its parameters are
                not ``params`` in the same order, or its torch optimizer is not a supported SGD
                (:func:`sgd_momentum`) with this run's momentum.
            RuntimeError: the run is already attached.
        """
        if self._attached:
            raise RuntimeError(
                "this GradientCanaryRun is already attached to an optimizer (one run, one optimizer)"
            )
        if not hasattr(optimizer, "attach_pre_noise_hook") or not hasattr(optimizer, "attach_post_step_hook"):
            raise ValueError(
                f"{type(optimizer).__name__} has no canary hooks; attach to the optimizer returned by "
                "AdaptivePrivacyEngine.make_private."
            )
        trained = list(optimizer.params)
        if len(trained) != len(self.params) or any(a is not b for a, b in zip(trained, self.params)):
            raise ValueError(
                "params must be the optimizer's trainable parameters, in optimizer.params order."
            )
        momentum = sgd_momentum(optimizer.original_optimizer)
        if momentum != self.momentum:
            raise ValueError(
                f"the optimizer's SGD momentum is {momentum}, this run's {self.momentum}; pass momentum=."
            )
        optimizer.attach_pre_noise_hook(self._before_noise)
        optimizer.attach_post_step_hook(self._after_step)
        self._attached = True

    def _flat_params(self) -> Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self.params])  # a new tensor: θ at this moment

    def _before_noise(self, optimizer: Any) -> None:
        """θ_t, then the selected canaries into the clipped sum (on rank 0 only: the sum is all-reduced)."""
        self._before = self._flat_params()
        joins = torch.rand(self.count, generator=self._sampler) < self.sample_rate
        selected = (self.included & joins).to(dtype=torch.float32, device=self._before.device)
        if not bool(selected.any()) or ddp.get_rank() != 0:
            return
        scale = float(optimizer.max_grad_norm) / self.max_grad_norm  # the step's C over the canaries' norm
        total = torch.mv(self._directions.t(), selected) * scale  # [P]: Σ of the selected canaries
        for p, chunk in zip(self.params, total.split(self._numels)):
            if p.summed_grad is None:
                raise RuntimeError(
                    "a trainable parameter has no clipped gradient sum; canaries cannot be added"
                )
            p.summed_grad.add_(chunk.view_as(p.summed_grad).to(p.summed_grad.dtype))

    def _after_step(self, optimizer: Any) -> None:
        """Score the step from θ_t, θ_{t+1} and the learning rate it used."""
        if self._before is None:
            return
        before, self._before = self._before, None
        self._scorer.observe(before=before, after=self._flat_params(), lr=optimizer.param_groups[0]["lr"])

    # ------------------------------------------------------------------ the audit
    def audit(self, *, delta: float, confidence: float = 0.95) -> CanaryAudit:
        """ε̂ at δ from the scores so far (:func:`~adaptive_dp.auditing.audit_from_scores`, ``mode="gradient"``).

        Raises:
            RuntimeError: no step has been scored yet.
            ValueError: ``delta`` / ``confidence`` out of range (see ``audit_from_scores``).
        """
        if self.steps == 0:
            raise RuntimeError("no optimizer step has been scored yet; train with the run attached first")
        return audit_from_scores(
            scores=self.scores(), included=self.included, delta=delta, confidence=confidence, mode="gradient"
        )

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The run's state: settings, coin flips, scores and the sampling RNG (the canaries are rebuilt from
        the seed). Take it between optimizer steps."""
        return {
            "count": self.count,
            "kind": self.kind,
            "seed": self.seed,
            "max_grad_norm": self.max_grad_norm,
            "sample_rate": self.sample_rate,
            "included": self.included.clone(),
            "scorer": self._scorer.state_dict(),
            "sampler": self._sampler.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` into a run built with the same settings; the scores continue as if
        uninterrupted.

        Raises:
            ValueError: a key is missing or a setting (count, kind, seed, C, q, momentum) differs.
        """
        missing = {"count", "kind", "seed", "max_grad_norm", "sample_rate", "included", "scorer", "sampler"}
        missing -= set(state)
        if missing:
            raise ValueError(f"gradient canary state is missing {sorted(missing)}.")
        for name in ("count", "kind", "seed", "max_grad_norm", "sample_rate"):
            if state[name] != getattr(self, name):
                raise ValueError(
                    f"gradient canary state has {name}={state[name]!r}, this run {getattr(self, name)!r}; "
                    "build the run with the saved settings."
                )
        if not torch.equal(state["included"].cpu(), self.included):
            raise ValueError("gradient canary state has other coin flips than this run's seed gives.")
        self._scorer.load_state_dict(state["scorer"])
        self._sampler.set_state(state["sampler"])
        self._before = None
