"""Data features from intermediate layers, for the critic of the privacy-token MI estimator.

Meng et al. 2025 ("Real-Time Privacy Risk Measurement with Privacy Tokens for Gradient Leakage",
arXiv 2502.02913) pair each privacy token with features of the example taken from the model's own
intermediate layers: what the model "sees" of an input is what its gradient can carry. A
:class:`FeatureExtractor` puts forward hooks on named layers, runs a forward pass without autograd,
average-pools every feature map to ``pooled_size × pooled_size`` and concatenates the results with the
input itself pooled to ``input_size × input_size``. Hooks live only inside the extractor's ``with`` block
(or one call), so the model is left as it was found.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["FeatureExtractor", "default_feature_layers"]


def _probe_outputs(model: nn.Module, example: Tensor) -> list[tuple[str, tuple[int, ...], nn.Module]]:
    """Run one example through ``model``; list (name, output shape without batch, module) in call order."""
    records: list[tuple[str, tuple[int, ...], nn.Module]] = []
    handles = []
    for name, module in model.named_modules():
        if not name:
            continue

        def hook(mod, inputs, output, _name=name):
            if isinstance(output, Tensor):
                records.append((_name, tuple(output.shape[1:]), mod))

        handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
    return records


def default_feature_layers(model: nn.Module, example: Tensor, *, max_layers: int = 4) -> list[str]:
    """Sensible default layers: the end of each convolutional stage, then the penultimate layer.

    A probe forward pass on ``example`` ([1, C, H, W]) records every submodule's output; for each distinct
    feature-map shape [C, H, W] (a stage), the last module producing it is kept (the stage's output after
    its activation; pooling layers and 1×1 maps are skipped), the last ``max_layers - 1`` stages are used, and the module whose output feeds the last
    ``nn.Linear`` (the penultimate representation) is added when it is a named module. For the project's
    models (``adaptive_dp.models.cnn``): the activations after each conv block of ``small-cnn``/``tanh-cnn``,
    the three stages of ``resnet20``, and the last hidden layer of the classifier.

    Args:
        model: a hook-free module (not a GradSampleModule).
        example: [1, C, H, W] input.
        max_layers: at most this many layers are returned.

    Returns:
        Module names (``model.named_modules()`` keys) in forward order.
    """
    records = _probe_outputs(model, example)
    last_of_shape: dict[tuple[int, ...], int] = {}
    for i, (_, shape, module) in enumerate(records):
        pooling = type(module).__module__ == "torch.nn.modules.pooling"
        if len(shape) == 3 and shape[1] * shape[2] > 1 and not pooling:
            last_of_shape[shape] = i
    stage_ends = sorted(last_of_shape.values())
    chosen = [records[i][0] for i in stage_ends][-(max(1, max_layers - 1)) :]
    # Penultimate: the last 1-D output produced before the final Linear is called.
    linear_calls = [i for i, (_, _, m) in enumerate(records) if isinstance(m, nn.Linear)]
    if linear_calls:
        last_linear = linear_calls[-1]
        in_features = records[last_linear][2].in_features
        for i in range(last_linear - 1, -1, -1):
            name, shape, module = records[i]
            if shape == (in_features,) and not isinstance(module, (nn.Flatten,)):
                if name not in chosen:
                    chosen.append(name)
                break
    return chosen[-max_layers:] if len(chosen) > max_layers else chosen


def _pool(t: Tensor, size: int) -> Tensor:
    if t.dim() == 4:
        return F.adaptive_avg_pool2d(t, size).flatten(1)
    if t.dim() == 3:
        return F.adaptive_avg_pool1d(t, size).flatten(1)
    return t.flatten(1)


class FeatureExtractor:
    """Intermediate-layer data features [B, F] of a model, via temporary forward hooks.

    Args:
        model: a hook-free ``nn.Module`` (for a GradSampleModule pass ``gsm._module`` — better, a copy —
            because opacus' hooks on the wrapped module would record activations).
        layers: module names (``model.named_modules()`` keys); None = :func:`default_feature_layers`,
            resolved on the first call from its input.
        pooled_size: feature maps [B, C, H, W] are average-pooled to ``pooled_size × pooled_size``
            (C·pooled_size² numbers per layer); 2-D outputs are kept as they are.
        input_size: the input is average-pooled to ``input_size × input_size`` and included first
            (0 leaves it out).
        max_layers: cap on the default layer list.

    Use as ``with FeatureExtractor(model) as fx: f = fx(x)`` or just ``fx(x)`` (hooks are added and removed
    around the call). ``forward`` lets a caller run the model another way (e.g.
    ``torch.func.functional_call`` with other parameters) while the hooks record it.

    Raises:
        ValueError: an unknown layer name, an empty layer list, or a bad size.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        layers: Sequence[str] | None = None,
        pooled_size: int = 2,
        input_size: int = 4,
        max_layers: int = 4,
    ) -> None:
        if pooled_size < 1:
            raise ValueError(f"pooled_size must be >= 1, got {pooled_size}")
        if input_size < 0:
            raise ValueError(f"input_size must be >= 0, got {input_size}")
        self.model = model
        self.pooled_size = int(pooled_size)
        self.input_size = int(input_size)
        self.max_layers = int(max_layers)
        self.layers: list[str] | None = None
        if layers is not None:
            self._set_layers(list(layers))
        self._handles: list = []
        self._captured: dict[str, Tensor] = {}

    def _set_layers(self, layers: list[str]) -> None:
        names = dict(self.model.named_modules())
        missing = [n for n in layers if n not in names or not n]
        if missing:
            raise ValueError(f"unknown layer name(s) {missing}; choose from {[n for n in names if n]}")
        if not layers:
            raise ValueError("layers is empty: pass None for the default layers")
        self.layers = layers

    def _attach(self) -> None:
        modules = dict(self.model.named_modules())
        for name in self.layers or []:

            def hook(mod, inputs, output, _name=name):
                if isinstance(output, Tensor):
                    self._captured[_name] = output.detach()

            self._handles.append(modules[name].register_forward_hook(hook))

    def _detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._captured = {}

    def __enter__(self) -> FeatureExtractor:
        if self.layers is not None and not self._handles:
            self._attach()
        return self

    def __exit__(self, *exc) -> None:
        self._detach()

    def __call__(self, x: Tensor, *, forward: Callable[[Tensor], Tensor] | None = None) -> Tensor:
        """Features [B, F]: pooled input then pooled layer outputs, concatenated in layer order.

        Args:
            x: [B, C, H, W] input batch on the model's device.
            forward: how to run the model (default ``self.model``).

        Raises:
            ValueError: if ``x`` is empty or a hooked layer did not run.
        """
        if x.shape[0] == 0:
            raise ValueError("empty batch: no examples to extract features from")
        if self.layers is None:
            self._set_layers(default_feature_layers(self.model, x[:1], max_layers=self.max_layers))
        own_hooks = not self._handles
        if own_hooks:
            self._attach()
        try:
            self._captured = {}
            with torch.no_grad():
                (forward or self.model)(x)
            missing = [n for n in self.layers if n not in self._captured]
            if missing:
                raise ValueError(f"layer(s) {missing} produced no tensor output in the forward pass")
            parts = [_pool(x.detach(), self.input_size)] if self.input_size else []
            parts += [_pool(self._captured[n], self.pooled_size) for n in self.layers]
            return torch.cat([p.float() for p in parts], dim=1)
        finally:
            self._captured = {}
            if own_hooks:
                self._detach()
