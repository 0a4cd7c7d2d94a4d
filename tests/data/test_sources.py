"""cl_lightning.data.sources: disk -> tensors through torchvision's readers, with clear errors."""

from __future__ import annotations

import gzip
import hashlib
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from fakedata import MNIST_FILES, patch_cifar100_md5, write_cifar100, write_mnist

from cl_lightning.data.sources import (
    SOURCES,
    DatasetCorruptError,
    DatasetNotFoundError,
    ImageSet,
    load_source,
)


def _check_image_set(
    data: ImageSet, n: int, shape: tuple[int, int, int], max_value: int, num_classes: int
) -> None:
    assert data.images.shape == (n, *shape)
    assert data.images.dtype == torch.uint8
    assert data.targets.shape == (n,)
    assert data.targets.dtype == torch.int64
    assert data.max_value == max_value and data.num_classes == num_classes
    assert int(data.images.max()) <= max_value
    assert 0 <= int(data.targets.min()) and int(data.targets.max()) < num_classes
    scaled = data.images.float() / data.max_value
    assert 0.0 <= float(scaled.min()) and float(scaled.max()) <= 1.0
    assert len(data) == n


# --------------------------------------------------------------------------- loading


@pytest.mark.parametrize("train, n", [(True, 600), (False, 200)])
def test_mnist_loads_what_torchvision_reads(mnist_root: Path, train: bool, n: int) -> None:
    data = load_source("mnist", mnist_root, train=train)
    _check_image_set(data, n, (1, 28, 28), 255, 10)
    reference = torchvision.datasets.MNIST(str(mnist_root), train=train)
    assert torch.equal(data.images[:, 0], reference.data)
    assert torch.equal(data.targets, reference.targets)
    assert torch.bincount(data.targets, minlength=10).tolist() == [n // 10] * 10
    assert int(data.images.max()) > 200  # the full 0..255 range, not normalised


def test_root_may_be_a_string(mnist_root: Path) -> None:
    assert len(load_source("mnist", str(mnist_root), train=False)) == 200


def test_gz_only_folder_is_extracted_then_loaded(fashion_root: Path) -> None:
    raw = fashion_root / "FashionMNIST" / "raw"
    assert sorted(p.name for p in raw.iterdir()) == sorted(f + ".gz" for f in MNIST_FILES)
    data = load_source("fashion_mnist", fashion_root, train=True)
    _check_image_set(data, 600, (1, 28, 28), 255, 10)
    for name in MNIST_FILES:  # extracted next to the .gz, which stays
        assert (raw / name).read_bytes() == gzip.decompress((raw / (name + ".gz")).read_bytes())
    assert not list(raw.glob("*.part"))
    reference = torchvision.datasets.FashionMNIST(str(fashion_root), train=True)
    assert torch.equal(data.images[:, 0], reference.data)
    # the second call finds the files already extracted
    assert len(load_source("fashion_mnist", fashion_root, train=False)) == 200


def test_cifar100_is_nchw_as_stored(cifar_root: Path) -> None:
    train = load_source("cifar100", cifar_root, train=True)
    test = load_source("cifar100", cifar_root, train=False)
    _check_image_set(train, 2000, (3, 32, 32), 255, 100)
    _check_image_set(test, 500, (3, 32, 32), 255, 100)
    assert train.images.is_contiguous()
    assert torch.bincount(train.targets, minlength=100).tolist() == [20] * 100
    # CIFAR rows are 1024 red, 1024 green, 1024 blue values: image i is row i reshaped to CHW.
    with open(cifar_root / "cifar-100-python" / "train", "rb") as f:
        entry = pickle.load(f, encoding="latin1")
    rows = torch.from_numpy(entry["data"]).reshape(-1, 3, 32, 32)
    assert torch.equal(train.images, rows)
    assert train.targets.tolist() == entry["fine_labels"]
    reference = torchvision.datasets.CIFAR100(str(cifar_root), train=True)
    assert torch.equal(train.images.permute(0, 2, 3, 1), torch.from_numpy(reference.data))


def test_digits_fixed_stratified_split() -> None:
    train = load_source("digits", "ignored", train=True)
    test = load_source("digits", "/no/such/folder", train=False, download=True)  # root/download ignored
    _check_image_set(train, len(train), (1, 8, 8), 16, 10)
    _check_image_set(test, len(test), (1, 8, 8), 16, 10)
    assert len(train) + len(test) == 1797
    assert 0.18 < len(test) / 1797 < 0.22
    assert int(train.images.max()) == 16
    # stratified: every class is about 20% test
    per_class = torch.bincount(test.targets, minlength=10).float() / (
        torch.bincount(test.targets, minlength=10) + torch.bincount(train.targets, minlength=10)
    )
    assert ((per_class - 0.2).abs() < 0.01).all()
    # the two splits partition the dataset
    from sklearn.datasets import load_digits

    everything = torch.cat([train.images, test.images]).flatten(1)
    original = torch.from_numpy(load_digits().images.astype(np.uint8)).flatten(1)
    assert sorted(map(bytes, everything.numpy())) == sorted(map(bytes, original.numpy()))


def test_digits_split_ignores_global_seeds() -> None:
    """The test set must be the same whatever the experiment seed (like MNIST's fixed split)."""
    torch.manual_seed(0)
    np.random.seed(0)
    first = load_source("digits", ".", train=False)
    torch.manual_seed(12345)
    np.random.seed(999)
    torch.rand(10)
    second = load_source("digits", ".", train=False)
    assert torch.equal(first.images, second.images) and torch.equal(first.targets, second.targets)
    # pinned, so a change of the split (which would change every reported digits number) is noticed
    digest = hashlib.sha256(first.images.numpy().tobytes() + first.targets.numpy().tobytes()).hexdigest()
    assert (len(first), digest[:16]) == (359, _DIGITS_TEST_DIGEST)


_DIGITS_TEST_DIGEST = "aef57afdfc309c55"


def test_fake_mnist_is_learnable_in_one_epoch(mnist_root: Path) -> None:
    """The fixtures' promise to other tests: a small MLP learns the fake data in one epoch."""
    torch.manual_seed(0)
    train = load_source("mnist", mnist_root, train=True)
    test = load_source("mnist", mnist_root, train=False)
    x, y = train.images.flatten(1).float() / 255, train.targets
    model = torch.nn.Sequential(torch.nn.Linear(784, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for batch in torch.randperm(len(y)).split(32):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
        optimizer.step()
    with torch.no_grad():
        accuracy = (model(test.images.flatten(1).float() / 255).argmax(1) == test.targets).float().mean()
    assert accuracy > 0.9


# --------------------------------------------------------------------------- errors


def test_unknown_name_lists_sources() -> None:
    with pytest.raises(ValueError, match="imagenet") as info:
        load_source("imagenet", ".", train=True)
    for name in SOURCES:
        assert name in str(info.value)


@pytest.mark.parametrize(
    "name, folder",
    [
        ("mnist", Path("MNIST") / "raw"),
        ("fashion_mnist", Path("FashionMNIST") / "raw"),
        ("cifar100", Path("cifar-100-python")),
    ],
)
def test_missing_dataset_says_where_and_how(tmp_path: Path, name: str, folder: Path) -> None:
    with pytest.raises(DatasetNotFoundError) as info:
        load_source(name, tmp_path, train=True)
    message = str(info.value)
    assert str(tmp_path / folder) in message
    assert "download: true" in message and "--data.download true" in message
    assert isinstance(info.value, FileNotFoundError)
    assert info.value.__cause__ is not None  # torchvision's own error, chained
    if name == "cifar100":
        assert "train, test, meta" in message
    else:
        assert all(f in message for f in MNIST_FILES)
    if name == "fashion_mnist":
        assert "apt-get install dataset-fashion-mnist" in message
        assert "/usr/share/datasets/fashion-mnist/" in message


def test_partly_missing_mnist_names_the_missing_file(tmp_path: Path) -> None:
    raw = write_mnist(tmp_path, n_train=20, n_test=10)
    (raw / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DatasetNotFoundError, match="did not find t10k-labels-idx1-ubyte"):
        load_source("mnist", tmp_path, train=True)


def test_failed_download_is_not_found(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_internet(self) -> None:
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz: no route to host")

    monkeypatch.setattr(torchvision.datasets.MNIST, "download", no_internet)
    with pytest.raises(DatasetNotFoundError, match="no route to host") as info:
        load_source("mnist", tmp_path, train=True, download=True)
    assert str(tmp_path / "MNIST" / "raw") in str(info.value)


@pytest.mark.parametrize("name", ["train-images-idx3-ubyte", "train-labels-idx1-ubyte"])
def test_truncated_idx_file_is_corrupt_and_named(tmp_path: Path, name: str) -> None:
    raw = write_mnist(tmp_path, n_train=100, n_test=20)
    path = raw / name
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DatasetCorruptError) as info:
        load_source("mnist", tmp_path, train=True)
    assert str(path) in str(info.value)
    assert "truncated" in str(info.value) and "Delete" in str(info.value)
    assert info.value.__cause__ is not None
    # the other split's files are intact and still load
    assert len(load_source("mnist", tmp_path, train=False)) == 20


def test_label_count_mismatch_is_corrupt(tmp_path: Path) -> None:
    write_mnist(tmp_path, n_train=100, n_test=20)
    other = write_mnist(tmp_path / "other", n_train=50, n_test=20)
    shutil.copy(other / "train-labels-idx1-ubyte", tmp_path / "MNIST" / "raw")
    with pytest.raises(DatasetCorruptError, match="100 images but"):
        load_source("mnist", tmp_path, train=True)


def test_bad_gzip_is_corrupt_and_named(tmp_path: Path) -> None:
    raw = write_mnist(tmp_path, "FashionMNIST", n_train=100, n_test=20, gz=True)
    packed = raw / "train-images-idx3-ubyte.gz"
    packed.write_bytes(packed.read_bytes()[:200])  # truncated download
    with pytest.raises(DatasetCorruptError) as info:
        load_source("fashion_mnist", tmp_path, train=True)
    assert str(packed) in str(info.value)
    assert info.value.__cause__ is not None
    assert not (raw / "train-images-idx3-ubyte").exists()  # no half-extracted file left behind
    assert not list(raw.glob("*.part"))


def test_a_bad_gzip_leaves_the_folder_as_it_was(tmp_path: Path) -> None:
    """Every file is checked before any is extracted: a damaged test-set .gz leaves no training file
    extracted beside it (the folder holds exactly what it held)."""
    raw = write_mnist(tmp_path, "FashionMNIST", n_train=100, n_test=20, gz=True)
    packed = raw / "t10k-images-idx3-ubyte.gz"
    packed.write_bytes(packed.read_bytes()[:200])
    before = sorted(p.name for p in raw.iterdir())
    with pytest.raises(DatasetCorruptError, match="t10k-images-idx3-ubyte.gz is not a valid gzip file"):
        load_source("fashion_mnist", tmp_path, train=True)
    assert sorted(p.name for p in raw.iterdir()) == before


def test_cifar_checksum_mismatch_is_corrupt(cifar_root: Path, tmp_path: Path) -> None:
    shutil.copytree(cifar_root / "cifar-100-python", tmp_path / "cifar-100-python")
    path = tmp_path / "cifar-100-python" / "train"
    content = bytearray(path.read_bytes())
    content[len(content) // 2] ^= 0xFF
    path.write_bytes(bytes(content))
    for train in (True, False):  # torchvision verifies all three files whatever the split
        with pytest.raises(DatasetCorruptError) as info:
            load_source("cifar100", tmp_path, train=train)
        assert str(path) in str(info.value) and "checksum" in str(info.value)
        assert str(tmp_path / "cifar-100-python" / "test") not in str(info.value)
        assert info.value.__cause__ is not None


def test_cifar_pickle_that_fails_to_load_is_corrupt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    md5 = write_cifar100(tmp_path, n_train_per_class=1, n_test_per_class=1)
    path = tmp_path / "cifar-100-python" / "test"
    path.write_bytes(path.read_bytes()[:100])
    md5["test"] = hashlib.md5(path.read_bytes()).hexdigest()  # checksum fine, content not
    patch_cifar100_md5(monkeypatch, md5)
    with pytest.raises(DatasetCorruptError, match="cifar-100-python") as info:
        load_source("cifar100", tmp_path, train=False)
    assert info.value.__cause__ is not None
    assert len(load_source("cifar100", tmp_path, train=True)) == 100


def test_cifar_missing_one_file_is_not_found(cifar_root: Path, tmp_path: Path) -> None:
    shutil.copytree(cifar_root / "cifar-100-python", tmp_path / "cifar-100-python")
    (tmp_path / "cifar-100-python" / "meta").unlink()
    with pytest.raises(DatasetNotFoundError, match="did not find meta"):
        load_source("cifar100", tmp_path, train=True)
