import functools

import pytest
import torch

from fastvit_ssl.data.augment import IMAGENET_MEAN, IMAGENET_STD
from fastvit_ssl.kernels import patch_embed as module
from fastvit_ssl.kernels.patch_embed import patch_embed, patch_embed_ref
from fastvit_ssl.kernels.target import A100, H100, planning_for
from numerics import assert_no_worse_than_torch, assert_within_rounded_products

# (batch, channels, image side, patch, embed dim, class token): one patch, partial tiles, K = 768 as in ViT/16
SHAPES = [(1, 1, 8, 8, 5, True), (2, 3, 14, 7, 20, True), (3, 3, 16, 4, 33, False), (2, 3, 32, 16, 48, True)]


def inputs(shape, dtype=torch.float32, seed=0, device="cpu"):
    B, C, H, P, D, cls = shape
    g = torch.Generator().manual_seed(seed)
    T = (H // P) ** 2 + cls
    images = torch.randn(B, C, H, H, generator=g)
    weight = torch.randn(D, C, P, P, generator=g) / P
    bias, pos = torch.randn(D, generator=g), torch.randn(1, T, D, generator=g)
    cls_token = torch.randn(1, 1, D, generator=g) if cls else None
    params = [t.to(device, dtype).requires_grad_() if t is not None else None for t in (weight, bias, pos, cls_token)]
    return images.to(device, dtype), params


def forward_backward(fn, images, params, P, dout_dtype=None, absolute=False):
    """(output, gradients of the parameters) for an upstream gradient rounded to `dout_dtype` (default: the
    output's), so that runs in several precisions differentiate the same values. absolute: |upstream gradient|
    (with absolute inputs, each output and gradient is then the sum of its terms' magnitudes: the map is linear)."""
    params = [p.detach().clone().requires_grad_() if p is not None else None for p in params]
    out = fn(images, params[0], params[1], params[2], P, params[3])
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.device, dout_dtype or out.dtype)
    dout = (dout.abs() if absolute else dout).to(out.dtype)
    (out * dout).sum().backward()
    return out.detach(), [p.grad for p in params if p is not None]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_fp32_forward_and_backward_match_float64(shape, poisoned, device):
    images, params = inputs(shape, device=device)
    out, grads = forward_backward(patch_embed, images, params, shape[3])
    out64, grads64 = forward_backward(
        patch_embed_ref, images.double(), [p.double() if p is not None else None for p in params], shape[3]
    )
    assert torch.isfinite(out).all()  # fp32 against fp64 (numerics.py); gradients sum over the batch and patches
    torch.testing.assert_close(out.double(), out64, rtol=1e-5, atol=1e-5)
    for g, g64 in zip(grads, grads64):
        torch.testing.assert_close(g.double(), g64, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("shape", SHAPES[1:], ids=str)
def test_bf16_is_no_worse_than_torch_bf16(shape, poisoned, device):
    images, params = inputs(shape, torch.bfloat16, seed=2, device=device)
    P = shape[3]
    out, grads = forward_backward(patch_embed, images, params, P)
    out16, grads16 = forward_backward(patch_embed_ref, images, params, P)
    out64, grads64 = forward_backward(
        patch_embed_ref, images.double(), [p.double() if p is not None else None for p in params], P, torch.bfloat16
    )
    assert out.dtype == torch.bfloat16
    assert_no_worse_than_torch(out, out64, out16)
    for g, g16, g64 in zip(grads, grads16, grads64):
        assert_no_worse_than_torch(g, g64, g16)


def test_under_autocast_the_residual_stream_stays_fp32(poisoned, device):
    """fp32 weights under bf16 autocast: bf16 products, an fp32 output (conv in bf16 + an fp32 table, as the plain
    computation gives), so no block's LayerNorm casts the stream up again. Its error, forward and backward, is what
    rounding the operands to bf16 allows, no more (torch's autocast rounds its conv's output to bf16 on top)."""
    B, C, H, P, D, cls = shape = SHAPES[3]
    images, params = inputs(shape, seed=5, device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        out, grads = forward_backward(patch_embed, images, params, P)
    params64 = [p.double() for p in params]
    out64, grads64 = forward_backward(patch_embed_ref, images.double(), params64, P, torch.float32)
    magnitude = forward_backward(
        patch_embed_ref, images.double().abs(), [p.abs() for p in params64], P, torch.float32, absolute=True
    )
    assert out.dtype == torch.float32 and all(g.dtype == torch.float32 for g in grads)
    terms = max(C * P * P, B * (H // P) ** 2)  # the longest sum: a patch's pixels, or the patches of a batch
    assert_within_rounded_products(out, out64, magnitude[0], terms)
    for g, g64, m in zip(grads, grads64, magnitude[1]):
        assert_within_rounded_products(g, g64, m, terms)


@pytest.mark.parametrize("target", [A100, H100], ids=lambda t: f"sm_{t.arch}")
@pytest.mark.parametrize("shape", [(14, 3, 48, 16, 200, True), (7, 3, 28, 14, 100, True)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_the_shipped_gpu_configuration(target, shape, dtype, poisoned, device):
    """The tiles a launch on that GPU uses, run through the interpreter: ragged row, feature and pixel tiles
    (140 and 35 rows, D = 200 and 100, K = 768 and 588) and the row splits of the weight gradient."""
    images, params = inputs(shape, dtype, seed=4, device=device)
    check_on_target(patch_embed, patch_embed_ref, images, params, shape[3], dtype, target)


def check_on_target(fused, reference, images, params, P, dtype, target):
    """The fused forward and backward at `target`'s launch tiles against float64: fp32 by numerics.py's bounds,
    bf16 no worse than torch's bf16."""
    with planning_for(target):
        out, grads = forward_backward(fused, images, params, P)
    params64 = [p.double() if p is not None else None for p in params]
    out64, grads64 = forward_backward(reference, images.double(), params64, P, dtype)
    if dtype == torch.float32:  # numerics.py
        torch.testing.assert_close(out.double(), out64, rtol=1e-5, atol=1e-5)
        for g, g64 in zip(grads, grads64):
            torch.testing.assert_close(g.double(), g64, rtol=1e-5, atol=1e-4)
        return
    out16, grads16 = forward_backward(reference, images, params, P)
    assert_no_worse_than_torch(out, out64, out16)
    for g, g16, g64 in zip(grads, grads16, grads64):
        assert_no_worse_than_torch(g, g64, g16)


def kept(shape, seed: int, device) -> torch.Tensor:
    """MAE-style visible patches: a random quarter (at least one) of each image's, in random order."""
    B, _, H, P, _, _ = shape
    L = (H // P) ** 2
    noise = torch.rand(B, L, generator=torch.Generator().manual_seed(seed))
    return noise.argsort(1)[:, : max(1, L // 4)].to(device)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_kept_patches_alone_match_float64(shape, poisoned, device):
    """keep: only those patches are gathered and embedded, each with its own position row; the trained position
    table (if any) gets each kept token's gradient at its patch's row. fp32 against fp64 as above."""
    images, params = inputs(shape, seed=6, device=device)
    keep = kept(shape, 6, device)
    out, grads = forward_backward(functools.partial(patch_embed, keep=keep), images, params, shape[3])
    params64 = [p.double() if p is not None else None for p in params]
    out64, grads64 = forward_backward(
        functools.partial(patch_embed_ref, keep=keep), images.double(), params64, shape[3]
    )
    assert out.shape == (shape[0], keep.shape[1] + shape[5], shape[4])
    torch.testing.assert_close(out.double(), out64, rtol=1e-5, atol=1e-5)
    for g, g64 in zip(grads, grads64):
        torch.testing.assert_close(g.double(), g64, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("target", [A100, H100], ids=lambda t: f"sm_{t.arch}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_kept_patches_in_the_shipped_gpu_configuration(target, dtype, poisoned, device):
    shape = (14, 3, 48, 16, 200, True)  # 9 patches, 2 kept: 42 rows, ragged tiles
    images, params = inputs(shape, dtype, seed=7, device=device)
    keep = kept(shape, 7, device)
    fused, ref = functools.partial(patch_embed, keep=keep), functools.partial(patch_embed_ref, keep=keep)
    check_on_target(fused, ref, images, params, shape[3], dtype, target)


def test_uint8_nhwc_images_are_normalised_in_the_kernel(poisoned, device):
    g = torch.Generator().manual_seed(3)
    images = torch.randint(0, 256, (2, 16, 16, 3), dtype=torch.uint8, generator=g).to(device)  # as DALI gives them
    _, (weight, bias, pos, cls) = inputs((2, 3, 16, 4, 24, True), seed=3, device=device)
    out = patch_embed(images, weight, bias, pos, 4, cls, IMAGENET_MEAN, IMAGENET_STD)
    mean, std = (torch.tensor(v, dtype=torch.float64, device=device) for v in (IMAGENET_MEAN, IMAGENET_STD))
    float_images = (images.double() / 255 - mean) / std
    expected = patch_embed_ref(
        float_images.permute(0, 3, 1, 2), weight.double(), bias.double(), pos.double(), 4, cls.double()
    )
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-4)  # fp32 vs fp64, inputs |x| < 2.7
    keep = kept((2, 3, 16, 4, 24, True), 3, device)
    out = patch_embed(images, weight, bias, pos, 4, cls, IMAGENET_MEAN, IMAGENET_STD, keep=keep)
    rows = torch.cat([torch.zeros_like(keep[:, :1]), keep + 1], 1)  # the class token, then the kept patches
    torch.testing.assert_close(
        out.double(), expected.gather(1, rows[..., None].expand(-1, -1, 24)), rtol=1e-5, atol=1e-4
    )


def test_frozen_projection_does_no_backward_work(monkeypatch, device):
    calls = []
    monkeypatch.setattr(module, "patch_embed_bwd", lambda *a, **k: calls.append(1))
    images, (weight, bias, pos, cls) = inputs((2, 3, 14, 7, 20, True), device=device)
    weight.requires_grad_(False)
    bias.requires_grad_(False)
    pos.requires_grad_(False)
    patch_embed(images, weight, bias, pos, 7, cls).sum().backward()
    assert calls == [] and weight.grad is None
    torch.testing.assert_close(cls.grad, torch.full_like(cls, 2.0))  # summed over the batch of 2


def test_bad_shapes_are_named():
    images, (weight, bias, pos, cls) = inputs((2, 3, 14, 7, 20, True))
    with pytest.raises(ValueError, match=r"weight \(20, 3, 7, 7\) is not \[D, 3, 4, 4\]"):
        patch_embed(images, weight, bias, pos, 4, cls)
    with pytest.raises(ValueError, match="image 15x15 is not a multiple of the patch size 7"):
        patch_embed(torch.randn(2, 3, 15, 15), weight, bias, pos, 7, cls)
    with pytest.raises(ValueError, match=r"must end with \(4, 20\)"):
        patch_embed(images, weight, bias, pos, 7, None)
    with pytest.raises(ValueError, match="no gradient for the images"):
        patch_embed(images.requires_grad_(), weight, bias, pos, 7, cls)
