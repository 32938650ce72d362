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
    """BatchNorm1d whose batch statistics cover the global batch of all ranks (sync-BN), computed in fp32.

    torch's SyncBatchNorm only runs on GPUs; this one all-reduces through autograd, so it also runs with gloo on
    CPUs, and single-process it computes what BatchNorm1d does. Two passes (mean, then centred squares) keep the
    variance as accurate as BatchNorm1d's. Whatever the input's and the parameters' storage (bf16 parameters with
    fp32 running statistics under DeepSpeed), statistics and normalisation run in fp32 (fp64 for fp64 inputs), as
    autocast runs BN, and the output has the input's dtype.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, C), or (V, N, C): V groups (the views of a step) each normalised over its own N rows, running
        statistics updated group after group: what V calls on (N, C) compute, in one pass."""
        x32 = x.to(torch.promote_types(x.dtype, torch.float32))
        if self.training or not self.track_running_stats:
            world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
            all_sum = _AllReduceSum.apply if world > 1 else lambda t: t
            count = x.shape[-2] * world
            mean = all_sum(x32.sum(dim=-2, keepdim=True)) / count  # (V, 1, C) or (1, C)
            var = all_sum((x32 - mean).square().sum(dim=-2, keepdim=True)) / count  # biased, as used for normalising
            if self.training and self.track_running_stats:
                unbiased = var.detach() * count / max(count - 1, 1)
                for group_mean, group_var in zip(mean.detach().flatten(0, -2), unbiased.flatten(0, -2)):
                    self._update_running_stats(group_mean, group_var)
        else:
            mean, var = self.running_mean.to(x32.dtype), self.running_var.to(x32.dtype)
        y = (x32 - mean) * torch.rsqrt(var + self.eps)
        if self.affine:
            y = y * self.weight.to(x32.dtype) + self.bias.to(x32.dtype)
        return y.to(x.dtype)

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, unbiased_var: torch.Tensor) -> None:
        self.num_batches_tracked.add_(1)
        momentum = self.momentum if self.momentum is not None else 1.0 / self.num_batches_tracked.item()
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
        self.running_var.lerp_(unbiased_var.to(self.running_var.dtype), momentum)


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


def trunc_normal_linears_(module: nn.Module) -> nn.Module:
    """DeiT's/SiT's init of a head: every Linear N(0, 0.02) truncated at +-2, biases zero."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02, a=-2.0, b=2.0)
            nn.init.zeros_(m.bias)
    return module


def sit_contrastive_head(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """SiT's contrastive head: Linear-BN-ReLU, Linear-BN-GELU, Linear-BN(affine=False), with biases; no predictor."""
    return trunc_normal_linears_(
        nn.Sequential(
            nn.Linear(in_dim, hidden_dim),
            GlobalBatchNorm1d(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, hidden_dim),
            GlobalBatchNorm1d(hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, out_dim),
            GlobalBatchNorm1d(out_dim, affine=False),
        )
    )


class ReconstructionHead(nn.Module):
    """SiT's pixel head: three Linear(D, D) + GELU on every patch token, then a per-patch linear map to its P x P x C
    pixels (a transposed convolution with kernel and stride P), [B, L, D] -> [B, C, H, W]."""

    def __init__(self, dim: int, patch_size: int, in_chans: int = 3):
        super().__init__()
        layers = []
        for _ in range(3):
            layers += [nn.Linear(dim, dim), nn.GELU()]
        self.mlp = trunc_normal_linears_(nn.Sequential(*layers))
        self.to_pixels = nn.ConvTranspose2d(dim, in_chans, kernel_size=patch_size, stride=patch_size)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        B, L, D = tokens.shape
        grid = int(L**0.5)
        x = self.mlp(tokens).transpose(1, 2).reshape(B, D, grid, grid)  # (B, D, h, w)
        return self.to_pixels(x)  # (B, C, h * P, w * P)
