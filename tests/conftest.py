import os

import torch

if not torch.cuda.is_available():
    # Triton kernels run through its interpreter on CPU tensors; it must be chosen before triton is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import random
from pathlib import Path

import pytest
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


@pytest.fixture(scope="session")
def dataset_root(tmp_path_factory) -> Path:
    """root/train (3 classes x 8 JPEGs) and root/val (3 x 4), shared read-only by the tests."""
    root = tmp_path_factory.mktemp("images")
    make_image_folder(root / "train", per_class=8, seed=0)
    make_image_folder(root / "val", per_class=4, seed=1)
    return root


@pytest.fixture
def tiny_overrides(dataset_root, tmp_path) -> list[str]:
    """A pre-training run of a few CPU seconds: 14x14 images, 2x2 patches of the demo ViT, batch 8."""
    return [
        "model.arch=vit_demo",
        "model.img_size=14",
        "moco.dim=16",
        "moco.mlp_dim=32",
        "data.batch_size=8",
        "data.num_workers=0",
        f"data.root={dataset_root}",
        "optim.epochs=2",
        "optim.warmup_epochs=1",
        "optim.base_lr=1e-3",
        f"run.out_dir={tmp_path / 'runs'}",
        "run.name=tiny",
        "run.log_every=1",
    ]
