"""Small generated JPEG ImageFolder trees for data and training tests."""

import random
from pathlib import Path

from PIL import Image, ImageDraw


def draw_image(rng: random.Random, label: int, size: tuple[int, int]) -> Image.Image:
    """A small picture whose shape depends on the class: ellipses, rectangles or lines on a coloured ground."""
    img = Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))
    draw = ImageDraw.Draw(img)
    for _ in range(3):
        x0, y0 = rng.randrange(size[0] // 2), rng.randrange(size[1] // 2)
        box = (x0, y0, x0 + rng.randrange(4, size[0] // 2), y0 + rng.randrange(4, size[1] // 2))
        color = tuple(rng.randrange(256) for _ in range(3))
        [draw.ellipse, draw.rectangle, draw.line][label % 3](box, fill=color)
    return img


def make_image_folder(root: Path, classes: int = 3, per_class: int = 8, size=(24, 20), seed: int = 0) -> Path:
    rng = random.Random(seed)
    for label in range(classes):
        folder = root / f"class_{label}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            draw_image(rng, label, size).save(folder / f"{i:03d}.jpg", quality=90)
    return root
