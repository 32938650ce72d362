"""Attention kernels for the ViT's `model.attention`, chosen when the model is built (nothing switches per call).

Every backend computes softmax(q k^T / sqrt(d) + bias) v on q, k, v [B, heads, T, d] and returns [B, heads, T, d]:
- auto: torch's SDPA picks (flash, memory-efficient, math), cuDNN only where its version is known good for ViT
  lengths (cuDNN before 9.15.1 computed wrong results for sequence lengths not divisible by 128, pytorch issue
  169849; a ViT has 197 or 257 tokens);
- flash | efficient | cudnn | math: one SDPA backend, forced;
- flex: FlexAttention (compiled), the bias as a score modification;
- explicit: the plain ops, softmax(q @ k^T * scale) @ v, as timm 0.4.9 (the version the official MoCo v3 pins);
- flash_attn2 | flash_attn3 | flash_attn4: the flash-attn package's kernels (FA2; FA3 for Hopper; FA4, CuTe), when
  installed (an optional GPU extra), bf16/fp16 on CUDA, no bias.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from fastvit_ssl.specs import ATTENTION_KERNELS as BACKENDS

SDPA = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "math": SDPBackend.MATH,
}
FLASH_ATTN = {  # backend -> (module, function) of the flash-attn package's interfaces
    "flash_attn2": ("flash_attn", "flash_attn_func"),
    "flash_attn3": ("flash_attn_interface", "flash_attn_func"),
    "flash_attn4": ("flash_attn.cute", "flash_attn_func"),
}
CUDNN_GOOD = 91501  # cuDNN 9.15.1
NO_BIAS = ("flash", "cudnn", *FLASH_ATTN)  # kernels without an additive logit bias (BEiT's relative positions)


class AttentionUnavailable(ValueError):
    """`model.attention` names a kernel this machine or model cannot run; the message says why and what to use."""


def check_available(backend: str, device: torch.device, bias: bool = False, precision: str = "bf16") -> None:
    """Raise AttentionUnavailable when `backend` cannot run on `device` (with a logit bias, if `bias`; at
    `precision`, fp32 | bf16 | fp16)."""
    if backend not in BACKENDS:
        raise AttentionUnavailable(f"model.attention={backend} is not one of {', '.join(BACKENDS)}")
    if bias and backend in NO_BIAS:
        raise AttentionUnavailable(
            f"model.attention={backend} cannot add a logit bias (BEiT's relative positions); use auto, efficient, "
            "flex or math"
        )
    cuda_only = backend in ("efficient", "cudnn", "flex", *FLASH_ATTN)  # flex: no backward on CPUs
    if cuda_only and device.type != "cuda":
        raise AttentionUnavailable(f"model.attention={backend} runs on CUDA devices only; use auto on {device.type}")
    if device.type == "cuda" and precision == "fp32" and backend in ("flash", *FLASH_ATTN):
        raise AttentionUnavailable(
            f"model.attention={backend} computes in bf16 or fp16 on CUDA; use run.precision=bf16 or attention auto"
        )
    if backend == "cudnn" and (torch.backends.cudnn.version() or 0) < CUDNN_GOOD:
        raise AttentionUnavailable(
            f"model.attention=cudnn: cuDNN {torch.backends.cudnn.version()} is older than 9.15.1, whose attention is "
            "wrong for sequence lengths not divisible by 128 (a ViT's 197); use auto or flash"
        )
    if backend in FLASH_ATTN:
        module, _ = FLASH_ATTN[backend]
        if importlib.util.find_spec(module.split(".")[0]) is None:
            raise AttentionUnavailable(
                f"model.attention={backend} needs the flash-attn package ({module}), which is not installed; use auto"
            )


def attention_fn(backend: str) -> Callable:
    """(q, k, v, bias or None) -> output, for `backend` (see the module docstring)."""
    if backend == "explicit":
        return explicit_attention
    if backend == "flex":
        return flex
    if backend in FLASH_ATTN:
        return functools.partial(flash_attn, *FLASH_ATTN[backend])
    backends = [SDPA[backend]] if backend in SDPA else auto_backends()
    return functools.partial(sdpa, backends)


def auto_backends() -> list[SDPBackend]:
    """SDPA's own choice among its backends, without cuDNN where its version is not known good."""
    backends = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    if (torch.backends.cudnn.version() or 0) >= CUDNN_GOOD:
        backends.insert(2, SDPBackend.CUDNN_ATTENTION)
    return backends


def sdpa(backends: list[SDPBackend], q, k, v, bias):
    with sdpa_kernel(backends):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=None if bias is None else bias.to(q.dtype))


def explicit_attention(q, k, v, bias):
    """timm 0.4.9's Attention: the [B, heads, T, T] weights materialised, softmax in the input's dtype."""
    weights = (q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)  # (B, heads, T, T)
    if bias is not None:
        weights = weights + bias.to(weights.dtype)
    return weights.softmax(dim=-1) @ v


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def flex(q, k, v, bias):
    if bias is None:
        return _compiled_flex()(q, k, v)
    bias = bias.to(q.dtype)[0]  # (heads, T, T)
    return _compiled_flex()(q, k, v, score_mod=lambda score, b, h, i, j: score + bias[h, i, j])


def flash_attn(module: str, name: str, q, k, v, bias):
    """The flash-attn package's kernel on [B, T, heads, d] tensors (its layout); FA3/FA4 return (out, lse)."""
    fn = getattr(importlib.import_module(module), name)
    out = fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=1.0 / math.sqrt(q.shape[-1]))
    return (out[0] if isinstance(out, tuple) else out).transpose(1, 2)
