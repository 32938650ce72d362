"""Optimizer choice: AdamW (the ViT recipe), LARS or LAMB, over a method's parameter groups."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fastvit_ssl.config import OptimConfig
from fastvit_ssl.optim.lamb import LAMB
from fastvit_ssl.optim.lars import LARS


def build_optimizer(cfg: OptimConfig, groups: list[dict], ops: Mapping | None = None) -> torch.optim.Optimizer:
    """`groups`: Method.param_groups, each with its "lr_scale" and "wd_scale"; the schedules set lr and weight decay
    (times those multipliers) before every step (optim/schedules.set_hyperparameters). LARS and LAMB also exempt
    tensors with ndim <= 1 from decay and trust ratio themselves. `ops` (kernels/dispatch.py) picks fused LARS/LAMB;
    AdamW is torch's fused implementation on CUDA."""
    groups = [{**g, "weight_decay": cfg.weight_decay * g["wd_scale"]} for g in groups if g["params"]]
    if cfg.name == "adamw":
        fused = all(p.is_cuda for g in groups for p in g["params"])
        return torch.optim.AdamW(groups, lr=0.0, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused or None)
    if cfg.name == "lars":
        lars = ops["lars"] if ops else LARS
        return lars(groups, lr=0.0, momentum=cfg.momentum, trust_coefficient=cfg.trust_coefficient)
    lamb = ops["lamb"] if ops else LAMB
    return lamb(groups, lr=0.0, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
