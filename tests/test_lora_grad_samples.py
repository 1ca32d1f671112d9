"""Guard against opacus issue #820 (LoRA updates silently corrupted under opacus + peft), and DP LoRA training.

Truths used: per-example autograd (each example's own backward, no opacus) for the per-sample gradients and
their norms; the starting model's own test accuracy; the frozen base's values before training (bit for bit);
and, for ghost clipping, the hooks-mode run on the same seed (ghost clipping computes the same clipped sum, so
σ, ε and the leakage readings must agree up to float rounding).
"""

from __future__ import annotations

import copy

import pytest
import torch
from opacus import GradSampleModule
from opacus.grad_sample import GradSampleModuleFastGradientClipping
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

pytest.importorskip("transformers")
pytest.importorskip("peft")

from adaptive_dp.data.datasets import load_dataset  # noqa: E402
from adaptive_dp.models import build_model  # noqa: E402
from adaptive_dp.models.lora import apply_lora  # noqa: E402
from adaptive_dp.privacy_engine import AdaptivePrivacyEngine  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:target_mi without a privacy budget:UserWarning")


def _lora_vit(seed: int = 0) -> nn.Module:
    """LoRA vit-tiny on 8×8 one-channel images, with B drawn non-zero so every adapter has a gradient."""
    model = apply_lora(
        build_model("vit-tiny", in_channels=1, num_classes=10, image_size=8, seed=seed), rank=4
    )
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.copy_(0.1 * torch.randn(param.shape, generator=g))
    return model


def _batch(n: int = 6):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


def _per_example_grads(model: nn.Module, x, y) -> torch.Tensor:
    rows = []
    for i in range(x.shape[0]):
        model.zero_grad()
        nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        rows.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad]))
    model.zero_grad()
    return torch.stack(rows)


@pytest.mark.parametrize("mode", ["hooks", "functorch"])
def test_opacus_lora_per_sample_gradients_equal_per_example_autograd(mode):
    model = _lora_vit()
    x, y = _batch()
    want = _per_example_grads(model, x, y)
    gsm = GradSampleModule(copy.deepcopy(model), loss_reduction="sum", force_functorch=mode == "functorch")
    nn.functional.cross_entropy(gsm(x), y, reduction="sum").backward()
    trainable = [p for p in gsm.parameters() if p.requires_grad]
    assert all(p.grad_sample is not None for p in trainable)
    got = torch.cat([p.grad_sample.flatten(1) for p in trainable], dim=1)
    assert got.shape == want.shape
    assert ((got - want).norm(dim=1) / want.norm(dim=1)).max() < 1e-5
    frozen = [p for p in gsm.parameters() if not p.requires_grad]
    assert frozen and all(getattr(p, "grad_sample", None) is None for p in frozen)


def test_opacus_ghost_norms_of_lora_equal_per_example_autograd():
    """Ghost clipping never forms per-sample gradients; its per-sample norms must be the true ones."""
    model = _lora_vit()
    x, y = _batch()
    want = _per_example_grads(model, x, y).norm(dim=1)
    gsm = GradSampleModuleFastGradientClipping(copy.deepcopy(model), loss_reduction="sum", max_grad_norm=1e6)
    nn.functional.cross_entropy(gsm(x), y, reduction="sum").backward()
    assert torch.allclose(gsm.get_norm_sample(), want, rtol=1e-5)


def _digits():
    def tensors(split):
        data = load_dataset("digits", split=split)
        xs, ys = zip(*[data[i] for i in range(len(data))])
        return torch.stack(xs), torch.tensor(ys)

    (x_train, y_train), (x_test, y_test) = tensors("train"), tensors("test")
    return (x_train, y_train), (x_test[:64], y_test[:64]), (x_test[64:], y_test[64:])


def _accuracy(model: nn.Module, x, y) -> float:
    model.eval()
    with torch.no_grad():
        accuracy = (model(x).argmax(dim=1) == y).float().mean().item()
    model.train()
    return accuracy


STEPS = 30


def _dp_lora_run(mode: str, data) -> dict:
    """30 DP-SGD steps (σ = 0.5 start, PID on the likelihood-ratio reading) of LoRA vit-tiny on digits."""
    (x_train, y_train), audit, test = data
    torch.manual_seed(0)
    model = apply_lora(build_model("vit-tiny", in_channels=1, num_classes=10, image_size=8, seed=0), rank=4)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    start_accuracy = _accuracy(model, *test)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5, momentum=0.9)
    engine = AdaptivePrivacyEngine()
    out = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=DataLoader(TensorDataset(x_train, y_train), batch_size=128),
        noise_multiplier=0.5,
        max_grad_norm=1.0,
        grad_sample_mode=mode,
        audit_data=audit,
        target_mi=1.0,
        controller="pid",
        monitor_every=5,
    )
    private, optimizer, loader = out[0], out[1], out[-1]
    criterion = out[2] if mode == "ghost" else nn.CrossEntropyLoss()
    done = 0
    while done < STEPS:
        for xb, yb in loader:
            optimizer.zero_grad()
            criterion(private(xb), yb).backward()
            optimizer.step()
            done += 1
            if done == STEPS:
                break
    return {
        "engine": engine,
        "model": model,
        "frozen": frozen,
        "start": start,
        "start_accuracy": start_accuracy,
        "accuracy": _accuracy(model, *test),
    }


@pytest.fixture(scope="module")
def runs():
    data = _digits()
    return {mode: _dp_lora_run(mode, data) for mode in ("hooks", "ghost")}


def test_dp_lora_fine_tuning_improves_accuracy_and_keeps_the_base_bit_identical(runs):
    run = runs["hooks"]
    assert run["start_accuracy"] < 0.2  # a random ViT: the starting model is poor
    assert run["accuracy"] > run["start_accuracy"] + 0.3
    params = dict(run["model"].named_parameters())
    assert all(torch.equal(params[n], value) for n, value in run["frozen"].items())
    assert all(not torch.equal(params[n], value) for n, value in run["start"].items())
    assert len(run["engine"].history) == STEPS
    # the monitor reads leakage on what DP-SGD releases: the adapters and the head, nothing frozen
    assert run["engine"].monitor.layer_shapes == [tuple(params[n].shape) for n in run["start"]]


def test_ghost_clipping_trains_with_the_monitor_and_matches_hooks(runs):
    hooks, ghost = runs["hooks"]["engine"], runs["ghost"]["engine"]
    assert len(ghost.history) == len(hooks.history) == STEPS
    readings = [(h["mi"], g["mi"]) for h, g in zip(hooks.history, ghost.history) if h["mi"] is not None]
    assert len(readings) == STEPS // 5 and all(g is not None for _, g in readings)
    for h, g in zip(hooks.history, ghost.history):  # same seed: same batches, noise and monitor draws
        assert g["noise_multiplier"] == pytest.approx(h["noise_multiplier"], rel=1e-3)
    for h_mi, g_mi in readings:  # θ differs only by float rounding in the clipped sum
        assert g_mi == pytest.approx(h_mi, rel=1e-3, abs=1e-3)
    assert ghost.get_epsilon(1e-5) == pytest.approx(hooks.get_epsilon(1e-5), rel=1e-4)
    assert len({round(h["noise_multiplier"], 6) for h in hooks.history}) > 1  # the controller moved σ
    assert runs["ghost"]["accuracy"] == pytest.approx(runs["hooks"]["accuracy"], abs=0.02)
    params = dict(runs["ghost"]["model"].named_parameters())
    assert all(torch.equal(params[n], value) for n, value in runs["ghost"]["frozen"].items())
