"""Export the pre-trained encoder for timm (or a checkpoint for a method's official scripts), and read timm/DeiT
weights back for fine-tuning.

    python -m fastvit_ssl.eval.export --checkpoint runs/vit_small-imagenet --out vit_small_mocov3.safetensors
    python -m fastvit_ssl.eval.export --format official --checkpoint runs/vit_small-imagenet --out moco.pth.tar

writes the base encoder alone (no heads, no momentum encoder, no `module.`/`online.` prefixes) in timm's
VisionTransformer key layout, and FILE.json with the timm model name and the constructor arguments that rebuild
this architecture, so that

    spec = json.load(open("FILE.json"))
    model = timm.create_model(spec["timm_model"], pretrained=False, **spec["timm_kwargs"])
    model.load_state_dict(safetensors.torch.load_file("FILE.safetensors"), strict=True)

gives our encoder's features (num_classes=0: the model returns the pooled feature). MoCo v3's ViT-S has 12 heads
where timm's vit_small has 6: the kwargs say so. The conv-stem models have no timm counterpart and are refused.
BEiT encoders (relative position biases, q/v biases) go to timm's `Beit` (beit_* names: gamma_1/2, attn.q_bias,
rel_pos_bias.*); BEiT pre-training's mean of the normed tokens has no timm pooling: it is exported as "token"
(the same normed tokens from forward_features; average x[:, 1:] yourself).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from fastvit_ssl.checkpoint import CheckpointError
from fastvit_ssl.eval.encoder import load_encoder, load_weights, read_checkpoint
from fastvit_ssl.eval.report import print_result
from fastvit_ssl.methods.base import method_class
from fastvit_ssl.models.vit import VisionTransformer
from fastvit_ssl.specs import ARCH_SPECS

TIMM_NAMES = {
    "vit_tiny": "vit_tiny_patch16_224",
    "vit_small": "vit_small_patch16_224",
    "vit_base": "vit_base_patch16_224",
    "vit_large": "vit_large_patch16_224",
    "vit_huge": "vit_huge_patch14_224",
}


TIMM_BEIT_NAMES = {"vit_base": "beit_base_patch16_224", "vit_large": "beit_large_patch16_224"}


def beit_layout(encoder: VisionTransformer) -> bool:
    """Whether `encoder` needs timm's Beit: relative position biases or biases on q and v only."""
    block = encoder.blocks[0]
    return encoder.rel_pos_bias is not None or block.rel_pos_bias is not None or block.attn.qkv.bias is None


def layer_scale(encoder: VisionTransformer) -> float | None:
    gamma = getattr(encoder.blocks[0].ls1, "gamma", None)
    return None if gamma is None else float(gamma.detach().flatten()[0])  # the weights overwrite it anyway


def timm_spec(encoder: VisionTransformer) -> dict:
    """{"timm_model": name, "timm_kwargs": {...}} that rebuild `encoder` in timm (VisionTransformer, or Beit)."""
    spec = ARCH_SPECS[encoder.arch]
    if spec.conv_stem:
        raise CheckpointError(f"{encoder.arch} has a convolutional stem, which timm's VisionTransformer lacks")
    kwargs = {
        "img_size": encoder.patch_embed.img_size,
        "patch_size": spec.patch_size,
        "embed_dim": spec.embed_dim,
        "depth": spec.depth,
        "num_heads": encoder.blocks[0].attn.num_heads,  # model.num_heads may differ from the arch's (SiT's ViT-S)
        "mlp_ratio": 4.0,
        "qkv_bias": True,  # timm ViT: biases on q, k and v; timm Beit: learned q and v biases (k none)
        "init_values": layer_scale(encoder),
        "num_classes": 0,
    }
    if beit_layout(encoder):
        if encoder.blocks[0].attn.qkv.bias is not None:
            raise CheckpointError("timm's Beit has no bias on k: export a BEiT encoder with model.qkv_bias=qv")
        kwargs |= {
            "use_abs_pos_emb": encoder.pos_embed_kind != "none",
            "use_rel_pos_bias": encoder.blocks[0].rel_pos_bias is not None,
            "use_shared_rel_pos_bias": encoder.rel_pos_bias is not None,
            "global_pool": "avg" if encoder.global_pool == "avg" else "token",
        }
        return {"timm_model": TIMM_BEIT_NAMES.get(encoder.arch, "beit_base_patch16_224"), "timm_kwargs": kwargs}
    kwargs |= {
        "class_token": True,
        "global_pool": "avg" if encoder.global_pool == "avg_normed" else encoder.global_pool,
        "fc_norm": encoder.global_pool == "avg",
    }
    if encoder.arch in TIMM_NAMES:
        return {"timm_model": TIMM_NAMES[encoder.arch], "timm_kwargs": kwargs}
    note = f"timm has no {encoder.arch}: the name only picks its ViT constructor, the kwargs set every dimension"
    return {"timm_model": "vit_base_patch16_224", "timm_kwargs": kwargs, "note": note}


