"""What this project can build, in plain Python (no torch): the config checks names and sizes against it without
importing the models.

- ARCH_SPECS: the ViT sizes.
- ATTENTION_KERNELS: the names `model.attention` takes (models/attention.py implements them).
- MODEL_KEYS: the `model.*` settings that define a model, its tensors or what they mean. Two runs that differ in
  one of them hold different models: resume refuses to continue, run.init_from refuses to load. Every other
  `model.*` setting says how a model runs (activation checkpointing, compilation, the attention kernel) and may
  change between starts. A method names its own (e.g. the widths of its heads) in `Method.model_keys`.
- CONTRASTIVE_KERNEL_MAX_DIM: the widest features the fused contrastive kernel takes (kernels/contrastive.py).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ArchSpec:
    embed_dim: int
    depth: int
    num_heads: int
    patch_size: int
    conv_stem: bool = False  # Xiao et al. 2021: 3x3 stride-2 convs instead of the patch projection


ARCH_SPECS = {
    "vit_demo": ArchSpec(embed_dim=192, depth=4, num_heads=3, patch_size=7),  # CPU demo: 28x28 digits, 4x4 patches
    "vit_tiny": ArchSpec(embed_dim=192, depth=12, num_heads=3, patch_size=16),
    "vit_small": ArchSpec(embed_dim=384, depth=12, num_heads=12, patch_size=16),  # MoCo v3 uses 12 heads
    "vit_base": ArchSpec(embed_dim=768, depth=12, num_heads=12, patch_size=16),
    "vit_large": ArchSpec(embed_dim=1024, depth=24, num_heads=16, patch_size=16),
    "vit_huge": ArchSpec(embed_dim=1280, depth=32, num_heads=16, patch_size=14),
    # The conv stem replaces one transformer block to keep the FLOPs (the official vit_conv_* models).
    "vit_conv_small": ArchSpec(embed_dim=384, depth=11, num_heads=12, patch_size=16, conv_stem=True),
    "vit_conv_base": ArchSpec(embed_dim=768, depth=11, num_heads=12, patch_size=16, conv_stem=True),
}

ATTENTION_KERNELS = (
    "auto",
    "flash",
    "efficient",
    "cudnn",
    "math",
    "flex",
    "explicit",
    "flash_attn2",
    "flash_attn3",
    "flash_attn4",
)

MODEL_KEYS = (
    "arch",
    "img_size",
    "num_heads",
    "pos_embed",
    "rel_pos_bias",
    "layer_scale",
    "qkv_bias",
    "mask_token",
    "global_pool",
    "frozen_patch_embed",  # which tensors train: the optimizer's state depends on it
)

CONTRASTIVE_KERNEL_MAX_DIM = 256


def encoder_flops(arch: str, img_size: int, batch: int, tokens: int | None = None) -> float:
    """Forward FLOPs (multiply-adds x 2) of the ViT on `batch` images: per block 24 T D^2 (qkv, proj, 4x MLP) +
    4 T^2 D (QK^T and AV) over T tokens, plus the patch projection of their patches (3 P^2 inputs to D features).
    `tokens`: the class token and the patches kept when some are dropped (MAE: only those need embedding)."""
    spec = ARCH_SPECS[arch]
    T = tokens or (img_size // spec.patch_size) ** 2 + 1
    D, P = spec.embed_dim, spec.patch_size
    return batch * (spec.depth * (24 * T * D * D + 4 * T * T * D) + 2 * (T - 1) * 3 * P * P * D)
