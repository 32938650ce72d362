"""SiT (Ahmed, Atito, Kittler 2021, with the momentum teacher of the official code at HEAD): group-masked model
learning + contrastive learning.

The student sees both views corrupted (GMML, data/gmml.py) in one batch: its class token goes through the
contrastive head, its patch tokens through the reconstruction head back to pixels. The teacher, an EMA of the
student's encoder and contrastive head, sees the clean views. Loss:
    ctr(s1, t2) + ctr(s2, t1) + lambda * mean |reconstruction - clean| over the corrupted pixels of both views,
with ctr MoCo v3's 2-tau-scaled InfoNCE over teacher outputs gathered from all ranks.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from fastvit_ssl import distributed
from fastvit_ssl.config import Config, SitConfig
from fastvit_ssl.data.gmml import Draws, corrupt, generator, replace_from_batch, take_rounds_ref
from fastvit_ssl.kernels.dispatch import REFERENCE_OPS, Ops
from fastvit_ssl.methods.base import Method
from fastvit_ssl.methods.ema import ema_update_ref_
from fastvit_ssl.methods.losses import contrastive_across_ranks, contrastive_loss_ref
from fastvit_ssl.models.build import build_encoder
from fastvit_ssl.models.heads import ReconstructionHead, sit_contrastive_head
from fastvit_ssl.models.vit import VisionTransformer, normalize_uint8
from fastvit_ssl.optim import schedules


class Student(nn.Module):
    """The trained part: encoder -> contrastive head on the class token, reconstruction head on the patch tokens."""

    def __init__(self, encoder: VisionTransformer, dim: int, mlp_dim: int):
        super().__init__()
        self.encoder = encoder
        self.head = sit_contrastive_head(encoder.embed_dim, mlp_dim, dim)
        self.recon_head = ReconstructionHead(encoder.embed_dim, encoder.patch_embed.patch_size)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[2B, C, H, W] corrupted views -> (contrastive outputs [2B, dim], reconstructions [2B, C, H, W])."""
        tokens = self.encoder.forward_tokens(images)  # (2B, 1 + L, D), after the final norm
        return self.head(tokens[:, 0]), self.recon_head(tokens[:, 1:])


