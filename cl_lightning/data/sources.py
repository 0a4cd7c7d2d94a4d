"""Load one whole dataset split from disk as uint8 tensors.

This module does one job: disk -> tensors. The benchmarks transform whole tensors once per
task (permute, rotate, split by class), so every source is returned as a single
``(N, C, H, W)`` uint8 tensor plus ``(N,)`` int64 targets, exactly as stored: no
normalisation, no per-sample access, no PIL.

The files are read by torchvision's own readers (``MNIST``, ``FashionMNIST``, ``CIFAR100``),
so the on-disk layout is the one torchvision users already have, and ``download=True``
fetches it. This module adds what those readers lack:

* ``.gz``-only MNIST/Fashion-MNIST folders (how Debian's ``dataset-fashion-mnist`` package and
  most mirrors ship the files) are decompressed in place, because torchvision only looks for
  the extracted files;
* a missing dataset raises :class:`DatasetNotFoundError` with one message saying which folder
  was searched, which files were expected and how to get them;
* a damaged file (truncated IDX file, bad gzip, CIFAR checksum mismatch, unreadable pickle)
  raises :class:`DatasetCorruptError` naming the file, instead of torchvision's
  "Dataset not found or corrupted" or a bare reshape error.

``digits`` (scikit-learn's 8x8 ``load_digits``) ships inside the scikit-learn wheel, so it
works offline with no files at all; it has no official train/test split, so a fixed one is
made here (see :data:`DIGITS_SPLIT_SEED`).
"""

from __future__ import annotations

import gzip
import math
import os
import pickle
import shutil
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torchvision import datasets
from torchvision.datasets.utils import check_integrity

from cl_lightning.errors import ConfigError, UserError

__all__ = [
    "DIGITS_SPLIT_SEED",
    "DIGITS_TEST_FRACTION",
    "SOURCES",
    "DatasetCorruptError",
    "DatasetNotFoundError",
    "ImageSet",
    "NUM_CLASSES",
    "load_source",
]

SOURCES = ("mnist", "fashion_mnist", "cifar100", "digits")
#: Number of classes of each source, known before any file is read (to check settings early).
NUM_CLASSES = {"mnist": 10, "fashion_mnist": 10, "cifar100": 100, "digits": 10}

#: Seed of the fixed digits train/test split. It is a constant, deliberately independent of the
#: experiment seed: like MNIST's official split, the digits test set must be the same for every
#: run, or accuracies of different seeds would be measured on different test sets. It drives a
#: ``numpy.random.RandomState``, whose stream NumPy keeps frozen across versions.
DIGITS_SPLIT_SEED = 0
#: Share of each digits class held out for the test split (stratified: about 36 images per class).
DIGITS_TEST_FRACTION = 0.2

_NAMES = {"mnist": "MNIST", "fashion_mnist": "Fashion-MNIST", "cifar100": "CIFAR-100"}
_IDX_READERS = {"mnist": datasets.MNIST, "fashion_mnist": datasets.FashionMNIST}
_CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"
_DOWNLOAD_HINT = (
    "let torchvision download them (needs internet): set `download: true` in the data config, "
    "or pass `--data.download true` on the command line"
)
# What torchvision's readers raise on files they cannot parse (assertions and reshapes in the IDX
# reader, pickle errors, "Dataset not found" RuntimeErrors) or cannot download (URLError is an
# OSError). PermissionError is re-raised untouched before this tuple is consulted.
_READ_ERRORS = (
    AssertionError,
    RuntimeError,
    ValueError,
    TypeError,
    IndexError,
    KeyError,
    EOFError,
    pickle.UnpicklingError,
    OSError,
)


class DatasetNotFoundError(UserError, FileNotFoundError):
    """The dataset's files are not on disk (and download was off, or failed)."""


class DatasetCorruptError(UserError, RuntimeError):
    """The dataset's files are on disk but cannot be read (truncated, bad gzip, bad checksum)."""


