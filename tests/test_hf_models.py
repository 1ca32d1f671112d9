"""HF transformers models: the registered ViTs, the logit wrapper, offline loading, and LoRA's parameter split.

Truths used: per-example autograd (each example's own backward) for opacus' per-sample gradients, the
parameter counts of the ViT architecture computed by hand, a model's own logits before saving, and peft's
definition of the adapters (B = 0 at the start: the adapted model computes the base model's function).
"""

from __future__ import annotations

import copy

import pytest
import torch
from opacus import GradSampleModule
from torch import nn

pytest.importorskip("transformers")
pytest.importorskip("peft")

from adaptive_dp.models import MODELS, build_model  # noqa: E402
from adaptive_dp.models.hf import HFImageClassifier, load_local_pretrained  # noqa: E402
from adaptive_dp.models.lora import apply_lora  # noqa: E402
from adaptive_dp.models.vit import VIT_SIZES  # noqa: E402


def _vit_parameters(hidden: int, layers: int, mlp: int, channels: int, size: int, classes: int) -> int:
    """Parameters of ViTForImageClassification with 4×4 patches and no q/k/v bias, counted by hand."""
    tokens = (size // 4) ** 2 + 1
    embeddings = channels * 16 * hidden + hidden + hidden + tokens * hidden  # patch conv, [CLS], positions
    attention = 3 * hidden * hidden + hidden * hidden + hidden  # q, k, v (no bias), output projection
    block = attention + 2 * 2 * hidden + hidden * mlp + mlp + mlp * hidden + hidden  # + 2 LayerNorms + MLP
    return embeddings + layers * block + 2 * hidden + hidden * classes + classes


@pytest.mark.parametrize("name", ["vit-tiny", "vit-small"])
@pytest.mark.parametrize(("channels", "size"), [(1, 8), (1, 28), (3, 32)])
def test_registered_vits_shapes_and_sizes(name, channels, size):
    assert name in MODELS
    model = build_model(name, in_channels=channels, num_classes=10, image_size=size, seed=0)
    assert isinstance(model, HFImageClassifier)
    assert model.hf.config._attn_implementation == "eager"  # twice differentiable, for the attacks
    out = model(torch.randn(3, channels, size, size))
    assert out.shape == (3, 10) and torch.isfinite(out).all()
    sizes = VIT_SIZES[name]
    expected = _vit_parameters(
        sizes["hidden_size"], sizes["num_hidden_layers"], sizes["intermediate_size"], channels, size, 10
    )
    assert sum(p.numel() for p in model.parameters()) == expected


def test_vit_small_is_about_four_times_vit_tiny():
    count = {
        name: sum(
            p.numel() for p in build_model(name, in_channels=3, num_classes=10, image_size=32).parameters()
        )
        for name in ("vit-tiny", "vit-small")
    }
    assert 3.5 < count["vit-small"] / count["vit-tiny"] < 4.5


def test_seeded_build_is_reproducible():
    a, b, c = (
        build_model("vit-tiny", in_channels=1, num_classes=10, image_size=8, seed=s) for s in (3, 3, 4)
    )
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters()))


def _per_example_grads(model: nn.Module, x, y) -> torch.Tensor:
    rows = []
    for i in range(x.shape[0]):
        model.zero_grad()
        nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        rows.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad]))
    model.zero_grad()
    return torch.stack(rows)


@pytest.mark.parametrize("mode", ["hooks", "functorch"])
def test_opacus_per_sample_gradients_of_full_vit_match_autograd(mode):
    model = build_model("vit-tiny", in_channels=1, num_classes=10, image_size=8, seed=0)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(5, 1, 8, 8, generator=g), torch.randint(0, 10, (5,), generator=g)
    want = _per_example_grads(model, x, y)
    gsm = GradSampleModule(copy.deepcopy(model), loss_reduction="sum", force_functorch=mode == "functorch")
    nn.functional.cross_entropy(gsm(x), y, reduction="sum").backward()
    got = torch.cat([p.grad_sample.flatten(1) for p in gsm.parameters() if p.requires_grad], dim=1)
    assert got.shape == want.shape
    assert ((got - want).norm(dim=1) / want.norm(dim=1)).max() < 1e-5


