"""Linear probe: the frozen encoder's features, BN without affine + one linear layer, SGD (or LARS), cosine.

    python -m fastvit_ssl.eval.linear --checkpoint runs/demo [--data ROOT] [--epochs 90] [--random-init]

Features are extracted once from centre crops and cached (on a CPU this is what makes 90 epochs affordable; the
official recipe re-augments every epoch, which mostly matters at ImageNet scale). The lr scales with the batch
(base_lr x batch / 256), as in MoCo v3's linear classification.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
from torch import nn

from fastvit_ssl.data.build import build_eval_data, resolve_root
from fastvit_ssl.data.folder import labelled_root, scan_image_folder
from fastvit_ssl.eval.encoder import load_encoder, random_encoder
from fastvit_ssl.eval.knn import extract_features
from fastvit_ssl.eval.report import print_result
from fastvit_ssl.optim.lars import LARS


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> list[float]:
    top = scores.topk(max(ks), dim=1).indices  # (N, kmax)
    return [100.0 * (top[:, :k] == labels[:, None]).any(dim=1).float().mean().item() for k in ks]


def train_head(
    train_f,
    train_y,
    val_f,
    val_y,
    num_classes: int,
    epochs: int = 90,
    batch: int = 256,
    base_lr: float = 0.1,
    optimizer: str = "sgd",
    seed: int = 0,
) -> tuple[float, float]:
    """(top-1, top-5) in percent of BN + linear trained on cached features."""
    torch.manual_seed(seed)
    head = nn.Sequential(
        nn.BatchNorm1d(train_f.shape[1], affine=False, eps=1e-6), nn.Linear(train_f.shape[1], num_classes)
    )
    nn.init.normal_(head[1].weight, std=0.01)
    nn.init.zeros_(head[1].bias)
    lr = base_lr * batch / 256
    opt = (
        LARS(head.parameters(), lr=lr, momentum=0.9)
        if optimizer == "lars"
        else torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9)
    )
    steps_per_epoch = max(1, len(train_f) // batch)
    total = epochs * steps_per_epoch
    generator = torch.Generator().manual_seed(seed)
    for step in range(total):
        if step % steps_per_epoch == 0:
            order = torch.randperm(len(train_f), generator=generator)
        idx = order[(step % steps_per_epoch) * batch :][:batch]
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
        loss = nn.functional.cross_entropy(head(train_f[idx]), train_y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    head.eval()
    with torch.no_grad():
        return tuple(topk_accuracy(head(val_f), val_y, ks=(1, min(5, num_classes))))


def linear_probe(encoder, eval_data, device, num_classes: int, **kwargs) -> tuple[float, float]:
    train_f, train_y = extract_features(encoder, eval_data[0], device, normalize=False)
    val_f, val_y = extract_features(encoder, eval_data[1], device, normalize=False)
    return train_head(train_f, train_y, val_f, val_y, num_classes, **kwargs)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True, help="checkpoint, run or DeepSpeed folder")
    parser.add_argument("--data", type=Path, help="folder with train/ and val/ (default: the run's data)")
    parser.add_argument("--epochs", type=int, default=90)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--base-lr", type=float, default=0.1)
    parser.add_argument("--optimizer", choices=["sgd", "lars"], default="sgd")
    parser.add_argument("--random-init", action="store_true", help="probe a randomly initialised encoder instead")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    encoder, cfg = load_encoder(args.checkpoint)
    if args.random_init:
        encoder = random_encoder(cfg)
    root = labelled_root(args.data or resolve_root(cfg))
    train_samples, classes = scan_image_folder(root / "train")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    top1, top5 = linear_probe(
        encoder.to(device),
        build_eval_data(cfg, root, train_samples, classes),
        device,
        len(classes),
        epochs=args.epochs,
        batch=args.batch,
        base_lr=args.base_lr,
        optimizer=args.optimizer,
    )
    return print_result({"linear_top1": top1, "linear_top5": top5, "random_init": args.random_init}, started)


if __name__ == "__main__":
    from fastvit_ssl.cli import run

    run(main)
