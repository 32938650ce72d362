"""The fine-tuning augmentations: RandAugment's operations and their magnitudes, and random erasing."""

import random

import numpy as np
import pytest
import torch
from PIL import Image

from fastvit_ssl.data.randaugment import OPS, rand_augment, random_erase

# Ramps with a 4-pixel checker, within 60..214: shifts change it more the larger they are, sharpening has edges to
# work on, and AutoContrast has range to stretch.
_ys, _xs = np.mgrid[0:24, 0:32]
_ramps = np.stack([60 + 4 * _xs, 60 + 5 * _ys, 190 - 2 * _xs], axis=-1)
IMAGE = Image.fromarray((_ramps + 24 * ((_xs // 4 + _ys // 4) % 2)[..., None]).astype(np.uint8))
LEVEL_ZERO_IS_IDENTITY = set(OPS) - {"AutoContrast", "Equalize", "Invert", "PosterizeIncreasing"}


def pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img, dtype=np.int16)


@pytest.mark.parametrize("name", sorted(OPS))
def test_every_operation_keeps_the_image_and_grows_with_the_level(name):
    op = OPS[name]
    strong = op(IMAGE, 1.0, random.Random(0))
    assert strong.size == IMAGE.size and strong.mode == "RGB"
    assert np.abs(pixels(strong) - pixels(IMAGE)).mean() > 1  # full strength visibly changes the image
    if name in LEVEL_ZERO_IS_IDENTITY:
        assert np.array_equal(pixels(op(IMAGE, 0.0, random.Random(0))), pixels(IMAGE))
        mild = op(IMAGE, 0.3, random.Random(0))
        assert np.abs(pixels(mild) - pixels(IMAGE)).mean() <= np.abs(pixels(strong) - pixels(IMAGE)).mean()


def test_rand_augment_is_seeded_and_applies_about_half_its_draws():
    assert np.array_equal(pixels(rand_augment(IMAGE, random.Random(3))), pixels(rand_augment(IMAGE, random.Random(3))))
    assert np.array_equal(pixels(rand_augment(IMAGE, random.Random(3), num_ops=0)), pixels(IMAGE))
    unchanged = np.mean(
        [np.array_equal(pixels(rand_augment(IMAGE, random.Random(s), num_ops=1)), pixels(IMAGE)) for s in range(400)]
    )
    assert 0.4 < unchanged < 0.6  # each drawn operation runs with probability 0.5


def test_random_erasing_rate_area_and_noise():
    x = torch.zeros(3, 40, 40)
    erased = [random_erase(x, random.Random(s), prob=0.25) for s in range(800)]
    fractions = [(e != 0).any(0).float().mean().item() for e in erased]
    hit = [f for f in fractions if f > 0]
    assert 0.2 < len(hit) / len(fractions) < 0.3
    assert min(hit) >= 0.015 and max(hit) <= 0.34  # area drawn from [0.02, 1/3], rounded to whole pixels
    box = next(e for e in erased if (e != 0).any())
    assert 0.7 < box[box != 0].std().item() < 1.3  # standard-normal noise, as in a normalised image
    assert torch.equal(random_erase(x, random.Random(0), prob=0.0), x)
