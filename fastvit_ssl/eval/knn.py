"""Weighted k-nearest-neighbour classification on frozen features (Wu et al. 2018), the usual SSL monitor.

python -m fastvit_ssl.eval.knn --checkpoint runs/demo [--data ROOT] [--k 20] [--temperature 0.07] [--random-init]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from fastvit_ssl.models.vit import begin_graph_step
from fastvit_ssl.progress import Progress


@torch.no_grad()
def extract_features(
    encoder: nn.Module, loader: DataLoader, device: torch.device, normalize: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Encoder features [N, D] (L2-normalised unless normalize=False) and labels [N], in eval mode; images go in
    the encoder's storage dtype (bf16 weights under DeepSpeed), features come out fp32."""
    was_training = encoder.training
    encoder.eval()
    dtype = next(encoder.parameters()).dtype
    feats, labels = [], []
    progress = Progress("features", len(loader.dataset))
    for images, y in loader:
        begin_graph_step()
        f = encoder(images.to(device, dtype)).float()
        feats.append((F.normalize(f, dim=1) if normalize else f).cpu())
        labels.append(y)
        progress.update(len(y))
    encoder.train(was_training)
    return torch.cat(feats), torch.cat(labels)


def knn_predict(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    k: int,
    temperature: float,
    num_classes: int,
    chunk: int = 1024,
) -> torch.Tensor:
    """Class scores [N_test, C]: each of the k most similar training images votes exp(cos / T) for its class."""
    k = min(k, train_feats.shape[0])
    scores = []
    for start in range(0, test_feats.shape[0], chunk):
        sim = test_feats[start : start + chunk] @ train_feats.T  # (n, N_train)
        top_sim, top_idx = sim.topk(k, dim=1)  # (n, k)
        votes = torch.zeros(sim.shape[0], num_classes, dtype=sim.dtype)
        votes.scatter_add_(1, train_labels[top_idx], (top_sim / temperature).exp())
        scores.append(votes)
    return torch.cat(scores)


def knn_top1(
    encoder: nn.Module,
    train_loader: DataLoader,
    val_loader: DataLoader,
    device: torch.device,
    k: int = 20,
    temperature: float = 0.07,
) -> float:
    """Top-1 accuracy in percent of weighted kNN on `encoder`'s features."""
    train_f, train_y = extract_features(encoder, train_loader, device)
    val_f, val_y = extract_features(encoder, val_loader, device)
    num_classes = int(max(train_y.max(), val_y.max())) + 1
    pred = knn_predict(train_f, train_y, val_f, k, temperature, num_classes).argmax(dim=1)
    return 100.0 * (pred == val_y).float().mean().item()


def main(argv: list[str] | None = None) -> dict:
    import argparse
    import time
    from pathlib import Path

    from fastvit_ssl.data.build import build_eval_data
    from fastvit_ssl.data.folder import scan_image_folder
    from fastvit_ssl.eval.encoder import eval_root, load_encoder, random_encoder
    from fastvit_ssl.eval.report import print_result

    parser = argparse.ArgumentParser(description="Weighted kNN top-1 of a checkpoint's encoder.")
    parser.add_argument("--checkpoint", type=Path, required=True, help="checkpoint, run or DeepSpeed folder")
    parser.add_argument("--data", type=Path, help="folder with train/ and val/ (default: the run's data)")
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--temperature", type=float, default=0.07)
    parser.add_argument("--random-init", action="store_true", help="evaluate a randomly initialised encoder instead")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    encoder, cfg = load_encoder(args.checkpoint)
    if args.random_init:
        encoder = random_encoder(cfg)
    root = eval_root(cfg, args.data)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    eval_data = build_eval_data(cfg, root, *scan_image_folder(root / "train"))
    top1 = knn_top1(encoder.to(device), *eval_data, device, args.k, args.temperature)
    return print_result({"knn_top1": top1, "random_init": args.random_init}, started)


if __name__ == "__main__":
    from fastvit_ssl.cli import run

    run(main)
