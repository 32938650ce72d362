"""From the data config to loaders: pre-training views of root/train, evaluation images of root/train and root/val."""

from __future__ import annotations

from pathlib import Path

import torch

from fastvit_ssl import distributed
from fastvit_ssl.config import Config
from fastvit_ssl.data.augment import ViewAugment
from fastvit_ssl.data.dali import DaliViewLoader, dali_available
from fastvit_ssl.data.demo import build_demo_dataset
from fastvit_ssl.data.folder import DataError, scan_image_folder
from fastvit_ssl.data.torch_pipeline import EvalLoader, TorchViewLoader


def resolve_root(cfg: Config) -> Path:
    """data.root, or the demo data set (built once, by rank 0) when it is empty."""
    if cfg.data.root:
        root = Path(cfg.data.root)
        if not (root / "train").is_dir():
            raise DataError(
                f"data.root={root} must contain a train/ folder (and val/ for kNN), each holding one "
                "sub-folder of images per class"
            )
        return root
    root = Path(cfg.run.out_dir) / "demo_data"
    if distributed.is_main():
        build_demo_dataset(root)
    distributed.barrier()
    return root


def build_train_data(cfg: Config, root: Path, device: torch.device, views: list[ViewAugment]):
    """(loader of this rank's share of every global batch, the [(path, label)] of root/train, class names): Pillow +
    torch or DALI, ImageFolder tree or webdataset shards (root/train/*.tar, DALI only; no samples, no classes), each
    image made into `views` (the method's: Method.views)."""
    tars = sorted(str(p) for p in (root / "train").glob("*.tar"))
    use_dali = cfg.data.backend == "dali" or (cfg.data.backend == "auto" and dali_available())
    if use_dali and not dali_available():
        raise DataError(
            "data.backend=dali but NVIDIA DALI is not installed: pip install nvidia-dali-cuda130 "
            "(nvidia-dali-cuda120 for CUDA 12), or set data.backend=torch"
        )
    if tars and not use_dali:
        raise DataError(
            f"{root / 'train'} holds webdataset shards, which only the DALI backend reads: install DALI "
            "and set data.backend=dali"
        )
    samples, classes = ([], []) if tars else scan_image_folder(root / "train")
    if use_dali:
        loader = DaliViewLoader(tars or samples, views, cfg.data.batch_size, cfg.run.seed, cfg.data.num_workers, device)
    else:
        loader = TorchViewLoader(
            samples,
            views,
            cfg.data.batch_size,
            distributed.rank(),
            distributed.world_size(),
            cfg.run.seed,
            cfg.data.num_workers,
            pin_memory=device.type == "cuda",
        )
    return loader, samples, classes


def endless_batches(loader):
    """Batches of a pre-training loader, epoch after epoch without end (for benchmarks, which time a fixed count)."""
    epoch = 0
    while True:
        loader.start(epoch)
        yield from loader
        epoch += 1


def build_eval_data(cfg: Config, root: Path, train_samples: list, classes: list[str], batch_size: int = 256):
    """(train loader, val loader) of centre-cropped labelled images for kNN, or None without a val/ folder.
    `train_samples` and `classes` are the scan of root/train, which is not listed a second time."""
    if not classes or not (root / "val").is_dir():  # kNN needs labelled ImageFolder trees
        return None
    val_samples, _ = scan_image_folder(root / "val", classes)
    return tuple(
        EvalLoader(
            s,
            cfg.model.img_size,
            batch_size=batch_size,
            num_workers=min(cfg.data.num_workers, 4),
            generator=torch.Generator(),  # iterating draws a worker seed: not from the global RNG training uses
        )
        for s in (train_samples, val_samples)
    )
