"""Pictures of what a pre-trained encoder learned, from any method's checkpoint (DINO made these the first look):

    python -m fastvit_ssl.viz attention --checkpoint RUN --images DIR_OR_FILES --out attention.png
    python -m fastvit_ssl.viz neighbours --checkpoint RUN [--data ROOT] --out neighbours.png

attention: for each image, the class token's attention over the patches in the last block, averaged over the heads
(overlaid on the image) and head by head. neighbours: for a few validation images (one per class, up to 8), their
nearest training images in feature space (cosine similarity of the encoder's pooled feature), each titled with
its similarity, green when its class matches the query's, red when not.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader

from fastvit_ssl.data.folder import IMAGE_EXTENSIONS, UNREADABLE, DataError, load_rgb, scan_image_folder
from fastvit_ssl.data.preview import to_image
from fastvit_ssl.data.torch_pipeline import EvalDataset, eval_transform
from fastvit_ssl.eval.encoder import eval_root, load_encoder
from fastvit_ssl.eval.knn import extract_features
from fastvit_ssl.models.vit import VisionTransformer

log = logging.getLogger(__name__)


@torch.no_grad()
def class_attention(encoder: VisionTransformer, images: torch.Tensor) -> torch.Tensor:
    """[B, 3, S, S] -> [B, heads, g, g]: softmax(q_cls k^T / sqrt(d) + bias) of the last block, over the patches."""
    encoder.eval()
    block, seen = encoder.blocks[-1], {}
    handle = block.attn.register_forward_pre_hook(lambda m, args: seen.update(x=args[0], bias=args[1]))
    encoder.forward_tokens(images)
    handle.remove()
    x, bias, attn = seen["x"], seen["bias"], block.attn  # x: (B, T, D), the last block's normed input
    B, T, D = x.shape
    qkv = F.linear(x, attn.qkv.weight, attn.qkv_bias()).float()  # (B, T, 3 D)
    q, k, _ = qkv.view(B, T, 3, attn.num_heads, D // attn.num_heads).unbind(2)
    logits = torch.einsum("bhd,bthd->bht", q[:, 0], k) / (D // attn.num_heads) ** 0.5  # (B, heads, T)
    if bias is not None:
        logits = logits + bias[:, :, 0].float()
    weights = logits.softmax(-1)[:, :, 1:]  # (B, heads, L): the class token's attention to each patch
    return weights.reshape(B, attn.num_heads, encoder.grid, encoder.grid)


def image_files(sources: list[Path], limit: int) -> list[Path]:
    """Files as given, and the images of given folders (sorted, recursively); up to `limit`, spread evenly over
    the list (so that a class-sorted folder gives images of several classes)."""
    files = []
    for source in sources:
        if source.is_dir():
            files += sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        elif source.is_file():
            files.append(source)
        else:
            raise DataError(f"--images {source}: no such file or folder")
    if not files:
        raise DataError(f"--images: no images ({', '.join(IMAGE_EXTENSIONS)}) in {', '.join(map(str, sources))}")
    return files[:: max(1, len(files) // limit)][:limit]


def readable_images(files: list[Path]) -> list[Image.Image]:
    """The images of `files` as RGB; an unreadable file is skipped with a warning that names it, and a DataError
    says when none is left."""
    images = []
    for path in files:
        try:
            images.append(load_rgb(str(path)))
        except UNREADABLE as e:
            log.warning("skipping unreadable image %s (%s: %s)", path, type(e).__name__, e)
    if not images:
        raise DataError(f"--images: none of the {len(files)} file(s) could be read as an image (each named above)")
    return images


def plot_attention(images: torch.Tensor, maps: torch.Tensor, out: Path) -> Path:
    """One row per image: the image, the heads' mean attention over it, each head's attention."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    B, H = maps.shape[:2]
    size = images.shape[-1]
    smooth = maps.shape[-1] >= 8  # coarse grids stay visibly patch-wise
    up = F.interpolate(maps, size=(size, size), mode="bilinear" if smooth else "nearest")  # (B, heads, S, S)
    fig, axes = plt.subplots(B, H + 2, figsize=(1.6 * (H + 2), 1.6 * B), squeeze=False)
    for b in range(B):
        picture = to_image(images[b])
        mean = up[b].mean(0)
        panels = [(picture, None, "image"), (picture, mean, "mean of heads")]
        panels += [(None, up[b, h], f"head {h + 1}") for h in range(H)]
        for ax, (background, heat, title) in zip(axes[b], panels):
            if background is not None:
                ax.imshow(background)
            if heat is not None:
                ax.imshow(heat.numpy(), cmap="inferno", alpha=0.6 if background is not None else 1.0)
            ax.set_xticks([])
            ax.set_yticks([])
            if b == 0:
                ax.set_title(title, fontsize=8)
    fig.suptitle("class-token attention, last block", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def attention_picture(encoder: VisionTransformer, files: list[Path], out: Path) -> Path:
    size, weight = encoder.patch_embed.img_size, next(encoder.parameters())
    images = torch.stack([eval_transform(image, size) for image in readable_images(files)])
    maps = class_attention(encoder, images.to(weight.device, weight.dtype))  # bf16 weights under DeepSpeed
    return plot_attention(images, maps.float().cpu(), out)


def neighbours_picture(
    encoder: VisionTransformer, root: Path, out: Path, k: int = 5, queries: int = 8, gallery: int = 0
) -> Path:
    """Nearest training images of one validation image per class (up to `queries`), searched among all training
    images or, with `gallery`, that many spread evenly over them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    size = encoder.patch_embed.img_size
    train, classes = scan_image_folder(root / "train")
    if gallery and len(train) > gallery:
        train = train[:: len(train) // gallery][:gallery]
    val, _ = scan_image_folder(root / "val", classes)
    first: dict[int, tuple[str, int]] = {}
    for path, label in val:
        first.setdefault(label, (path, label))
    picks = list(first.values())[:queries]  # the first validation image of each class
    device = next(encoder.parameters()).device
    feats, labels = extract_features(encoder, DataLoader(EvalDataset(train, size), batch_size=256), device)
    query_set = EvalDataset(picks, size)
    query_feats, query_labels = extract_features(encoder, DataLoader(query_set, batch_size=256), device)
    sims, idx = (query_feats @ feats.T).topk(min(k, len(train)), dim=1)  # (Q, k)
    fig, axes = plt.subplots(len(picks), k + 1, figsize=(1.6 * (k + 1), 1.7 * len(picks)), squeeze=False)
    for q in range(len(picks)):
        axes[q][0].imshow(to_image(query_set[q][0]))
        axes[q][0].set_title(f"query: {classes[query_labels[q]]}", fontsize=8)
        for j in range(sims.shape[1]):
            i = int(idx[q, j])
            ax = axes[q][j + 1]
            ax.imshow(to_image(eval_transform(load_rgb(train[i][0]), size)))
            same = int(labels[i]) == int(query_labels[q])
            ax.set_title(f"{sims[q, j]:.2f} {classes[labels[i]]}", fontsize=8, color="green" if same else "red")
        for ax in axes[q]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(f"{k} nearest training images (cosine similarity, class)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def run_pictures(encoder: VisionTransformer, root: Path, run_dir: Path) -> list[Path]:
    """The end of a run with labelled data: attention.png (6 validation images) and neighbours.png (among up to
    20,000 training images: seconds on a GPU even for ImageNet)."""
    return [
        attention_picture(encoder, image_files([root / "val"], 6), run_dir / "attention.png"),
        neighbours_picture(encoder, root, run_dir / "neighbours.png", gallery=20_000),
    ]


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="picture", required=True)
    attention = sub.add_parser("attention", help="class-token attention maps")
    attention.add_argument("--images", type=Path, nargs="+", required=True, help="image files or folders")
    attention.add_argument("--max-images", type=int, default=6, help="(default: %(default)s)")
    neighbours = sub.add_parser("neighbours", help="nearest training images of a few validation images")
    neighbours.add_argument("--data", type=Path, help="folder with train/ and val/ (default: the run's data)")
    neighbours.add_argument("--k", type=int, default=5, help="(default: %(default)s)")
    for p in (attention, neighbours):
        p.add_argument("--checkpoint", type=Path, required=True, help="checkpoint, run or DeepSpeed folder")
        p.add_argument("--out", type=Path, required=True, help="a .png file")
    args = parser.parse_args(argv)
    encoder, cfg = load_encoder(args.checkpoint)
    if args.picture == "attention":
        out = attention_picture(encoder, image_files(args.images, args.max_images), args.out)
    else:
        out = neighbours_picture(encoder, eval_root(cfg, args.data), args.out, args.k)
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    from fastvit_ssl.cli import run

    run(main)
