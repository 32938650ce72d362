"""Weighted k-nearest-neighbour classification on frozen features (Wu et al. 2018), the usual SSL monitor."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader


@torch.no_grad()
def extract_features(encoder: nn.Module, loader: DataLoader, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised encoder features [N, D] and labels [N], in eval mode."""
    was_training = encoder.training
    encoder.eval()
    feats, labels = [], []
    for images, y in loader:
        feats.append(F.normalize(encoder(images.to(device)).float(), dim=1).cpu())
        labels.append(y)
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