def to_timm_state_dict(encoder: VisionTransformer) -> dict[str, torch.Tensor]:
    """Our parameter names already follow timm's VisionTransformer (the fixed position table becomes a plain
    tensor); BEiT encoders get timm Beit's names. No [MASK] token, and no relative position index: timm Beit builds
    that buffer itself and keeps it out of its state dict (non-persistent, as ours)."""
    state = {k: v.detach().contiguous().clone() for k, v in encoder.state_dict().items() if k != "mask_token"}
    if not beit_layout(encoder):
        return state
    renames = [(".ls1.gamma", ".gamma_1"), (".ls2.gamma", ".gamma_2"), (".rel_pos_bias.", ".attn.")]
    out = {}
    for key, value in state.items():
        if key == "pos_embed" and encoder.pos_embed_kind == "none":
            continue
        for old, new in renames:
            key = key.replace(old, new) if key.startswith("blocks.") else key
        out[key] = value
    return out


def from_timm_state_dict(encoder: VisionTransformer, state: dict[str, torch.Tensor], source: str = "weights") -> None:
    """Load timm / DeiT layout weights into `encoder` (classifier heads and distillation tokens are dropped)."""
    if "dist_token" in state:
        raise CheckpointError(f"{source} is a distilled DeiT (dist_token): use the non-distilled weights")
    state = {k: v for k, v in state.items() if not k.startswith(("head.", "head_dist."))}
    load_weights(encoder, state, source)


def umask() -> int:
    """The process's umask (reading it sets it: it is set back at once)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def export(checkpoint: Path, out: Path) -> Path:
    """Write `out` (.safetensors; its folder made if need be) and its .json beside; the weights get the mode any new
    file gets (safetensors writes a temporary file, mode 0600, and renames it over `out`)."""
    encoder, _ = load_encoder(checkpoint)
    from safetensors.torch import save_file

    spec = timm_spec(encoder)  # before writing anything: it refuses what timm cannot build
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(to_timm_state_dict(encoder), str(out))
    out.chmod(0o666 & ~umask())
    out.with_suffix(".json").write_text(json.dumps(spec, indent=2) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True, help="checkpoint, run or DeepSpeed folder")
    parser.add_argument(
        "--out", type=Path, required=True, help="FILE.safetensors (FILE.json beside); official: FILE.pth.tar"
    )
    parser.add_argument(
        "--format", choices=["timm", "official"], default="timm", help="official: the method's official code's layout"
    )
    args = parser.parse_args(argv)
    started = time.perf_counter()
    if args.format == "official":
        state = read_checkpoint(args.checkpoint)
        method = method_class(state["config"]["method"]["name"])
        official = method.to_official(state, str(args.checkpoint))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        torch.save(official, args.out)
        print_result({"weights": str(args.out), "format": f"official {method.name}"}, started)
        return 0
    out = export(args.checkpoint, args.out)
    spec = json.loads(out.with_suffix(".json").read_text())
    print_result({"weights": str(out), "spec": str(out.with_suffix(".json")), **spec}, started)
    return 0


if __name__ == "__main__":
    from fastvit_ssl.cli import run

    run(main)
