"""End-to-end fine-tuning with the DeiT / MAE recipe MoCo v3 reports: AdamW, layer-wise lr decay, stochastic depth,
mixup / cutmix, label smoothing, linear warm-up then cosine.

    python -m fastvit_ssl.eval.finetune --checkpoint runs/demo [--data ROOT] [--epochs 5] [--random-init]
    python -m fastvit_ssl.eval.finetune --timm-weights deit_small.safetensors --arch vit_small --data ROOT
        (timm / DeiT layout weights; --arch and --img-size say what they are)

Training images get DeiT's augmentations: random resized crop, flip, RandAugment (2 ops, magnitude 9, std 0.5) and
random erasing (p = 0.25), then mixup or cutmix per batch.
"""

from __future__ import annotations

import argparse
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fastvit_ssl.config import ConfigError, load
from fastvit_ssl.data.augment import ViewAugment
from fastvit_ssl.data.folder import first_readable, scan_image_folder
from fastvit_ssl.data.randaugment import rand_augment, random_erase
from fastvit_ssl.data.torch_pipeline import EvalDataset, augment_image, to_normalized_tensor
from fastvit_ssl.eval.encoder import eval_root, load_encoder, random_encoder
from fastvit_ssl.eval.export import from_timm_state_dict
from fastvit_ssl.eval.linear import topk_accuracy
from fastvit_ssl.eval.report import print_result
from fastvit_ssl.methods.base import method_class
from fastvit_ssl.models.build import build_encoder
from fastvit_ssl.models.heads import trunc_normal_linears_
from fastvit_ssl.models.vit import VisionTransformer
from fastvit_ssl.optim.schedules import learning_rate
from fastvit_ssl.progress import Progress


@dataclass
class Recipe:
    epochs: int = 100
    batch: int = 1024
    base_lr: float = 5e-4  # lr = base_lr * batch / 256
    weight_decay: float = 0.05
    layer_decay: float = 0.75  # lr of block i scales by layer_decay^(depth + 1 - i) (main: BEiT's 0.65 for BEiT)
    drop_path: float = 0.1
    mixup: float = 0.8  # Beta(alpha, alpha) mixing of whole images
    cutmix: float = 1.0  # Beta(alpha, alpha) area of a pasted box; each batch uses one of the two
    smoothing: float = 0.1
    randaug_ops: int = 2  # RandAugment "rand-m9-mstd0.5-inc1": 2 operations at magnitude ~N(9, 0.5) of 10
    randaug_m: float = 9.0
    erase_prob: float = 0.25  # random erasing
    warmup_epochs: float = 5
    seed: int = 0
    pool: str = "auto"  # cls: Linear on the encoder's output; cls+mean: SiT's MLP head on [class token, mean of
    # the patch tokens]; auto: cls+mean for SiT checkpoints, else cls (for BEiT the encoder's output is the mean)


