"""How each benchmark turns one dataset into a sequence of tasks.

Permuted and rotated tasks only move pixels: task t's image is a *gather* of the base image's
pixels through a fixed index map (a permutation, or the nearest-neighbour source pixel of a
rotation, with -1 where the rotated image is filled with 0). Keeping the maps instead of T
transformed copies of the dataset needs no PIL and works on any device: the task being trained is
gathered once into its own tensor (:func:`apply_pixel_map`), evaluation and memory batches are
gathered as they are drawn, whatever mix of tasks they hold (:func:`apply_pixel_maps`).

Split tasks select classes; nothing is transformed, the task id selects the logits.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.transforms.functional import InterpolationMode, rotate

from cl_lightning.errors import ConfigError

#: Index value in a pixel map meaning "this output pixel is background (0)".
FILL = -1


def identity_map(num_pixels: int) -> Tensor:
    return torch.arange(num_pixels)


def permutation_maps(num_tasks: int, num_pixels: int, generator: torch.Generator) -> Tensor:
    """Pixel maps of the permuted benchmark: task 1 is the identity, task t > 1 a seeded permutation.

    Returns a ``(num_tasks, num_pixels)`` long tensor. The research code drew its permutations
    unseeded; here they come from ``generator`` so that a run is reproducible.
    """
    maps = [identity_map(num_pixels)]
    maps += [torch.randperm(num_pixels, generator=generator) for _ in range(num_tasks - 1)]
    return torch.stack(maps)


def rotation_map(height: int, width: int, degrees: float) -> Tensor:
    """Pixel map of a counter-clockwise rotation by ``degrees`` (nearest neighbour, fill 0).

    The map is obtained by rotating an image whose pixel values are their own indices with
    torchvision's nearest-neighbour ``rotate``: nearest interpolation copies values without
    blending, so the rotated "index image" says exactly which source pixel lands where. Any
    image rotated through the map equals ``rotate(image, degrees, NEAREST, fill=0)``. The index
    image is float32 (exact up to 2^24 pixels) because torchvision samples uint8 and float32
    images on a float32 grid: a float64 grid would break nearest-neighbour ties differently.
    """
    index_image = torch.arange(1, height * width + 1, dtype=torch.float32).view(1, height, width)
    rotated = rotate(index_image, degrees, interpolation=InterpolationMode.NEAREST, fill=[0.0])
    return rotated.flatten().round().long() - 1  # background 0 becomes FILL (-1)


def rotation_maps(num_tasks: int, height: int, width: int, degrees_per_task: float) -> Tensor:
    """Pixel maps of the rotated benchmark: task t is rotated by (t-1) * ``degrees_per_task``."""
    return torch.stack([rotation_map(height, width, t * degrees_per_task) for t in range(num_tasks)])


def apply_pixel_map(images: Tensor, pixel_map: Tensor) -> Tensor:
    """Gather the pixels of every image (N, C, H, W) through one map (H*W,): a whole task at once.

    Same result as :func:`apply_pixel_maps` with the map repeated, without building an (N, H*W)
    index (8 bytes per pixel: 376 MB for a 60k-image MNIST task).
    """
    n, c, h, w = images.shape
    out = images.reshape(n, c, h * w).index_select(2, pixel_map.clamp(min=0))
    return (out * (pixel_map >= 0).to(out.dtype)).view(n, c, h, w)  # FILL pixels become 0


def apply_pixel_maps(images: Tensor, maps: Tensor) -> Tensor:
    """Gather the pixels of each image (N, C, H, W) through its own map (N, H*W).

    Entries equal to :data:`FILL` produce 0. One ``gather`` call for the whole batch, whatever
    mix of tasks the batch holds.
    """
    n, c, h, w = images.shape
    flat = images.reshape(n, c, h * w)
    flat = torch.cat([flat, flat.new_zeros(n, c, 1)], dim=2)  # index h*w is the fill value 0
    index = torch.where(maps < 0, h * w, maps).unsqueeze(1).expand(n, c, h * w)
    return flat.gather(2, index).view(n, c, h, w)


def check_split(num_tasks: int, classes_per_task: int, num_classes: int) -> None:
    """Refuse a split benchmark that needs more classes than the dataset has."""
    needed = num_tasks * classes_per_task
    if needed > num_classes:
        raise ConfigError(
            f"split benchmark: {num_tasks} tasks x {classes_per_task} classes per task needs "
            f"{needed} classes but the dataset has {num_classes}; lower `data.num_tasks` or "
            f"`data.classes_per_task`."
        )


def split_classes(
    num_tasks: int, classes_per_task: int, num_classes: int, generator: torch.Generator | None
) -> Tensor:
    """Classes of each split task, ``(num_tasks, classes_per_task)``.

    In label order (0-4, 5-9, ...) as the paper, or in a seeded random order when a
    ``generator`` is given.
    """
    check_split(num_tasks, classes_per_task, num_classes)
    needed = num_tasks * classes_per_task
    order = torch.randperm(num_classes, generator=generator) if generator is not None else torch.arange(num_classes)
    return order[:needed].view(num_tasks, classes_per_task)
