"""The N×N Gram matrix of per-sample gradients, layer by layer, without materialising N×P gradients.

The likelihood-ratio reading needs only G_ij = ⟨g_i, g_j⟩ of the audit examples' per-sample gradients
(:meth:`~adaptive_dp.leakage.likelihood_ratio.LikelihoodRatioEstimator.estimate_from_gram`): its diagonal gives
the clipping norms, clipping rescales rows and columns (G̃ = D G D, D = diag(min(1, C/‖g_i‖))), and centring
is H G̃ H. G is a sum over parameters, and for a linear layer y_t = W a_t + b applied at positions t (tokens,
or the pixels of a convolution through ``unfold``) the per-sample gradient of W is g_i = Σ_t b_{i,t} a_{i,t}ᵀ
(b the gradient of the loss with respect to y), so

    ⟨g_i, g_j⟩_W = Σ_{t,s} (a_{i,t}·a_{j,s}) (b_{i,t}·b_{j,s}) = sum of (A_i A_jᵀ) ⊙ (B_i B_jᵀ),
    ⟨g_i, g_j⟩_b = (Σ_t b_{i,t}) · (Σ_s b_{j,s}),

the identity ghost clipping uses for the norms (Li et al. 2022, "Large Language Models Can Be Strong
Differentially Private Learners", Sec. 4; Bu et al. 2023, "Differentially Private Optimization on Large Model
at Small Cost", book-keeping). One batched forward and backward pass over the N audit examples records each
layer's activations A [N, T, d_in] and output gradients B [N, T, d_out] with module hooks, and each layer's
contribution is computed as soon as its output gradient arrives, then dropped. The backward pass computes
output gradients only, no weight gradients: each hooked layer's output gets a scalar zero "probe" added (same
values) and the pass differentiates with respect to the probes, not the parameters.

- ``"ghost"``: the identity above, O(N² T² (d_in + d_out)) time, O(N T²) memory per row of G;
- ``"per-layer"``: that layer's per-sample gradients B_iᵀ A_i [N, d_out, d_in], then their Gram matrix,
  O(N T d_in d_out + N² d_in d_out) time, O(N d_in d_out) memory — one layer at a time, never the N×P of
  all layers;
- ``"auto"`` (default) picks the cheaper of the two per layer by that operation count (Bu et al. 2022,
  "Scalable and Efficient Training of Large Convolutional Neural Networks with Differential Privacy", mixed
  ghost norm). With T² > d_in d_out / (1 + N/T) — every layer of the ViTs here (T = 65 tokens) — the
  per-layer product wins; ghost wins at T = 1 (MLPs, the [CLS] classification head).

Other layers holding parameters (LayerNorm, embeddings, ViT's [CLS] token and position embeddings, grouped
convolutions, ...) fall back to materialised per-sample gradients of that module alone, from its recorded
inputs and output gradient (``torch.func.vmap`` of ``vjp`` over the examples), the way opacus' functorch mode
handles layers it has no rule for.

:class:`~adaptive_dp.leakage.monitor.LeakageMonitor` reads the likelihood-ratio estimator through this path by
default (``gradient_path="auto"``): :func:`parameter_grams` → :func:`clipped_gram` → :func:`centre_gram` →
``estimate_from_gram``; a ValueError raised here (a model this path cannot handle) sends it back to
materialised per-sample gradients.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adaptive_dp.leakage.gradients import clip_factors

__all__ = ["LAYER_MODES", "centre_gram", "clipped_gram", "gram_matrix", "parameter_grams", "row_gram"]

#: How a linear or convolutional layer's contribution is computed: ``"auto"``, ``"ghost"``, ``"per-layer"``.
LAYER_MODES = ("auto", "ghost", "per-layer")

#: Columns per block of :func:`row_gram`: float32 products over this many columns, summed in float64.
GRAM_BLOCK_COLUMNS = 4096

#: Elements of one [rows, N, T, T] block of the ghost identity (bounds its memory: 2 such blocks at a time).
GHOST_BLOCK_ELEMENTS = 1 << 22

LossFn = Callable[[Tensor, Tensor], Tensor]


@dataclass
class _Site:
    """A module holding some of the parameters of G, and what its calls recorded during one pass."""

    module: nn.Module
    prefix: str
    names: dict[str, str]  # attribute ("weight") → qualified parameter name
    kind: str  # "linear", "conv" or "generic"
    calls: list[tuple[tuple, dict]] = field(default_factory=list)
    grads: dict[int, Tensor] = field(default_factory=dict)


def _kind(module: nn.Module) -> str:
    if isinstance(module, nn.Linear):
        return "linear"
    if (
        isinstance(module, nn.Conv2d)
        and module.groups == 1
        and module.padding_mode == "zeros"
        and not isinstance(module.padding, str)
    ):
        return "conv"
    return "generic"


def _rows(site: _Site, inputs: Tensor, grad: Tensor) -> tuple[Tensor, Tensor]:
    """(A [N, T, d_in], B [N, T, d_out]) of one call of a linear or convolutional layer."""
    n = inputs.shape[0]
    if site.kind == "conv":
        m = site.module
        cols = F.unfold(inputs, m.kernel_size, dilation=m.dilation, padding=m.padding, stride=m.stride)
        return cols.transpose(1, 2), grad.reshape(n, grad.shape[1], -1).transpose(1, 2)
    return inputs.reshape(n, -1, inputs.shape[-1]), grad.reshape(n, -1, grad.shape[-1])


def _use_ghost(mode: str, n: int, t: int, d_in: int, d_out: int) -> bool:
    if mode != "auto":
        return mode == "ghost"
    return n * n * t * t * (d_in + d_out) < n * t * d_in * d_out + n * n * d_in * d_out


def _ghost_gram(a: Tensor, b: Tensor, dtype: torch.dtype) -> Tensor:
    """Σ_{t,s} (a_{i,t}·a_{j,s})(b_{i,t}·b_{j,s}) for all i, j, in row blocks; a [N, T, d_in], b [N, T, d_out]."""
    n, t = a.shape[:2]
    rows = max(1, GHOST_BLOCK_ELEMENTS // max(1, n * t * t))
    blocks = []
    for start in range(0, n, rows):
        aa = torch.einsum("itd,jsd->ijts", a[start : start + rows], a)
        bb = torch.einsum("itd,jsd->ijts", b[start : start + rows], b)
        blocks.append(aa.mul_(bb).sum(dim=(2, 3), dtype=dtype))
    return torch.cat(blocks)


def row_gram(rows: Tensor, dtype: torch.dtype) -> Tensor:
    """rows rowsᵀ [N, N] in ``dtype`` for rows [N, K]: products in the rows' dtype, block sums in ``dtype``.

    One float32 matmul over K ~ 10⁶ columns rounds each entry to ~1e-6·‖r_i‖‖r_j‖; products over blocks of
    :data:`GRAM_BLOCK_COLUMNS` columns summed in float64 keep it at ~1e-8, at the float32 matmul's cost (+~10 %)
    and without a float64 copy of the rows.
    """
    if rows.dtype == dtype or rows.shape[1] <= GRAM_BLOCK_COLUMNS:
        return (rows @ rows.T).to(dtype)
    out = torch.zeros(rows.shape[0], rows.shape[0], dtype=dtype, device=rows.device)
    for block in rows.split(GRAM_BLOCK_COLUMNS, dim=1):
        out += (block @ block.T).to(dtype)
    return out


def _flat_gram(g: Tensor, dtype: torch.dtype) -> Tensor:
    return row_gram(g.reshape(g.shape[0], -1), dtype)


class _GramRecorder:
    """Module hooks that turn one batched forward/backward pass into per-parameter Gram matrices."""

    def __init__(
        self,
        model: nn.Module,
        state: dict[str, Tensor],
        params: Mapping[str, Tensor],
        *,
        n: int,
        layer_mode: str,
        dtype: torch.dtype,
    ) -> None:
        self.state, self.n, self.layer_mode, self.dtype = state, n, layer_mode, dtype
        self.grams = {name: torch.zeros(n, n, dtype=dtype, device=params[name].device) for name in params}
        self.sites: list[_Site] = []
        for prefix, module in model.named_modules():
            names = {
                attr: f"{prefix}.{attr}" if prefix else attr
                for attr, _ in module.named_parameters(recurse=False)
                if (f"{prefix}.{attr}" if prefix else attr) in params
            }
            if names:
                self.sites.append(_Site(module, prefix, names, _kind(module)))
        self.probes: dict[int, Tensor] = {}  # site → scalar zero added to its outputs (see parameter_grams)
        self.recording = True

    def install(self) -> list[Any]:
        """Register one forward hook per site; returns the handles (remove them when done)."""
        return [
            site.module.register_forward_hook(self._forward_hook(site), with_kwargs=True)
            for site in self.sites
        ]

    def _forward_hook(self, site: _Site) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Tensor | None:
            if not self.recording or not torch.is_grad_enabled():
                return None
            if not isinstance(output, Tensor):
                raise ValueError(
                    f"gram_matrix: module {site.prefix or '<root>'} ({type(module).__name__}) holds parameters and "
                    f"returns {type(output).__name__}, not a tensor; use per-sample gradients for this model"
                )
            if (
                output.dim() == 0
                or output.shape[0] != self.n
                or (site.kind != "generic" and args[0].shape[0] != self.n)
            ):
                raise ValueError(
                    f"gram_matrix: module {site.prefix or '<root>'} does not see the batch of {self.n} examples in "
                    "dimension 0 (inputs and outputs must be batch-first)"
                )
            probe = self.probes.setdefault(
                id(site), torch.zeros((), dtype=output.dtype, device=output.device, requires_grad=True)
            )
            output = output + probe  # the same values, now on the backward path to the probe
            index = len(site.calls)
            site.calls.append((args, kwargs))
            output.register_hook(lambda grad: self._on_grad(site, index, grad))
            return output

        return hook

    def _on_grad(self, site: _Site, index: int, grad: Tensor) -> None:
        site.grads[index] = grad.detach()
        if len(site.grads) == len(site.calls):
            self.finish(site)

    def finish(self, site: _Site) -> None:
        """Add the site's contribution to :attr:`grams` from the calls whose output gradient arrived; reset it."""
        calls = [(site.calls[i], g) for i, g in sorted(site.grads.items())]
        site.calls, site.grads = [], {}
        if not calls:
            return
        self.recording = False  # the generic fallback re-runs the module: its children must not record
        try:
            if site.kind == "generic":
                self._add_generic(site, calls)
            else:
                self._add_linear(site, calls)
        finally:
            self.recording = True

    def _add_linear(self, site: _Site, calls: list) -> None:
        rows = [_rows(site, args[0].detach(), grad) for (args, _), grad in calls]
        if len(rows) == 1:
            a, b = rows[0]
        else:  # a layer called several times: the positions of all its calls
            a, b = torch.cat([r[0] for r in rows], dim=1), torch.cat([r[1] for r in rows], dim=1)
        if "weight" in site.names:
            n, t, d_in = a.shape
            if _use_ghost(self.layer_mode, n, t, d_in, b.shape[2]):
                contribution = _ghost_gram(a, b, self.dtype)
            else:
                contribution = _flat_gram(torch.einsum("nto,nti->noi", b, a.to(b.dtype)), self.dtype)
            self.grams[site.names["weight"]] += contribution
        if "bias" in site.names:
            self.grams[site.names["bias"]] += _flat_gram(b.sum(dim=1), self.dtype)

    def _add_generic(self, site: _Site, calls: list) -> None:
        local = {
            k[len(site.prefix) + 1 :] if site.prefix else k: v
            for k, v in self.state.items()
            if not site.prefix or k.startswith(site.prefix + ".")
        }
        trainable = {attr: local.pop(attr) for attr in site.names}
        total: dict[str, Tensor] | None = None
        for (args, kwargs), grad in calls:
            grads = _module_per_sample_grads(site.module, trainable, local, args, kwargs, grad, n=self.n)
            total = grads if total is None else {k: total[k] + grads[k] for k in total}
        for attr, g in total.items():
            self.grams[site.names[attr]] += _flat_gram(g, self.dtype)


