"""MoCo v3 (Chen, Xie, He 2021): base encoder + projector + predictor, momentum encoder + projector, symmetric
contrastive loss over keys gathered from all ranks.

Its official checkpoints (facebookresearch/moco-v3) both ways: main_moco.py saves {"epoch", "arch", "state_dict",
"optimizer", "scaler"}, the model under DDP's `module.`: base_encoder (a timm ViT whose `head` is the projector),
predictor, momentum_encoder (whose `head` is the momentum projector). Ours holds the same tensors under other names;
the map is exact, BN statistics included. Every evaluation reads such a file where it reads ours, `train.py
run.init_from=FILE` starts from its weights, and `python -m fastvit_ssl.eval.export --format official` writes one
that the official main_lincls.py (--pretrained) and convert_to_deit.py read.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fastvit_ssl.checkpoint import CheckpointError
from fastvit_ssl.config import Config, check, check_contrastive_dim, load, register_alias
from fastvit_ssl.data.augment import moco_v3_views
from fastvit_ssl.methods.base import Method, momentum_schedule, register
from fastvit_ssl.methods.ema import ema_update_ref_
from fastvit_ssl.methods.losses import contrastive_across_ranks, contrastive_loss_ref
from fastvit_ssl.models.build import build_encoder
from fastvit_ssl.models.heads import predictor, projector
from fastvit_ssl.specs import ARCH_SPECS, encoder_flops


@dataclass
class MocoConfig:
    """The `moco:` section."""

    dim: int = 256  # output of projector and predictor
    mlp_dim: int = 4096  # hidden width of both MLPs
    temperature: float = 0.2
    momentum: float = 0.99  # start value; rises to 1 on a half-cosine when momentum_cosine
    momentum_cosine: bool = True


register_alias("model", "init", "mocov3", "xavier")  # model.init's name for MoCo v3's init before 2026-12-04

OFFICIAL_ARCHS = ("vit_small", "vit_base", "vit_conv_small", "vit_conv_base")  # its vits.py, at 224 px
OFFICIAL_NAMES = [  # official (after `module.`) -> ours; the heads first, they sit inside the encoders there
    ("base_encoder.head.", "online.base_projector."),
    ("base_encoder.", "online.base_encoder."),
    ("predictor.", "online.predictor."),
    ("momentum_encoder.head.", "momentum_projector."),
    ("momentum_encoder.", "momentum_encoder."),
]


def encode_views(
    encoder: nn.Module, head: Callable, x1: torch.Tensor, x2: torch.Tensor, one_pass: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """head(encoder(x)) [N, dim] of both views: one pass over the 2N images, in half the kernel launches and with
    twice the rows per matrix product (a ViT has no op across samples; the head sees (2, N, C) and its BN normalises
    each view over its own N rows), equal to one pass per view, as the official code runs it."""
    if one_pass:
        z = head(encoder(torch.cat([x1, x2])).unflatten(0, (2, -1)))  # (2N, D) -> (2, N, D) -> (2, N, dim)
        return z[0], z[1]
    return head(encoder(x1)), head(encoder(x2))


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
        return encode_views(self.base_encoder, self.heads, x1, x2, self.one_pass)

    def heads(self, features: torch.Tensor) -> torch.Tensor:
        return self.predictor(self.base_projector(features))


@register
class MoCoV3(Method):
    """Args:
    encoder: the base encoder (a VisionTransformer); a copy becomes the momentum encoder.
    dim: output dimension of projector and predictor (256).
    mlp_dim: hidden dimension of both MLPs (4096).
    temperature: softmax temperature tau (0.2 for ViT).
    loss_fn: contrastive loss with contrastive_loss_ref's signature (reference or fused kernel).
    ema_fn: in-place momentum update with ema_update_ref_'s signature (reference or fused kernel).
    """

    name, section, Config = "mocov3", "moco", MocoConfig
    model_keys = ("dim", "mlp_dim")
    backbone_name = "online.base_encoder"
    ema_modules = {"online.base_encoder": "momentum_encoder", "online.base_projector": "momentum_projector"}
    probe_protocol = "sgd"  # main_lincls.py's
    recipe = "vit_base.yaml"
    suite = (("vit_small", 256, 1.4), ("vit_base", 128, 1.5), ("vit_large", 64, 1.4))

    def __init__(
        self,
        encoder: nn.Module,
        dim: int = 256,
        mlp_dim: int = 4096,
        temperature: float = 0.2,
        loss_fn: Callable = contrastive_loss_ref,
        ema_fn: Callable = ema_update_ref_,
    ):
        super().__init__(ema_fn)
        self.temperature, self.loss_fn = temperature, loss_fn
        self.online = QueryNetwork(encoder, dim, mlp_dim)
        self.momentum_encoder = copy.deepcopy(encoder).requires_grad_(False)
        self.momentum_projector = copy.deepcopy(self.online.base_projector).requires_grad_(False)

    def encode_views_in_one_pass(self, enabled: bool) -> None:
        self.online.one_pass = enabled  # the official builder.py: one pass per view

    @classmethod
    def build(cls, cfg: Config, ops) -> MoCoV3:
        """The method with the reference computations, or with the fused kernels of `ops`."""
        moco = cfg.moco
        encoder = build_encoder(cfg, ops["patch_embed"])
        return cls(encoder, moco.dim, moco.mlp_dim, moco.temperature, ops["contrastive_loss"], ops["ema_update_"])

    @staticmethod
    def validate(cfg: Config) -> None:
        moco = cfg.moco
        check(
            [
                (moco.dim > 0 and moco.mlp_dim > 0, "moco.dim and moco.mlp_dim must be positive"),
                (moco.temperature > 0, "moco.temperature must be positive (the paper uses 0.2 for ViT)"),
                (0 <= moco.momentum <= 1, "moco.momentum must lie in [0, 1] (the paper uses 0.99)"),
            ]
        )
        check_contrastive_dim(cfg, "moco", moco.dim)

    @classmethod
    def views(cls, cfg: Config) -> list:
        return moco_v3_views(cfg.model.img_size, cfg.data.min_scale, 2, cfg.data.uint8_views, cfg.data.interpolation)

    @classmethod
    def schedules(cls, cfg: Config, total_steps: int) -> dict[str, np.ndarray]:
        """m = 1 - (1 - m0) (1 + cos(pi t / T)) / 2 per iteration: m0 at the start, 1 at the end (or constant)."""
        return {"momentum": momentum_schedule(cfg.moco.momentum, cfg.moco.momentum_cosine, total_steps)}

    @classmethod
    def benchmark_overrides(cls, arch: str, img_size: int) -> list[str]:
        return ["moco.dim=128", "moco.mlp_dim=1024"] if arch == "vit_demo" else []

    @classmethod
    def step_flops(cls, cfg: Config, batch: int, keys: int) -> float:
        """Two views, each: base encoder + projector + predictor forward and backward (x3), momentum encoder +
        projector forward; the loss's logits both ways (specs.encoder_flops: the ViT's)."""
        H, d = cfg.moco.mlp_dim, cfg.moco.dim
        D = ARCH_SPECS[cfg.model.arch].embed_dim
        projector = 2 * batch * (D * H + H * H + H * d)
        predictor = 2 * batch * (d * H + H * d)
        encoder = encoder_flops(cfg.model.arch, cfg.model.img_size, batch)
        per_view = 3 * (encoder + projector + predictor) + encoder + projector
        return 2 * per_view + 2 * 3 * 2 * batch * keys * d

    @classmethod
    def is_official(cls, state: dict) -> bool:
        model = state.get("state_dict") if isinstance(state, dict) else None
        return isinstance(model, dict) and any(k.startswith("module.base_encoder.") for k in model)

    @classmethod
    def from_official(cls, state: dict, source: str) -> dict:
        arch = state.get("arch")
        if arch not in ARCH_SPECS:
            raise CheckpointError(f"{source}: MoCo v3 arch {arch!r}; the official ViTs are {', '.join(OFFICIAL_ARCHS)}")
        model = {rename(k.removeprefix("module."), OFFICIAL_NAMES): v for k, v in state["state_dict"].items()}
        cfg = load(None, [f"model.arch={arch}", f"method.name={cls.name}"])
        return {"model": model, "config": cfg.to_dict(), "step": 0, "official_epoch": state.get("epoch")}

    @classmethod
    def to_official(cls, state: dict, source: str) -> dict:
        model_cfg = state["config"]["model"]
        if model_cfg["arch"] not in OFFICIAL_ARCHS or model_cfg["img_size"] != 224:
            raise CheckpointError(
                f"{source}: {model_cfg['arch']} at {model_cfg['img_size']} px; the official scripts build "
                f"{', '.join(OFFICIAL_ARCHS)} at 224 px"
            )
        return official_state(state)

    @torch.no_grad()
    def targets(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Momentum encoder + projector: keys k1, k2 [N, dim], from the views the queries see."""
        return encode_views(self.momentum_encoder, self.momentum_projector, *batch["views"][:2], self.online.one_pass)

    def online_inputs(self, batch) -> tuple:
        return tuple(batch["views"][:2])

    def losses(self, outputs, targets, batch) -> dict[str, torch.Tensor]:
        """ctr(q1, k2) + ctr(q2, k1), keys gathered from all ranks."""
        (q1, q2), (k1, k2) = outputs, targets
        ctr, tau = self.loss_fn, self.temperature
        return {"loss": contrastive_across_ranks(ctr, q1, k2, tau) + contrastive_across_ranks(ctr, q2, k1, tau)}


def official_state(state: dict) -> dict:
    """Our checkpoint -> main_moco.py's layout (model tensors only), whatever the ViT."""
    back = [(new, old) for old, new in OFFICIAL_NAMES]
    model = {"module." + rename(k, back): v for k, v in state["model"].items()}
    return {"arch": state["config"]["model"]["arch"], "state_dict": model, "step": state.get("step", 0)}


def rename(key: str, pairs: list[tuple[str, str]]) -> str:
    for old, new in pairs:
        if key.startswith(old):
            return new + key[len(old) :]
    raise CheckpointError(f"unexpected tensor {key!r} in a MoCo v3 checkpoint")
