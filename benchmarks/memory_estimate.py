"""Per-GPU memory of MoCo v3 pre-training under DeepSpeed ZeRO, computed (not measured) from the architecture.

    python benchmarks/memory_estimate.py                   # ViT-L and ViT-H, batch 4096 over 8 and 64 GPUs

Model states with bf16 training and AdamW (Rajbhandari et al. 2020), P trained parameters, N GPUs:
    bf16 weights 2P, bf16 gradients 2P, fp32 master weights + two moments 12P
    ZeRO-1: 2P + 2P + 12P/N      ZeRO-2: 2P + 14P/N      ZeRO-3: 16P/N
plus the fp32 momentum encoder + projector replicated on every GPU (4 bytes each, outside ZeRO; see
engine/deepspeed_engine.py). Activations, bf16, per image and view, with fused (flash) attention: ~34 s h bytes per
block (Korthikanti et al. 2022, without the s^2 attention term), s tokens, h width; with activation checkpointing
only each block's input (2 s h bytes) is kept, plus one block's activations during its recomputation. Two views.
"""

from __future__ import annotations

import argparse

import torch

from fastvit_ssl.models.heads import predictor, projector
from fastvit_ssl.models.vit import ARCH_SPECS, VisionTransformer

GIB = 2**30


def counts(arch: str, mlp_dim: int = 4096, dim: int = 256) -> tuple[int, int]:
    """(trained parameters, momentum parameters) of MoCo v3 with this encoder."""
    with torch.device("meta"):
        encoder = VisionTransformer(arch, 224, frozen_patch_embed=True)
        heads = [projector(encoder.embed_dim, mlp_dim, dim), predictor(dim, mlp_dim)]
    trained = sum(p.numel() for p in encoder.parameters() if p.requires_grad)
    trained += sum(p.numel() for h in heads for p in h.parameters())
    momentum = sum(p.numel() for p in encoder.parameters()) + sum(p.numel() for p in heads[0].parameters())
    return trained, momentum


def estimate(arch: str, stage: int, gpus: int, batch: int, checkpointing: bool) -> dict[str, float]:
    spec = ARCH_SPECS[arch]
    trained, momentum = counts(arch)
    states = {1: 4 * trained + 12 * trained / gpus, 2: 2 * trained + 14 * trained / gpus, 3: 16 * trained / gpus}
    tokens, width, per_gpu = (224 // spec.patch_size) ** 2 + 1, spec.embed_dim, batch // gpus
    block = 34 * tokens * width * per_gpu * 2  # bytes of one block's activations, both views
    activations = spec.depth * 2 * tokens * width * per_gpu * 2 + block if checkpointing else spec.depth * block
    return {"states": states[stage] / GIB, "momentum": 4 * momentum / GIB, "activations": activations / GIB}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4096)
    args = parser.parse_args(argv)
    print(
        f"{'arch':<10} {'GPUs':>4} {'ZeRO':>4} {'model states':>13} {'momentum':>9} {'activations':>12} "
        f"{'act. ckpt':>10} {'total (ckpt)':>13}   GiB per GPU, global batch {args.batch}"
    )
    for arch in ("vit_large", "vit_huge"):
        for gpus in (8, 64):
            for stage in (1, 2, 3):
                full = estimate(arch, stage, gpus, args.batch, checkpointing=False)
                ckpt = estimate(arch, stage, gpus, args.batch, checkpointing=True)
                total = ckpt["states"] + ckpt["momentum"] + ckpt["activations"]
                print(
                    f"{arch:<10} {gpus:>4} {stage:>4} {full['states']:>13.1f} {full['momentum']:>9.1f} "
                    f"{full['activations']:>12.1f} {ckpt['activations']:>10.1f} {total:>13.1f}"
                )


if __name__ == "__main__":
    main()
