"""Linear probe of the frozen encoder's features, by one of two published protocols:

    python -m fastvit_ssl.eval.linear --checkpoint runs/demo [--protocol sgd|lars_bn] [--data ROOT] [--random-init]

- `sgd` (MoCo v3's official main_lincls.py; comparable with the MoCo v3 paper's linear numbers): the ViT's Linear
  head alone (N(0, 0.01) init, zero bias), SGD momentum 0.9, no weight decay, lr 3 x batch / 256 (the official ViT
  setting), batch 1024, 90 epochs, cosine stepped once per epoch.
- `lars_bn` (MAE's main_linprobe.py; comparable with MAE-style probes): BatchNorm without affine parameters in
  front of the Linear head, LARS, lr 0.1 x batch / 256, batch 16,384, 90 epochs, cosine per step.
The default is the checkpoint's method's (Method.probe_protocol).

Both train on features extracted once from centre crops and cached (on a CPU this is what makes 90 epochs
affordable; the official scripts re-augment every epoch with random resized crops and flips, which mostly matters
at ImageNet scale). --epochs, --batch and --base-lr override the protocol's values.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
from torch import nn

from fastvit_ssl.data.build import build_eval_data
from fastvit_ssl.data.folder import scan_image_folder
from fastvit_ssl.eval.encoder import eval_root, load_encoder, random_encoder
from fastvit_ssl.eval.knn import extract_features
from fastvit_ssl.eval.report import print_result
from fastvit_ssl.methods.base import method_class
from fastvit_ssl.optim.lars import LARS


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> list[float]:
    top = scores.topk(max(ks), dim=1).indices  # (N, kmax)
    return [100.0 * (top[:, :k] == labels[:, None]).any(dim=1).float().mean().item() for k in ks]


PROTOCOLS = {
    "sgd": dict(epochs=90, batch=1024, base_lr=3.0),
    "lars_bn": dict(epochs=90, batch=16384, base_lr=0.1),
}
FORMER_NAMES = {"mocov3": "sgd", "mae": "lars_bn"}  # --protocol's names before 2026-12-04


def make_head(dim: int, num_classes: int, protocol: str) -> nn.Module:
    """Linear(dim, classes), N(0, 0.01) weights and zero bias; `lars_bn` puts BN without affine parameters before
    it."""
    linear = nn.Linear(dim, num_classes)
    nn.init.normal_(linear.weight, std=0.01)
    nn.init.zeros_(linear.bias)
    if protocol == "sgd":
        return linear
    return nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), linear)


def train_head(
    train_f,
    train_y,
    val_f,
    val_y,
    num_classes: int,
    protocol: str = "sgd",
    epochs: int | None = None,
    batch: int | None = None,
    base_lr: float | None = None,
    seed: int = 0,
) -> tuple[float, float]:
    """(top-1, top-5) in percent of the protocol's head trained on cached features (None: the protocol's value)."""
    torch.manual_seed(seed)
    settings = PROTOCOLS[protocol]
    epochs, base_lr = epochs or settings["epochs"], base_lr or settings["base_lr"]
    batch = min(batch or settings["batch"], len(train_f))  # a small data set: one batch per epoch
    head = make_head(train_f.shape[1], num_classes, protocol)
    lr = base_lr * batch / 256
    opt = (
        torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=0.0)
        if protocol == "sgd"
        else LARS(head.parameters(), lr=lr, momentum=0.9)
    )
    steps_per_epoch = max(1, len(train_f) // batch)
    total = epochs * steps_per_epoch
    generator = torch.Generator().manual_seed(seed)
    for step in range(total):
        if step % steps_per_epoch == 0:
            order = torch.randperm(len(train_f), generator=generator)
        idx = order[(step % steps_per_epoch) * batch :][:batch]
        # cosine per epoch (main_lincls.py's adjust_learning_rate) or per step (MAE)
        progress = (step // steps_per_epoch) / epochs if protocol == "sgd" else step / total
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * progress))
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
    parser.add_argument(
        "--protocol", choices=["auto", *PROTOCOLS, *FORMER_NAMES], default="auto", help="auto: the method's"
    )
    parser.add_argument("--epochs", type=int, help="default: the protocol's (90)")
    parser.add_argument("--batch", type=int, help="default: the protocol's (1024 sgd, 16384 lars_bn)")
    parser.add_argument("--base-lr", type=float, help="default: the protocol's (3.0 sgd, 0.1 lars_bn)")
    parser.add_argument("--random-init", action="store_true", help="probe a randomly initialised encoder instead")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    encoder, cfg = load_encoder(args.checkpoint)
    protocol = FORMER_NAMES.get(args.protocol, args.protocol)
    protocol = protocol if protocol != "auto" else method_class(cfg.method.name).probe_protocol
    if args.random_init:
        encoder = random_encoder(cfg)
    root = eval_root(cfg, args.data)
    train_samples, classes = scan_image_folder(root / "train")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    top1, top5 = linear_probe(
        encoder.to(device),
        build_eval_data(cfg, root, train_samples, classes),
        device,
        len(classes),
        protocol=protocol,
        epochs=args.epochs,
        batch=args.batch,
        base_lr=args.base_lr,
    )
    result = {"linear_top1": top1, "linear_top5": top5, "protocol": protocol, "random_init": args.random_init}
    return print_result(result, started)


if __name__ == "__main__":
    from fastvit_ssl.cli import run

    run(main)
