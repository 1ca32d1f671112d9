"""Tests for adaptive_dp.data: real loaders, the other on-disk layouts (tiny fixtures), errors, audit split."""

from __future__ import annotations

import gzip
import pickle
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from adaptive_dp.data import cifar as cifar_module
from adaptive_dp.data.cache import fingerprint
from adaptive_dp.data.datasets import (
    CIFAR10_CLASSES,
    DATASETS,
    CorruptDataError,
    DataNotFoundError,
    ImageDataset,
    audit_split,
    denormalize,
    get_cache_dir,
    get_data_root,
    load_dataset,
    normalize,
)

# Published class counts of MNIST (LeCun et al.), train and t10k.
MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def _channel_mean_std(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of uint8 images [N, C, H, W] on the [0, 1] scale (exact integer sums)."""
    total = torch.zeros(images.shape[1], dtype=torch.int64)
    squares = torch.zeros_like(total)
    for chunk in images.split(5000):
        x = chunk.to(torch.int32)
        total += x.sum((0, 2, 3))
        squares += (x * x).sum((0, 2, 3))
    count = images.numel() / images.shape[1]
    mean = total.double() / count
    return mean / 255, (squares.double() / count - mean**2).sqrt() / 255


def _counts(dataset: ImageDataset) -> list[int]:
    return torch.bincount(dataset.targets, minlength=dataset.info.num_classes).tolist()


# ----------------------------------------------------------------------------------------------- real data


def test_digits_split_is_fixed_stratified_and_complete():
    from sklearn.datasets import load_digits

    train, test = load_dataset("digits", split="train"), load_dataset("digits", split="test")
    assert (len(train), len(test)) == (1437, 360)
    assert train.images.shape[1:] == (1, 8, 8) and train.images.dtype == torch.uint8
    bunch = load_digits()
    full = np.rint(bunch.data * 255 / 16).astype(np.uint8)
    # together the two splits are exactly the 1,797 digits (as multisets of (image, label) rows)
    rows = torch.cat(
        [torch.cat([d.images.flatten(1), d.targets[:, None].to(torch.uint8)], 1) for d in (train, test)]
    )
    truth = np.concatenate([full, bunch.target[:, None].astype(np.uint8)], 1)
    assert sorted(map(bytes, rows.numpy())) == sorted(map(bytes, truth))
    # stratified: each class is 20 % test, up to rounding
    per_class = np.bincount(bunch.target)
    assert np.all(np.abs(np.array(_counts(test)) - 0.2 * per_class) <= 1)
    assert torch.equal(load_dataset("digits", split="test").images, test.images)  # fixed split


def test_mnist_counts_and_shapes(data_root):
    train = load_dataset("mnist", split="train", data_dir=data_root)
    test = load_dataset("mnist", split="test", data_dir=data_root)
    assert train.images.shape == (60000, 1, 28, 28) and test.images.shape == (10000, 1, 28, 28)
    assert _counts(train) == MNIST_TRAIN_COUNTS and _counts(test) == MNIST_TEST_COUNTS
    # the standard statistics in DATASETS are those of these very pixels
    mean, std = _channel_mean_std(train.images)
    assert abs(mean.item() - DATASETS["mnist"].mean[0]) < 1e-3
    assert abs(std.item() - DATASETS["mnist"].std[0]) < 1e-3


def test_fashion_mnist_counts(data_root, monkeypatch):
    monkeypatch.setenv("ADAPTIVE_DP_DATA", str(data_root))  # the env route, no data_dir
    train, test = load_dataset("fashion-mnist"), load_dataset("fashion_mnist", split="test")
    assert train.images.shape == (60000, 1, 28, 28) and test.images.shape == (10000, 1, 28, 28)
    assert _counts(train) == [6000] * 10 and _counts(test) == [1000] * 10
    mean, std = _channel_mean_std(train.images)
    assert abs(mean.item() - DATASETS["fashion-mnist"].mean[0]) < 1e-3
    assert abs(std.item() - DATASETS["fashion-mnist"].std[0]) < 1e-3
    assert not torch.equal(train.images[:100], load_dataset("mnist", data_dir=data_root).images[:100])


def test_cifar10_from_jpeg_tar(data_root):
    if not (data_root / "cifar10-jpeg" / "cifar10-jpeg.tar").is_file():
        pytest.skip("cifar10-jpeg/cifar10-jpeg.tar not in the data root")
    train = load_dataset("cifar10", split="train", data_dir=data_root)
    test = load_dataset("cifar10", split="test", data_dir=data_root)
    assert train.images.shape == (50000, 3, 32, 32) and test.images.shape == (10000, 3, 32, 32)
    assert _counts(train) == [5000] * 10 and _counts(test) == [1000] * 10
    assert train.info.classes == CIFAR10_CLASSES
    # per-channel statistics agree with the standard CIFAR-10 values (JPEG re-encoding moves them a little)
    mean, std = _channel_mean_std(train.images[::4])  # 12,500 images: the mean is within ~1e-3
    assert torch.allclose(mean, torch.tensor(DATASETS["cifar10"].mean, dtype=torch.float64), atol=5e-3)
    assert torch.allclose(std, torch.tensor(DATASETS["cifar10"].std, dtype=torch.float64), atol=5e-3)
    # decoded once: the cache holds one file per split for this tar (other tars or older copies of it have
    # their own keys), and a second load reads it back unchanged
    tar_path = data_root / "cifar10-jpeg" / "cifar10-jpeg.tar"
    stat = tar_path.stat()
    key = fingerprint(tar_path.resolve(), stat.st_size, stat.st_mtime_ns)
    cached = sorted(
        p.name.split("-")[1] for p in (get_cache_dir() / "cifar10-decoded").glob(f"tar-*-{key}.images.npy")
    )
    assert cached == ["test", "train"]
    assert torch.equal(load_dataset("cifar10", split="test", data_dir=data_root).images, test.images)


# ------------------------------------------------------------------------------------ tiny on-disk layouts


def _write_idx(path: Path, array: np.ndarray, magic: int, *, compress: bool = False) -> None:
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        payload = gzip.compress(payload)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(payload)


def _tiny_idx(folder: Path, rng: np.random.Generator, *, compress: bool = False) -> dict[str, np.ndarray]:
    arrays = {}
    for split, prefix, n in (("train", "train", 12), ("test", "t10k", 5)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        _write_idx(folder / f"{prefix}-images-idx3-ubyte", images, 2051, compress=compress)
        _write_idx(folder / f"{prefix}-labels-idx1-ubyte", labels, 2049, compress=compress)
        arrays[split] = (images, labels)
    return arrays


@pytest.mark.parametrize(
    ("name", "layout", "compress"),
    [("mnist", "MNIST/raw", False), ("fashion-mnist", "FashionMNIST/raw", True), ("mnist", ".", False)],
)
def test_idx_layouts(tmp_path, name, layout, compress):
    arrays = _tiny_idx(tmp_path / layout, np.random.default_rng(0), compress=compress)
    for split in ("train", "test"):
        ds = load_dataset(name, split=split, data_dir=tmp_path)
        images, labels = arrays[split]
        assert torch.equal(ds.images[:, 0], torch.from_numpy(images))
        assert torch.equal(ds.targets, torch.from_numpy(labels.astype(np.int64)))


def test_corrupt_idx_files_give_clear_errors(tmp_path):
    folder = tmp_path / "mnist"
    _tiny_idx(folder, np.random.default_rng(1))
    images = folder / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:-7])  # truncated download
    with pytest.raises(CorruptDataError, match="truncated or corrupt"):
        load_dataset("mnist", data_dir=tmp_path)
    # labels file where the images belong: wrong magic number
    images.write_bytes((folder / "train-labels-idx1-ubyte").read_bytes())
    with pytest.raises(CorruptDataError, match="magic number 2049, expected 2051"):
        load_dataset("mnist", data_dir=tmp_path)
    bad_gz = folder / "t10k-images-idx3-ubyte"
    bad_gz.unlink()
    bad_gz.with_name(bad_gz.name + ".gz").write_bytes(b"not gzip at all")
    with pytest.raises(CorruptDataError, match="download it again"):
        load_dataset("mnist", split="test", data_dir=tmp_path)


def test_cifar_python_batches(tmp_path):
    rng = np.random.default_rng(2)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(3, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, size=3).tolist()
        batches[name] = (data, labels)
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": labels, b"batch_label": name.encode()}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [c.encode() for c in CIFAR10_CLASSES]}, f)

    train = load_dataset("cifar10", split="train", data_dir=tmp_path)
    assert train.images.shape == (15, 3, 32, 32)
    data = np.concatenate([batches[f"data_batch_{i}"][0] for i in range(1, 6)])
    # row layout of the original batches: 1024 red, then green, then blue values, row-major
    i, c, h, w = 7, 2, 5, 30
    assert train.images[i, c, h, w].item() == data[i, c * 1024 + h * 32 + w]
    assert torch.equal(train.images.flatten(1), torch.from_numpy(data))
    assert train.targets.tolist() == sum((batches[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    test = load_dataset("cifar10", split="test", data_dir=tmp_path)
    assert test.targets.tolist() == batches["test_batch"][1]


def _png_tree(
    base: Path, rng: np.random.Generator, per_class: int = 2
) -> dict[str, tuple[np.ndarray, list[int]]]:
    truth = {}
    for split in ("train", "test"):
        images, labels = [], []
        for label, cls in enumerate(CIFAR10_CLASSES):
            (base / split / cls).mkdir(parents=True)
            for k in range(per_class):
                pixels = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(base / split / cls / f"{k:04d}.png")  # lossless
                images.append(pixels.transpose(2, 0, 1))
                labels.append(label)
        truth[split] = (np.stack(images), labels)
    return truth


def test_cifar_image_folder_tree_is_decoded_once(tmp_path, monkeypatch):
    monkeypatch.setenv("ADAPTIVE_DP_CACHE", str(tmp_path / "cache"))
    truth = _png_tree(tmp_path / "data" / "cifar10", np.random.default_rng(3))
    for split in ("train", "test"):
        ds = load_dataset("cifar10", split=split, data_dir=tmp_path / "data")
        assert torch.equal(ds.images, torch.from_numpy(truth[split][0]))
        assert ds.targets.tolist() == truth[split][1]
    cached = list((get_cache_dir() / "cifar10-decoded").glob("folder-train-*.images.npy"))
    assert len(cached) == 1
    stamp = cached[0].stat().st_mtime_ns
    load_dataset("cifar10", split="train", data_dir=tmp_path / "data")
    assert cached[0].stat().st_mtime_ns == stamp  # read from the cache, not decoded again


def test_cifar_tar_is_decoded_once_under_concurrent_loads(tmp_path, monkeypatch):
    """Two loaders racing on a cold cache (as two pytest-xdist workers would): one decodes, the other
    waits on the file lock and reads the cached result; no temporary files are left behind."""
    truth = _png_tree(tmp_path / "tree" / "cifar10", np.random.default_rng(4), per_class=3)
    root = tmp_path / "root"
    (root / "cifar10-jpeg").mkdir(parents=True)
    with tarfile.open(root / "cifar10-jpeg" / "cifar10-jpeg.tar", "w") as tar:
        tar.add(tmp_path / "tree" / "cifar10", arcname="cifar10")
    monkeypatch.setenv("ADAPTIVE_DP_CACHE", str(tmp_path / "cache"))
    real_decode, calls = cifar_module._decode_tar, []

    def slow_counting_decode(path):
        calls.append(path)
        time.sleep(0.3)  # keep the lock held while the other thread arrives
        return real_decode(path)

    monkeypatch.setattr(cifar_module, "_decode_tar", slow_counting_decode)
    with ThreadPoolExecutor(max_workers=2) as pool:  # flock locks conflict across separate open()s
        results = list(
            pool.map(lambda split: load_dataset("cifar10", split=split, data_dir=root), ["train", "test"])
        )
    assert len(calls) == 1
    for split, ds in zip(["train", "test"], results):
        assert torch.equal(ds.images, torch.from_numpy(truth[split][0]))
        assert ds.targets.tolist() == truth[split][1]
    names = sorted(p.name for p in (tmp_path / "cache" / "cifar10-decoded").iterdir())
    assert [n.split("-")[1] for n in names if n.endswith(".images.npy")] == ["test", "train"]  # one per split
    assert len(names) == 5 and names[0].endswith(".lock")  # + labels + the lock file, no temporary leftovers


# ------------------------------------------------------------------------------------------ roots, errors


def test_data_root_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("ADAPTIVE_DP_DATA", str(tmp_path / "env"))
    monkeypatch.setenv("ADAPTIVE_DP_CACHE", str(tmp_path / "cache"))
    assert get_data_root(tmp_path / "arg") == tmp_path / "arg"
    assert get_data_root() == tmp_path / "env"
    monkeypatch.delenv("ADAPTIVE_DP_DATA")
    assert get_data_root() == tmp_path / "cache" / "data"
    monkeypatch.delenv("ADAPTIVE_DP_CACHE")
    assert get_cache_dir() == Path.home() / ".cache" / "adaptive_dp"


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist", "cifar10"])
def test_missing_data_dir_says_where_and_how(tmp_path, name):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataNotFoundError) as info:
        load_dataset(name, data_dir=missing)
    message = str(info.value)
    assert str(missing) in message
    assert "--data-dir" in message and "ADAPTIVE_DP_DATA" in message and "download=True" in message
    expected_name = "cifar-10-batches-py" if name == "cifar10" else "train-images-idx3-ubyte"
    assert expected_name in message
    assert isinstance(info.value, FileNotFoundError)


def test_download_without_torchvision_says_so(tmp_path):
    try:
        import torchvision  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("torchvision is installed: download=True would try the network")
    with pytest.raises(DataNotFoundError, match="torchvision"):
        load_dataset("mnist", data_dir=tmp_path, download=True)


def test_unknown_dataset_and_split():
    with pytest.raises(ValueError, match="unknown data set") as info:
        load_dataset("imagenet")
    assert all(name in str(info.value) for name in DATASETS)
    with pytest.raises(ValueError, match="split"):
        load_dataset("digits", split="validation")


# ------------------------------------------------------------------------------ normalisation, dataset


def test_normalize_roundtrip_and_items():
    ds = load_dataset("digits", split="test")
    x01 = ds.images.float() / 255
    z = normalize(x01, ds.info)
    assert torch.allclose(denormalize(z, ds.info), x01, atol=1e-6)
    assert torch.allclose(z, (x01 - 0.3053) / 0.3759, atol=1e-6)
    x, y = ds[17]
    assert x.dtype == torch.float32 and x.shape == (1, 8, 8) and isinstance(y, int)
    assert torch.allclose(x, z[17], atol=1e-6) and y == ds.targets[17].item()
    batch = next(iter(DataLoader(ds, batch_size=5)))  # the batched __getitems__ path
    assert torch.allclose(batch[0], z[:5], atol=1e-6) and torch.equal(batch[1], ds.targets[:5])
    with pytest.raises(ValueError, match="channel|expected images"):
        normalize(torch.rand(2, 3, 8, 8), ds.info)


def test_large_dataset_items_without_float_cache(monkeypatch):
    ds = load_dataset("digits", split="train")
    monkeypatch.setattr(ImageDataset, "FLOAT_CACHE_LIMIT", 0)
    ds_fresh = ImageDataset(ds.images, ds.targets, ds.info)
    expected = normalize(ds.images[[3, 9]].float() / 255, ds.info)
    assert torch.allclose(ds_fresh[3][0], expected[0], atol=1e-6)
    assert torch.allclose(torch.stack([x for x, _ in ds_fresh.__getitems__([3, 9])]), expected, atol=1e-6)
    assert ds_fresh._normalised is None


# ----------------------------------------------------------------------------------------------- audit split


def test_audit_split_disjoint_seeded_and_sized():
    ds = TensorDataset(torch.arange(1000))
    train, audit = audit_split(ds, fraction=0.1, seed=3)
    assert len(audit) == 100 and len(train) == 900
    assert set(train.indices).isdisjoint(audit.indices)
    assert sorted(train.indices + audit.indices) == list(range(1000))
    again_train, again_audit = audit_split(ds, fraction=0.1, seed=3)
    assert again_audit.indices == audit.indices and again_train.indices == train.indices
    assert audit_split(ds, fraction=0.1, seed=4)[1].indices != audit.indices
    assert len(audit_split(ds, size=37)[1]) == 37


def test_audit_examples_never_reach_the_dp_training_loader():
    from opacus.data_loader import DPDataLoader

    ds = TensorDataset(torch.arange(500))
    train, audit = audit_split(ds, size=50, seed=0)
    loader = DPDataLoader.from_data_loader(
        DataLoader(train, batch_size=64), generator=torch.Generator().manual_seed(0)
    )
    seen = set()
    for _ in range(5):
        for (batch,) in loader:
            seen.update(batch.tolist())
    assert seen and seen.isdisjoint(audit.indices)
    assert len(seen) > 400  # Poisson sampling over 5 epochs reaches almost every training example


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"fraction": 0.1, "size": 5}, {"fraction": 0.0}, {"fraction": 1.0}, {"size": 0}, {"size": 10}],
)
def test_audit_split_rejects_bad_sizes(kwargs):
    with pytest.raises(ValueError, match="fraction|size"):
        audit_split(TensorDataset(torch.arange(10)), **kwargs)


def test_module_constants_are_consistent():
    for name, info in DATASETS.items():
        assert info.name == name and len(info.classes) == info.num_classes
        assert len(info.mean) == len(info.std) == info.in_channels


# ------------------------------------------------------------------------------------------------ registry


@pytest.fixture
def scratch_registry(monkeypatch):
    """The data-set registry, restored after the test (registering is global)."""
    from adaptive_dp.data import registry

    for attribute in ("DATASETS", "_SOURCES", "_ALIASES"):
        monkeypatch.setattr(registry, attribute, dict(getattr(registry, attribute)))
    return registry


def test_a_registered_reader_is_loadable_by_name_and_alias(tmp_path, scratch_registry):
    rng = np.random.default_rng(5)
    images = rng.integers(0, 256, size=(6, 1, 4, 4), dtype=np.uint8)
    labels = np.array([0, 1, 2, 0, 1, 2], dtype=np.int64)
    np.save(tmp_path / "toy.npy", images)
    info = scratch_registry.DatasetInfo("toy", 3, 1, 4, (0.5,), (0.25,), ("a", "b", "c"))

    @scratch_registry.register_dataset(
        info, aliases=("toy_set",), expected=lambda root: ([root / "toy.npy"], "toy.npy")
    )
    def _read_toy(split, root):
        path = root / "toy.npy"
        return (np.load(path), labels) if path.is_file() else None

    assert scratch_registry.DATASETS["toy"] is info
    ds = load_dataset("Toy-Set", split="test", data_dir=tmp_path)  # alias, any case and _/- spelling
    assert ds.info is info and torch.equal(ds.images, torch.from_numpy(images))
    assert torch.allclose(ds[2][0], (torch.from_numpy(images[2]).float() / 255 - 0.5) / 0.25)
    with pytest.raises(DataNotFoundError, match="toy.npy") as missing:
        load_dataset("toy", data_dir=tmp_path / "elsewhere")
    assert str(tmp_path / "elsewhere") in str(missing.value)
    with pytest.raises(ValueError, match="already registered"):
        scratch_registry.register_dataset(info)(_read_toy)
    with pytest.raises(ValueError, match="already registered"):  # an alias may not shadow a name
        scratch_registry.register_dataset(
            scratch_registry.DatasetInfo("toy2", 3, 1, 4, (0.5,), (0.25,), ("a", "b", "c")),
            aliases=("mnist",),
        )(_read_toy)