@dataclass(frozen=True)
class ImageSet:
    """One whole split of an image dataset, as stored on disk.

    Attributes:
        images: ``(N, C, H, W)`` uint8, not normalised.
        targets: ``(N,)`` int64 class indices in ``[0, num_classes)``.
        max_value: largest possible pixel value (255 for MNIST/Fashion/CIFAR, 16 for digits), so
            ``images.float() / max_value`` is in ``[0, 1]``.
        num_classes: number of classes of the whole dataset (not only those present).
    """

    images: Tensor
    targets: Tensor
    max_value: int
    num_classes: int

    def __len__(self) -> int:
        return int(self.targets.shape[0])


def load_source(name: str, root: str | Path, train: bool, download: bool = False) -> ImageSet:
    """Load the train or test split of dataset ``name`` from ``root`` as tensors.

    Args:
        name: one of :data:`SOURCES`.
        root: the folder torchvision uses as ``root`` (holding ``MNIST/raw/``,
            ``FashionMNIST/raw/`` or ``cifar-100-python/``). Ignored for ``digits``.
        train: the training split if True, else the test split.
        download: let torchvision download missing files (needs internet). Ignored for ``digits``.

    Raises:
        ValueError: unknown ``name``.
        DatasetNotFoundError: the files are missing and ``download`` is off (or downloading failed).
        DatasetCorruptError: a file is present but damaged.
    """
    if name not in SOURCES:
        raise ConfigError(f"unknown data source {name!r}; choose one of: {', '.join(SOURCES)}")
    if name == "digits":
        return _load_digits(train)
    root = Path(root).expanduser().absolute()
    if name == "cifar100":
        return _load_cifar100(root, train, download)
    return _load_idx(name, root, train, download)


# --------------------------------------------------------------------------- MNIST / Fashion-MNIST


def _load_idx(name: str, root: Path, train: bool, download: bool) -> ImageSet:
    """MNIST-format datasets: four IDX files in ``root/<ClassName>/raw/``."""
    reader = _IDX_READERS[name]
    raw = root / reader.__name__ / "raw"
    expected = [Path(filename).stem for filename, _ in reader.resources]  # names without .gz
    _gunzip_if_missing([raw / filename for filename in expected])
    prefix = "train" if train else "t10k"
    split_files = [raw / f for f in expected if f.startswith(prefix)]
    try:
        dataset = reader(str(root), train=train, download=download)
    except PermissionError:
        raise
    except _READ_ERRORS as err:
        missing = [f for f in expected if not (raw / f).is_file()]
        if missing:
            raise DatasetNotFoundError(
                _idx_not_found_message(name, raw, expected, missing, err if download else None)
            ) from err
        raise DatasetCorruptError(_idx_corrupt_message(name, split_files, err)) from err
    images = dataset.data.unsqueeze(1)  # (N, 28, 28) -> (N, 1, 28, 28); a view, no copy
    targets = dataset.targets.to(torch.int64)
    return _checked(ImageSet(images, targets, 255, NUM_CLASSES[name]), name, split_files)


def _gunzip_if_missing(targets: list[Path]) -> None:
    """Decompress each ``target.gz`` into ``target`` when only the ``.gz`` file is there.

    torchvision's readers only check for the extracted files. Every file is decompressed to a
    temporary file first and all are renamed into place only once each one decompressed, so a
    damaged ``.gz`` leaves the folder as it was (no file of the set extracted beside it), and an
    interrupted run (or two processes extracting at once, as in multi-device training) never leaves
    a half-written file that would later look "corrupt".
    """
    pending = [t for t in targets if not t.is_file() and t.with_name(t.name + ".gz").is_file()]
    partials = [t.with_name(f".{t.name}.{os.getpid()}.part") for t in pending]
    try:
        for target, partial in zip(pending, partials):
            packed = target.with_name(target.name + ".gz")
            try:
                with gzip.open(packed, "rb") as src, open(partial, "wb") as dst:
                    shutil.copyfileobj(src, dst, length=1 << 20)
            except (gzip.BadGzipFile, EOFError, zlib.error) as err:
                raise DatasetCorruptError(
                    f"{packed} is not a valid gzip file ({err}): it is truncated or damaged. "
                    "Delete it and download or copy it again."
                ) from err
    except BaseException:
        for partial in partials:
            partial.unlink(missing_ok=True)
        raise
    for target, partial in zip(pending, partials):
        os.replace(partial, target)