def _module_per_sample_grads(
    module: nn.Module,
    trainable: dict[str, Tensor],
    frozen: dict[str, Tensor],
    args: tuple,
    kwargs: dict,
    grad: Tensor,
    *,
    n: int,
) -> dict[str, Tensor]:
    """{attr: [N, *shape]} per-sample gradients of ``module``'s own parameters for one recorded call.

    vmap over the examples of vjp(θ ↦ module(θ; inputs_i), output gradient_i); tensor arguments with N rows
    are split by example, anything else is shared.
    """
    from torch.func import functional_call, vjp, vmap

    split = [
        k
        for k, v in [*enumerate(args), *kwargs.items()]
        if isinstance(v, Tensor) and v.dim() and v.shape[0] == n
    ]
    batched = [(args[k] if isinstance(k, int) else kwargs[k]).detach() for k in split]

    def one(p: dict[str, Tensor], rows: list[Tensor], g: Tensor) -> dict[str, Tensor]:
        call_args, call_kwargs = list(args), dict(kwargs)
        for key, row in zip(split, rows):
            if isinstance(key, int):
                call_args[key] = row.unsqueeze(0)
            else:
                call_kwargs[key] = row.unsqueeze(0)
        _, pullback = vjp(
            lambda q: functional_call(module, {**frozen, **q}, tuple(call_args), call_kwargs), p
        )
        return pullback(g.unsqueeze(0))[0]

    return vmap(one, in_dims=(None, 0, 0))(trainable, batched, grad)


