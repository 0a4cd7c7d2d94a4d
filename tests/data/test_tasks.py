"""cl_lightning.data.tasks: pixel maps (permuted / rotated benchmarks), their application, class splits."""

from __future__ import annotations

import pytest
import torch
from torchvision.transforms.functional import InterpolationMode, rotate

from cl_lightning.data.tasks import (
    FILL,
    apply_pixel_map,
    apply_pixel_maps,
    identity_map,
    permutation_maps,
    rotation_map,
    rotation_maps,
    split_classes,
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _random_images(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Random images with no zero pixel (so a wrongly filled pixel cannot look right by chance)."""
    images = torch.randint(1, 256, shape, generator=_gen(seed), dtype=torch.uint8)
    return images if dtype == torch.uint8 else images.to(dtype) / 255


# --------------------------------------------------------------------------- permutation maps


def test_permutation_maps_task1_identity_and_bijections() -> None:
    maps = permutation_maps(5, 784, _gen(0))
    assert maps.shape == (5, 784)
    assert maps.dtype == torch.long
    assert torch.equal(maps[0], torch.arange(784))
    assert torch.equal(identity_map(784), torch.arange(784))
    for m in maps:  # every map is a bijection of the pixels
        assert torch.equal(m.sort().values, torch.arange(784))


def test_permutation_maps_differ_between_tasks() -> None:
    maps = permutation_maps(6, 784, _gen(0))
    for i in range(6):
        for j in range(i + 1, 6):
            assert not torch.equal(maps[i], maps[j]), (i, j)
    assert not torch.equal(maps[1], torch.arange(784))


def test_permutation_maps_are_seeded() -> None:
    a = permutation_maps(4, 64, _gen(7))
    b = permutation_maps(4, 64, _gen(7))
    c = permutation_maps(4, 64, _gen(8))
    assert torch.equal(a, b)
    assert torch.equal(a[0], c[0])  # the identity does not depend on the seed
    for t in range(1, 4):
        assert not torch.equal(a[t], c[t])


def test_single_task_is_only_the_identity() -> None:
    maps = permutation_maps(1, 10, _gen(0))
    assert torch.equal(maps, torch.arange(10)[None])


# --------------------------------------------------------------------------- rotation maps

# 45 degrees on 28x28 and 90 degrees on 20x31 hit nearest-neighbour ties: they catch a map
# built on a different sampling grid than torchvision uses for real images.


def _rotation_cases() -> list:
    cases = []
    for shape in [(1, 28, 28), (3, 32, 32), (1, 20, 31)]:
        for angle in (9, 45, 90, 171):
            for dtype in (torch.uint8, torch.float32):
                cases.append(pytest.param(shape, angle, dtype, id=f"{'x'.join(map(str, shape))}-{angle}-{dtype}"))
    return cases


@pytest.mark.parametrize("shape, angle, dtype", _rotation_cases())
def test_rotation_map_equals_torchvision_rotate(shape: tuple[int, int, int], angle: float, dtype: torch.dtype) -> None:
    c, h, w = shape
    images = _random_images((4, c, h, w), dtype, seed=angle)
    m = rotation_map(h, w, angle)
    assert m.shape == (h * w,)
    assert m.dtype == torch.long
    assert int(m.min()) >= FILL and int(m.max()) < h * w
    expected = rotate(images, angle, interpolation=InterpolationMode.NEAREST, fill=0)
    got = apply_pixel_maps(images, m.expand(4, -1))
    assert got.dtype == images.dtype
    assert torch.equal(got, expected), f"{int((got != expected).any(1).sum())} pixels differ"


def test_rotation_map_fills_corners_with_zero() -> None:
    m = rotation_map(28, 28, 45)
    assert (m == FILL).any()  # the corners of a 45 degree rotation come from outside the image
    images = _random_images((2, 1, 28, 28), torch.float32)
    out = apply_pixel_maps(images, m.expand(2, -1))
    assert torch.all(out.flatten(1)[:, m == FILL] == 0)
    assert torch.all(out.flatten(1)[:, m != FILL] > 0)  # every other pixel is a copied (non-zero) pixel


def test_rotation_map_zero_degrees_is_identity() -> None:
    assert torch.equal(rotation_map(28, 28, 0), torch.arange(784))
    assert torch.equal(rotation_map(20, 31, 0), torch.arange(620))


def test_rotation_map_90_degrees_is_counter_clockwise() -> None:
    image = torch.zeros(1, 1, 8, 8)
    image[0, 0, 0, 7] = 1.0  # top-right corner
    out = apply_pixel_maps(image, rotation_map(8, 8, 90)[None])
    assert out[0, 0, 0, 0] == 1.0  # counter-clockwise: top-right goes to top-left
    assert out.sum() == 1.0


@pytest.mark.parametrize("degrees", [9.0, 22.5])
def test_rotation_maps_task_t_is_rotated_by_t_minus_1_steps(degrees: float) -> None:
    maps = rotation_maps(5, 28, 28, degrees)
    assert maps.shape == (5, 784)
    assert torch.equal(maps[0], torch.arange(784))  # task 1: identity
    for t in range(5):  # 0-based t = paper's task t+1, rotated by t * degrees
        assert torch.equal(maps[t], rotation_map(28, 28, t * degrees)), t
    assert not torch.equal(maps[1], maps[2])


def test_rotation_maps_non_square_and_multichannel() -> None:
    maps = rotation_maps(3, 20, 31, 9.0)
    assert maps.shape == (3, 620)
    images = _random_images((3, 3, 20, 31), torch.float32)
    out = apply_pixel_maps(images, maps)  # one task per row
    for t in range(3):
        expected = rotate(images[t : t + 1], 9.0 * t, interpolation=InterpolationMode.NEAREST, fill=0)
        assert torch.equal(out[t : t + 1], expected), t


# --------------------------------------------------------------------------- apply_pixel_maps


def test_apply_pixel_maps_batch_mixing_tasks() -> None:
    c, h, w = 3, 6, 5
    n = h * w
    perms = permutation_maps(3, n, _gen(3))
    fill_some = torch.arange(n)
    fill_some[::4] = FILL
    row_maps = torch.stack([perms[1], perms[0], perms[2], fill_some, perms[1]])
    images = _random_images((5, c, h, w), torch.float32, seed=11)
    out = apply_pixel_maps(images, row_maps)
    assert out.shape == images.shape and out.dtype == images.dtype
    for i in range(5):  # each row is gathered through its own map, on every channel
        flat = images[i].reshape(c, n)
        expected = torch.where(row_maps[i] < 0, torch.zeros(()), flat[:, row_maps[i].clamp(min=0)])
        assert torch.equal(out[i].reshape(c, n), expected), i
        single = apply_pixel_maps(images[i : i + 1], row_maps[i : i + 1])
        assert torch.equal(out[i : i + 1], single), i
    assert torch.equal(out[1], images[1])  # identity row unchanged
    assert torch.all(out[3].reshape(c, n)[:, ::4] == 0)  # FILL gives 0
    assert not torch.equal(out[0], out[2])


def test_one_map_for_a_whole_task_equals_the_per_image_maps() -> None:
    images = torch.randint(0, 256, (7, 3, 5, 6), dtype=torch.uint8)
    for pixel_map in (rotation_map(5, 6, 33.0), permutation_maps(2, 30, torch.Generator().manual_seed(1))[1]):
        expected = apply_pixel_maps(images, pixel_map.expand(7, 30))
        assert torch.equal(apply_pixel_map(images, pixel_map), expected)


def test_apply_pixel_maps_keeps_uint8_and_does_not_modify_input() -> None:
    images = _random_images((2, 1, 4, 4), torch.uint8)
    before = images.clone()
    maps = torch.stack([torch.arange(16).flip(0), torch.full((16,), FILL)])
    out = apply_pixel_maps(images, maps)
    assert out.dtype == torch.uint8
    assert torch.equal(images, before)
    assert torch.equal(out[0].flatten(), images[0].flatten().flip(0))
    assert torch.equal(out[1], torch.zeros_like(out[1]))


# --------------------------------------------------------------------------- split_classes


def test_split_classes_label_order() -> None:
    classes = split_classes(20, 5, 100, None)
    assert classes.shape == (20, 5)
    assert torch.equal(classes[0], torch.arange(5))
    assert torch.equal(classes[1], torch.arange(5, 10))
    assert torch.equal(classes, torch.arange(100).view(20, 5))
    assert torch.equal(split_classes(2, 3, 10, None), torch.tensor([[0, 1, 2], [3, 4, 5]]))


def test_split_classes_shuffled_is_seeded() -> None:
    a = split_classes(20, 5, 100, _gen(1))
    b = split_classes(20, 5, 100, _gen(1))
    c = split_classes(20, 5, 100, _gen(2))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a, torch.arange(100).view(20, 5))
    assert torch.equal(a.flatten().sort().values, torch.arange(100))  # disjoint, all classes


def test_split_classes_shuffled_uses_fewer_classes_than_available() -> None:
    classes = split_classes(3, 4, 100, _gen(0))
    assert classes.shape == (3, 4)
    flat = classes.flatten()
    assert len(flat.unique()) == 12  # disjoint tasks
    assert int(flat.min()) >= 0 and int(flat.max()) < 100
    rows = [set(r.tolist()) for r in classes]
    assert all(not (rows[i] & rows[j]) for i in range(3) for j in range(i + 1, 3))


def test_split_classes_too_many_tasks() -> None:
    with pytest.raises(ValueError, match=r"21 tasks x 5 classes.*105 classes.*has 100") as info:
        split_classes(21, 5, 100, None)
    assert "num_tasks" in str(info.value) and "classes_per_task" in str(info.value)
    with pytest.raises(ValueError, match="needs 12 classes"):
        split_classes(3, 4, 10, _gen(0))
