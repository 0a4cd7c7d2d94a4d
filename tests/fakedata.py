"""Tiny, learnable datasets written in the REAL on-disk formats.

The tests read them through torchvision's own ``MNIST`` / ``FashionMNIST`` / ``CIFAR100``
classes (via :func:`cl_lightning.data.sources.load_source`), so the whole path from files to
tensors is exercised without the real datasets (no internet here).

Learnable: every class has a fixed, seeded prototype pattern made of coarse blocks (4x4-pixel
cells, so small rotations keep most of it, like real digits) and each image is its class's
prototype with a random contrast factor plus Gaussian noise. A small MLP separates the classes
after one epoch; train and test splits share the prototypes and differ only in the noise.
Labels are exactly balanced, in shuffled order.
"""

from __future__ import annotations

import gzip
import hashlib
import pickle
from pathlib import Path

import numpy as np

MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def _prototypes(rng: np.random.Generator, n_classes: int, channels: int, cells: int, cell: int) -> np.ndarray:
    """(n_classes, channels, cells*cell, cells*cell) float prototypes in [0, 255] made of blocks."""
    if channels == 1:  # sparse bright strokes on black, like MNIST
        coarse = (rng.random((n_classes, 1, cells, cells)) < 0.4) * 255.0
    else:  # colour blobs, like natural images at low resolution
        coarse = rng.uniform(0, 255, (n_classes, channels, cells, cells))
    return coarse.repeat(cell, axis=2).repeat(cell, axis=3)


def _samples(
    rng: np.random.Generator, prototypes: np.ndarray, n: int, noise: float
) -> tuple[np.ndarray, np.ndarray]:
    """n images (uint8, prototype-shaped) with balanced labels in shuffled order."""
    n_classes = len(prototypes)
    labels = rng.permutation(np.arange(n) % n_classes)
    contrast = rng.uniform(0.7, 1.0, (n,) + (1,) * (prototypes.ndim - 1))
    images = prototypes[labels] * contrast + rng.normal(0, noise, (n,) + prototypes.shape[1:])
    return np.clip(np.rint(images), 0, 255).astype(np.uint8), labels.astype(np.int64)


def _idx_bytes(array: np.ndarray) -> bytes:
    """IDX (LeCun) encoding of a uint8 array: magic 0x0000 08 <ndim>, big-endian int32 dims, data."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def write_mnist(
    root: str | Path,
    folder: str = "MNIST",
    n_train: int = 600,
    n_test: int = 200,
    seed: int = 0,
    gz: bool = False,
) -> Path:
    """Write the four MNIST IDX files under ``root/folder/raw/``; return that raw folder.

    ``folder="FashionMNIST"`` gives a Fashion-MNIST layout (same file format and names). With
    ``gz=True`` only the ``.gz`` versions are written (as Debian's package and most mirrors ship
    them). Images are 28x28 uint8, 10 classes.
    """
    raw = Path(root) / folder / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    prototypes = _prototypes(rng, 10, 1, cells=7, cell=4)[:, 0]  # (10, 28, 28)
    splits = {
        "train": _samples(rng, prototypes, n_train, 40.0),
        "t10k": _samples(rng, prototypes, n_test, 40.0),
    }
    for prefix, (images, labels) in splits.items():
        for kind, array in (("images-idx3", images), ("labels-idx1", labels.astype(np.uint8))):
            name, payload = f"{prefix}-{kind}-ubyte", _idx_bytes(array)
            if gz:
                # mtime=0: identical bytes on every run
                (raw / f"{name}.gz").write_bytes(gzip.compress(payload, compresslevel=1, mtime=0))
            else:
                (raw / name).write_bytes(payload)
    return raw


def write_cifar100(
    root: str | Path, n_train_per_class: int = 20, n_test_per_class: int = 5, seed: int = 0
) -> dict[str, str]:
    """Write ``root/cifar-100-python/{train,test,meta}`` as CIFAR-100 ships them; return their md5s.

    The official files are Python 2 pickles; read by torchvision with
    ``pickle.load(f, encoding="latin1")`` they are dicts with str keys: ``data`` ((N, 3072) uint8
    rows, CHW order: 1024 red, 1024 green, 1024 blue values), ``fine_labels``, ``coarse_labels``,
    ``filenames``, ``batch_label``; ``meta`` has ``fine_label_names`` and ``coarse_label_names``.
    These files hold the same structure (written from Python 3, so the str keys are str on any
    encoding). torchvision checks md5 sums, so patch ``CIFAR100.train_list`` / ``test_list`` /
    ``meta`` with the returned sums (keys ``"train"``, ``"test"``, ``"meta"``).
    """
    folder = Path(root) / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    prototypes = _prototypes(rng, 100, 3, cells=8, cell=4)  # (100, 3, 32, 32)
    for split, per_class, batch_label in (
        ("train", n_train_per_class, "training batch 1 of 1"),
        ("test", n_test_per_class, "testing batch 1 of 1"),
    ):
        images, labels = _samples(rng, prototypes, 100 * per_class, 30.0)
        entry = {
            "filenames": [f"fake_{split}_{i:05d}.png" for i in range(len(labels))],
            "batch_label": batch_label,
            "fine_labels": labels.tolist(),
            "coarse_labels": (labels // 5).tolist(),
            "data": images.reshape(len(images), 3 * 32 * 32),
        }
        (folder / split).write_bytes(pickle.dumps(entry, protocol=2))
    meta = {
        "fine_label_names": [f"fake_class_{i:02d}" for i in range(100)],
        "coarse_label_names": [f"fake_superclass_{i:02d}" for i in range(20)],
    }
    (folder / "meta").write_bytes(pickle.dumps(meta, protocol=2))
    return {name: hashlib.md5((folder / name).read_bytes()).hexdigest() for name in ("train", "test", "meta")}


def patch_cifar100_md5(monkeypatch, md5: dict[str, str]) -> None:
    """Make torchvision's ``CIFAR100`` accept the fake files (it verifies every file's md5)."""
    from torchvision.datasets import CIFAR100

    monkeypatch.setattr(CIFAR100, "train_list", [["train", md5["train"]]])
    monkeypatch.setattr(CIFAR100, "test_list", [["test", md5["test"]]])
    monkeypatch.setattr(CIFAR100, "meta", {"filename": "meta", "key": "fine_label_names", "md5": md5["meta"]})
