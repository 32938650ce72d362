"""MoCo v3 (Chen, Xie, He 2021): base encoder + projector + predictor, momentum encoder + projector, symmetric
contrastive loss over keys gathered from all ranks."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from fastvit_ssl.config import Config
from fastvit_ssl.kernels.dispatch import REFERENCE_OPS, Ops
from fastvit_ssl.methods.base import Method
from fastvit_ssl.methods.ema import ema_update_ref_
from fastvit_ssl.methods.losses import contrastive_across_ranks, contrastive_loss_ref
from fastvit_ssl.models.build import build_encoder
from fastvit_ssl.models.heads import predictor, projector
from fastvit_ssl.optim import schedules


def encode_views(encoder: nn.Module, x1: torch.Tensor, x2: torch.Tensor, one_pass: bool) -> list[torch.Tensor]:
    """Features [N, D] of both views: one encoder pass over the 2N images (a ViT has no op across samples, so it
    equals two passes, in half the kernel launches and with twice the rows per matrix product), or one pass per
    view as the official code."""
    if one_pass:
        return list(encoder(torch.cat([x1, x2])).chunk(2))  # (2N, D) -> 2 x (N, D)
    return [encoder(x1), encoder(x2)]


class QueryNetwork(nn.Module):
    """The trained part: base encoder -> projector -> predictor. Engines that wrap the trained parameters (DDP,
    DeepSpeed) wrap this module alone; the momentum networks stay outside, in fp32."""

    def __init__(self, encoder: nn.Module, dim: int, mlp_dim: int):
        super().__init__()
        self.base_encoder = encoder
        self.base_projector = projector(encoder.embed_dim, mlp_dim, dim)
        self.predictor = predictor(dim, mlp_dim)
        self.one_pass = True  # see encode_views

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[N, C, H, W] x 2 -> queries q1, q2 [N, dim]; the heads' BN sees each view on its own."""
        f1, f2 = encode_views(self.base_encoder, x1, x2, self.one_pass)
        return self.predictor(self.base_projector(f1)), self.predictor(self.base_projector(f2))


class MoCoV3(Method):
    """Args:
    encoder: the base encoder (a VisionTransformer); a copy becomes the momentum encoder.
    dim: output dimension of projector and predictor (256).
    mlp_dim: hidden dimension of both MLPs (4096).
    temperature: softmax temperature tau (0.2 for ViT).
    momentum: EMA momentum at the start; with `momentum_cosine` it rises to 1 on a half-cosine.
    loss_fn: contrastive loss with contrastive_loss_ref's signature (reference or fused kernel).
    ema_fn: in-place momentum update with ema_update_ref_'s signature (reference or fused kernel).
    """

    backbone_name = "online.base_encoder"
    ema_modules = {"online.base_encoder": "momentum_encoder", "online.base_projector": "momentum_projector"}

    def __init__(
        self,
        encoder: nn.Module,
        dim: int = 256,
        mlp_dim: int = 4096,
        temperature: float = 0.2,
        momentum: float = 0.99,
        momentum_cosine: bool = True,
        loss_fn: Callable = contrastive_loss_ref,
        ema_fn: Callable = ema_update_ref_,
    ):
        super().__init__(ema_fn)
        self.temperature, self.loss_fn = temperature, loss_fn
        self.base_momentum, self.momentum_cosine = momentum, momentum_cosine
        self.online = QueryNetwork(encoder, dim, mlp_dim)
        self.momentum_encoder = copy.deepcopy(encoder).requires_grad_(False)
        self.momentum_projector = copy.deepcopy(self.online.base_projector).requires_grad_(False)

    def encode_views_in_one_pass(self, enabled: bool) -> None:
        self.online.one_pass = enabled  # the official builder.py: one pass per view

    def momentum(self, epoch: float, epochs: float) -> float:
        return schedules.moco_momentum(epoch, epochs, self.base_momentum, self.momentum_cosine)

    @torch.no_grad()
    def targets(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Momentum encoder + projector: keys k1, k2 [N, dim], from the views the queries see."""
        f1, f2 = encode_views(self.momentum_encoder, *batch["views"][:2], self.online.one_pass)
        return self.momentum_projector(f1), self.momentum_projector(f2)

    def online_inputs(self, batch) -> tuple:
        return tuple(batch["views"][:2])

    def losses(self, outputs, targets, batch) -> dict[str, torch.Tensor]:
        """ctr(q1, k2) + ctr(q2, k1), keys gathered from all ranks."""
        (q1, q2), (k1, k2) = outputs, targets
        ctr, tau = self.loss_fn, self.temperature
        return {"loss": contrastive_across_ranks(ctr, q1, k2, tau) + contrastive_across_ranks(ctr, q2, k1, tau)}


def build_mocov3(cfg: Config, ops: Ops = REFERENCE_OPS) -> MoCoV3:
    """The method with the reference computations, or with the fused kernels of `ops`."""
    return MoCoV3(
        build_encoder(cfg, ops),
        dim=cfg.moco.dim,
        mlp_dim=cfg.moco.mlp_dim,
        temperature=cfg.moco.temperature,
        momentum=cfg.moco.momentum,
        momentum_cosine=cfg.moco.momentum_cosine,
        loss_fn=ops.contrastive_loss,
        ema_fn=ops.ema_update_,
    )
