"""Fused LM head: the cross-entropy of Linear(x) over a large vocabulary (BEiT: 8,192 visual tokens) without the
[N, V] logits in memory.

The rows are taken a chunk at a time, sized so that a chunk's logits take about the memory of the input x. For each
chunk: the logits z = x W^T + b (one matrix product), then a Triton kernel turns them in place into their gradient,
row by row in two passes over the vocabulary,

    lse_i = log sum_v exp(z_iv)      loss_i = lse_i - z_i,t_i      dz_iv = exp(z_iv - lse_i) - [v = t_i]

(zero for rows whose target is `ignore_index`), and the chunk's share of dx = dz W, dW = dz^T x, db = sum_i dz is
accumulated. The gradients are made in the forward pass, the only time the logits exist; backward scales them by
the incoming gradient over the number of counted rows. Extra memory: one chunk of logits and fp32 dW, db.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastvit_ssl.kernels.target import Target, target_of
from fastvit_ssl.methods.losses import linear_cross_entropy_ref


def _config(vocab: int, target: Target) -> dict:
    """BLOCK_V logits a program handles at once: the whole row in the interpreter (few, large programs); on a GPU
    2,048 with 8 warps (8 per thread; per-lane running max and sum: no spills on sm_80/sm_90a, see the compile
    check)."""
    if target.interpreted:
        return dict(BLOCK_V=triton.next_power_of_2(vocab), num_warps=4)
    return dict(BLOCK_V=min(2048, triton.next_power_of_2(vocab)), num_warps=8)


@triton.jit
def _ce_rows_kernel(logits_ptr, target_ptr, loss_ptr, V, stride, ignore_index, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    ptr = logits_ptr + row * stride
    cols = tl.arange(0, BLOCK_V)
    # pass 1: per-lane running max and sum (finite start: lanes past V stay at sum 0), merged at the end
    run_max = tl.full([BLOCK_V], -1e30, tl.float32)
    run_sum = tl.zeros([BLOCK_V], tl.float32)
    for start in range(0, V, BLOCK_V):
        z = tl.load(ptr + start + cols, mask=start + cols < V, other=-float("inf")).to(tl.float32)
        new_max = tl.maximum(run_max, z)
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.exp(z - new_max)
        run_max = new_max
    top = tl.max(run_max, axis=0)
    lse = top + tl.log(tl.sum(run_sum * tl.exp(run_max - top), axis=0))
    label = tl.load(target_ptr + row)
    counted = label != ignore_index
    z_label = tl.load(ptr + label, mask=counted, other=0.0).to(tl.float32)
    tl.store(loss_ptr + row, tl.where(counted, lse - z_label, 0.0))
    # pass 2: the logits' gradient, in place
    weight = tl.where(counted, 1.0, 0.0)
    for start in range(0, V, BLOCK_V):
        inside = start + cols < V
        z = tl.load(ptr + start + cols, mask=inside, other=0.0).to(tl.float32)
        g = (tl.exp(z - lse) - tl.where(start + cols == label, 1.0, 0.0)) * weight
        tl.store(ptr + start + cols, g.to(logits_ptr.dtype.element_ty), mask=inside)


def ce_rows_(logits: torch.Tensor, target: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Row losses [N] (fp32; 0 for ignored rows) of logits [N, V]; the logits become their gradient, in place."""
    N, V = logits.shape
    loss = torch.empty(N, dtype=torch.float32, device=logits.device)
    cfg = _config(V, target_of(logits.device))
    _ce_rows_kernel[(N,)](logits, target, loss, V, logits.stride(0), ignore_index, **cfg)
    return loss


def _compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype


def chunk_rows(n: int, dim: int, vocab: int) -> int:
    """Rows per chunk: a chunk's logits hold about as many numbers as the input x."""
    return max(1, triton.cdiv(n, triton.cdiv(vocab, dim)))


class LinearCrossEntropyFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, target, ignore_index, reduction):
        dtype = _compute_dtype(x, weight)
        x_, w_ = x.to(dtype), weight.to(dtype)
        b_ = bias.to(dtype) if bias is not None else None
        (N, D), V = x.shape, weight.shape[0]
        dx = torch.empty_like(x_)
        dw = torch.zeros(V, D, dtype=torch.float32, device=x.device)
        db = torch.zeros(V, dtype=torch.float32, device=x.device)
        loss_rows = []
        step = chunk_rows(N, D, V)
        for start in range(0, N, step):
            xc = x_[start : start + step]
            logits = xc @ w_.t() if b_ is None else torch.addmm(b_, xc, w_.t())  # (c, V)
            loss_rows.append(ce_rows_(logits, target[start : start + step].contiguous(), ignore_index))
            dx[start : start + step] = logits @ w_
            dw += (logits.t() @ xc).float()
            db += logits.sum(0, dtype=torch.float32)
        count = (target != ignore_index).sum().clamp_min(1).float() if reduction == "mean" else dw.new_ones(())
        ctx.save_for_backward(dx, dw, db, count)
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        return torch.cat(loss_rows).sum() / count

    @staticmethod
    def backward(ctx, dloss):
        dx, dw, db, count = ctx.saved_tensors
        scale = dloss / count
        x_dtype, w_dtype, b_dtype = ctx.dtypes
        grad_b = (db * scale).to(b_dtype) if b_dtype is not None else None
        return (dx * scale).to(x_dtype), (dw * scale).to(w_dtype), grad_b, None, None, None


def linear_cross_entropy(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> torch.Tensor:
    """Same value and gradients as linear_cross_entropy_ref (x [N, D], weight [V, D], bias [V], target [N] long),
    in O(N D + V D) memory instead of O(N V)."""
    if x.ndim != 2 or weight.ndim != 2 or x.shape[1] != weight.shape[1] or target.shape != x.shape[:1]:
        raise ValueError(
            f"linear_cross_entropy: x {tuple(x.shape)}, weight {tuple(weight.shape)}, target {tuple(target.shape)}: "
            "expected [N, D], [V, D], [N]"
        )
    if reduction not in ("mean", "sum"):
        raise ValueError(f"linear_cross_entropy: reduction={reduction!r}, expected 'mean' or 'sum'")
    return LinearCrossEntropyFn.apply(x, weight, bias, target, int(ignore_index), reduction)


__all__ = ["linear_cross_entropy", "linear_cross_entropy_ref"]
