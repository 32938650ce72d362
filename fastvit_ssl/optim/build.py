"""Optimizer choice: AdamW (the ViT recipe), LARS or LAMB, over the trainable parameters only."""

from __future__ import annotations

import torch
from torch import nn

from fastvit_ssl.config import OptimConfig
from fastvit_ssl.kernels.dispatch import REFERENCE_OPS, Ops


def build_optimizer(cfg: OptimConfig, model: nn.Module, ops: Ops = REFERENCE_OPS) -> torch.optim.Optimizer:
    """Like the official code, AdamW decays every trained tensor; LARS and LAMB exempt tensors with ndim <= 1.
    The learning rate starts at 0; the schedule sets it before every step. `ops` picks fused LARS/LAMB; AdamW is
    torch's fused implementation on CUDA."""
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.name == "adamw":
        fused = all(p.is_cuda for p in params)
        return torch.optim.AdamW(
            params,
            lr=0.0,
            betas=(cfg.beta1, cfg.beta2),
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            fused=fused or None,
        )
    if cfg.name == "lars":
        return ops.lars(
            params,
            lr=0.0,
            weight_decay=cfg.weight_decay,
            momentum=cfg.momentum,
            trust_coefficient=cfg.trust_coefficient,
        )
    return ops.lamb(params, lr=0.0, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, weight_decay=cfg.weight_decay)