def _idx_not_found_message(
    name: str, raw: Path, expected: list[str], missing: list[str], download_error: Exception | None
) -> str:
    label = _NAMES[name]
    if download_error is not None:
        head = f"{label}: downloading into {raw} failed ({download_error})."
        how = f"Check the internet connection, or copy the files into {raw}/ yourself."
    else:
        head = f"{label} not found: looked in {raw} and did not find {', '.join(missing)}."
        how = f"To get them, either {_DOWNLOAD_HINT}; or copy the files into {raw}/."
    lines = [
        head,
        f"Expected files: {', '.join(expected)} (the same names ending in .gz also work: they "
        "are extracted automatically).",
        how,
    ]
    if name == "fashion_mnist":
        lines.append(
            "On Debian/Ubuntu, `apt-get install dataset-fashion-mnist` puts the four .gz files in "
            f"/usr/share/datasets/fashion-mnist/; copy them to {raw}/."
        )
    return "\n".join(lines)


def _idx_corrupt_message(name: str, split_files: list[Path], err: Exception) -> str:
    """Name the damaged IDX file when its header and size disagree, else the split's files."""
    for path in split_files:
        problem = _idx_problem(path)
        if problem is not None:
            return (
                f"{_NAMES[name]} file {path} is damaged: {problem}. Delete it and download it "
                "again (`download: true`) or copy it again (if the .gz file is next to it, it is "
                "re-extracted)."
            )
    return (
        f"could not read {_NAMES[name]} from {', '.join(map(str, split_files))} ({err}). "
        "The files may be damaged: delete them and download or copy them again."
    )


