"""DINO (Caron, Touvron, Misra, Jegou, Mairal, Bojanowski, Joulin 2021; facebookresearch/dino): self-distillation
with no labels.

Each image gives 2 global crops (the ViT's size, scale 0.4-1) and 8 local crops (96 px, scale 0.05-0.4). The
student (ViT + DINO head) sees all crops, the ViT once per resolution; the teacher, an EMA of the student, sees the
2 global ones. Both heads end in K = 65,536 prototypes. Loss, over the pairs (teacher crop i, student crop v != i):
    mean over pairs of mean over images of CE(softmax((t_i - c) / tau_t), log_softmax(s_v / tau_s)),
with c the centre, an EMA (0.9) of the teacher's outputs over the global batch, updated after each loss, and tau_t
warmed up from 0.04 to 0.07 over 30 epochs, tau_s = 0.1. The last layer of the student's head is frozen for the
first epoch (its parameter group follows the "last_layer" schedule: 0, then 1).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fastvit_ssl import distributed
from fastvit_ssl.config import Config, check
from fastvit_ssl.data.augment import ViewAugment
from fastvit_ssl.methods.base import Method, momentum_schedule, register, weight_decay_groups
from fastvit_ssl.methods.ema import ema_update_ref_
from fastvit_ssl.methods.losses import prototype_cross_entropy_ref
from fastvit_ssl.models.build import build_encoder
from fastvit_ssl.models.heads import GlobalBatchNorm1d
from fastvit_ssl.models.vit import VisionTransformer, normalize_uint8
from fastvit_ssl.specs import ARCH_SPECS, encoder_flops

GLOBAL_CROPS = 2


@dataclass
class DinoConfig:
    """The `dino:` section. The global crops' scale is data.min_scale to 1 (DINO: 0.4), their size model.img_size."""

    out_dim: int = 65536  # prototypes K
    hidden_dim: int = 2048  # the head's MLP
    bottleneck_dim: int = 256  # its L2-normalised output, the last layer's input
    norm_last_layer: bool = True  # the last layer's weight-norm gain fixed at 1 (False: trained; safe for ViT-S)
    head_bn: bool = False  # BatchNorm after each hidden layer of the head, global over ranks (its use_bn_in_head)
    local_crops: int = 8
    local_size: int = 96
    local_min_scale: float = 0.05
    local_max_scale: float = 0.4
    student_temp: float = 0.1
    teacher_temp: float = 0.04  # after the warm-up (the recipe: 0.07)
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: int = 0  # the recipe: 30
    center_momentum: float = 0.9
    momentum: float = 0.996  # teacher EMA at the start; rises to 1 on a half-cosine
    freeze_last_layer_epochs: int = 1
    drop_path: float = 0.1  # stochastic depth of the student


