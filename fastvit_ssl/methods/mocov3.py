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
        self.base_encoder = encoder
        self.base_projector = projector(encoder.embed_dim, mlp_dim, dim)
        self.predictor = predictor(dim, mlp_dim)
        self.momentum_encoder = copy.deepcopy(self.base_encoder).requires_grad_(False)
        self.momentum_projector = copy.deepcopy(self.base_projector).requires_grad_(False)
        # Only trained tensors move; frozen ones (patch projection, position table) are equal by construction.
        pairs = [
            (b, m)
            for base, mom in (
                (self.base_encoder, self.momentum_encoder),
                (self.base_projector, self.momentum_projector),
            )
            for b, m in zip(base.parameters(), mom.parameters())
            if b.requires_grad
        ]
        self._ema_pairs = pairs

    @torch.no_grad()
    def update_momentum_encoder(self, momentum: float) -> None:
        self.ema_fn([m for _, m in self._ema_pairs], [b for b, _ in self._ema_pairs], momentum)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, momentum: float) -> torch.Tensor:
        """x1, x2: [N, C, H, W] two views of the same N images (this rank's share). Returns the scalar loss."""
        f1, f2 = _encode_views(self.base_encoder, x1, x2)  # (N, D) each
        q1 = self.predictor(self.base_projector(f1))  # (N, dim); the heads' BN sees each view on its own
        q2 = self.predictor(self.base_projector(f2))
        with torch.no_grad():
            self.update_momentum_encoder(momentum)
            g1, g2 = _encode_views(self.momentum_encoder, x1, x2)
            k1, k2 = self.momentum_projector(g1), self.momentum_projector(g2)
        return self.contrastive(q1, k2) + self.contrastive(q2, k1)

    def contrastive(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        keys = distributed.all_gather_cat(k)  # (N * world, dim)
        return self.loss_fn(q, keys, self.temperature, label_offset=q.shape[0] * distributed.rank())


def _encode_views(encoder: nn.Module, x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both views in one batched pass when the encoder treats images independently (LayerNorm-only ViT)."""
    if getattr(encoder, "batch_independent", False):
        return encoder(torch.cat([x1, x2])).chunk(2)
    return encoder(x1), encoder(x2)


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
