"""Public pretraining → private fine-tuning (``adaptive-dp pretrain``, then ``train --init --lora-rank``) on digits.

Truths used: the pretrain checkpoint's own weights and split record (the frozen base must equal them bit for bit,
the private pool must exclude exactly its indices); ``torch.randperm`` under the recorded seed (the split is
re-derivable); the model's ``requires_grad`` flags (what the leakage monitor must read); and the uninterrupted run
(a resumed one must match it step for step and weight for weight).
"""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from train_helpers import run_cli, tiny_config  # noqa: E402

from adaptive_dp.cli import main  # noqa: E402
from adaptive_dp.data import load_dataset  # noqa: E402
from adaptive_dp.leakage import monitor as monitor_module  # noqa: E402
from adaptive_dp.training import loop as training  # noqa: E402
from adaptive_dp.training import train  # noqa: E402
from adaptive_dp.training.checkpoint import load_checkpoint, load_trained_model  # noqa: E402
from adaptive_dp.training.config import TrainConfig  # noqa: E402
from adaptive_dp.training.finetune import (  # noqa: E402
    build_run_model,
    check_init_matches,
    load_init,
    private_splits,
)
from adaptive_dp.training.pretrain import PretrainConfig, pretrain  # noqa: E402
from adaptive_dp.training.public_split import (  # noqa: E402
    carve_public_split,
    check_split_record,
    indices_sha256,
    split_record,
)
from adaptive_dp.training.tracking import read_history  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:target_mi without a privacy budget:UserWarning")

PUBLIC = 600
DIGITS_TRAIN = 1437
#: a tiny closed-loop LoRA run: controller and monitor carry state across the epoch boundary
LORA = dict(
    model="vit-tiny",
    lora_rank=4,
    epochs=2,
    lr=0.5,
    noise_multiplier=0.5,
    target_mi=0.3,
    controller="pid",
    monitor_every=3,
    audit_fraction=0.05,
)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """``adaptive-dp pretrain`` on 600 public digits (2 epochs); returns the run folder."""
    out = tmp_path_factory.mktemp("pretrain") / "run"
    argv = ["pretrain", "--dataset", "digits", "--model", "vit-tiny", "--public-examples", str(PUBLIC)]
    argv += ["--epochs", "2", "--batch-size", "64", "--device", "cpu", "--no-progress", "--out", str(out)]
    assert main(argv) == 0
    return out