def test_load_local_pretrained_round_trip_and_new_head(tmp_path):
    model = build_model("vit-tiny", in_channels=3, num_classes=10, image_size=32, seed=0).eval()
    model.hf.save_pretrained(tmp_path)
    x = torch.randn(2, 3, 32, 32)
    loaded = load_local_pretrained(tmp_path)
    assert isinstance(loaded, HFImageClassifier)
    assert loaded.hf.config._attn_implementation == "eager"
    with torch.no_grad():
        assert torch.allclose(loaded.eval()(x), model(x), atol=1e-6)
    reheaded = load_local_pretrained(tmp_path, num_classes=4)
    assert reheaded(x).shape == (2, 4)
    body = {n: p for n, p in model.hf.named_parameters() if not n.startswith("classifier")}
    for name, param in reheaded.hf.named_parameters():
        if not name.startswith("classifier"):
            assert torch.equal(param, body[name]), name


def test_load_local_pretrained_refuses_a_non_model_directory(tmp_path):
    with pytest.raises(ValueError, match="save_pretrained"):
        load_local_pretrained(tmp_path)
    with pytest.raises(ValueError, match="save_pretrained"):
        load_local_pretrained(tmp_path / "missing")


def test_apply_lora_trains_adapters_and_head_only_and_starts_at_the_base_function():
    base = build_model("vit-tiny", in_channels=1, num_classes=10, image_size=8, seed=0).eval()
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        before = base(x)
    model = apply_lora(base, rank=4, alpha=8)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    layers = VIT_SIZES["vit-tiny"]["num_hidden_layers"]
    adapters = [n for n in trainable if ".lora_A.default." in n or ".lora_B.default." in n]
    assert len(adapters) == layers * 2 * 2  # q_proj and v_proj, A and B each
    assert all(("q_proj" in n or "v_proj" in n) for n in adapters)
    assert sorted(set(trainable) - set(adapters)) == sorted(n for n in trainable if "classifier" in n)
    assert len(trainable) == len(adapters) + 2  # classifier weight and bias
    with torch.no_grad():
        assert torch.allclose(model(x), before, atol=1e-6)  # B = 0: the adapted model is the base model


def test_apply_lora_rank_zero_is_full_fine_tuning():
    model = build_model("vit-tiny", in_channels=1, num_classes=10, image_size=8, seed=0)
    model.requires_grad_(False)
    assert apply_lora(model, rank=0) is model
    assert all(p.requires_grad for p in model.parameters())


def test_apply_lora_refuses_bad_arguments_with_the_fix():
    def fresh():
        return build_model("vit-tiny", in_channels=1, num_classes=10, image_size=8, seed=0)

    with pytest.raises(ValueError, match="q_proj"):  # lists the names that would fit
        apply_lora(fresh(), rank=4, targets=("query",))
    with pytest.raises(ValueError, match="rank"):
        apply_lora(fresh(), rank=-1)
    with pytest.raises(ValueError, match="sequence"):
        apply_lora(fresh(), rank=4, targets="q_proj")
    with pytest.raises(ValueError, match="head"):
        apply_lora(fresh(), rank=4, head=("nohead",))
    with pytest.raises(ValueError, match="dropout"):
        apply_lora(fresh(), rank=4, dropout=1.0)


def test_apply_lora_seed_fixes_the_adapters_and_leaves_the_global_rng():
    def adapters(seed):
        model = build_model("vit-tiny", in_channels=1, num_classes=10, image_size=8, seed=0)
        model = apply_lora(model, rank=4, seed=seed)
        return [p.detach().clone() for n, p in model.named_parameters() if ".lora_A." in n]

    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a, b, c = adapters(7), adapters(7), adapters(8)
    assert torch.equal(torch.rand(1), before)
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    assert not any(torch.equal(p, q) for p, q in zip(a, c))
