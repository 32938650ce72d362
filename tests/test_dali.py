"""The DALI pipeline in CPU-only mode: shapes, ranges, sharding, determinism, bad files, webdataset shards, and
statistical parity of its augmentations with the Pillow pipeline on a few hundred generated JPEGs."""

import logging
import tarfile
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from fastvit_ssl import distributed
from fastvit_ssl.data.augment import IMAGENET_MEAN, IMAGENET_STD, ViewAugment, moco_v3_views
from fastvit_ssl.data.check import main as check_main
from fastvit_ssl.data.check import quick_check
from fastvit_ssl.data.folder import scan_image_folder
from fastvit_ssl.data.torch_pipeline import TorchViewLoader
from fastvit_ssl.models.vit import normalize_uint8
from image_fixtures import make_image_folder

pytest.importorskip("nvidia.dali")
from fastvit_ssl.data.dali import DaliViewLoader  # noqa: E402

CPU = torch.device("cpu")


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """Undo the normalisation: [B, 3, S, S] in [0, 1]."""
    return x * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)


def collect(loader, epoch=0) -> list:
    loader.start(epoch)
    return list(loader)


def test_views_shapes_ranges_and_asymmetry(dataset_root):
    samples, _ = scan_image_folder(dataset_root / "train")
    loader = DaliViewLoader(samples, moco_v3_views(16, 0.2), 8, seed=0, num_threads=2, device=CPU)
    batches = collect(loader)
    assert loader.batches_per_epoch == 3 and len(batches) == 3
    v1, v2 = batches[0].views
    assert v1.shape == v2.shape == (8, 3, 16, 16) and v1.dtype == torch.float32
    assert to_unit(v1).min() >= -1e-4 and to_unit(v1).max() <= 1 + 1e-4  # pixels in [0, 1] up to fp32 rounding
    assert not torch.allclose(v1, v2)
    assert batches[0].labels.shape == (8,)


def test_uint8_views_are_the_float_views_before_normalisation(dataset_root):
    samples, _ = scan_image_folder(dataset_root / "train")
    float_views, uint8_views = (
        collect(DaliViewLoader(samples, moco_v3_views(16, 0.2, uint8=u), 8, seed=0, num_threads=2, device=CPU))[0].views
        for u in (False, True)
    )
    for x, u in zip(float_views, uint8_views):
        assert u.shape == (8, 16, 16, 3) and u.dtype == torch.uint8
        # same draws, same pixels: (u / 255 - mean) / std in fp32 in two orders, |x| < 2.7, so ulps of 2.4e-7
        torch.testing.assert_close(normalize_uint8(u), x, rtol=0, atol=1e-5)


def test_same_seed_same_batches_and_epochs_differ(dataset_root):
    samples, _ = scan_image_folder(dataset_root / "train")
    make = lambda: DaliViewLoader(samples, moco_v3_views(16), 8, seed=3, num_threads=2, device=CPU)  # noqa: E731
    a, b = collect(make()), collect(make())
    assert all(torch.equal(x.views[0], y.views[0]) and torch.equal(x.labels, y.labels) for x, y in zip(a, b))
    assert not torch.equal(a[0].views[0], collect(make(), epoch=1)[0].views[0])


def test_rank_shards_are_disjoint_and_match_the_torch_backend(tmp_path, monkeypatch):
    root = make_image_folder(tmp_path, classes=1, per_class=40)
    samples = [(p, i) for i, (p, _) in enumerate(scan_image_folder(root)[0])]  # label = image index
    seen = []
    for rank in range(2):
        monkeypatch.setattr(distributed, "rank", lambda r=rank: r)
        monkeypatch.setattr(distributed, "world_size", lambda: 2)
        dali = collect(DaliViewLoader(samples, moco_v3_views(8), 16, seed=1, num_threads=1, device=CPU))
        torch_loader = TorchViewLoader(samples, moco_v3_views(8), 16, rank, 2, seed=1, num_workers=0)
        assert [b.labels.tolist() for b in dali] == [b.labels.tolist() for b in collect(torch_loader)]
        seen.append({i for b in dali for i in b.labels.tolist()})
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == 32  # 2 global batches of 16 from 40 images


def test_unreadable_files_are_left_out_and_counted(tmp_path, caplog):
    root = make_image_folder(tmp_path, classes=2, per_class=8)
    files = sorted((root / "class_0").iterdir())
    files[0].write_bytes(b"")
    files[1].write_bytes(files[2].read_bytes()[:150])  # truncated: DALI itself would stop the whole pipeline
    files[2].write_text("not an image")
    Image.new("CMYK", (24, 20), (10, 20, 30, 0)).save(files[3])  # CMYK decodes to RGB
    samples, _ = scan_image_folder(root)
    assert sorted(quick_check([p for p, _ in samples])) == [0, 1, 2]
    with caplog.at_level(logging.WARNING):
        loader = DaliViewLoader(samples, moco_v3_views(16), 4, seed=0, num_threads=1, device=CPU)
    assert "left out 3 unreadable file(s) of 16" in caplog.text and "truncated JPEG" in caplog.text
    assert loader.batches_per_epoch == 13 // 4 and len(collect(loader)) == 3


