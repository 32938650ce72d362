"""Pillow + torch pipeline: two augmented views per image, sharded by rank, deterministic per (seed, epoch).

Every sample draws its augmentation from its own RNG seeded by (seed, epoch, image index), so batches do not
depend on the number of workers or ranks, and a resumed run sees exactly the images and crops it would have seen.
"""

from __future__ import annotations

import random
import weakref
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageFilter, ImageOps
from torch.utils.data import DataLoader, Dataset, Sampler

from fastvit_ssl.data.augment import IMAGENET_MEAN, IMAGENET_STD, ViewAugment, sample_crop
from fastvit_ssl.data.folder import DataError, first_readable, report_unreadable
from fastvit_ssl.preemption import ignore_in_worker


@dataclass
class Batch:
    views: list[torch.Tensor]  # each [B, 3, S, S] normalised float, or [B, S, S, 3] uint8 (ViewAugment.uint8)
    labels: torch.Tensor  # [B] class index (unused by pre-training, kept for monitors)
    skipped: int  # samples of this batch whose image was unreadable (one per draw; replacements tried not counted)
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (path, reason) of every unreadable file met


def color_jitter(img: Image.Image, view: ViewAugment, rng: random.Random) -> Image.Image:
    """Brightness, contrast, saturation and hue in a random order, as torchvision's ColorJitter."""
    ops = [
        lambda x: ImageEnhance.Brightness(x).enhance(rng.uniform(1 - view.brightness, 1 + view.brightness)),
        lambda x: ImageEnhance.Contrast(x).enhance(rng.uniform(1 - view.contrast, 1 + view.contrast)),
        lambda x: ImageEnhance.Color(x).enhance(rng.uniform(1 - view.saturation, 1 + view.saturation)),
        lambda x: shift_hue(x, rng.uniform(-view.hue, view.hue)),
    ]
    rng.shuffle(ops)
    for op in ops:
        img = op(img)
    return img


def shift_hue(img: Image.Image, fraction: float) -> Image.Image:
    h, s, v = img.convert("HSV").split()
    h = Image.fromarray((np.asarray(h, dtype=np.int16) + round(fraction * 255)).astype(np.uint8), "L")  # wraps
    return Image.merge("HSV", (h, s, v)).convert("RGB")


def to_normalized_tensor(img: Image.Image, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255)  # (3, H, W)
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def augment_view(img: Image.Image, view: ViewAugment, rng: random.Random) -> torch.Tensor:
    """RGB image -> [3, size, size] normalised (or [size, size, 3] uint8, ViewAugment.uint8)."""
    img = augment_image(img, view, rng)
    if view.uint8:
        return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())  # (size, size, 3)
    return to_normalized_tensor(img, view.mean, view.std)


def augment_image(img: Image.Image, view: ViewAugment, rng: random.Random) -> Image.Image:
    """RGB image -> RGB image of the view's size, in the official order: crop, jitter, grayscale, blur, solarize,
    flip."""
    left, top, w, h = sample_crop(img.width, img.height, view, rng)
    resample = Image.BICUBIC if view.interpolation == "bicubic" else Image.BILINEAR
    img = img.resize((view.size, view.size), resample, box=(left, top, left + w, top + h))
    if rng.random() < view.jitter_prob:
        img = color_jitter(img, view, rng)
    if rng.random() < view.grayscale_prob:
        img = img.convert("L").convert("RGB")
    if rng.random() < view.blur_prob:
        img = img.filter(ImageFilter.GaussianBlur(radius=rng.uniform(*view.blur_sigma)))
    if rng.random() < view.solarize_prob:
        img = ImageOps.solarize(img, view.solarize_threshold)
    if rng.random() < view.flip_prob:
        img = ImageOps.mirror(img)
    return img


def eval_transform(img: Image.Image, size: int) -> torch.Tensor:
    """Resize the shorter side to size / 0.875, centre crop `size` (the usual 256 -> 224 evaluation crop)."""
    short = round(size / 0.875)
    scale = short / min(img.width, img.height)
    img = img.resize((max(short, round(img.width * scale)), max(short, round(img.height * scale))), Image.BILINEAR)
    left, top = (img.width - size) // 2, (img.height - size) // 2
    return to_normalized_tensor(img.crop((left, top, left + size, top + size)))


class MultiViewDataset(Dataset):
    """Indexed by (image index, sample seed); returns (views, label, unreadable files tried), not warning about
    them: TorchViewLoader does, in the main process."""

    def __init__(self, samples: list[tuple[str, int]], views: list[ViewAugment]):
        self.samples, self.views = samples, views

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: tuple[int, int]):
        index, seed = key
        img, label, unreadable = first_readable(self.samples, index, report=False)
        rng = random.Random(seed)
        return [augment_view(img, v, rng) for v in self.views], label, unreadable


