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
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

from fastvit_ssl import distributed
from fastvit_ssl.config import Config, check, check_contrastive_dim
from fastvit_ssl.data.augment import moco_v3_views
from fastvit_ssl.data.gmml import Draws, corrupt, generator, replace_from_batch, take_rounds_ref
from fastvit_ssl.methods.base import Method, momentum_schedule, register, weight_decay_groups
from fastvit_ssl.methods.ema import ema_update_ref_
from fastvit_ssl.methods.losses import contrastive_across_ranks, contrastive_loss_ref
from fastvit_ssl.models.build import build_encoder
from fastvit_ssl.models.heads import ReconstructionHead, sit_contrastive_head
from fastvit_ssl.models.vit import VisionTransformer, normalize_uint8
from fastvit_ssl.specs import ARCH_SPECS, encoder_flops


@dataclass
class SitConfig:
    """The `sit:` section: group-masked model learning + contrastive learning against a momentum teacher."""

    dim: int = 256  # output of the contrastive head
    mlp_dim: int = 4096  # hidden width of the contrastive head
    temperature: float = 0.2
    momentum: float = 0.996  # teacher EMA at the start; rises to 1 on a half-cosine when momentum_cosine
    momentum_cosine: bool = True
    recon_weight: float = 1.0  # lambda of the reconstruction loss (the official README uses 5 on small data)
    corrupt_fraction: float = 0.5  # each view: random rectangles until at least this fraction is covered
    corrupt_fill: Literal["zeros", "noise", "self"] = "zeros"  # self: content from elsewhere in the same image
    max_side: float = 0.3  # rectangle sides from 1 pixel to below this fraction of the image side
    replace_prob: float = 0.5  # per image, the corruption is instead...
    replace_fraction: float = 0.3  # ...this fraction replaced by the same regions of another image of the batch
    drop_path: float = 0.1  # stochastic depth of the student
    # the reconstruction loss over ranks: global (the masked pixels of the global batch, whatever the number of
    # ranks) or per_rank (each rank's own mean, averaged over ranks, as the official code with DDP)
    loss_reduction: Literal["global", "per_rank"] = "global"


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


@register
class SiT(Method):
    """Args:
    encoder: the student's encoder (drop path on); the teacher's is a copy without drop path.
    cfg: the `sit` config section (heads, temperature, momentum, corruption, lambda).
    seed: the run's seed; each step's corruption is drawn from (seed, step).
    loss_fn: contrastive loss with contrastive_loss_ref's signature (reference or fused kernel).
    ema_fn: in-place EMA with ema_update_ref_'s signature (reference or fused kernel).
    take_rounds: GMML's rectangle rounds, take_rounds_ref or its kernel.
    """

    name, section, Config = "sit", "sit", SitConfig
    model_keys = ("dim", "mlp_dim")
    backbone_name = "online.encoder"
    lr_warmup = "linspace"  # its cosine_scheduler: np.linspace(0, lr, warm-up iterations)
    ema_modules = {"online.encoder": "teacher_encoder", "online.head": "teacher_head"}
    finetune_pool = "cls+mean"  # SiT's fine-tuning head reads the class token and the mean of the patch tokens
    recipe = "sit_vit_small.yaml"
    suite = (("vit_small", 128, 1.5),)

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

    @classmethod
    def build(cls, cfg: Config, ops) -> SiT:
        encoder = build_encoder(cfg, ops["patch_embed"], drop_path_rate=cfg.sit.drop_path)
        return cls(encoder, cfg.sit, cfg.run.seed, ops["contrastive_loss"], ops["ema_update_"], ops["take_rounds"])

    @staticmethod
    def validate(cfg: Config) -> None:
        sit, side = cfg.sit, cfg.model.img_size
        check(
            [
                (sit.dim > 0 and sit.mlp_dim > 0, "sit.dim and sit.mlp_dim must be positive"),
                (sit.temperature > 0, "sit.temperature must be positive (SiT uses 0.2)"),
                (0 <= sit.momentum <= 1, "sit.momentum must lie in [0, 1] (SiT uses 0.996)"),
                (sit.recon_weight >= 0, "sit.recon_weight must be >= 0"),
                (0 < sit.corrupt_fraction < 1, "sit.corrupt_fraction must lie in (0, 1) (SiT uses 0.5)"),
                (0 <= sit.replace_prob <= 1, "sit.replace_prob must lie in [0, 1]"),
                (0 < sit.replace_fraction < 1, "sit.replace_fraction must lie in (0, 1) (SiT uses 0.3)"),
                (0 <= sit.drop_path < 1, "sit.drop_path must lie in [0, 1)"),
                (
                    1 < int(side * sit.max_side) < side,
                    f"sit.max_side={sit.max_side} of a {side}px image must allow rectangles of 1 to "
                    f"{int(side * sit.max_side) - 1} pixels; use a larger value or model.img_size",
                ),
                (cfg.model.global_pool == "token", "SiT reads the class token: use model.global_pool=token"),
                (
                    not ARCH_SPECS[cfg.model.arch].conv_stem,
                    "SiT reconstructs patches: use an arch without the conv stem",
                ),
            ]
        )
        check_contrastive_dim(cfg, "sit", sit.dim)

    @classmethod
    def views(cls, cfg: Config) -> list:
        return moco_v3_views(cfg.model.img_size, cfg.data.min_scale, 2, cfg.data.uint8_views, cfg.data.interpolation)

    @classmethod
    def schedules(cls, cfg: Config, total_steps: int) -> dict[str, np.ndarray]:
        """The teacher's momentum: its cosine_scheduler(m, 1), per iteration (or constant)."""
        return {"momentum": momentum_schedule(cfg.sit.momentum, cfg.sit.momentum_cosine, total_steps)}

    @classmethod
    def benchmark_overrides(cls, arch: str, img_size: int) -> list[str]:
        return ["sit.dim=128", "sit.mlp_dim=1024"] if arch == "vit_demo" else []

    @classmethod
    def step_flops(cls, cfg: Config, batch: int, keys: int) -> float:
        """Both views in one batch: the student (encoder, contrastive head Gc, pixel head R) forward and backward
        (x3), the teacher (encoder + Gc) forward, the loss's logits both ways."""
        spec, H, d = ARCH_SPECS[cfg.model.arch], cfg.sit.mlp_dim, cfg.sit.dim
        T, D, P = (cfg.model.img_size // spec.patch_size) ** 2 + 1, spec.embed_dim, spec.patch_size
        encoder = encoder_flops(cfg.model.arch, cfg.model.img_size, batch)
        head = 2 * batch * (D * H + H * H + H * d)
        pixels = 2 * batch * (T - 1) * (3 * D * D + 3 * D * P * P)
        return 2 * (3 * (encoder + head + pixels) + encoder + head) + 2 * 3 * 2 * batch * keys * d

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
        return weight_decay_groups(self.online)

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