def _check_inputs(model: nn.Module, x: Tensor, y: Tensor, layer_mode: str) -> int:
    from opacus.grad_sample import AbstractGradSampleModule

    if isinstance(model, AbstractGradSampleModule):
        raise ValueError(
            "gram_matrix needs a module without opacus' hooks (they would fire and write p.grad_sample); pass "
            "adaptive_dp.leakage.gradients.hook_free_copy(model) and the live parameters as params="
        )
    if layer_mode not in LAYER_MODES:
        raise ValueError(f"layer_mode must be one of {LAYER_MODES}, got {layer_mode!r}")
    if not isinstance(x, Tensor) or x.dim() == 0 or x.shape[0] == 0:
        raise ValueError("x must be a tensor [N, ...] with N >= 1 audit examples")
    if not isinstance(y, Tensor) or y.dim() == 0 or y.shape[0] != x.shape[0]:
        raise ValueError(f"y must be a tensor [N, ...] with the N = {x.shape[0]} rows of x")
    return x.shape[0]


def _trainable(model: nn.Module, params: Mapping[str, Tensor] | None) -> dict[str, Tensor]:
    named = dict(model.named_parameters(remove_duplicate=False))
    if params is None:
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError("no parameters to differentiate: pass params= or leave some requires_grad=True")
    unknown = sorted(set(params) - set(named))
    if unknown:
        raise ValueError(f"params {unknown} are not parameters of {type(model).__name__}")
    aliases: dict[int, list[str]] = {}
    for name, p in named.items():
        aliases.setdefault(id(p), []).append(name)
    tied = sorted(name for name in params if len(aliases[id(named[name])]) > 1)
    if tied:
        raise ValueError(
            f"gram_matrix does not support tied (shared) parameters: {tied}; untie them or use "
            "per-sample gradients"
        )
    return {n: p.detach() for n, p in params.items()}


