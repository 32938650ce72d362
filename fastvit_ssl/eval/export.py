"""Export the pre-trained encoder for timm, and read timm/DeiT weights back for fine-tuning.

    python -m fastvit_ssl.eval.export --checkpoint runs/vit_small-imagenet --out vit_small_mocov3.safetensors

writes the base encoder alone (no heads, no momentum encoder, no `module.`/`online.` prefixes) in timm's
VisionTransformer key layout, and FILE.json with the timm model name and the constructor arguments that rebuild
this architecture, so that

    spec = json.load(open("FILE.json"))
    model = timm.create_model(spec["timm_model"], pretrained=False, **spec["timm_kwargs"])
    model.load_state_dict(safetensors.torch.load_file("FILE.safetensors"), strict=True)

gives our encoder's features (num_classes=0: the model returns the pooled feature). MoCo v3's ViT-S has 12 heads
where timm's vit_small has 6: the kwargs say so. The conv-stem models have no timm counterpart and are refused.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from fastvit_ssl.checkpoint import CheckpointError
from fastvit_ssl.eval.encoder import load_encoder, load_weights
from fastvit_ssl.models.vit import ARCH_SPECS, VisionTransformer

TIMM_NAMES = {
    "vit_tiny": "vit_tiny_patch16_224",
    "vit_small": "vit_small_patch16_224",
    "vit_base": "vit_base_patch16_224",
    "vit_large": "vit_large_patch16_224",
    "vit_huge": "vit_huge_patch14_224",
}


def timm_spec(encoder: VisionTransformer) -> dict:
    """{"timm_model": name, "timm_kwargs": {...}} that rebuild `encoder` in timm."""
    spec = ARCH_SPECS[encoder.arch]
    if spec.conv_stem:
        raise CheckpointError(f"{encoder.arch} has a convolutional stem, which timm's VisionTransformer lacks")
    kwargs = {
        "img_size": encoder.patch_embed.img_size,
        "patch_size": spec.patch_size,
        "embed_dim": spec.embed_dim,
        "depth": spec.depth,
        "num_heads": spec.num_heads,
        "mlp_ratio": 4.0,
        "qkv_bias": True,
        "class_token": True,
        "global_pool": "avg" if encoder.global_pool == "avg_normed" else encoder.global_pool,
        "fc_norm": encoder.global_pool == "avg",
        "num_classes": 0,
    }
    return {"timm_model": TIMM_NAMES.get(encoder.arch, "vit_base_patch16_224"), "timm_kwargs": kwargs}


def to_timm_state_dict(encoder: VisionTransformer) -> dict[str, torch.Tensor]:
    """Our parameter names already follow timm's; the fixed position table becomes a plain tensor."""
    return {k: v.detach().contiguous().clone() for k, v in encoder.state_dict().items()}


def from_timm_state_dict(encoder: VisionTransformer, state: dict[str, torch.Tensor], source: str = "weights") -> None:
    """Load timm / DeiT layout weights into `encoder` (classifier heads and distillation tokens are dropped)."""
    if "dist_token" in state:
        raise CheckpointError(f"{source} is a distilled DeiT (dist_token): use the non-distilled weights")
    state = {k: v for k, v in state.items() if not k.startswith(("head.", "head_dist."))}
    load_weights(encoder, state, source)


def export(checkpoint: Path, out: Path) -> Path:
    encoder, _ = load_encoder(checkpoint)
    from safetensors.torch import save_file

    save_file(to_timm_state_dict(encoder), str(out))
    out.with_suffix(".json").write_text(json.dumps(timm_spec(encoder), indent=2) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True, help="checkpoint, run or DeepSpeed folder")
    parser.add_argument("--out", type=Path, required=True, help="FILE.safetensors (FILE.json is written beside)")
    args = parser.parse_args(argv)
    print(f"wrote {export(args.checkpoint, args.out)} and {args.out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    from fastvit_ssl.cli import run

    run(main)
