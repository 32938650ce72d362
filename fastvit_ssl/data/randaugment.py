"""The fine-tuning recipe's image augmentations (DeiT, as MoCo v3 fine-tunes): RandAugment (Cubuk et al. 2020) in
the variant DeiT uses, "rand-m9-mstd0.5-inc1", and random erasing (Zhong et al. 2020).

RandAugment: `num_ops` operations drawn uniformly with replacement, each applied with probability 0.5, at a
magnitude drawn per operation from N(magnitude, magnitude_std) clipped to [0, 10]; the "increasing" variants make
every operation stronger as the magnitude grows. Geometric operations fill with the ImageNet mean colour.
"""

from __future__ import annotations

import math
import random

import torch
from PIL import Image, ImageEnhance, ImageOps

FILL = (124, 116, 104)  # the ImageNet mean colour, for the pixels geometric operations uncover


def _signed(value: float, rng: random.Random) -> float:
    return value if rng.random() < 0.5 else -value


def _affine(img: Image.Image, matrix: tuple) -> Image.Image:
    return img.transform(img.size, Image.AFFINE, matrix, resample=Image.BILINEAR, fillcolor=FILL)


def _enhance(enhancer):
    return lambda img, level, rng: enhancer(img).enhance(1.0 + _signed(0.9 * level, rng))


def _solarize_add(img: Image.Image, level: float, rng: random.Random) -> Image.Image:
    add = int(110 * level)
    table = [min(255, i + add) if i < 128 else i for i in range(256)]
    return img.point(table * len(img.getbands()))


# Each takes (image, level in [0, 1], rng); level 0 leaves the image unchanged for all but the first three and
# posterize (4 bits at level 0).
OPS = {
    "AutoContrast": lambda img, level, rng: ImageOps.autocontrast(img),
    "Equalize": lambda img, level, rng: ImageOps.equalize(img),
    "Invert": lambda img, level, rng: ImageOps.invert(img),
    "Rotate": lambda img, level, rng: img.rotate(_signed(30 * level, rng), Image.BILINEAR, fillcolor=FILL),
    "PosterizeIncreasing": lambda img, level, rng: ImageOps.posterize(img, max(1, 4 - int(4 * level))),
    "SolarizeIncreasing": lambda img, level, rng: ImageOps.solarize(img, 256 - int(256 * level)),
    "SolarizeAdd": _solarize_add,
    "ColorIncreasing": _enhance(ImageEnhance.Color),
    "ContrastIncreasing": _enhance(ImageEnhance.Contrast),
    "BrightnessIncreasing": _enhance(ImageEnhance.Brightness),
    "SharpnessIncreasing": _enhance(ImageEnhance.Sharpness),
    "ShearX": lambda img, level, rng: _affine(img, (1, _signed(0.3 * level, rng), 0, 0, 1, 0)),
    "ShearY": lambda img, level, rng: _affine(img, (1, 0, 0, _signed(0.3 * level, rng), 1, 0)),
    "TranslateXRel": lambda img, level, rng: _affine(img, (1, 0, _signed(0.45 * level, rng) * img.width, 0, 1, 0)),
    "TranslateYRel": lambda img, level, rng: _affine(img, (1, 0, 0, 0, 1, _signed(0.45 * level, rng) * img.height)),
}


def rand_augment(
    img: Image.Image, rng: random.Random, num_ops: int = 2, magnitude: float = 9.0, magnitude_std: float = 0.5
) -> Image.Image:
    """An RGB image -> the same size, after `num_ops` randomly chosen operations (each with probability 0.5)."""
    for name in rng.choices(list(OPS), k=num_ops):
        if rng.random() < 0.5:
            level = min(max(rng.gauss(magnitude, magnitude_std), 0.0), 10.0) / 10.0
            img = OPS[name](img, level, rng)
    return img


def random_erase(
    x: torch.Tensor, rng: random.Random, prob: float = 0.25, area: tuple[float, float] = (0.02, 1 / 3)
) -> torch.Tensor:
    """A normalised [C, H, W] image with, with probability `prob`, one rectangle (a fraction of the area drawn from
    `area`, aspect ratio log-uniform in [0.3, 3.3]) replaced by per-pixel standard-normal noise."""
    if rng.random() >= prob:
        return x
    C, H, W = x.shape
    for _ in range(10):  # draws that do not fit are retried, as in the paper
        target = H * W * rng.uniform(*area)
        ratio = math.exp(rng.uniform(math.log(0.3), math.log(1 / 0.3)))
        h, w = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < h < H and 0 < w < W:
            top, left = rng.randint(0, H - h), rng.randint(0, W - w)
            noise = torch.randn(C, h, w, generator=torch.Generator().manual_seed(rng.getrandbits(63)))
            x = x.clone()
            x[:, top : top + h, left : left + w] = noise
            return x
    return x