def parameter_grams(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    loss_fn: LossFn,
    params: Mapping[str, Tensor] | None = None,
    buffers: Mapping[str, Tensor] | None = None,
    layer_mode: str = "auto",
    dtype: torch.dtype = torch.float64,
) -> tuple[dict[str, Tensor], Tensor]:
    """Per-parameter Gram matrices G^(p)_ij = ⟨∇_p ℓ_i, ∇_p ℓ_j⟩ of the per-example losses, and the losses.

    One batched forward and backward pass over the N examples (module hooks record activations and output
    gradients; the module's own parameters, gradients and hooks are left as they were), each layer's
    contribution computed as its output gradient arrives (see the module docstring): no [N, P] per-sample
    gradient matrix exists at any time. The gradients are those of ℓ_i = ``loss_fn(model(x_i)[None], y_i[None])``,
    each example a batch of one, as :func:`~adaptive_dp.leakage.gradients.per_sample_gradients` computes them.

    Args:
        model: a module without opacus' hooks (a plain model, or
            :func:`~adaptive_dp.leakage.gradients.hook_free_copy` of a GradSampleModule's module), mapping
            batch-first inputs to outputs; put it in eval mode for dropout-free gradients.
        x: [N, ...] inputs; y: [N, ...] targets, on the model's device.
        loss_fn: ``loss_fn(output [1, ...], target [1, ...]) -> scalar`` (e.g. ``F.cross_entropy``, nats).
        params: name → tensor of the parameters g ranges over (the live values; default the model's
            parameters with ``requires_grad``): for LoRA, the adapters and the head.
        buffers: name → tensor overriding any other state entry of ``model`` (frozen parameters, buffers).
        layer_mode: :data:`LAYER_MODES` — ``"auto"`` (cheaper per layer), ``"ghost"`` or ``"per-layer"``; all
            give the same matrix up to rounding.
        dtype: dtype of the result and of the sums over positions, layers and parameters (float64 default;
            float32 where float64 is missing); the products themselves are in the model's dtype, as in
            today's materialised path (float32 rounding: ~1e-7·‖g_i‖‖g_j‖ per entry).

    Returns:
        ``(grams, losses)``: name → [N, N] symmetric PSD matrix (``dtype``) for every name of ``params``
        (zeros for a parameter the loss does not depend on), and the [N] per-example losses (model dtype).
        G = Σ_p G^(p) is the Gram matrix of the flattened per-sample gradients, unclipped.

    Raises:
        ValueError: a GradSampleModule, N < 1 or y of another length, unknown or tied ``params``, an unknown
            ``layer_mode``, or a parameter-holding module that is not batch-first or does not return a tensor.

    Source: Li et al. 2022, Sec. 4 (ghost norm); Bu et al. 2023 (book-keeping); Bu et al. 2022 (mixed ghost
    norm: the per-layer choice).
    """
    from torch.func import functional_call, vmap

    n = _check_inputs(model, x, y, layer_mode)
    chosen = _trainable(model, params)
    state = {n_: t.detach() for n_, t in [*model.named_parameters(), *model.named_buffers()]}
    state.update({k: v.detach() for k, v in (buffers or {}).items()})
    state.update(chosen)
    recorder = _GramRecorder(model, state, chosen, n=n, layer_mode=layer_mode, dtype=dtype)
    handles = recorder.install()
    try:
        with torch.enable_grad():
            out = functional_call(model, state, (x,))
            losses = vmap(lambda o, t: loss_fn(o.unsqueeze(0), t.unsqueeze(0)))(out, y)
            if recorder.probes:  # backward to the probes: output gradients only, no weight gradients
                torch.autograd.grad(losses.sum(), list(recorder.probes.values()), allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()
    for site in recorder.sites:  # calls whose output gradient never arrived add nothing
        recorder.finish(site)
    return recorder.grams, losses.detach()


def gram_matrix(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    loss_fn: LossFn,
    params: Mapping[str, Tensor] | None = None,
    buffers: Mapping[str, Tensor] | None = None,
    layer_mode: str = "auto",
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """The [N, N] Gram matrix G_ij = ⟨g_i, g_j⟩ of the unclipped per-sample gradients over ``params``.

    The sum over parameters of :func:`parameter_grams` (same arguments, same errors); ``dtype`` (float64 by
    default). Clip it with :func:`clipped_gram` and centre it with :func:`centre_gram` for the
    likelihood-ratio estimator.
    """
    grams, _ = parameter_grams(
        model, x, y, loss_fn=loss_fn, params=params, buffers=buffers, layer_mode=layer_mode, dtype=dtype
    )
    return torch.stack(list(grams.values())).sum(dim=0)


def clipped_gram(
    grams: Mapping[str, Tensor] | Tensor, max_grad_norm: float | list[float], *, per_layer: bool = False
) -> Tensor:
    """Gram matrix of the clipped per-sample gradients: G̃ = Σ_p D_p G^(p) D_p.

    D_p = diag of opacus' clipping factors min(1, C / (‖g_i‖ + 1e-6))
    (:func:`~adaptive_dp.leakage.gradients.clip_factors`), with ‖g_i‖ = √G_ii over all parameters (flat: one
    D for every p) or √G^(p)_ii per parameter with its own C_p (``per_layer``, as
    ``make_private(clipping="per_layer")``).

    Args:
        grams: [N, N] unclipped Gram matrix, or name → per-parameter [N, N] matrices (:func:`parameter_grams`;
            needed for ``per_layer``).
        max_grad_norm: C, or one C_p per parameter for ``per_layer`` (a float C gives C/√L each).
        per_layer: per-parameter clipping.

    Returns:
        [N, N] matrix in the dtype of ``grams``.

    Raises:
        ValueError: a matrix that is not [N, N] or not finite (diverged model), or per-layer norms whose
            count is not the number of parameters.

    Source: Abadi et al. 2016, Alg. 1 (clipping); opacus ``DPOptimizer.clip_and_accumulate``.
    """
    parts = list(grams.values()) if isinstance(grams, Mapping) else [grams]
    for part in parts:
        if part.dim() != 2 or part.shape[0] != part.shape[1] or part.shape != parts[0].shape:
            raise ValueError(f"Gram matrices must all be [N, N], got {tuple(part.shape)}")
        if not bool(torch.isfinite(part).all()):
            raise ValueError(
                "the Gram matrix holds NaN or inf: the model has diverged or the inputs hold NaN"
            )
    norms = torch.stack([part.diagonal().clamp_min(0.0).sqrt() for part in parts], dim=1)  # [N, L]
    factors = clip_factors(norms, max_grad_norm, per_layer=per_layer)
    return sum(f.unsqueeze(1) * part * f.unsqueeze(0) for f, part in zip(factors.T, parts))


def centre_gram(gram: Tensor) -> Tensor:
    """H G H with H = I − 11ᵀ/N: the Gram matrix of g_i − ḡ (ḡ the mean over the N rows).

    Every distance ‖g_i − g_j‖² = G_ii + G_jj − 2G_ij is unchanged; this is the input of
    :meth:`~adaptive_dp.leakage.likelihood_ratio.LikelihoodRatioEstimator.estimate_from_gram`. After clipping,
    an entry's float32 rounding (~1e-7·C²) is far below the critic's noise scale σ²C² for any σ > 1e-3.

    Args:
        gram: [N, N] Gram matrix.

    Returns:
        [N, N] centred matrix, same dtype.
    """
    return gram - gram.mean(dim=0, keepdim=True) - gram.mean(dim=1, keepdim=True) + gram.mean()
