"""NVIDIA DALI pipeline: decode (nvJPEG on a GPU, libjpeg-turbo on CPU-only machines) and the MoCo v3 views.

Two readers:
- an ImageFolder tree: every epoch, each rank gets the file list of exactly the images the torch backend would give
  it at each step (ShardedBatchSampler: disjoint shards, seeded per-epoch permutation), read in order by
  `fn.readers.file`; resuming mid-epoch starts the list at the right batch.
- webdataset tar shards (`train/*.tar`, one image per sample under jpg/jpeg/png): `fn.readers.webdataset`, sharded by
  rank (rotating with the epoch) and shuffled by DALI with a per-epoch seed.

The views read the same ViewAugment parameters as the Pillow pipeline. DALI cannot replace a sample it fails to
decode (its operators work on whole batches), so unreadable files are dealt with before the pipeline starts: a
structural check (check.quick_check: empty, not an image, JPEG/PNG cut short) leaves them out of the file list
with a counted warning. A file that passes it but still fails to decode stops the run with a DataError naming
the check tool.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from fastvit_ssl import distributed
from fastvit_ssl.data.augment import ViewAugment
from fastvit_ssl.data.check import quick_check
from fastvit_ssl.data.folder import REPORTED, DataError
from fastvit_ssl.data.torch_pipeline import Batch, ShardedBatchSampler

log = logging.getLogger(__name__)


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def augment(images, view: ViewAugment):
    """One view of a batch of decoded HWC uint8 images, in the recipe's order; returns normalised float CHW, or
    uint8 HWC for view.uint8 (the encoder normalises)."""
    from nvidia.dali import fn, types

    x = fn.random_resized_crop(
        images,
        size=(view.size, view.size),
        random_area=(view.min_scale, view.max_scale),
        random_aspect_ratio=(view.min_ratio, view.max_ratio),
        num_attempts=10,
        antialias=True,
        interp_type=types.INTERP_CUBIC if view.interpolation == "bicubic" else types.INTERP_LINEAR,
    )
    if fn.random.coin_flip(probability=view.jitter_prob):
        # Contrast pivots on the image's mean gray level, as torchvision's does (DALI's default pivot is mid-range).
        gray_mean = fn.reductions.mean(fn.color_space_conversion(x, image_type=types.RGB, output_type=types.GRAY))
        x = fn.brightness_contrast(
            x,
            brightness=fn.random.uniform(range=(1 - view.brightness, 1 + view.brightness)),
            contrast=fn.random.uniform(range=(1 - view.contrast, 1 + view.contrast)),
            contrast_center=gray_mean,
        )
        x = fn.hsv(
            x,
            saturation=fn.random.uniform(range=(1 - view.saturation, 1 + view.saturation)),
            hue=fn.random.uniform(range=(-360 * view.hue, 360 * view.hue)),  # DALI: degrees
        )
    if fn.random.coin_flip(probability=view.grayscale_prob):
        x = fn.hsv(x, saturation=0.0)
    if fn.random.coin_flip(probability=view.blur_prob):
        x = fn.gaussian_blur(x, sigma=fn.random.uniform(range=view.blur_sigma))
    if fn.random.coin_flip(probability=view.solarize_prob):
        bright = x >= view.solarize_threshold
        x = fn.cast(bright * (255 - x) + (bright ^ True) * x, dtype=types.UINT8)
    mirror = fn.random.coin_flip(probability=view.flip_prob)
    if view.uint8:
        return fn.crop_mirror_normalize(x, mirror=mirror, dtype=types.UINT8, output_layout="HWC")
    return fn.crop_mirror_normalize(
        x,
        mirror=mirror,
        dtype=types.FLOAT,
        output_layout="CHW",
        mean=[255 * m for m in view.mean],
        std=[255 * s for s in view.std],
    )


def build_pipeline(
    views: list[ViewAugment],
    batch_size: int,
    num_threads: int,
    device_id: int | None,
    seed: int,
    files: list[str] | None = None,
    labels: list[int] | None = None,
    tars: list[str] | None = None,
    shard_id: int = 0,
    num_shards: int = 1,
):
    """A built DALI pipeline with outputs view0..viewN-1 and label, on the GPU `device_id` or CPU-only (None)."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(enable_conditionals=True)
    def moco_views():
        if tars is None:
            encoded, label = fn.readers.file(files=files, labels=labels, random_shuffle=False, name="reader")
        else:
            encoded = fn.readers.webdataset(
                paths=tars,
                ext=["jpg;jpeg;png"],
                random_shuffle=True,
                seed=seed,
                initial_fill=min(4096, 8 * batch_size),
                shard_id=shard_id,
                num_shards=num_shards,
                name="reader",
            )
            label = fn.constant(idata=0, shape=[1], dtype=types.INT32)  # pre-training needs no labels
        images = fn.decoders.image(encoded, device="cpu" if device_id is None else "mixed", output_type=types.RGB)
        return (*[augment(images, v) for v in views], label)

    pipe = moco_views(
        batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed, prefetch_queue_depth=2
    )
    pipe.build()
    return pipe


