"""Images per second of each data backend and output (normalised float, or uint8 for data.uint8_views): decode +
the two MoCo v3 views at 224^2, this process alone.

    python benchmarks/data.py                          # generated 500x375 JPEGs, 2 workers / threads
    python benchmarks/data.py --root /data/imagenet/train --threads 8 --out benchmarks/results/data-<machine>.csv

On a machine with a GPU, DALI decodes with nvJPEG and augments on the GPU; elsewhere it runs CPU-only.
"""

from __future__ import annotations

import argparse
import datetime
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fastvit_ssl import runinfo
from fastvit_ssl.data.augment import moco_v3_views
from fastvit_ssl.data.build import endless_batches
from fastvit_ssl.data.dali import DaliViewLoader, dali_available
from fastvit_ssl.data.folder import scan_image_folder
from fastvit_ssl.data.torch_pipeline import TorchViewLoader
from rows import write_rows


def generate_jpegs(root: Path, count: int, seed: int = 0) -> Path:
    """Photo-sized JPEGs of smooth random colour fields (what a decoder and a blur cost is about the same)."""
    rng = np.random.default_rng(seed)
    folder = root / "generated"
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        small = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
        Image.fromarray(small).resize((500, 375), Image.BICUBIC).save(folder / f"{i:05d}.jpg", quality=90)
    return root


def images_per_second(loader, batches: int, warmup: int) -> float:
    """Steady-state rate: `warmup` batches untimed (start-up, and the batches the loader queued meanwhile, which
    would otherwise arrive for free), then `batches` timed, over as many epochs as that takes."""
    stream = endless_batches(loader)
    for _ in range(warmup):
        next(stream)
    start, seen = time.perf_counter(), 0
    for _ in range(batches):
        seen += next(stream).views[0].shape[0]
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return seen / (time.perf_counter() - start)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, help="an ImageFolder tree; default: generated JPEGs")
    parser.add_argument("--images", type=int, help="how many JPEGs to generate (default: one epoch's worth)")
    parser.add_argument("--threads", type=int, default=2, help="torch loader workers / DALI threads")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=6, help="untimed batches first (more than the loader queues)")
    parser.add_argument("--batches", type=int, default=16, help="timed batches")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.root or generate_jpegs(Path(tmp), args.images or (args.warmup + args.batches + 1) * args.batch)
        samples, _ = scan_image_folder(root)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        makers = {"torch (Pillow)": lambda v: TorchViewLoader(samples, v, args.batch, 0, 1, 0, args.threads)}
        if dali_available():
            name = "DALI (GPU decode)" if device.type == "cuda" else "DALI (CPU only)"
            makers[name] = lambda v: DaliViewLoader(samples, v, args.batch, 0, args.threads, device)
        rows = []
        for output in ("float", "uint8"):  # normalised float CHW, or uint8 HWC (data.uint8_views)
            views = moco_v3_views(args.size, uint8=output == "uint8")
            for name, make in makers.items():  # one loader at a time: idle workers of another would compete
                rows.append(
                    {
                        "backend": name,
                        "output": output,
                        "images_per_second": round(images_per_second(make(views), args.batches, args.warmup), 1),
                        "threads": args.threads,
                        "batch": args.batch,
                        "size": args.size,
                        "views": len(views),
                        "device": runinfo.device_name(device),
                        "commit": runinfo.git_commit(),
                        "date": datetime.date.today().isoformat(),
                    }
                )
    for row in rows:
        print(
            f"{row['backend']:<20} {row['output']:<6} {row['images_per_second']:>8.1f} img/s  "
            f"({row['threads']} threads, {row['views']} views of {row['size']}^2, {row['device']})"
        )
    if args.out:
        write_rows(rows, args.out)
    return rows


if __name__ == "__main__":
    main()
