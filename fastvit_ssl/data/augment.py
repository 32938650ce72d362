"""What a view is (ViewAugment: every pipeline, Pillow and DALI, makes the same from it) and the shared two-view
recipe; a method's own views are made in its file (Method.views).

MoCo v3's (and SiT's) two views, BYOL's asymmetric pair:
    view 1: random resized crop, flip, colour jitter (0.4, 0.4, 0.2, 0.1) p=0.8, grayscale p=0.2, blur p=1.0;
    view 2: the same, but blur p=0.1 and solarize p=0.2.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def imagenet_stats(device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The normalisation's mean and std as [1, 3, 1, 1] float32 tensors on `device`."""
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    return mean, torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)


@dataclass(frozen=True)
class ViewAugment:
    size: int  # output side in pixels
    min_scale: float = 0.08  # crop area range, as a fraction of the image
    max_scale: float = 1.0
    min_ratio: float = 3 / 4  # crop aspect-ratio range (width / height)
    max_ratio: float = 4 / 3
    flip_prob: float = 0.5
    jitter_prob: float = 0.8
    brightness: float = 0.4  # factor drawn from [1 - b, 1 + b]
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1  # shift drawn from [-h, h] of a full turn
    grayscale_prob: float = 0.2
    blur_prob: float = 1.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_prob: float = 0.0
    solarize_threshold: int = 128  # pixels >= threshold (of 255) are inverted
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    uint8: bool = False  # hand over [size, size, 3] uint8 instead: the encoder normalises (data.uint8_views)
    interpolation: str = "bilinear"  # of the crop's resize: bilinear (MoCo v3) or bicubic (SiT, DINO)


def moco_v3_views(
    size: int, min_scale: float = 0.08, num_views: int = 2, uint8: bool = False, interpolation: str = "bilinear"
) -> list[ViewAugment]:
    """The recipe's views; beyond two, views alternate between the two kinds. (SiT's views are these with bicubic
    resizing and crops of 0.2-1.)"""
    kinds = [
        ViewAugment(size, min_scale, blur_prob=1.0, solarize_prob=0.0, uint8=uint8, interpolation=interpolation),
        ViewAugment(size, min_scale, blur_prob=0.1, solarize_prob=0.2, uint8=uint8, interpolation=interpolation),
    ]
    return [kinds[i % 2] for i in range(num_views)]


def sample_crop(width: int, height: int, view: ViewAugment, rng: random.Random) -> tuple[int, int, int, int]:
    """(left, top, crop_width, crop_height) of a random resized crop, torchvision's rule: up to 10 draws of area
    and log-uniform aspect ratio that fit, else the largest centred crop with the ratio clamped to the range."""
    area = width * height
    log_lo, log_hi = math.log(view.min_ratio), math.log(view.max_ratio)
    for _ in range(10):
        target = area * rng.uniform(view.min_scale, view.max_scale)
        ratio = math.exp(rng.uniform(log_lo, log_hi))
        w = round(math.sqrt(target * ratio))
        h = round(math.sqrt(target / ratio))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, width - w), rng.randint(0, height - h), w, h
    ratio = width / height
    if ratio < view.min_ratio:
        w, h = width, round(width / view.min_ratio)
    elif ratio > view.max_ratio:
        w, h = round(height * view.max_ratio), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h