class DaliViewLoader:
    """Pre-training batches of this rank from DALI; the same interface as torch_pipeline.TorchViewLoader.

    Args:
        source: [(path, label)] of an ImageFolder training set, or the list of webdataset .tar shards.
        views: augmentation of each view.
        global_batch: images per step over all ranks.
        seed: data order and augmentations derive from (seed, epoch).
        num_threads: DALI CPU threads per rank.
        device: the rank's GPU (decode with nvJPEG there, outputs on it) or CPU.
    """

    def __init__(
        self,
        source: list,
        views: list[ViewAugment],
        global_batch: int,
        seed: int,
        num_threads: int,
        device: torch.device,
    ):
        self.views, self.seed, self.num_threads = views, seed, max(1, num_threads)
        self.rank, self.world = distributed.rank(), distributed.world_size()
        self.local_batch = global_batch // self.world
        self.device_id = (device.index or 0) if device.type == "cuda" else None
        self.tars = [str(p) for p in source] if source and str(source[0]).endswith(".tar") else None
        if self.tars is None:
            self.samples = _drop_unreadable(source)
            self.sampler = ShardedBatchSampler(len(self.samples), global_batch, self.rank, self.world, seed)
            self.batches_per_epoch = self.sampler.batches_per_epoch
        else:
            size = build_pipeline(views, self.local_batch, self.num_threads, None, seed, tars=self.tars).epoch_size()
            self.batches_per_epoch = next(iter(size.values())) // global_batch
        self.epoch, self.first_batch = 0, 0

    def start(self, epoch: int, first_batch: int = 0) -> None:
        self.epoch, self.first_batch = epoch, first_batch

    def __iter__(self):
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        # DALI's random state cannot jump to a batch: a resumed epoch rebuilds the epoch's pipeline from its start
        # (same seed, same order) and replays the batches already trained on, so every step sees what it would
        # have seen uninterrupted.
        seed = int(np.random.default_rng([self.seed, self.epoch]).integers(2**31))
        if self.tars is None:
            self.sampler.start(self.epoch)
            order = [i for batch in self.sampler for i, _ in batch]
            source = {"files": [self.samples[i][0] for i in order], "labels": [self.samples[i][1] for i in order]}
        else:
            source = {"tars": self.tars, "shard_id": (self.rank + self.epoch) % self.world, "num_shards": self.world}
        if self.first_batch:
            log.info(
                "DALI: replaying %d batches of epoch %d to resume its random state exactly",
                self.first_batch,
                self.epoch,
            )
        pipe = build_pipeline(self.views, self.local_batch, self.num_threads, self.device_id, seed, **source)
        names = [f"view{i}" for i in range(len(self.views))]
        iterator = DALIGenericIterator(
            [pipe], [*names, "label"], reader_name="reader", last_batch_policy=LastBatchPolicy.DROP
        )
        for _ in range(self.first_batch):
            _next(iterator)
        for _ in range(self.batches_per_epoch - self.first_batch):
            out = _next(iterator)
            yield Batch([out[n] for n in names], out["label"].view(-1).long(), 0)


def _next(iterator) -> dict:
    try:
        return next(iterator)[0]
    except RuntimeError as e:
        raise DataError(
            f"DALI could not decode an image ({str(e).splitlines()[0][:300]}); list unreadable files "
            "with `python -m fastvit_ssl.data.check DIR` and remove them"
        ) from None


def _drop_unreadable(samples: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """Leave out the files that fail the structural check (rank 0 checks, the other ranks receive its verdict), with
    one warning that counts them; they count as reported, so evaluation passes, which read them with Pillow, do not
    warn about them again. No batch draws them: DALI's skipped_images stay 0."""
    checks_here = distributed.is_main() or not distributed.is_initialized()
    bad = distributed.broadcast_object(quick_check([p for p, _ in samples]) if checks_here else None)
    if bad:
        examples = "; ".join(f"{Path(samples[i][0]).name}: {r}" for i, r in list(bad.items())[:5])
        log.warning("DALI: left out %d unreadable file(s) of %d (%s)", len(bad), len(samples), examples)
        REPORTED.update(samples[i][0] for i in bad)
    return [s for i, s in enumerate(samples) if i not in bad]
