"""The realistic problems every kernel must compile for, as launches of the public launchers on `meta` tensors
(no memory): `CASES` is a list of (label, launch). The ahead-of-time check (`aot.py`) runs them inside
`target.planning_for(...)`, so each launcher picks the configuration it would pick on that GPU.

Sizes: ViT-S/B/L/H widths 384/768/1024/1280 with patches of 16 (ViT-H: 14) on 224^2 images, a per-GPU batch of
256; MoCo v3's contrastive loss at D = 256 (and the demo's 128) with up to 4,096 queries per rank against 65,536
keys gathered from 16 ranks, plus a ragged size that defeats the 16-divisibility specialisation; SiT's GMML
rounds on a batch of 256 at 224 px; BEiT-B's LM head (8,192 visual tokens) on a chunk of its 256 x 75 masked tokens
(linear_ce.chunk_rows: 1,746 rows at D = 768), and a ragged vocabulary; DINO's prototype loss at its recipe's
2 global + 8 local crops of 64 images per GPU over 65,536 prototypes, and a ragged size.
"""

from __future__ import annotations

import functools

import torch

from fastvit_ssl.data import gmml as gmml_ref
from fastvit_ssl.data.augment import IMAGENET_MEAN, IMAGENET_STD
from fastvit_ssl.kernels import contrastive, ema, gmml, lars_lamb, linear_ce, patch_embed, prototype_ce

FLOATS = (torch.float32, torch.bfloat16, torch.float16)
WIDTHS = {"vit_small": (384, 16), "vit_base": (768, 16), "vit_large": (1024, 16), "vit_huge": (1280, 14)}


def meta(*shape, dtype=torch.float32):
    return torch.empty(*shape, dtype=dtype, device="meta")


def contrastive_step(n: int, m: int, dim: int, dtype: torch.dtype) -> None:
    q, k = meta(n, dim, dtype=dtype), meta(m, dim, dtype=dtype)
    loss_rows, lse, rq, rk = contrastive.contrastive_fwd(q, k, 0.2, 0)
    contrastive.contrastive_bwd(q, k, rq, rk, lse, meta(()), 0.2, 0)


