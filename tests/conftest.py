"""Shared fixtures: tiny fake datasets in the real on-disk formats (see ``fakedata.py``).

Each fixture returns the ``root`` folder to pass to torchvision / ``load_source``. The
session-scoped folders are shared by every test: do not modify them (copy them, or call
``fakedata.write_*`` into ``tmp_path``, to test damaged files).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from fakedata import patch_cifar100_md5, write_cifar100, write_mnist

from cl_lightning.data.datamodule import ContinualDataModule

# As the CLI's default `num_threads: 1`: the tests' batches are tiny, and with 2 threads on a
# 2-core machine any concurrent process makes every torch op stall (see cl_lightning.cli).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def mnist_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``root/MNIST/raw/`` with the four extracted IDX files: 600 train / 200 test, 28x28, 10 classes."""
    root = tmp_path_factory.mktemp("mnist")
    write_mnist(root, "MNIST", n_train=600, n_test=200, seed=0)
    return root


@pytest.fixture
def fashion_root(tmp_path: Path) -> Path:
    """``root/FashionMNIST/raw/`` holding ONLY the four ``.gz`` files: 600 train / 200 test.

    Function scope, so it is still gz-only in every test (loading extracts the files in place).
    A different seed than ``mnist_root``, so the two are different datasets.
    """
    write_mnist(tmp_path, "FashionMNIST", n_train=600, n_test=200, seed=1, gz=True)
    return tmp_path


@pytest.fixture(scope="session")
def _cifar_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("cifar")
    return root, write_cifar100(root, n_train_per_class=20, n_test_per_class=5, seed=0)


@pytest.fixture
def cifar_root(_cifar_files: tuple[Path, dict[str, str]], monkeypatch: pytest.MonkeyPatch) -> Path:
    """``root/cifar-100-python/{train,test,meta}``: 100 classes, 20 train / 5 test per class
    (2000 / 500 images, 32x32x3). torchvision's ``CIFAR100`` md5 sums are patched to the fake
    files' for the duration of the test (function scope for that reason; the files are written
    once per session)."""
    root, md5 = _cifar_files
    patch_cifar100_md5(monkeypatch, md5)
    return root


@pytest.fixture(scope="session")
def digits() -> ContinualDataModule:
    """Three permuted 8x8-digits tasks, seed 0, set up (offline). Shared: do not modify it."""
    dm = ContinualDataModule(source="digits", benchmark="permuted", num_tasks=3, seed=0)
    dm.setup()
    return dm
