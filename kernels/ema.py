"""Fused momentum-encoder update: ema = m * ema + (1 - m) * p over a whole list of tensors in one launch per dtype
pair, with fp32 math whatever the storage (one read of each tensor, one write: 3 memory passes instead of the 5 of
two foreach ops, and instead of MoCo v3's two launches and a temporary per tensor)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastvit_ssl.kernels.multi_tensor import address_table, chunk_table, group_by_dtype, tensor_ptr, triton_dtype
from fastvit_ssl.methods.ema import ema_update_ref_

BLOCK = 4096
# 16 warps: 8 elements a thread, ~40 registers, 32-48 resident warps per SM on sm_80/sm_90a (the ahead-of-time
# check's numbers); the default 4 warps needs ~165 registers on sm_90a and leaves 12 warps to hide memory latency.
NUM_WARPS = 16


@triton.jit
def _ema_kernel(
    ema_addrs,
    param_addrs,
    numels,
    chunk_tensor,
    chunk_start,
    momentum,
    EMA_DTYPE: tl.constexpr,
    PARAM_DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    chunk = tl.program_id(0)
    t = tl.load(chunk_tensor + chunk)
    offsets = tl.load(chunk_start + chunk) + tl.arange(0, BLOCK)
    mask = offsets < tl.load(numels + t)
    ema_ptr = tensor_ptr(ema_addrs, t, EMA_DTYPE)
    param_ptr = tensor_ptr(param_addrs, t, PARAM_DTYPE)
    ema = tl.load(ema_ptr + offsets, mask=mask).to(tl.float32)
    param = tl.load(param_ptr + offsets, mask=mask).to(tl.float32)
    tl.store(ema_ptr + offsets, (ema * momentum + param * (1.0 - momentum)).to(EMA_DTYPE), mask=mask)


@torch.no_grad()
def ema_update_(ema_params: list[torch.Tensor], params: list[torch.Tensor], momentum: float) -> None:
    """In place, for every pair: ema = momentum * ema + (1 - momentum) * p (fp32 math, any float storage)."""
    if len(ema_params) != len(params):
        raise ValueError(f"ema_update_: {len(ema_params)} EMA tensors but {len(params)} parameters")
    for e, p in zip(ema_params, params):
        if e.shape != p.shape or e.device != p.device:
            raise ValueError(
                f"ema_update_: EMA tensor {tuple(e.shape)} on {e.device} does not match parameter "
                f"{tuple(p.shape)} on {p.device}"
            )
    for (ema_dtype, param_dtype), idx in group_by_dtype(ema_params, params).items():
        emas, ps = [ema_params[i] for i in idx], [params[i] for i in idx]
        device = emas[0].device
        numels, chunk_tensor, chunk_start = chunk_table(tuple(e.numel() for e in emas), BLOCK, device)
        _ema_kernel[(chunk_tensor.numel(),)](
            address_table(emas, device),
            address_table(ps, device),
            numels,
            chunk_tensor,
            chunk_start,
            float(momentum),
            EMA_DTYPE=triton_dtype(ema_dtype),
            PARAM_DTYPE=triton_dtype(param_dtype),
            BLOCK=BLOCK,
            num_warps=NUM_WARPS,
        )


__all__ = ["ema_update_", "ema_update_ref_"]