def test_check_tool_lists_unreadable_files_and_exits_non_zero(tmp_path, capsys):
    root = make_image_folder(tmp_path, classes=1, per_class=3)
    assert check_main([str(root), "--workers", "1"]) == 0
    bad = root / "class_0" / "000.jpg"
    bad.write_bytes(bad.read_bytes()[:100])
    assert check_main([str(root), "--workers", "1"]) == 1
    out, err = capsys.readouterr()
    assert str(bad) in out and "1 unreadable of 3 images" in err


def make_shards(tmp_path) -> list:
    images = make_image_folder(tmp_path / "images", classes=2, per_class=10)
    tars = []
    for shard in range(2):
        tars.append(tmp_path / f"shard-{shard}.tar")
        with tarfile.open(tars[-1], "w") as tar:
            for i, path in enumerate(sorted((images / f"class_{shard}").iterdir())):
                tar.add(path, arcname=f"{shard:02d}{i:04d}.jpg")
    return tars


@pytest.mark.parametrize("source", ["image_folder", "webdataset"])
def test_a_resumed_epoch_gives_the_uninterrupted_batches(source, dataset_root, tmp_path):
    """Positioned mid-epoch (a resume), the loader yields exactly the rest of the epoch it would have yielded."""
    data = scan_image_folder(dataset_root / "train")[0] if source == "image_folder" else make_shards(tmp_path)
    make = lambda: DaliViewLoader(data, moco_v3_views(16), 4, seed=5, num_threads=2, device=CPU)  # noqa: E731
    whole = collect(make(), epoch=1)
    loader = make()
    loader.start(1, first_batch=2)
    rest = list(loader)
    assert len(rest) == len(whole) - 2 > 0
    for resumed, uninterrupted in zip(rest, whole[2:]):
        assert all(torch.equal(a, b) for a, b in zip(resumed.views, uninterrupted.views))


def test_webdataset_shards(tmp_path):
    tars = make_shards(tmp_path)
    loader = DaliViewLoader(tars, moco_v3_views(16), 4, seed=0, num_threads=1, device=CPU)
    assert loader.batches_per_epoch == 5
    batches = collect(loader)
    assert len(batches) == 5 and batches[0].views[1].shape == (4, 3, 16, 16)


def gradient_images(root, count=256, size=64):
    """Red encodes x and green y (0..255), blue is 0: enough to read back crop boxes, flips and grayscale."""
    folder = root / "gradients"
    folder.mkdir(parents=True)
    ramp = np.linspace(0, 255, size).round().astype(np.uint8)
    array = np.stack([np.tile(ramp, (size, 1)), np.tile(ramp[:, None], (1, size)), np.zeros((size, size), np.uint8)], 2)
    for i in range(count):
        Image.fromarray(array).save(folder / f"{i:04d}.png")  # lossless, so values survive exactly
    return scan_image_folder(root)[0]


def statistics(loader) -> dict[str, float]:
    x = to_unit(torch.cat([b.views[0] for b in collect(loader)]))  # (n, 3, S, S)
    red, green, blue = x[:, 0], x[:, 1], x[:, 2]
    gray = (red - blue).abs().amax(dim=(1, 2)) < 0.02
    colour = ~gray
    flipped = red[:, :, 0].mean(1) > red[:, :, -1].mean(1)
    width = (red.amax(dim=(1, 2)) - red.amin(dim=(1, 2)))[colour]
    height = (green.amax(dim=(1, 2)) - green.amin(dim=(1, 2)))[colour]
    area = width * height
    return {
        "gray": gray.float().mean().item(),
        "flipped": flipped[colour].float().mean().item(),
        "area_min": area.min().item(),
        "area_mean": area.mean().item(),
        "count": len(x),
    }


def test_augmentation_statistics_match_the_torch_backend(tmp_path):
    samples = gradient_images(tmp_path)
    view = replace(ViewAugment(32, min_scale=0.25), jitter_prob=0.0, blur_prob=0.0)
    torch_stats = statistics(TorchViewLoader(samples, [view], 256, 0, 1, seed=0, num_workers=0))
    dali_stats = statistics(DaliViewLoader(samples, [view], 256, seed=0, num_threads=2, device=CPU))
    for stats in (torch_stats, dali_stats):
        assert stats["count"] == 256
        assert abs(stats["gray"] - 0.2) < 0.08  # p = 0.2, n = 256: 3 standard deviations
        assert abs(stats["flipped"] - 0.5) < 0.12
        assert stats["area_min"] > 0.2  # crops cover at least min_scale of the image (minus resampling blur)
    assert abs(torch_stats["area_mean"] - dali_stats["area_mean"]) < 0.06


def test_solarize_rate_of_the_second_view(tmp_path):
    folder = tmp_path / "grey" / "all"
    folder.mkdir(parents=True)
    for i in range(256):
        Image.new("RGB", (32, 32), (200, 200, 200)).save(folder / f"{i:04d}.png")
    samples = scan_image_folder(tmp_path / "grey")[0]
    view2 = replace(moco_v3_views(16)[1], jitter_prob=0.0)
    for loader in (
        TorchViewLoader(samples, [view2], 256, 0, 1, seed=0, num_workers=0),
        DaliViewLoader(samples, [view2], 256, seed=0, num_threads=2, device=CPU),
    ):
        x = to_unit(torch.cat([b.views[0] for b in collect(loader)]))
        solarized = x.mean(dim=(1, 2, 3)) < 0.5  # 200 -> 55
        assert abs(solarized.float().mean().item() - 0.2) < 0.08
