"""Shared by the benchmark scripts: which real dataset this machine has."""

from __future__ import annotations

from pathlib import Path


def has_files(folder: Path) -> bool:
    return folder.is_dir() and any(folder.iterdir())


def image_source(root: str, color: bool = False) -> tuple[str, int, int]:
    """(source, input channels, input pixels) of the best real dataset found under ``root``.

    ``color``: prefer CIFAR-100 (the ResNet's benchmark). Fashion-MNIST (Debian's
    ``dataset-fashion-mnist``, see README) is next; the embedded 8x8 digits always work.
    """
    if color and has_files(Path(root, "cifar-100-python")):
        return "cifar100", 3, 32 * 32
    if has_files(Path(root, "FashionMNIST", "raw")):
        return "fashion_mnist", 1, 28 * 28
    return "digits", 1, 8 * 8