def _idx_problem(path: Path) -> str | None:
    """Why ``path`` is not a well-formed uint8 IDX file, or None when header and size agree."""
    with open(path, "rb") as f:
        header = f.read(16)
    if len(header) < 4 or header[:3] != b"\x00\x00\x08" or header[3] not in (1, 3):
        return f"not an IDX uint8 file (magic number {header[:4].hex() or 'missing'})"
    ndim = header[3]
    if len(header) < 4 + 4 * ndim:
        return "the header is cut short"
    dims = [int.from_bytes(header[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    needed = 4 + 4 * ndim + math.prod(dims)
    size = path.stat().st_size
    if size != needed:
        shape = "x".join(map(str, dims))
        return f"it has {size} bytes but its header ({shape}) needs {needed} (truncated)"
    return None


# --------------------------------------------------------------------------- CIFAR-100


def _load_cifar100(root: Path, train: bool, download: bool) -> ImageSet:
    """CIFAR-100's python pickles in ``root/cifar-100-python/{train,test,meta}``."""
    reader = datasets.CIFAR100  # attributes read at call time: tests patch the md5 sums
    folder = root / reader.base_folder
    entries = [*reader.train_list, *reader.test_list, [reader.meta["filename"], reader.meta["md5"]]]
    split_files = [folder / f for f, _ in (reader.train_list if train else reader.test_list)]
    try:
        dataset = reader(str(root), train=train, download=download)
    except PermissionError:
        raise
    except _READ_ERRORS as err:
        # torchvision says "Dataset not found or corrupted" for both cases: tell them apart.
        missing = [f for f, _ in entries if not (folder / f).is_file()]
        if missing:
            raise DatasetNotFoundError(
                _cifar_not_found_message(root, folder, [f for f, _ in entries], missing, download, err)
            ) from err
        bad = [(f, md5) for f, md5 in entries if not check_integrity(str(folder / f), md5)]
        if bad:
            detail = "; ".join(f"{folder / f} (expected md5 {md5})" for f, md5 in bad)
            message = (
                f"CIFAR-100 is damaged: checksum mismatch for {detail}. The files are truncated, "
                f"damaged or not the official ones. Delete {folder} and download it again "
                "(`download: true`) or re-extract cifar-100-python.tar.gz."
            )
        else:
            message = (
                f"could not read CIFAR-100 from {folder} ({err}). The files may be damaged: delete "
                f"{folder} and download it again or re-extract cifar-100-python.tar.gz."
            )
        raise DatasetCorruptError(message) from err
    # torchvision keeps (N, 32, 32, 3) HWC numpy; the models want NCHW.
    images = torch.from_numpy(dataset.data).permute(0, 3, 1, 2).contiguous()
    targets = torch.as_tensor(dataset.targets, dtype=torch.int64)
    return _checked(ImageSet(images, targets, 255, NUM_CLASSES["cifar100"]), "cifar100", split_files)


def _cifar_not_found_message(
    root: Path, folder: Path, expected: list[str], missing: list[str], download: bool, err: Exception
) -> str:
    if download:
        head = f"CIFAR-100: downloading into {root} failed ({err})."
        how = "Check the internet connection, or get the archive yourself:"
    else:
        head = f"CIFAR-100 not found: looked in {folder} and did not find {', '.join(missing)}."
        how = f"To get them, either {_DOWNLOAD_HINT}; or get the archive yourself:"
    return "\n".join(
        [
            head,
            f"Expected files: {', '.join(expected)} in {folder}/.",
            how,
            f"download cifar-100-python.tar.gz from {_CIFAR_URL} and extract it in {root}/ "
            f"(`tar -xzf cifar-100-python.tar.gz -C {root}` creates {folder.name}/). With the "
            f"archive in {root}/, `download: true` verifies and extracts it without downloading.",
        ]
    )


# --------------------------------------------------------------------------- digits


def _load_digits(train: bool) -> ImageSet:
    """scikit-learn's 8x8 digits (1797 images, values 0..16), split by :func:`_digits_test_mask`."""
    from sklearn.datasets import load_digits  # imported here: scikit-learn is slow to import

    bunch = load_digits()
    images = torch.from_numpy(bunch.images.astype(np.uint8)).unsqueeze(1)  # (1797, 1, 8, 8)
    targets = torch.from_numpy(bunch.target.astype(np.int64))
    test = torch.from_numpy(_digits_test_mask(bunch.target))
    keep = ~test if train else test
    return ImageSet(images[keep].contiguous(), targets[keep].contiguous(), 16, NUM_CLASSES["digits"])


def _digits_test_mask(labels: np.ndarray) -> np.ndarray:
    """Fixed stratified test split: :data:`DIGITS_TEST_FRACTION` of each class, seeded by
    :data:`DIGITS_SPLIT_SEED` (never the experiment seed) and untouched by global RNG state."""
    rng = np.random.RandomState(DIGITS_SPLIT_SEED)
    mask = np.zeros(len(labels), dtype=bool)
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        n_test = int(round(len(members) * DIGITS_TEST_FRACTION))
        mask[rng.permutation(members)[:n_test]] = True
    return mask


# --------------------------------------------------------------------------- shared


def _checked(data: ImageSet, name: str, files: list[Path]) -> ImageSet:
    """Catch files that parse but disagree (image/label counts, labels out of range)."""
    n, labels = data.images.shape[0], data.targets
    problem = None
    if labels.shape != (n,):
        problem = f"{n} images but {tuple(labels.shape)} labels"
    elif n and (int(labels.min()) < 0 or int(labels.max()) >= data.num_classes):
        problem = f"labels outside 0..{data.num_classes - 1}"
    if problem is not None:
        raise DatasetCorruptError(
            f"{_NAMES[name]} files {', '.join(map(str, files))} do not match: {problem}. "
            "Delete them and download or copy them again."
        )
    return data