class Classifier(nn.Module):
    """Args:
    encoder: the pre-trained ViT.
    num_classes: outputs.
    pool: "cls" (a Linear on the encoder's pooled output, DeiT/MAE) or "cls+mean" (SiT's head: Linear(2D, D),
        GELU, Linear(D, classes) on the class token concatenated with the mean of the patch tokens).
    """

    def __init__(self, encoder: VisionTransformer, num_classes: int, pool: str = "cls"):
        super().__init__()
        self.encoder, self.pool, D = encoder, pool, encoder.embed_dim
        if pool == "cls":
            self.head = nn.Linear(D, num_classes)
            nn.init.trunc_normal_(self.head.weight, std=2e-5)
            nn.init.zeros_(self.head.bias)
        else:
            self.head = trunc_normal_linears_(nn.Sequential(nn.Linear(2 * D, D), nn.GELU(), nn.Linear(D, num_classes)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.pool == "cls":
            return self.head(self.encoder(images))
        tokens = self.encoder.forward_tokens(images)  # (B, 1 + L, D), after the final norm
        return self.head(torch.cat([tokens[:, 0], tokens[:, 1:].mean(dim=1)], dim=1))


class AugmentedImages(Dataset):
    """(image, label): random resized crop, flip, RandAugment, normalisation, random erasing (DeiT's order)."""

    def __init__(self, samples, size: int, recipe: Recipe):
        self.samples, self.recipe, self.epoch = samples, recipe, 0
        self.view = ViewAugment(size, jitter_prob=0.0, grayscale_prob=0.0, blur_prob=0.0, solarize_prob=0.0)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        img, label, _ = first_readable(self.samples, index)
        rng = random.Random(hash((self.recipe.seed, self.epoch, index)))
        img = rand_augment(augment_image(img, self.view, rng), rng, self.recipe.randaug_ops, self.recipe.randaug_m)
        return random_erase(to_normalized_tensor(img), rng, self.recipe.erase_prob), label


def param_groups(model: Classifier, recipe: Recipe, lr: float) -> list[dict]:
    """Layer-wise lr decay (embeddings = layer 0, block i = i + 1, final norm and head = depth + 1); no weight decay
    for biases, norm scales and the class/position tokens."""
    depth = len(model.encoder.blocks)
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        parts = name.split(".")
        layer = (
            int(parts[2]) + 1
            if parts[1] == "blocks"
            else (0 if parts[1] in ("cls_token", "pos_embed", "patch_embed") else depth + 1)
        )
        decay = p.ndim > 1 and "token" not in name and "pos_embed" not in name
        group = groups.setdefault(
            (layer, decay),
            {
                "params": [],
                "weight_decay": recipe.weight_decay if decay else 0.0,
                "lr_scale": recipe.layer_decay ** (depth + 1 - layer),
            },
        )
        group["params"].append(p)
    for group in groups.values():
        group["lr"] = lr * group["lr_scale"]
    return list(groups.values())


def finetuning_layout(cfg) -> dict:
    """How a pre-trained encoder is rebuilt for fine-tuning: its method says (Method.finetuning_layout; e.g. BEiT
    gives every block its own relative position bias, mean pooling and its norm, no [MASK] token)."""
    return method_class(cfg.method.name).finetuning_layout(cfg)


def mix(images: torch.Tensor, targets: torch.Tensor, recipe: Recipe, rng: np.random.Generator):
    """Mixup or cutmix (half of the batches each) with the batch flipped; targets become soft."""
    use_cutmix = recipe.cutmix > 0 and (recipe.mixup == 0 or rng.random() < 0.5)
    lam = rng.beta(recipe.cutmix, recipe.cutmix) if use_cutmix else rng.beta(recipe.mixup, recipe.mixup)
    flipped = images.flip(0)
    if use_cutmix:
        H, W = images.shape[-2:]
        h, w = int(H * math.sqrt(1 - lam)), int(W * math.sqrt(1 - lam))
        cy, cx = rng.integers(H), rng.integers(W)
        y0, y1, x0, x1 = max(cy - h // 2, 0), min(cy + h // 2, H), max(cx - w // 2, 0), min(cx + w // 2, W)
        images = images.clone()
        images[..., y0:y1, x0:x1] = flipped[..., y0:y1, x0:x1]
        lam = 1 - (y1 - y0) * (x1 - x0) / (H * W)
    else:
        images = lam * images + (1 - lam) * flipped
    return images, lam * targets + (1 - lam) * targets.flip(0)


def finetune(
    encoder: VisionTransformer, root: Path, recipe: Recipe, device: torch.device, num_workers: int = 2
) -> dict[str, float]:
    """Train encoder + linear head on root/train, return top-1/top-5 on root/val."""
    torch.manual_seed(recipe.seed)
    samples, classes = scan_image_folder(root / "train")
    model = Classifier(encoder, len(classes), "cls" if recipe.pool == "auto" else recipe.pool).to(device)
    dataset = AugmentedImages(samples, encoder.patch_embed.img_size, recipe)
    loader = DataLoader(
        dataset,
        batch_size=recipe.batch,
        shuffle=True,
        drop_last=True,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(recipe.seed),
    )
    lr = recipe.base_lr * recipe.batch / 256
    optimizer = torch.optim.AdamW(param_groups(model, recipe, lr), lr=lr, betas=(0.9, 0.999))
    rng, step, losses = np.random.default_rng(recipe.seed), 0, []
    progress = Progress("fine-tuning", recipe.epochs * len(loader) * recipe.batch)
    for epoch in range(recipe.epochs):
        dataset.epoch = epoch
        model.train()
        for images, labels in loader:
            scale = learning_rate(step / len(loader), 1.0, recipe.warmup_epochs, recipe.epochs)
            for group in optimizer.param_groups:
                group["lr"] = lr * group["lr_scale"] * scale
            targets = F.one_hot(labels, len(classes)).float() * (1 - recipe.smoothing) + recipe.smoothing / len(classes)
            if recipe.mixup > 0 or recipe.cutmix > 0:
                images, targets = mix(images, targets, recipe, rng)
            loss = torch.sum(-targets.to(device) * F.log_softmax(model(images.to(device)), dim=1), dim=1).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            step += 1
            progress.update(recipe.batch, f"epoch {step / len(loader):.2f} loss {np.mean(losses[-20:]):.4f}")
    return {**evaluate(model, root, classes, device), "first_loss": losses[0], "last_loss": float(np.mean(losses[-5:]))}


@torch.no_grad()
def evaluate(model: Classifier, root: Path, classes: list[str], device: torch.device) -> dict[str, float]:
    model.eval()
    scores, labels = [], []
    val = DataLoader(
        EvalDataset(scan_image_folder(root / "val", classes)[0], model.encoder.patch_embed.img_size), batch_size=256
    )
    for images, y in val:
        scores.append(model(images.to(device)).float().cpu())
        labels.append(y)
    top1, top5 = topk_accuracy(torch.cat(scores), torch.cat(labels), ks=(1, min(5, len(classes))))
    return {"finetune_top1": top1, "finetune_top5": top5}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", type=Path, help="checkpoint, run or DeepSpeed folder")
    source.add_argument("--timm-weights", type=Path, help="a .safetensors file in timm's ViT layout")
    parser.add_argument("--arch", default="vit_base", help="with --timm-weights")
    parser.add_argument("--img-size", type=int, default=224, help="with --timm-weights")
    parser.add_argument("--data", type=Path, help="folder with train/ and val/ (default: the run's data)")
    parser.add_argument("--random-init", action="store_true", help="fine-tune a randomly initialised encoder")
    parser.add_argument(
        "--pretrained-norm",
        choices=["drop", "fc_norm"],
        default="drop",
        help="what mean pooling (MAE's and BEiT's fine-tuning) makes of the pre-trained final norm: drop (the "
        "default) drops it and the norm of the mean, fc_norm, starts at weight 1, bias 0 (BEiT's official "
        "fine-tuning); fc_norm loads it as the norm of the mean",
    )
    for field, default in vars(Recipe()).items():
        if field == "layer_decay":  # its default depends on the checkpoint's method
            parser.add_argument("--layer-decay", type=float, help="default: the method's (0.75, MAE's; BEiT: 0.65)")
        else:
            parser.add_argument(f"--{field.replace('_', '-')}", type=type(default), default=default)
    args = parser.parse_args(argv)
    recipe = Recipe(**{f: getattr(args, f) for f in vars(Recipe()) if getattr(args, f) is not None})
    started = time.perf_counter()
    trainable = {"frozen_patch_embed": False, "drop_path_rate": recipe.drop_path}
    if args.timm_weights:
        from safetensors.torch import load_file

        cfg = load(None, [f"model.arch={args.arch}", f"model.img_size={args.img_size}"])
        encoder = build_encoder(cfg, None, **trainable)
        from_timm_state_dict(encoder, load_file(str(args.timm_weights)), str(args.timm_weights))
    else:
        encoder, cfg = load_encoder(args.checkpoint, finetuning_layout, args.pretrained_norm, **trainable)
    method = method_class(cfg.method.name)
    if args.layer_decay is None:
        recipe.layer_decay = method.finetune_layer_decay
    if args.random_init:
        encoder = random_encoder(cfg, **trainable, **finetuning_layout(cfg))
    if recipe.pool == "auto":
        recipe.pool = method.finetune_pool
    if recipe.pool not in ("cls", "cls+mean"):
        raise ConfigError(f"--pool {recipe.pool!r} must be auto, cls or cls+mean")
    root = eval_root(cfg, args.data)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return print_result({**finetune(encoder, root, recipe, device), "random_init": args.random_init}, started)


if __name__ == "__main__":
    from fastvit_ssl.cli import run

    run(main)