class WeightNormLinear(nn.Module):
    """Linear without bias whose weight is g * v / ||v|| row by row (nn.utils.weight_norm's, with its parameter
    names weight_g [out, 1] and weight_v [out, in]); g starts at 1, v at nn.Linear's default."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.weight_v = nn.Parameter(nn.Linear(in_dim, out_dim, bias=False).weight.detach().clone())
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = self.weight_v
        return F.linear(x, self.weight_g * v / v.norm(dim=1, keepdim=True))


class DinoHead(nn.Module):
    """Linear-GELU-Linear-GELU-Linear (hidden 2048, bottleneck 256; with head_bn a BatchNorm before each GELU),
    L2 normalisation, the weight-normalised last layer to K prototypes. MLP weights N(0, 0.02) truncated at +-2 (a
    plain normal), zero biases. Layer indices as the official head's, with or without BatchNorm."""

    def __init__(self, in_dim: int, cfg: DinoConfig):
        super().__init__()
        h, b = cfg.hidden_dim, cfg.bottleneck_dim

        def hidden(width_in: int) -> list[nn.Module]:
            return [nn.Linear(width_in, h), *([GlobalBatchNorm1d(h)] if cfg.head_bn else []), nn.GELU()]

        self.mlp = nn.Sequential(*hidden(in_dim), *hidden(h), nn.Linear(h, b))
        for layer in self.mlp:
            if isinstance(layer, nn.Linear):
                nn.init.trunc_normal_(layer.weight, std=0.02, a=-2.0, b=2.0)
                nn.init.zeros_(layer.bias)
        self.last_layer = WeightNormLinear(b, cfg.out_dim)
        self.last_layer.weight_g.requires_grad_(not cfg.norm_last_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(F.normalize(self.mlp(x), dim=-1))  # (N, K)


def encode_crops(encoder: VisionTransformer, crops: list[torch.Tensor]) -> torch.Tensor:
    """The class-token features of all crops [sum N_i, D], crop-major: one encoder pass per run of consecutive crops
    of one resolution (DINO's MultiCropWrapper)."""
    features, start = [], 0
    while start < len(crops):
        end = start + 1
        while end < len(crops) and crops[end].shape == crops[start].shape:
            end += 1
        features.append(encoder(torch.cat(crops[start:end])))
        start = end
    return torch.cat(features)


class Student(nn.Module):
    """The trained part: encoder on every crop, then the head on all their features at once."""

    def __init__(self, encoder: VisionTransformer, cfg: DinoConfig):
        super().__init__()
        self.encoder, self.head = encoder, DinoHead(encoder.embed_dim, cfg)

    def forward(self, *crops: torch.Tensor) -> torch.Tensor:
        return self.head(encode_crops(self.encoder, list(crops)))  # (V * B, K)


@register
class DINO(Method):
    """Args:
    encoder: the student's ViT (with its drop path); a copy without drop path becomes the teacher's.
    cfg: the `dino:` section.
    loss_fn: prototype_cross_entropy_ref's signature (the reference or the fused kernel).
    ema_fn: in-place EMA with ema_update_ref_'s signature.
    """

    name, section, Config = "dino", "dino", DinoConfig
    model_keys = ("out_dim", "hidden_dim", "bottleneck_dim", "norm_last_layer", "head_bn")
    backbone_name = "online.encoder"
    ema_modules = {"online.encoder": "teacher_encoder", "online.head": "teacher_head"}
    lr_warmup = "linspace"  # its cosine_scheduler
    recipe = "dino_vit_small.yaml"
    suite = (("vit_small", 64, 1.5),)

    def __init__(
        self,
        encoder: VisionTransformer,
        cfg: DinoConfig,
        loss_fn: Callable = prototype_cross_entropy_ref,
        ema_fn: Callable = ema_update_ref_,
    ):
        super().__init__(ema_fn)
        self.cfg, self.loss_fn = cfg, loss_fn
        self.online = Student(encoder, cfg)
        self.teacher_encoder = copy.deepcopy(encoder).requires_grad_(False)
        for block in self.teacher_encoder.blocks:
            block.drop_path_rate = 0.0
        self.teacher_head = copy.deepcopy(self.online.head).requires_grad_(False)
        self.register_buffer("center", torch.zeros(1, cfg.out_dim))

    @classmethod
    def build(cls, cfg: Config, ops) -> DINO:
        encoder = build_encoder(cfg, ops["patch_embed"], drop_path_rate=cfg.dino.drop_path)
        return cls(encoder, cfg.dino, ops["prototype_loss"], ops["ema_update_"])

    @staticmethod
    def validate(cfg: Config) -> None:
        dino, spec = cfg.dino, ARCH_SPECS[cfg.model.arch]
        check(
            [
                (dino.out_dim > 1 and dino.hidden_dim > 0 and dino.bottleneck_dim > 0, "dino head sizes must be > 0"),
                (dino.local_crops >= 0, "dino.local_crops must be >= 0 (0: two global crops only)"),
                (
                    dino.local_crops == 0 or (dino.local_size > 0 and dino.local_size % spec.patch_size == 0),
                    f"dino.local_size={dino.local_size} must be a multiple of {cfg.model.arch}'s patch "
                    f"{spec.patch_size} (DINO: 96 with patches of 16)",
                ),
                (
                    0 < dino.local_min_scale <= dino.local_max_scale <= 1,
                    "dino.local_min_scale <= dino.local_max_scale must lie in (0, 1] (DINO: 0.05 and 0.4)",
                ),
                (
                    min(dino.student_temp, dino.teacher_temp, dino.warmup_teacher_temp) > 0,
                    "dino.student_temp, dino.teacher_temp and dino.warmup_teacher_temp must be > 0",
                ),
                (
                    0 <= dino.warmup_teacher_temp_epochs <= cfg.optim.epochs,
                    "dino.warmup_teacher_temp_epochs must lie in [0, optim.epochs]",
                ),
                (0 <= dino.center_momentum < 1, "dino.center_momentum must lie in [0, 1) (DINO: 0.9)"),
                (0 <= dino.momentum <= 1, "dino.momentum must lie in [0, 1] (DINO: 0.996)"),
                (0 <= dino.drop_path < 1, "dino.drop_path must lie in [0, 1)"),
                (
                    cfg.model.rel_pos_bias == "none",
                    "DINO's local crops need absolute positions: model.rel_pos_bias=none",
                ),
                (cfg.model.global_pool == "token", "DINO's head reads the class token: use model.global_pool=token"),
            ]
        )

    @classmethod
    def views(cls, cfg: Config) -> list:
        """2 global crops (blur always; blur 0.1 and solarize 0.2) and the local ones (blur 0.5), each with flip,
        colour jitter (0.4, 0.4, 0.2, 0.1) p 0.8 and grayscale 0.2, bicubic (DataAugmentationDINO)."""
        d, uint8 = cfg.dino, cfg.data.uint8_views
        crop = dict(uint8=uint8, interpolation="bicubic")
        return [
            ViewAugment(cfg.model.img_size, cfg.data.min_scale, blur_prob=1.0, **crop),
            ViewAugment(cfg.model.img_size, cfg.data.min_scale, blur_prob=0.1, solarize_prob=0.2, **crop),
            *[ViewAugment(d.local_size, d.local_min_scale, d.local_max_scale, blur_prob=0.5, **crop)] * d.local_crops,
        ]

    @classmethod
    def schedules(cls, cfg: Config, total_steps: int) -> dict[str, np.ndarray]:
        """Per iteration: the teacher's momentum (a cosine to 1), its temperature (per epoch: np.linspace over the
        warm-up epochs, then constant, as DINOLoss's teacher_temp_schedule) and the last layer's lr factor (0 for
        the first freeze_last_layer_epochs, then 1)."""
        d = cfg.dino
        epoch = np.arange(total_steps) // (total_steps // cfg.optim.epochs)  # the epoch of every iteration
        warmup = np.linspace(d.warmup_teacher_temp, d.teacher_temp, d.warmup_teacher_temp_epochs)
        per_epoch = np.concatenate([warmup, np.full(cfg.optim.epochs - d.warmup_teacher_temp_epochs, d.teacher_temp)])
        return {
            "momentum": momentum_schedule(d.momentum, True, total_steps),
            "teacher_temp": per_epoch[epoch],
            "last_layer": (epoch >= d.freeze_last_layer_epochs).astype(np.float64),
        }

    @classmethod
    def benchmark_overrides(cls, arch: str, img_size: int) -> list[str]:
        if arch != "vit_demo":
            return []
        small = ["dino.out_dim=1024", "dino.hidden_dim=256", "dino.bottleneck_dim=64"]
        return [*small, f"dino.local_size={img_size // 2 // ARCH_SPECS[arch].patch_size * ARCH_SPECS[arch].patch_size}"]

    @classmethod
    def step_flops(cls, cfg: Config, batch: int, keys: int) -> float:
        """The student on every crop (encoder and head, forward and backward: x3), the teacher on the 2 global
        ones (forward); the loss's softmaxes are not counted."""
        d, D = cfg.dino, ARCH_SPECS[cfg.model.arch].embed_dim
        H, b = d.hidden_dim, d.bottleneck_dim
        head = 2 * batch * (D * H + H * H + H * b + b * d.out_dim)
        global_crop = encoder_flops(cfg.model.arch, cfg.model.img_size, batch) + head
        local_crop = encoder_flops(cfg.model.arch, d.local_size, batch) + head
        return 3 * (GLOBAL_CROPS * global_crop + d.local_crops * local_crop) + GLOBAL_CROPS * global_crop

    def prepare(self, views: list[torch.Tensor], step: int) -> dict:
        return {"views": [normalize_uint8(v) if v.dtype == torch.uint8 else v for v in views]}

    @torch.no_grad()
    def targets(self, batch) -> torch.Tensor:
        """The teacher's prototype logits of the global crops, [2 B, K]."""
        return self.teacher_head(encode_crops(self.teacher_encoder, batch["views"][:GLOBAL_CROPS]))

    def losses(self, outputs, targets, batch) -> dict[str, torch.Tensor]:
        """The loss with the current centre, and its two parts, the paper's signs of collapse (its section 5.3):
        the entropy of the teacher's targets (ln K: uniform collapse; 0: one prototype) and the KL divergence of
        the student from them (0: the student copies a collapsed teacher); loss = entropy + KL. Then the centre
        moves towards this step's teacher mean (global)."""
        c = self.cfg
        temp = batch["hparams"].values["teacher_temp"]
        loss = self.loss_fn(outputs, targets, self.center, c.student_temp, temp, GLOBAL_CROPS)
        with torch.no_grad():
            wide = targets.to(torch.promote_types(targets.dtype, torch.float32))  # bf16 sums in fp32; fp64 stays
            log_q = F.log_softmax((wide - self.center.to(wide.dtype)) / temp, dim=-1)  # (2B, K), the targets
            entropy = -(log_q.exp() * log_q).sum(-1).mean()  # every teacher crop is in as many pairs
            mean = distributed.all_reduce_sum(wide.sum(0, keepdim=True))
            mean = mean / (targets.shape[0] * distributed.world_size())  # (1, K)
            self.center.mul_(c.center_momentum).add_(mean.to(self.center.dtype), alpha=1 - c.center_momentum)
        return {"loss": loss, "loss/teacher_entropy": entropy, "loss/kl": loss.detach() - entropy}

    def param_groups(self) -> list[dict]:
        """The official groups (no weight decay for biases and 1-D tensors), the head's last layer on its own: it
        follows the "last_layer" schedule (frozen for the first epoch)."""
        last = {id(p) for p in self.online.head.last_layer.parameters()}
        groups = weight_decay_groups(self.online)
        for group in groups:
            group["params"] = [p for p in group["params"] if id(p) not in last]
        trained = [p for p in self.online.head.last_layer.parameters() if p.requires_grad]
        return [*groups, {"params": trained, "lr_scale": 1.0, "wd_scale": 1.0, "schedule": "last_layer"}]
