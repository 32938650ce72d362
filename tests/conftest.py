import os

import torch

if not torch.cuda.is_available():
    # Triton kernels run through its interpreter on CPU tensors; it must be chosen before triton is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from pathlib import Path

import pytest

from image_fixtures import make_image_folder


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
        "data.backend=torch",
        f"data.root={dataset_root}",
        "optim.epochs=2",
        "optim.warmup_epochs=1",
        "optim.base_lr=1e-3",
        f"run.out_dir={tmp_path / 'runs'}",
        "run.name=tiny",
        "run.log_every=1",
    ]
