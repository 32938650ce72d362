"""Fused patch embedding: patchify + linear projection + bias + position embedding (+ class token) in one kernel.

    out[b, 0]     = cls + pos[0]                                    (with a class token)
    out[b, 1 + l] = W . patch_l(x_b) + bias + pos[1 + l],           patch_l flattened as (c, i, j) like the conv weight

With `keep` ([B, K] patch indices, MAE's visible patches) only those patches are gathered and embedded, in keep's
order: out[b, 1 + k] = W . patch_keep[b, k](x_b) + bias + pos[1 + keep[b, k]]; the removed ones cost nothing.

The patches are gathered straight from the image (no im2col copy, no conv/flatten/transpose/cat/add chain). Images
are float NCHW, or uint8 NHWC (as DALI hands them over) normalised on the fly: x = (u / 255 - mean[c]) / std[c].
Backward computes dW = sum_rows dout^T patch and dbias = sum_rows dout in one kernel, and nothing at all for a
frozen projection (MoCo v3's random patch projection); class token and position table take plain sums.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from fastvit_ssl.kernels.multi_tensor import triton_dtype
from fastvit_ssl.kernels.target import Target, interpreted, target_of


def _config(kernel: str, dtype: torch.dtype, target: Target, keep: bool = False) -> dict:
    """Tiles of the forward ("fwd": BLOCK_R output rows x BLOCK_D features) or weight-gradient ("bwd": BLOCK_D x
    BLOCK_K weights, summed over BLOCK_R rows at a time) kernel, with BLOCK_K patch pixels per step.

    From the ahead-of-time check (python -m fastvit_ssl.kernels.aot), for patches of 14 and 16 on sm_80 and sm_90a:
    bf16/fp16 dots take tensor-core tiles of 128 rows (with uint8 input, 128 x 128 x 32 makes ptxas serialise the
    H100's wgmma, hence 64 features); exact fp32 dots run on the FMA units with operands in registers and spill
    above 64 x 64 x 32. Gathering kept patches (`keep`: indices loaded, not computed) costs the forward registers:
    16 pixels per step and two pipeline stages (with 32 and 3, sm_80 spilled 8-48 B in fp32 and sm_90a serialised
    its bf16 wgmma on uint8 images, whatever the row and feature tiles).
    """
    if target.interpreted:  # few, large programs
        return dict(BLOCK_R=64, BLOCK_D=128, BLOCK_K=64, num_warps=4)
    if keep and kernel == "fwd":
        return dict(BLOCK_R=64 if dtype == torch.float32 else 128, BLOCK_D=64, BLOCK_K=16, num_warps=4, num_stages=2)
    if dtype == torch.float32:
        if kernel == "fwd":
            return dict(BLOCK_R=64, BLOCK_D=64, BLOCK_K=32, num_warps=4, num_stages=3)
        return dict(BLOCK_R=32, BLOCK_D=64, BLOCK_K=32, num_warps=4, num_stages=2)
    if kernel == "fwd":
        return dict(BLOCK_R=128, BLOCK_D=64, BLOCK_K=32, num_warps=4, num_stages=3)
    return dict(BLOCK_R=64, BLOCK_D=128, BLOCK_K=64, num_warps=8, num_stages=3)


@triton.jit
def _gather_patches(
    img_ptr,
    scale_ptr,
    shift_ptr,
    base,
    valid,
    ks,
    K,
    stride_c,
    stride_h,
    stride_w,
    P: tl.constexpr,
    NORMALIZE: tl.constexpr,
):
    """[BLOCK_R, BLOCK_K] pixels of the patches starting at `base` (element offsets), columns k = (c, i, j)."""
    c = ks // (P * P)
    i = (ks // P) % P
    j = ks % P
    offsets = base[:, None] + c[None, :] * stride_c + i[None, :] * stride_h + j[None, :] * stride_w
    mask = valid[:, None] & (ks[None, :] < K)
    x = tl.load(img_ptr + offsets, mask=mask, other=0)
    if NORMALIZE:
        scale = tl.load(scale_ptr + c, mask=ks < K, other=0.0)
        shift = tl.load(shift_ptr + c, mask=ks < K, other=0.0)
        x = tl.where(mask, x.to(tl.float32) * scale[None, :] + shift[None, :], 0.0)
    return x


@triton.jit
def _patch_embed_fwd_kernel(
    img_ptr,
    w_ptr,
    bias_ptr,
    pos_ptr,
    cls_ptr,
    scale_ptr,
    shift_ptr,
    keep_ptr,
    out_ptr,
    R,
    T,
    D,
    K,
    grid_w,
    stride_b,
    stride_c,
    stride_h,
    stride_w,
    P: tl.constexpr,
    HAS_CLS: tl.constexpr,
    HAS_KEEP: tl.constexpr,
    NORMALIZE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # output rows b * T + t
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    token = rows % T
    patch = token - HAS_CLS  # -1 on class-token rows
    is_patch = (rows < R) & (patch >= 0)
    if HAS_KEEP:  # the patch index of output token t: keep[b, t - 1]
        patch = tl.load(keep_ptr + (rows // T) * (T - HAS_CLS) + patch, mask=is_patch, other=-1).to(tl.int32)
    pos_row = tl.where(patch >= 0, patch + HAS_CLS, 0)
    base = (rows // T) * stride_b + (patch // grid_w) * (P * stride_h) + (patch % grid_w) * (P * stride_w)
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        x = _gather_patches(
            img_ptr, scale_ptr, shift_ptr, base, is_patch, ks, K, stride_c, stride_h, stride_w, P, NORMALIZE
        )
        w = tl.load(w_ptr + cols[None, :] * K + ks[:, None], mask=(ks[:, None] < K) & (cols[None, :] < D), other=0.0)
        acc += tl.dot(x.to(DOT_DTYPE), w.to(DOT_DTYPE), input_precision="ieee")  # (BLOCK_R, BLOCK_D)
    col_ok = cols < D
    value = acc + tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_CLS:
        cls = tl.load(cls_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        value = tl.where((patch >= 0)[:, None], value, cls[None, :])
    out_ok = (rows < R)[:, None] & col_ok[None, :]
    value += tl.load(pos_ptr + pos_row[:, None] * D + cols[None, :], mask=out_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows[:, None] * D + cols[None, :], value.to(out_ptr.dtype.element_ty), mask=out_ok)


@triton.jit
def _patch_embed_bwd_kernel(
    img_ptr,
    dout_ptr,
    scale_ptr,
    shift_ptr,
    keep_ptr,
    dw_ptr,
    dbias_ptr,
    RP,
    L,
    T,
    D,
    K,
    grid_w,
    stride_b,
    stride_c,
    stride_h,
    stride_w,
    rows_per_split,
    P: tl.constexpr,
    HAS_CLS: tl.constexpr,
    HAS_KEEP: tl.constexpr,
    NORMALIZE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    ks = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    first = tl.program_id(2) * rows_per_split
    acc_w = tl.zeros([BLOCK_D, BLOCK_K], tl.float32)
    acc_b = tl.zeros([BLOCK_D], tl.float32)
    for r0 in range(first, tl.minimum(first + rows_per_split, RP), BLOCK_R):
        prow = r0 + tl.arange(0, BLOCK_R)  # patch rows b * L + l (L: the embedded patches of an image)
        valid = prow < tl.minimum(first + rows_per_split, RP)
        b, slot = prow // L, prow % L
        patch = slot
        if HAS_KEEP:
            patch = tl.load(keep_ptr + prow, mask=valid, other=0).to(tl.int32)
        base = b * stride_b + (patch // grid_w) * (P * stride_h) + (patch % grid_w) * (P * stride_w)
        x = _gather_patches(
            img_ptr, scale_ptr, shift_ptr, base, valid, ks, K, stride_c, stride_h, stride_w, P, NORMALIZE
        )
        out_row = b * T + HAS_CLS + slot
        g = tl.load(
            dout_ptr + out_row[:, None] * D + cols[None, :], mask=valid[:, None] & (cols[None, :] < D), other=0.0
        )
        acc_w += tl.dot(tl.trans(g.to(DOT_DTYPE)), x.to(DOT_DTYPE), input_precision="ieee")  # (BLOCK_D, BLOCK_K)
        acc_b += tl.sum(g.to(tl.float32), axis=0)
    w_ok = (cols[:, None] < D) & (ks[None, :] < K)
    tl.atomic_add(dw_ptr + cols[:, None] * K + ks[None, :], acc_w, mask=w_ok)
    if tl.program_id(1) == 0:
        tl.atomic_add(dbias_ptr + cols, acc_b, mask=cols < D)


def _layout(images: torch.Tensor):
    """(B, C, H, W, strides b/c/h/w, normalize?) for float NCHW or uint8 NHWC images."""
    if images.dtype == torch.uint8:
        B, H, W, C = images.shape
        sb, sh, sw, sc = images.stride()
        return B, C, H, W, (sb, sc, sh, sw), True
    B, C, H, W = images.shape
    return B, C, H, W, images.stride(), False


def _norm_constants(mean, std, channels: int, device):
    """(scale, shift) per channel so that u * scale + shift = (u / 255 - mean) / std."""
    if mean is None or std is None:
        raise ValueError("patch_embed: uint8 images need the normalisation mean and std")
    mean = torch.as_tensor(mean, dtype=torch.float32, device=device).reshape(channels)
    std = torch.as_tensor(std, dtype=torch.float32, device=device).reshape(channels)
    return 1.0 / (255.0 * std), -mean / std


def _check(images, weight, pos_embed, patch_size, cls_token, keep):
    B, C, H, W, _, _ = _layout(images)
    D = weight.shape[0]
    if weight.shape != (D, C, patch_size, patch_size):
        raise ValueError(f"patch_embed: weight {tuple(weight.shape)} is not [D, {C}, {patch_size}, {patch_size}]")
    if H % patch_size or W % patch_size:
        raise ValueError(f"patch_embed: image {H}x{W} is not a multiple of the patch size {patch_size}")
    T = (H // patch_size) * (W // patch_size) + (cls_token is not None)
    if pos_embed.shape[-2:] != (T, D):
        raise ValueError(f"patch_embed: pos_embed {tuple(pos_embed.shape)} must end with ({T}, {D})")
    if images.requires_grad:
        raise ValueError("patch_embed: no gradient for the images; use patch_embed_ref")
    if keep is not None and (keep.dtype != torch.int64 or keep.ndim != 2 or keep.shape[0] != B):
        raise ValueError(
            f"patch_embed: keep must be [{B}, K] int64 patch indices, got {keep.dtype} {tuple(keep.shape)}"
        )


def _dtypes(weight: torch.Tensor, pos_embed: torch.Tensor) -> tuple[torch.dtype, torch.dtype]:
    """(dtype of the products, dtype of the output). Under autocast the products take its dtype and the output the
    position table's wider one, as conv (autocast: bf16) + pos_embed (fp32) gives in the plain computation: the
    residual stream stays fp32 and no LayerNorm of a block casts it up again."""
    if torch.is_autocast_enabled(weight.device.type):
        compute = torch.get_autocast_dtype(weight.device.type)
        return compute, torch.promote_types(compute, pos_embed.dtype)
    return weight.dtype, weight.dtype


def patch_embed_fwd(
    images, weight, bias, pos_embed, patch_size, cls_token, mean, std, compute_dtype, out_dtype, keep=None
):
    B, C, H, W, strides, normalize = _layout(images)
    D, K = weight.shape[0], C * patch_size * patch_size
    grid_w = W // patch_size
    embedded = (H // patch_size) * grid_w if keep is None else keep.shape[1]  # patches per image
    T = embedded + (cls_token is not None)
    out = torch.empty(B, T, D, dtype=out_dtype, device=images.device)
    scale, shift = _norm_constants(mean, std, C, images.device) if normalize else (weight, weight)  # unused
    target = target_of(images.device)
    cfg = _config("fwd", compute_dtype, target, keep is not None)
    dot_dtype = torch.float32 if interpreted(images.device) else compute_dtype  # see target.interpreted()
    grid = (triton.cdiv(B * T, cfg["BLOCK_R"]), triton.cdiv(D, cfg["BLOCK_D"]))
    _patch_embed_fwd_kernel[grid](
        images,
        weight.contiguous(),
        bias,
        pos_embed.contiguous(),
        cls_token if cls_token is not None else bias,
        scale,
        shift,
        keep.contiguous() if keep is not None else bias,
        out,
        B * T,
        T,
        D,
        K,
        grid_w,
        *strides,
        P=patch_size,
        HAS_CLS=cls_token is not None,
        HAS_KEEP=keep is not None,
        NORMALIZE=normalize,
        DOT_DTYPE=triton_dtype(dot_dtype),
        **cfg,
    )
    return out


def patch_embed_bwd(images, dout, patch_size, has_cls, weight_shape, mean, std, compute_dtype, keep=None):
    """(dW [D, C, P, P], dbias [D]) in fp32; the products in `compute_dtype` (an fp32 dout is rounded to it)."""
    B, C, H, W, strides, normalize = _layout(images)
    D, K = weight_shape[0], C * patch_size * patch_size
    grid_w = W // patch_size
    L = (H // patch_size) * grid_w if keep is None else keep.shape[1]  # embedded patches per image
    dout = dout.contiguous()
    dw = torch.zeros(D, K, dtype=torch.float32, device=images.device)
    dbias = torch.zeros(D, dtype=torch.float32, device=images.device)
    scale, shift = _norm_constants(mean, std, C, images.device) if normalize else (dw, dw)  # unused
    target = target_of(images.device)
    cfg = _config("bwd", compute_dtype, target)
    dot_dtype = torch.float32 if interpreted(images.device) else compute_dtype  # bf16: bf16 operands, fp32 sums
    tiles = triton.cdiv(D, cfg["BLOCK_D"]) * triton.cdiv(K, cfg["BLOCK_K"])
    # split the rows over more programs when the weight tiles alone cannot fill the GPU
    splits = 1 if target.interpreted else max(1, min(16, 2 * target.sms // tiles))
    rows_per_split = triton.cdiv(triton.cdiv(B * L, splits), cfg["BLOCK_R"]) * cfg["BLOCK_R"]
    grid = (triton.cdiv(D, cfg["BLOCK_D"]), triton.cdiv(K, cfg["BLOCK_K"]), triton.cdiv(B * L, rows_per_split))
    _patch_embed_bwd_kernel[grid](
        images,
        dout,
        scale,
        shift,
        keep.contiguous() if keep is not None else dbias,
        dw,
        dbias,
        B * L,
        L,
        L + has_cls,
        D,
        K,
        grid_w,
        *strides,
        rows_per_split,
        P=patch_size,
        HAS_CLS=has_cls,
        HAS_KEEP=keep is not None,
        NORMALIZE=normalize,
        DOT_DTYPE=triton_dtype(dot_dtype),
        **cfg,
    )
    return dw.view(weight_shape), dbias


class PatchEmbedFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, images, weight, bias, pos_embed, cls_token, patch_size, mean, std, keep):
        ctx.save_for_backward(images, keep)
        ctx.patch_size, ctx.mean, ctx.std, ctx.has_cls, ctx.weight_shape = (
            patch_size,
            mean,
            std,
            cls_token is not None,
            weight.shape,
        )
        ctx.dtypes = (weight.dtype, bias.dtype, pos_embed.dtype, None if cls_token is None else cls_token.dtype)
        ctx.pos_shape = pos_embed.shape
        ctx.compute_dtype, out_dtype = _dtypes(weight, pos_embed)
        return patch_embed_fwd(
            images, weight, bias, pos_embed, patch_size, cls_token, mean, std, ctx.compute_dtype, out_dtype, keep
        )

    @staticmethod
    def backward(ctx, dout):
        images, keep = ctx.saved_tensors
        _, need_w, need_b, need_pos, need_cls = ctx.needs_input_grad[:5]
        dw = dbias = dpos = dcls = None
        if need_w or need_b:  # a frozen projection skips this, the only heavy part
            dw, dbias = patch_embed_bwd(
                images, dout, ctx.patch_size, ctx.has_cls, ctx.weight_shape, ctx.mean, ctx.std, ctx.compute_dtype, keep
            )
            dw, dbias = dw.to(ctx.dtypes[0]) if need_w else None, dbias.to(ctx.dtypes[1]) if need_b else None
        if need_pos and keep is None:
            dpos = dout.sum(0, keepdim=True).to(ctx.dtypes[2])
        elif need_pos:  # each kept token's gradient to its patch's row
            rows = torch.cat([torch.zeros_like(keep[:, :1]), keep + 1], 1) if ctx.has_cls else keep
            dpos = torch.zeros(ctx.pos_shape, dtype=torch.float32, device=dout.device)
            dpos[0].index_add_(0, rows.flatten(), dout.flatten(0, 1).float())
            dpos = dpos.to(ctx.dtypes[2])
        if need_cls:
            dcls = dout[:, :1].sum(0, keepdim=True).to(ctx.dtypes[3])
        return None, dw, dbias, dpos, dcls, None, None, None, None


def patch_embed(
    images: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    pos_embed: torch.Tensor,
    patch_size: int,
    cls_token: torch.Tensor | None = None,
    mean=None,
    std=None,
    keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """[B, C, H, W] float (or [B, H, W, C] uint8 with mean/std) -> [B, (1 +) L, D] token embeddings.

    weight: the conv weight [D, C, P, P]; bias [D]; pos_embed [1, (1 +) L, D]; cls_token [1, 1, D] or None;
    keep: [B, K] int64 patch indices to embed (and nothing else), or None for all: -> [B, (1 +) K, D].
    """
    _check(images, weight, pos_embed, patch_size, cls_token, keep)
    return PatchEmbedFn.apply(images, weight, bias, pos_embed, cls_token, patch_size, mean, std, keep)


def patch_embed_ref(
    images: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    pos_embed: torch.Tensor,
    patch_size: int,
    cls_token: torch.Tensor | None = None,
    mean=None,
    std=None,
    keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """The unfused computation: (normalise) -> strided conv -> flatten -> transpose -> prepend class -> add pos
    (-> the class token and the `keep` patches)."""
    if images.dtype == torch.uint8:
        scale, shift = _norm_constants(mean, std, images.shape[-1], images.device)
        images = (images.float() * scale + shift).permute(0, 3, 1, 2)
    x = F.conv2d(images.to(weight.dtype), weight, bias, stride=patch_size).flatten(2).transpose(1, 2)  # (B, L, D)
    if cls_token is not None:
        x = torch.cat([cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
    x = x + pos_embed
    if keep is None:
        return x
    first = 1 if cls_token is not None else 0
    kept = x[:, first:].gather(1, keep[..., None].expand(-1, -1, x.shape[-1]))  # (B, K, D)
    return torch.cat([x[:, :first], kept], dim=1)