class SiT(Method):
    """Args:
    encoder: the student's encoder (drop path on); the teacher's is a copy without drop path.
    cfg: the `sit` config section (heads, temperature, momentum, corruption, lambda).
    seed: the run's seed; each step's corruption is drawn from (seed, step).
    loss_fn: contrastive loss with contrastive_loss_ref's signature (reference or fused kernel).
    ema_fn: in-place EMA with ema_update_ref_'s signature (reference or fused kernel).
    take_rounds: GMML's rectangle rounds, take_rounds_ref or its kernel.
    """

    backbone_name = "online.encoder"
    lr_warmup = "linspace"  # its cosine_scheduler: np.linspace(0, lr, warm-up iterations)
    ema_modules = {"online.encoder": "teacher_encoder", "online.head": "teacher_head"}

    def __init__(
        self,
        encoder: VisionTransformer,
        cfg: SitConfig,
        seed: int = 0,
        loss_fn: Callable = contrastive_loss_ref,
        ema_fn: Callable = ema_update_ref_,
        take_rounds: Callable = take_rounds_ref,
    ):
        super().__init__(ema_fn)
        self.cfg, self.seed, self.loss_fn, self.take_rounds = cfg, seed, loss_fn, take_rounds
        self.online = Student(encoder, cfg.dim, cfg.mlp_dim)
        self.teacher_encoder = copy.deepcopy(encoder).requires_grad_(False)
        for block in self.teacher_encoder.blocks:
            block.drop_path_rate = 0.0
        self.teacher_head = copy.deepcopy(self.online.head).requires_grad_(False)

    def momentum(self, epoch: float, epochs: float) -> float:
        return schedules.moco_momentum(epoch, epochs, self.cfg.momentum, self.cfg.momentum_cosine)

    def corrupt(self, clean: torch.Tensor, draws: Draws, noise: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """One view [B, C, H, W] -> (corrupted, mask [B, H, W]): GMML, then SiT's replacement from the batch."""
        c = self.cfg
        fill_noise = noise if c.corrupt_fill == "noise" else None
        corrupted, mask = corrupt(
            clean, draws, c.corrupt_fraction, c.corrupt_fill, None, c.max_side, 1, fill_noise, self.take_rounds
        )
        return replace_from_batch(
            clean, corrupted, mask, draws, c.replace_prob, c.replace_fraction, c.max_side, 1, self.take_rounds
        )

    def prepare(self, views: list[torch.Tensor], step: int) -> dict[str, torch.Tensor]:
        """Both views, clean and corrupted, each as one [2B, ...] batch (BN statistics cover both views). The
        corruption of step `step` comes from (run seed, step): the same after a resume, and for an image the same
        whatever the number of ranks (see data/gmml.py)."""
        clean = [normalize_uint8(v) if v.dtype == torch.uint8 else v for v in views[:2]]
        B, device, rank, world = clean[0].shape[0], clean[0].device, distributed.rank(), distributed.world_size()
        shared = generator(device, (self.seed << 32) + step)
        noise = generator(device, (self.seed << 32) + step + (rank + 1 << 48))
        draws = Draws(shared, offset=rank * B, total=world * B, device=device)
        corrupted, masks = zip(*(self.corrupt(v, draws, noise) for v in clean))
        return {"clean": torch.cat(clean), "corrupted": torch.cat(corrupted), "mask": torch.cat(masks)}

    def online_inputs(self, batch) -> tuple:
        return (batch["corrupted"],)

    @torch.no_grad()
    def targets(self, batch) -> torch.Tensor:
        """The teacher's contrastive outputs [2B, dim] for the clean views."""
        return self.teacher_head(self.teacher_encoder(batch["clean"]))

    def losses(self, outputs, targets, batch) -> dict[str, torch.Tensor]:
        (z, recon), (t1, t2) = outputs, targets.chunk(2)
        s1, s2 = z.chunk(2)
        ctr, tau = self.loss_fn, self.cfg.temperature
        contrastive = contrastive_across_ranks(ctr, s1, t2, tau) + contrastive_across_ranks(ctr, s2, t1, tau)
        err = (recon - batch["clean"]).abs()  # (2B, C, H, W), fp32 or wider (a bf16 recon promotes)
        mask = batch["mask"][:, None].to(err.dtype)  # (2B, 1, H, W)
        # global: the mean over the corrupted pixels of the global batch; ranks average their losses, so each rank
        # divides by the global count over the number of ranks (one process computes the same mean as many).
        # per_rank: each rank's own mean, as the official code (DDP then averages).
        count = mask.sum().detach() * err.shape[1]
        if self.cfg.loss_reduction == "global":
            count = distributed.all_reduce_mean(count)
        reconstruction = (err * mask).sum() / count.clamp_min(1.0)
        return {
            "loss": contrastive + self.cfg.recon_weight * reconstruction,
            "loss/contrastive": contrastive.detach(),
            "loss/reconstruction": reconstruction.detach(),
        }

    def param_groups(self) -> list[dict]:
        """As the official code (DINO's groups): no weight decay for biases and 1-D tensors."""
        trained = [(n, p) for n, p in self.online.named_parameters() if p.requires_grad]
        plain = [p for n, p in trained if n.endswith(".bias") or p.ndim == 1]
        ids = {id(p) for p in plain}
        return [
            {"params": [p for _, p in trained if id(p) not in ids], "decay": True},
            {"params": plain, "decay": False},
        ]

    @torch.no_grad()
    def pictures(self, images: torch.Tensor, path: Path) -> bool:
        """Rows of clean, corrupted and reconstructed images (the same corruption every time)."""
        from fastvit_ssl.data.preview import plot_grid

        was_training = self.training
        self.eval()
        seeded = torch.Generator(images.device).manual_seed(self.seed)
        corrupted, _ = self.corrupt(images, Draws(seeded), seeded)
        recon = self.online(corrupted)[1].float()
        self.train(was_training)
        rows = {"clean": images, "corrupted": corrupted, "reconstructed": recon}
        plot_grid({k: list(v.cpu()) for k, v in rows.items()}, path, by_rows=True)
        return True


def build_sit(cfg: Config, ops: Ops = REFERENCE_OPS) -> SiT:
    encoder = build_encoder(cfg, ops, drop_path_rate=cfg.sit.drop_path)
    return SiT(encoder, cfg.sit, cfg.run.seed, ops.contrastive_loss, ops.ema_update_, ops.take_rounds)