class EvalDataset(Dataset):
    """Centre-cropped, unaugmented images with labels, for kNN and linear evaluation: (image, label), unreadable files
    warned about by the process that reads them; with report=False (image, label, unreadable files tried), for
    EvalLoader to warn in the main process."""

    def __init__(self, samples: list[tuple[str, int]], size: int, report: bool = True):
        self.samples, self.size, self.report = samples, size, report

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        img, label, unreadable = first_readable(self.samples, index, report=self.report)
        item = eval_transform(img, self.size), label
        return item if self.report else (*item, unreadable)


def collate_eval(items) -> tuple[torch.Tensor, torch.Tensor, list[tuple[str, str]]]:
    images, labels, unreadable = zip(*items)
    return torch.stack(images), torch.tensor(labels), [u for item in unreadable for u in item]


class EvalLoader(DataLoader):
    """Batches (images, labels) of centre-cropped `samples`; the unreadable files its workers meet are warned about
    here, in the main process, once per file however many evaluation passes (each with new workers) read them."""

    def __init__(self, samples: list[tuple[str, int]], size: int, **kwargs):
        super().__init__(EvalDataset(samples, size, report=False), collate_fn=collate_eval, **kwargs)

    def __iter__(self):
        for images, labels, unreadable in super().__iter__():
            report_unreadable(unreadable)
            yield images, labels


class ShardedBatchSampler(Sampler):
    """Batches of (index, seed) for one rank: global batch b of the epoch's permutation is split in rank order,
    so ranks see disjoint images and together exactly the single-process global batch. Drops the last partial
    global batch, as MoCo v3 does. `start(epoch, first_batch)` positions it (for resuming mid-epoch)."""

    def __init__(self, num_samples: int, global_batch: int, rank: int, world_size: int, seed: int):
        if num_samples < global_batch:
            raise DataError(
                f"the data set has {num_samples} images, fewer than one global batch of {global_batch}; "
                "lower data.batch_size or add images"
            )
        self.num_samples, self.global_batch, self.seed = num_samples, global_batch, seed
        self.rank, self.local_batch = rank, global_batch // world_size
        self.batches_per_epoch = num_samples // global_batch
        self.epoch, self.first_batch = 0, 0

    def start(self, epoch: int, first_batch: int = 0) -> None:
        self.epoch, self.first_batch = epoch, first_batch

    def __len__(self) -> int:
        return self.batches_per_epoch - self.first_batch

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(self.num_samples)
        seeds = rng.integers(0, 2**63 - 1, size=self.num_samples)  # one augmentation seed per image and epoch
        for b in range(self.first_batch, self.batches_per_epoch):
            lo = b * self.global_batch + self.rank * self.local_batch
            yield [(int(i), int(seeds[i])) for i in order[lo : lo + self.local_batch]]


def collate_views(items) -> Batch:
    views = [torch.stack(v) for v in zip(*(item[0] for item in items))]
    labels = torch.tensor([item[1] for item in items])
    unreadable = [item[2] for item in items]  # first entry, if any: the drawn image itself
    return Batch(views, labels, sum(map(bool, unreadable)), [u for tried in unreadable for u in tried])


def stop_workers(loader: DataLoader) -> None:
    """Shut a persistent-worker DataLoader's processes down now."""
    iterator, loader._iterator = getattr(loader, "_iterator", None), None
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()


class TorchViewLoader:
    """Pre-training batches of this rank from the Pillow pipeline; `start(epoch, first_batch)` positions it.

    Unreadable images are replaced by the next readable one (first_readable) in the workers, and warned about here,
    in the main process: once per file and rank, whichever worker met it; every draw counts in the batch's
    `skipped`.

    Args:
        samples: [(path, label)] of the training set.
        views: augmentation of each view.
        global_batch: images per step over all ranks.
        rank, world_size: this process and the number of processes.
        seed: data order and augmentations derive from (seed, epoch, image).
        num_workers: loader processes; pin_memory: for fast copies to a GPU.
    """

    def __init__(
        self,
        samples,
        views: list[ViewAugment],
        global_batch: int,
        rank: int,
        world_size: int,
        seed: int,
        num_workers: int,
        pin_memory: bool = False,
    ):
        self.sampler = ShardedBatchSampler(len(samples), global_batch, rank, world_size, seed)
        self.batches_per_epoch = self.sampler.batches_per_epoch
        self.loader = DataLoader(
            MultiViewDataset(samples, views),
            batch_sampler=self.sampler,
            num_workers=num_workers,
            collate_fn=collate_views,
            pin_memory=pin_memory,
            persistent_workers=num_workers > 0,
            generator=torch.Generator().manual_seed(seed),  # not the global RNG, which a resume restores
            worker_init_fn=ignore_in_worker,  # SIGTERM/SIGINT are the main process's: it stops cleanly
        )
        # Workers that ignore SIGTERM outlive multiprocessing's exit handler, which terminates then joins them:
        # stop them before it, whenever this loader is dropped or the interpreter exits (a crash included).
        self.close = weakref.finalize(self, stop_workers, self.loader)

    def start(self, epoch: int, first_batch: int = 0) -> None:
        self.sampler.start(epoch, first_batch)

    def __iter__(self):
        for batch in self.loader:
            report_unreadable(batch.unreadable)
            yield batch