def patch_embed_step(
    width: int, patch: int, images: str, weights: torch.dtype, compute: torch.dtype, keep: bool = False
) -> None:
    """Forward and weight gradient of a trainable projection; `images` is "uint8" (NHWC) or a float dtype's name;
    products in `compute`, the output (and its gradient) as the kernel makes it (fp32 under autocast); `keep`:
    MAE's visible quarter of the patches only."""
    batch, side = 256, 224
    if images == "uint8":
        x = meta(batch, side, side, 3, dtype=torch.uint8)
    else:
        x = meta(batch, 3, side, side, dtype=getattr(torch, images))
    patches = (side // patch) ** 2
    kept = meta(batch, patches // 4, dtype=torch.int64) if keep else None
    w, b = meta(width, 3, patch, patch, dtype=weights), meta(width, dtype=weights)
    pos, cls = meta(1, patches + 1, width, dtype=weights), meta(1, 1, width, dtype=weights)
    out = torch.promote_types(compute, weights)
    patch_embed.patch_embed_fwd(x, w, b, pos, patch, cls, IMAGENET_MEAN, IMAGENET_STD, compute, out, kept)
    tokens = 1 + (patches // 4 if keep else patches)
    dout = meta(batch, tokens, width, dtype=out)
    patch_embed.patch_embed_bwd(x, dout, patch, True, w.shape, IMAGENET_MEAN, IMAGENET_STD, compute, kept)


def gmml_step(batch: int, side: int) -> None:
    rectangles = [meta(gmml_ref.ROUNDS, batch, dtype=torch.int64) for _ in range(4)]
    gmml.take_rounds(meta(batch, side, side, dtype=torch.bool), *rectangles, meta(batch))


def lm_head_step(rows: int, vocab: int, dtype: torch.dtype) -> None:
    linear_ce.ce_rows_(meta(rows, vocab, dtype=dtype), meta(rows, dtype=torch.int64), -100)


def prototype_step(crops: int, batch: int, prototypes: int, dtype: torch.dtype) -> None:
    """Forward and student gradient: the head's logits in `dtype` for student and teacher, DINO's fp32 centre."""
    student, teacher = meta(crops * batch, prototypes, dtype=dtype), meta(2 * batch, prototypes, dtype=dtype)
    center = meta(1, prototypes)
    _, lse_s, lse_t = prototype_ce.prototype_ce_fwd(student, teacher, center, 0.1, 0.04, 2)
    prototype_ce.prototype_ce_bwd(student, teacher, center, lse_s, lse_t, meta(()), 0.1, 0.04, 2)


def ema_step(ema_dtype: torch.dtype, param_dtype: torch.dtype) -> None:
    shapes = [(384, 3, 16, 16), (384,), (1152, 384), (4097,)]
    ema.ema_update_([meta(*s, dtype=ema_dtype) for s in shapes], [meta(*s, dtype=param_dtype) for s in shapes], 0.99)


def optimizer_step(optimizer: type, dtype: torch.dtype) -> None:
    params = [torch.nn.Parameter(meta(*s, dtype=dtype)) for s in [(1152, 384), (384,), (4097,)]]
    for p in params:
        p.grad = torch.empty_like(p)
    optimizer(params, lr=1e-3, weight_decay=0.1).step()


# Model inputs: fp32 training; fp32 images and weights under bf16 autocast; DeepSpeed's bf16 (fp16) weights and
# images; uint8 NHWC views from the loaders, normalised in the kernel.
PATCH_INPUTS = [
    ("float32", torch.float32, torch.float32),
    ("float32", torch.float32, torch.bfloat16),
    ("bfloat16", torch.bfloat16, torch.bfloat16),
    ("float16", torch.float16, torch.float16),
    ("uint8", torch.float32, torch.float32),
    ("uint8", torch.float32, torch.bfloat16),
    ("uint8", torch.bfloat16, torch.bfloat16),
]

CASES = [
    *(
        (f"contrastive {str(dtype)[6:]} N={n} M={m} D={dim}", functools.partial(contrastive_step, n, m, dim, dtype))
        for dtype, dim, n, m in [
            *((dtype, dim, 4096, 65536) for dtype in FLOATS for dim in (128, 256)),
            (torch.bfloat16, 256, 1000, 7000),
        ]
    ),
    *(
        (
            f"patch_embed {arch} images={images} weights={str(w)[6:]} compute={str(o)[6:]}",
            functools.partial(patch_embed_step, width, patch, images, w, o),
        )
        for arch, (width, patch) in WIDTHS.items()
        for images, w, o in PATCH_INPUTS
    ),
    *(  # MAE's visible patches (its recipes: ViT-B/L/H, fp32 weights under bf16 autocast or bf16 weights)
        (
            f"patch_embed kept {arch} images={images} weights={str(w)[6:]} compute={str(o)[6:]}",
            functools.partial(patch_embed_step, width, patch, images, w, o, keep=True),
        )
        for arch, (width, patch) in WIDTHS.items()
        if arch != "vit_small"
        for images, w, o in PATCH_INPUTS
        if o != torch.float16 and w != torch.float16
    ),
    ("gmml rounds B=256 224px", functools.partial(gmml_step, 256, 224)),
    ("gmml rounds B=7 29px", functools.partial(gmml_step, 7, 29)),
    *(
        (f"lm_head {str(dtype)[6:]} rows={rows} V={vocab}", functools.partial(lm_head_step, rows, vocab, dtype))
        for dtype, rows, vocab in [*((dtype, 1746, 8192) for dtype in FLOATS), (torch.bfloat16, 999, 1000)]
    ),
    *(
        (
            f"prototype_loss {str(dtype)[6:]} V={crops} B={batch} K={prototypes}",
            functools.partial(prototype_step, crops, batch, prototypes, dtype),
        )
        for dtype, crops, batch, prototypes in [
            *((dtype, 10, 64, 65536) for dtype in FLOATS),
            (torch.bfloat16, 4, 7, 1000),
        ]
    ),
    *(
        (f"ema {str(e)[6:]} <- {str(p)[6:]}", functools.partial(ema_step, e, p))
        for e, p in [(d, d) for d in FLOATS] + [(torch.float32, torch.bfloat16), (torch.float32, torch.float16)]
    ),
    *(
        (f"{opt.__name__} {str(dtype)[6:]}", functools.partial(optimizer_step, opt, dtype))
        for opt in (lars_lamb.FusedLARS, lars_lamb.FusedLAMB)
        for dtype in FLOATS
    ),
]
