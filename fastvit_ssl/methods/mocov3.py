"""MoCo v3 (Chen, Xie, He 2021): base encoder + projector + predictor, momentum encoder + projector, symmetric
contrastive loss over keys gathered from all ranks."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from fastvit_ssl import distributed
from fastvit_ssl.config import Config
from fastvit_ssl.kernels.dispatch import REFERENCE_OPS, Ops
from fastvit_ssl.methods.ema import ema_update_ref_
from fastvit_ssl.methods.losses import contrastive_loss_ref
from fastvit_ssl.models.build import build_encoder
from fastvit_ssl.models.heads import predictor, projector


class QueryNetwork(nn.Module):
    """The trained part: base encoder -> projector -> predictor. Engines that wrap the trained parameters (DDP,
    DeepSpeed) wrap this module alone; the momentum networks stay outside, in fp32."""

    def __init__(self, encoder: nn.Module, dim: int, mlp_dim: int):
        super().__init__()
        self.base_encoder = encoder
        self.base_projector = projector(encoder.embed_dim, mlp_dim, dim)
        self.predictor = predictor(dim, mlp_dim)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[N, C, H, W] x 2 -> queries q1, q2 [N, dim]; the heads' BN sees each view on its own."""
        f1, f2 = self.base_encoder(x1), self.base_encoder(x2)  # (N, D) each
        return self.predictor(self.base_projector(f1)), self.predictor(self.base_projector(f2))


class MoCoV3(nn.Module):
    """Args:
    encoder: the base encoder (a VisionTransformer); a copy becomes the momentum encoder.
    dim: output dimension of projector and predictor (256).
    mlp_dim: hidden dimension of both MLPs (4096).
    temperature: softmax temperature tau (0.2 for ViT).
    loss_fn: contrastive loss with contrastive_loss_ref's signature (reference or fused kernel).
    ema_fn: in-place momentum update with ema_update_ref_'s signature (reference or fused kernel).
    """

    def __init__(
        self,
        encoder: nn.Module,
        dim: int = 256,
        mlp_dim: int = 4096,
        temperature: float = 0.2,
        loss_fn: Callable = contrastive_loss_ref,
        ema_fn: Callable = ema_update_ref_,
    ):
        super().__init__()
        self.temperature, self.loss_fn, self.ema_fn = temperature, loss_fn, ema_fn
        self.online = QueryNetwork(encoder, dim, mlp_dim)
        self.momentum_encoder = copy.deepcopy(self.base_encoder).requires_grad_(False)
        self.momentum_projector = copy.deepcopy(self.base_projector).requires_grad_(False)

    @property
    def base_encoder(self) -> nn.Module:
        return self.online.base_encoder

    @property
    def base_projector(self) -> nn.Module:
        return self.online.base_projector

    @property
    def predictor(self) -> nn.Module:
        return self.online.predictor

    def ema_pairs(self) -> list[tuple[nn.Parameter, nn.Parameter]]:
        """(base, momentum) tensor pairs that the EMA moves. Frozen tensors (patch projection, position table) are
        equal by construction and skipped."""
        networks = ((self.base_encoder, self.momentum_encoder), (self.base_projector, self.momentum_projector))
        return [
            (b, m) for base, mom in networks for b, m in zip(base.parameters(), mom.parameters()) if b.requires_grad
        ]

    @torch.no_grad()
    def update_momentum_encoder(self, momentum: float) -> None:
        pairs = self.ema_pairs()
        self.ema_fn([m for _, m in pairs], [b for b, _ in pairs], momentum)

    @torch.no_grad()
    def keys(self, x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Momentum encoder + projector: keys k1, k2 [N, dim], without gradient."""
        g1, g2 = self.momentum_encoder(x1), self.momentum_encoder(x2)
        return self.momentum_projector(g1), self.momentum_projector(g2)

    def loss(self, q1, q2, k1, k2) -> torch.Tensor:
        """ctr(q1, k2) + ctr(q2, k1), keys gathered from all ranks."""
        return self.contrastive(q1, k2) + self.contrastive(q2, k1)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, momentum: float) -> torch.Tensor:
        """x1, x2: [N, C, H, W] two views of the same N images (this rank's share). Returns the scalar loss."""
        q1, q2 = self.online(x1, x2)
        self.update_momentum_encoder(momentum)  # from the weights of the previous step, as the official code
        return self.loss(q1, q2, *self.keys(x1, x2))

    def contrastive(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        keys = distributed.all_gather_cat(k)  # (N * world, dim)
        return self.loss_fn(q, keys, self.temperature, label_offset=q.shape[0] * distributed.rank())


def build_mocov3(cfg: Config, ops: Ops = REFERENCE_OPS) -> MoCoV3:
    """The method with the reference computations, or with the fused kernels of `ops`."""
    return MoCoV3(
        build_encoder(cfg, ops),
        dim=cfg.moco.dim,
        mlp_dim=cfg.moco.mlp_dim,
        temperature=cfg.moco.temperature,
        loss_fn=ops.contrastive_loss,
        ema_fn=ops.ema_update_,
    )
