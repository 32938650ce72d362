"""Encoder construction from the config."""

from __future__ import annotations

from collections.abc import Callable

from fastvit_ssl.config import Config
from fastvit_ssl.models.vit import VisionTransformer


def build_encoder(cfg: Config, patch_embed_fn: Callable | None = None, **overrides) -> VisionTransformer:
    """The config's ViT; `patch_embed_fn` the fused patch embedding (ops["patch_embed"]) or None; `overrides`
    replace constructor arguments (e.g. drop path and a trainable patch projection for fine-tuning)."""
    kwargs = {
        "frozen_patch_embed": cfg.model.frozen_patch_embed,
        "global_pool": cfg.model.global_pool,
        "patch_embed_fn": patch_embed_fn,
        "grad_checkpointing": cfg.model.grad_checkpointing,
        "pos_embed": cfg.model.pos_embed,
        "init": cfg.model.init,
        "num_heads": cfg.model.num_heads,
        "rel_pos_bias": cfg.model.rel_pos_bias,
        "layer_scale": cfg.model.layer_scale,
        "qkv_bias": cfg.model.qkv_bias,
        "mask_token": cfg.model.mask_token,
        "attention": cfg.model.attention,
    }
    return VisionTransformer(cfg.model.arch, cfg.model.img_size, **(kwargs | overrides))
