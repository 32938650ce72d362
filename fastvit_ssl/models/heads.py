"""MoCo v3 projector and predictor: Linear (no bias) -> BN -> ReLU blocks, a BN without affine at the end."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks whose backward is again a sum over ranks: the gradient of the sum of all ranks' losses."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d whose batch statistics cover the global batch of all ranks (sync-BN).

    torch's SyncBatchNorm only runs on GPUs; this one all-reduces through autograd, so it also runs with gloo on
    CPUs, and single-process it is exactly BatchNorm1d. Two passes (mean, then centred squares) keep the variance
    as accurate as BatchNorm1d's.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        count = x.shape[0] * dist.get_world_size()
        mean = _AllReduceSum.apply(x.sum(dim=0)) / count  # (C,)
        var = _AllReduceSum.apply((x - mean).square().sum(dim=0)) / count  # biased, as used for normalising
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                self.running_mean.lerp_(mean, self.momentum)
                self.running_var.lerp_(var * count / max(count - 1, 1), self.momentum)
        y = (x - mean) * torch.rsqrt(var + self.eps)
        return y * self.weight + self.bias if self.affine else y


def build_mlp(num_layers: int, in_dim: int, hidden_dim: int, out_dim: int, last_bn: bool = True) -> nn.Sequential:
    """`num_layers` Linear layers; BN + ReLU between them, and BN(affine=False) after the last when `last_bn`."""
    layers: list[nn.Module] = []
    for i in range(num_layers):
        last = i == num_layers - 1
        layers.append(nn.Linear(in_dim if i == 0 else hidden_dim, out_dim if last else hidden_dim, bias=False))
        if not last:
            layers += [GlobalBatchNorm1d(hidden_dim), nn.ReLU(inplace=True)]
        elif last_bn:
            layers.append(GlobalBatchNorm1d(out_dim, affine=False))
    return nn.Sequential(*layers)


def projector(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """MoCo v3's 3-layer projection MLP for ViTs."""
    return build_mlp(3, in_dim, hidden_dim, out_dim)


def predictor(dim: int, hidden_dim: int) -> nn.Sequential:
    """MoCo v3's 2-layer prediction MLP (with the final BN, as the official ViT builder has it)."""
    return build_mlp(2, dim, hidden_dim, dim)
