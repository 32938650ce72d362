"""Optimizer choice: AdamW (the ViT recipe), LARS or LAMB, over a method's parameter groups."""

from __future__ import annotations

import torch

from fastvit_ssl.config import OptimConfig
from fastvit_ssl.kernels.dispatch import REFERENCE_OPS, Ops


def build_optimizer(cfg: OptimConfig, groups: list[dict], ops: Ops = REFERENCE_OPS) -> torch.optim.Optimizer:
    """`groups`: [{"params": [...], "decay": bool}] (Method.param_groups). Groups with "decay" get the weight decay
    (the loop moves it when it follows a schedule), the others none; LARS and LAMB also exempt tensors with
    ndim <= 1 themselves. The learning rate starts at 0; the schedule sets it before every step. `ops` picks fused
    LARS/LAMB; AdamW is torch's fused implementation on CUDA."""
    groups = [{**g, "weight_decay": cfg.weight_decay if g["decay"] else 0.0} for g in groups if g["params"]]
    if cfg.name == "adamw":
        fused = all(p.is_cuda for g in groups for p in g["params"])
        return torch.optim.AdamW(groups, lr=0.0, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused or None)
    if cfg.name == "lars":
        return ops.lars(groups, lr=0.0, momentum=cfg.momentum, trust_coefficient=cfg.trust_coefficient)
    return ops.lamb(groups, lr=0.0, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
