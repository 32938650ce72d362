"""A PNG grid to look at the augmentations: each row is an original image, then its two MoCo v3 views from the
Pillow + torch pipeline, then the two from DALI (when installed).

    python -m fastvit_ssl.data.preview DIR [--images 6] [--size 224] [--out augmentations.png]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from fastvit_ssl.data.augment import imagenet_stats, moco_v3_views
from fastvit_ssl.data.dali import DaliViewLoader, dali_available
from fastvit_ssl.data.folder import load_rgb, scan_image_folder
from fastvit_ssl.data.torch_pipeline import TorchViewLoader, eval_transform


def to_image(x: torch.Tensor):
    """[3, S, S] normalised -> [S, S, 3] in [0, 1] for matplotlib."""
    mean, std = (t[0] for t in imagenet_stats())  # (3, 1, 1) each
    return (x.cpu().float() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", type=Path, help="an ImageFolder tree (class sub-folders of images)")
    parser.add_argument("--images", type=int, default=6)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--min-scale", type=float, default=0.08)
    parser.add_argument("--out", type=Path, default=Path("augmentations.png"))
    args = parser.parse_args(argv)
    found = scan_image_folder(args.root)[0]
    samples = found[:: max(1, len(found) // args.images)][: args.images]  # spread over the classes
    views = moco_v3_views(args.size, args.min_scale)
    # the sampler permutes: label each sample with its row so the views can be put back in order
    indexed = [(path, row) for row, (path, _) in enumerate(samples)]
    columns = {"original": [eval_transform(load_rgb(p), args.size) for p, _ in samples]}
    backends = {"torch": TorchViewLoader(indexed, views, len(indexed), 0, 1, seed=0, num_workers=0)}
    if dali_available():
        cpu = torch.device("cpu")
        backends["DALI"] = DaliViewLoader(indexed, views, len(indexed), seed=0, num_threads=2, device=cpu)
    for name, loader in backends.items():
        loader.start(0)
        batch = next(iter(loader))
        order = batch.labels.argsort()
        for v, tensor in enumerate(batch.views):
            columns[f"{name} view {v + 1}"] = list(tensor[order])
    return plot_grid(columns, args.out)


def plot_grid(columns: dict[str, list[torch.Tensor]], out: Path, by_rows: bool = False) -> Path:
    """Images in titled columns (or, `by_rows`, titled rows) of one figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    length = len(next(iter(columns.values())))
    rows, cols = (len(columns), length) if by_rows else (length, len(columns))
    fig, axes = plt.subplots(rows, cols, figsize=(2 * cols, 2 * rows), squeeze=False)
    for c, (title, images) in enumerate(columns.items()):
        for r, image in enumerate(images):
            ax = axes[c][r] if by_rows else axes[r][c]
            ax.imshow(to_image(image))
            ax.set_xticks([])
            ax.set_yticks([])
        if by_rows:
            axes[c][0].set_ylabel(title, fontsize=9)
        else:
            axes[0][c].set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