@pytest.fixture(scope="module")
def lora_run(pretrained, tmp_path_factory):
    """The library call ``train(TrainConfig(..., init=..., lora_rank=4))``, with every LeakageMonitor built kept."""
    out = tmp_path_factory.mktemp("lora")
    monitors = []
    real_init = monitor_module.LeakageMonitor.__init__

    def spy(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        monitors.append(self)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(monitor_module.LeakageMonitor, "__init__", spy)
        summary = train(tiny_config(out, init=str(pretrained / "checkpoint.pt"), **LORA), progress=False)
    return out, summary, monitors


def _plain_name(peft_name: str) -> str:
    """The pretrained model's name of a parameter of the LoRA model (peft prefixes it, and renames adapted layers'
    own weights ``base_layer``)."""
    return peft_name.removeprefix("base_model.model.").replace(".base_layer", "")


def _is_trainable_name(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name or ".classifier." in name


# ------------------------------------------------------------------------------------------------- pretrain


def test_pretrain_writes_checkpoint_split_record_and_summary(pretrained):
    state = load_init(pretrained)
    record = state["public_split"]
    assert state["model"] == "vit-tiny" and state["dataset"] == "digits" and state["options"]["seed"] == 0
    assert record["indices"] == carve_public_split(
        DIGITS_TRAIN, PUBLIC, seed=0
    )  # re-derivable from the record
    assert record["count"] == len(set(record["indices"])) == PUBLIC and record["train_size"] == DIGITS_TRAIN
    assert record["sha256"] == indices_sha256(record["indices"])
    assert json.loads((pretrained / "public_split.json").read_text()) == record
    summary = json.loads((pretrained / "summary.json").read_text())
    assert summary["public_examples"] == PUBLIC and summary["checkpoint"] == str(pretrained / "checkpoint.pt")
    assert summary["seconds"] > 0 and summary["test_accuracy"] == state["test_accuracy"]
    assert summary["test_accuracy"] > 0.4  # chance is 0.1; two epochs on 600 digits reach ~0.7
    model = build_run_model(TrainConfig(model="vit-tiny", init=str(pretrained)), load_dataset("digits").info)
    assert all(p.requires_grad for p in model.parameters())  # no --lora-rank: full fine-tuning
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, state["model_state_dict"][name]), name


def test_pretrain_refuses_a_folder_holding_a_run(pretrained, capsys):
    before = (pretrained / "checkpoint.pt").read_bytes()
    argv = [
        "pretrain",
        "--dataset",
        "digits",
        "--public-examples",
        "100",
        "--epochs",
        "1",
        "--out",
        str(pretrained),
    ]
    assert main([*argv, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("adaptive-dp pretrain: error:") and "--overwrite" in err and err.count("\n") == 1
    assert (pretrained / "checkpoint.pt").read_bytes() == before


def test_public_split_is_seeded_and_checked():
    assert carve_public_split(100, 10, seed=3) == carve_public_split(100, 10, seed=3)
    assert carve_public_split(100, 10, seed=3) != carve_public_split(100, 10, seed=4)
    with pytest.raises(ValueError, match="between 1 and 99"):
        carve_public_split(100, 100, seed=0)
    record = split_record(dataset="digits", train_size=100, seed=0, indices=[5, 1, 9])
    assert check_split_record(record, train_size=100, source="x") == [1, 5, 9]
    with pytest.raises(ValueError, match="damaged"):
        check_split_record({**record, "indices": [1, 5, 8]}, train_size=100, source="x")
    with pytest.raises(ValueError, match="training set of 100 examples"):
        check_split_record(record, train_size=90, source="x")


def test_pretrain_library_call_refuses_too_many_public_examples(tmp_path):
    config = PretrainConfig(dataset="digits", public_examples=DIGITS_TRAIN, epochs=1, out=str(tmp_path / "o"))
    with pytest.raises(ValueError, match=f"between 1 and {DIGITS_TRAIN - 1}"):
        pretrain(config, progress=False)
    assert not (tmp_path / "o").exists()


# -------------------------------------------------------------------------------------- private fine-tuning


def test_lora_run_keeps_the_base_bit_identical_and_trains_adapters_and_head(pretrained, lora_run):
    out, summary, _ = lora_run
    pre = load_init(pretrained)["model_state_dict"]
    final = load_checkpoint(out)["model_state_dict"]
    frozen = [name for name in final if not _is_trainable_name(name)]
    assert {_plain_name(n) for n in frozen} == {n for n in pre if ".classifier." not in f".{n}"}
    for name in frozen:
        assert torch.equal(final[name], pre[_plain_name(name)]), name
    lora_b = [n for n in final if ".lora_B." in n]
    assert len(lora_b) == 8 and all(final[n].abs().sum() > 0 for n in lora_b)  # B starts at 0
    assert not torch.equal(final["base_model.model.hf.classifier.weight"], pre["hf.classifier.weight"])
    assert summary["steps"] > 0 and summary["epsilon"] > 0 and summary["config"]["lora_rank"] == 4
    model, info = load_trained_model(out)  # rebuilds the adapters before loading the run's weights
    assert info["init"] == str(pretrained / "checkpoint.pt")
    assert all(torch.equal(t, final[n]) for n, t in model.state_dict().items())


def test_monitor_reads_exactly_the_adapters_and_the_head(lora_run):
    _, summary, monitors = lora_run
    assert monitors and summary["mi_readings"] >= 2
    for monitor in monitors:
        trainable = [n for n, p in monitor._module.named_parameters() if p.requires_grad]
        assert monitor._names == trainable
        assert len(trainable) == 18 and all(
            _is_trainable_name(n) for n in trainable
        )  # 4 layers × q, v × A, B + head


def test_public_audit_and_private_train_are_disjoint(pretrained, lora_run):
    out, summary, _ = lora_run
    config = tiny_config(out, init=str(pretrained), **LORA)
    full = load_dataset("digits", split="train")
    train_set, audit_set, pool_size = private_splits(config, full)
    public = set(load_init(pretrained)["public_split"]["indices"])
    audit, private = set(audit_set.indices), set(train_set.indices)
    assert audit_set.dataset is full and train_set.dataset is full  # indices into the whole training set
    assert not (public & audit) and not (public & private) and not (audit & private)
    assert public | audit | private == set(range(DIGITS_TRAIN)) and pool_size == DIGITS_TRAIN - PUBLIC
    assert len(audit) == round(0.05 * pool_size)
    assert set(load_checkpoint(out)["audit_indices"]) == audit
    assert summary["dataset"]["train_size"] == len(private) and summary["audit_size"] == len(audit)


def test_interrupted_and_resumed_lora_run_equals_the_uninterrupted_one(
    pretrained, lora_run, tmp_path, monkeypatch
):
    out, summary, _ = lora_run
    real = training.save_run_checkpoint

    def save_then_crash(run, extra):
        written = real(run, extra)
        if run.progress.epochs and not extra.get("complete", False):
            raise KeyboardInterrupt  # a crash right after the first epoch's checkpoint
        return written

    with monkeypatch.context() as m:
        m.setattr(training, "save_run_checkpoint", save_then_crash)
        with pytest.raises(KeyboardInterrupt):
            train(tiny_config(tmp_path, init=str(pretrained / "checkpoint.pt"), **LORA), progress=False)
    assert load_checkpoint(tmp_path)["epoch"] == 1
    resumed = training.resume(tmp_path, progress=False)
    fields = ("step", "noise_multiplier", "epsilon", "mi", "audit_loss")
    history = [tuple(r[f] for f in fields) for r in read_history(out / "history.jsonl")]
    assert [tuple(r[f] for f in fields) for r in read_history(tmp_path / "history.jsonl")] == history
    assert resumed["test_accuracy"] == summary["test_accuracy"] and resumed["resumed_at_step"] > 0
    final, again = load_checkpoint(out)["model_state_dict"], load_checkpoint(tmp_path)["model_state_dict"]
    assert final.keys() == again.keys() and all(torch.equal(final[n], again[n]) for n in final)


# ----------------------------------------------------------------------------------------------- clear errors


def test_bad_init_is_one_clear_error(pretrained, tmp_path, capsys):
    train_checkpoint = tmp_path / "train.pt"
    torch.save({"format": "adaptive_dp.checkpoint/1"}, train_checkpoint)
    init = str(pretrained / "checkpoint.pt")
    cases = [
        (["--model", "vit-tiny", "--lora-rank", "4"], "--lora-rank adapts a pretrained model: add --init"),
        (["--model", "vit-tiny", "--init", str(tmp_path / "none.pt")], "no such file"),
        (["--model", "small-cnn", "--init", init], "--model small-cnn differs from the model of --init"),
        (
            ["--model", "vit-tiny", "--init", str(train_checkpoint)],
            "checkpoint of an `adaptive-dp train` run",
        ),
        (["--model", "vit-tiny", "--lora-targets", "query"], "add --lora-rank"),
        (
            ["--model", "vit-tiny", "--init", init, "--lora-rank", "2", "--lora-targets", "nope"],
            "no linear layer named nope",
        ),
    ]
    for argv, message in cases:
        out = tmp_path / "out"
        code = run_cli(["--dataset", "digits", "--epochs", "1", "--no-progress", "--out", str(out), *argv])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("adaptive-dp train: error:") and message in err, (argv, err)
        assert err.count("\n") == 1 and "Traceback" not in err and not out.exists()  # refused before the run
    with pytest.raises(ValueError, match="--dataset mnist differs from the data set of --init"):
        check_init_matches(TrainConfig(model="vit-tiny", dataset="mnist", init=init), load_init(init))
