"""Fused normalised contrastive logits + cross-entropy: MoCo v3's ctr(q, k) without the N x M logits in memory.

    loss = 2 tau * mean_i [ lse_j(s_ij) - s_i,label_i ],   s_ij = q_i . k_j / (|q_i| |k_j| tau),   label_i = i + offset

Forward: a program owns BLOCK_N queries and one chunk of the keys, streamed in tiles with an online log-sum-exp (as
in FlashAttention); only its running max, sum and positive logit per query leave the chip, O(S N) memory for S
chunks, merged into lse_i and the row loss afterwards (as flash-decoding splits the keys). Chunks exist to fill the
GPU: a rank's few hundred queries are only a handful of BLOCK_N row blocks. Backward recomputes each logit tile; with
p_ij = exp(s_ij - lse_i), g_ij = p_ij - [j = label_i] and cos_ij = s_ij tau (summed over the chunks' partial dq):

    dL/dq_i = (2 tau / N) dL * (1 / (tau |q_i|)) * ( sum_j g_ij k_j/|k_j| - (sum_j g_ij cos_ij) q_i/|q_i| )

The keys come from the momentum encoder and get no gradient. Inverse norms (O(N + M) floats) are computed once
outside the tiles; dots accumulate in fp32 for bf16/fp16 inputs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastvit_ssl.kernels.target import Target, interpreted, target_of
from fastvit_ssl.methods.losses import contrastive_loss_ref

MAX_DIM = 256  # a row of q (and of k) is one tile; larger rows spill (see _config)


def _config(kernel: str, dim: int, dtype: torch.dtype, target: Target) -> dict:
    """Block sizes of the forward ("fwd") or backward ("bwd") kernel for feature dim `dim` on `target`.

    From the ahead-of-time check (python -m fastvit_ssl.kernels.aot): the largest tiles that compile without spills
    on both sm_80 and sm_90a for D <= 256. fp32's exact ("ieee") dots run on the FMA units with operand tiles in
    registers, hence small tiles; bf16/fp16 dots use tensor cores, at the fastest tiles of a sweep on an H100
    (benchmarks/results/2026-11-25-NVIDIA-H100-80GB-HBM3/contrastive_sweep.csv, N=4,096, M=65,536, D=256:
    forward 0.73 ms at 128x32, 4 warps, against 1.10 ms at 64x64, 8 warps; backward 1.77 ms at 32x128, 8 warps,
    against 1.96 ms at 32x64: its fastest, 1.21 ms at 128x64, spills on both GPUs, so the gate refuses it).
    The key chunks of `_grid` keep the GPU busy at a rank's usual few hundred queries.
    """
    block_d = max(16, triton.next_power_of_2(dim))
    if target.interpreted:  # few, large programs
        return dict(BLOCK_N=32, BLOCK_M=128, BLOCK_D=block_d, num_warps=4)
    if dtype == torch.float32:
        block_n, block_m = (32, 16) if kernel == "fwd" else (16, 32)
        return dict(BLOCK_N=block_n, BLOCK_M=block_m, BLOCK_D=block_d, num_warps=4, num_stages=2)
    if kernel == "fwd":
        return dict(BLOCK_N=128, BLOCK_M=32, BLOCK_D=block_d, num_warps=4, num_stages=3)
    return dict(BLOCK_N=32, BLOCK_M=128, BLOCK_D=block_d, num_warps=8, num_stages=3)


@triton.jit
def _query_tile(q_ptr, N, D, stride_q, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr):
    """(rows, dims, valid [BLOCK_N, BLOCK_D], q tile) of this program's BLOCK_N queries."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    valid = (rows < N)[:, None] & (dims[None, :] < D)
    q = tl.load(q_ptr + rows[:, None] * stride_q + dims[None, :], mask=valid, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    return rows, dims, valid, q


@triton.jit
def _logits_tile(
    q, rq_scaled, k_ptr, rk_ptr, cols, dims, M, D, stride_k, UPCAST: tl.constexpr, PRECISION: tl.constexpr
):
    """(s [BLOCK_N, BLOCK_M], the key tile, its inverse norms); columns past M get -inf."""
    col_ok = cols < M
    k = tl.load(k_ptr + cols[:, None] * stride_k + dims[None, :], mask=col_ok[:, None] & (dims[None, :] < D), other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
    rk = tl.load(rk_ptr + cols, mask=col_ok, other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * rq_scaled[:, None] * rk[None, :]
    return tl.where(col_ok[None, :], s, float("-inf")), k, rk


@triton.jit
def _contrastive_fwd_kernel(
    q_ptr,
    k_ptr,
    rq_ptr,
    rk_ptr,
    max_ptr,
    sum_ptr,
    positive_ptr,
    N,
    M,
    D,
    stride_q,
    stride_k,
    label_offset,
    inv_t,
    CHUNK,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    rows, dims, _, q = _query_tile(q_ptr, N, D, stride_q, BLOCK_N, BLOCK_D, UPCAST)
    row_ok = rows < N
    rq_scaled = tl.load(rq_ptr + rows, mask=row_ok, other=0.0) * inv_t
    labels = rows + label_offset
    run_max = tl.full([BLOCK_N], float("-inf"), tl.float32)
    run_sum = tl.zeros([BLOCK_N], tl.float32)
    positive = tl.zeros([BLOCK_N], tl.float32)
    chunk_start = tl.program_id(1) * CHUNK
    for start in range(chunk_start, tl.minimum(chunk_start + CHUNK, M), BLOCK_M):
        cols = start + tl.arange(0, BLOCK_M)
        s = _logits_tile(q, rq_scaled, k_ptr, rk_ptr, cols, dims, M, D, stride_k, UPCAST, PRECISION)[0]
        new_max = tl.maximum(run_max, tl.max(s, axis=1))
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(s - new_max[:, None]), axis=1)
        run_max = new_max
        positive += tl.sum(tl.where(cols[None, :] == labels[:, None], s, 0.0), axis=1)
    partial = tl.program_id(1) * N + rows  # [S, N] outputs
    tl.store(max_ptr + partial, run_max, mask=row_ok)
    tl.store(sum_ptr + partial, run_sum, mask=row_ok)
    tl.store(positive_ptr + partial, positive, mask=row_ok)


@triton.jit
def _contrastive_bwd_kernel(
    q_ptr,
    k_ptr,
    rq_ptr,
    rk_ptr,
    lse_ptr,
    dloss_ptr,
    dq_ptr,
    N,
    M,
    D,
    stride_q,
    stride_k,
    stride_dq,
    label_offset,
    inv_t,
    two_t_over_n,
    CHUNK,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    rows, dims, tile_ok, q = _query_tile(q_ptr, N, D, stride_q, BLOCK_N, BLOCK_D, UPCAST)
    row_ok = rows < N
    rq = tl.load(rq_ptr + rows, mask=row_ok, other=0.0)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    labels = rows + label_offset
    g_keys = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)  # sum_j g_ij k_j / |k_j|
    g_cos = tl.zeros([BLOCK_N], tl.float32)  # sum_j g_ij cos_ij, times 1 / tau
    chunk_start = tl.program_id(1) * CHUNK
    for start in range(chunk_start, tl.minimum(chunk_start + CHUNK, M), BLOCK_M):
        cols = start + tl.arange(0, BLOCK_M)
        s, k, rk = _logits_tile(q, rq * inv_t, k_ptr, rk_ptr, cols, dims, M, D, stride_k, UPCAST, PRECISION)
        p = tl.where(cols[None, :] < M, tl.exp(s - lse[:, None]), 0.0)
        g = p - tl.where(cols[None, :] == labels[:, None], 1.0, 0.0)
        g_cos += tl.sum(g * tl.where(cols[None, :] < M, s, 0.0), axis=1)
        g = g * rk[None, :]  # k_j / |k_j| folded into g: the key tile enters the dot exactly as stored
        if q_ptr.dtype.element_ty == tl.float32:
            g_keys += tl.dot(g, k, input_precision=PRECISION)
        else:  # g as the sum of two bf16/fp16 halves (~16 significant bits): one rounded g costs 2-3 bits of dq
            g_hi = g.to(q_ptr.dtype.element_ty)
            g_lo = (g - g_hi.to(tl.float32)).to(q_ptr.dtype.element_ty)
            g_keys += tl.dot(g_hi.to(k.dtype), k, input_precision=PRECISION)
            g_keys += tl.dot(g_lo.to(k.dtype), k, input_precision=PRECISION)
    scale = tl.load(dloss_ptr) * two_t_over_n * rq * inv_t  # (BLOCK_N,)
    q_unit = q.to(tl.float32) * rq[:, None]
    dq = scale[:, None] * (g_keys - (g_cos / inv_t)[:, None] * q_unit)
    dq_ptr += tl.program_id(1) * N * stride_dq  # this chunk's partial dq [N, D] of [S, N, D]
    tl.store(dq_ptr + rows[:, None] * stride_dq + dims[None, :], dq.to(dq_ptr.dtype.element_ty), mask=tile_ok)


def _check(q: torch.Tensor, k: torch.Tensor, label_offset: int) -> None:
    if q.ndim != 2 or k.ndim != 2 or q.shape[1] != k.shape[1]:
        raise ValueError(f"contrastive_loss: q [N, D] and k [M, D] expected, got {tuple(q.shape)} and {tuple(k.shape)}")
    if q.shape[1] > MAX_DIM:
        raise ValueError(f"contrastive_loss: feature dim {q.shape[1]} > {MAX_DIM}; use contrastive_loss_ref")
    if q.dtype != k.dtype or q.device != k.device:
        raise ValueError(f"contrastive_loss: q ({q.dtype}, {q.device}) and k ({k.dtype}, {k.device}) must match")
    if not 0 <= label_offset <= k.shape[0] - q.shape[0]:
        raise ValueError(
            f"contrastive_loss: labels {label_offset}..{label_offset + q.shape[0] - 1} fall outside "
            f"the {k.shape[0]} keys"
        )
    if k.requires_grad:
        raise ValueError(
            "contrastive_loss: keys (momentum-encoder outputs) must not require grad; "
            "use contrastive_loss_ref to differentiate through them"
        )


def _dot_flags(x: torch.Tensor) -> dict:
    """fp32 inputs get full-precision dots; the interpreter gets fp32 operands (its bf16 dot is wrong)."""
    return dict(
        UPCAST=interpreted(x.device) or x.dtype == torch.float32,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
    )


def _inverse_norms(x: torch.Tensor) -> torch.Tensor:
    return x.float().norm(dim=1).clamp_min(1e-12).reciprocal()  # F.normalize's eps


def _grid(N: int, M: int, cfg: dict, target: Target) -> tuple[tuple[int, int], int]:
    """(row blocks, key chunks) and the keys per chunk: chunks of whole BLOCK_M tiles, as many as it takes to give
    every SM two programs (one chunk in the interpreter, where programs are slow, or when N alone fills the GPU)."""
    row_blocks, tiles = triton.cdiv(N, cfg["BLOCK_N"]), triton.cdiv(M, cfg["BLOCK_M"])
    wanted = 1 if target.interpreted else triton.cdiv(2 * target.sms, row_blocks)
    tiles_per_chunk = triton.cdiv(tiles, min(tiles, wanted))
    return (row_blocks, triton.cdiv(tiles, tiles_per_chunk)), tiles_per_chunk * cfg["BLOCK_M"]


def contrastive_fwd(q, k, temperature: float, label_offset: int):
    """Row losses [N] (fp32), row log-sum-exps [N] and the inverse norms of q and k."""
    q, k = q.contiguous(), k.contiguous()
    (N, D), M = q.shape, k.shape[0]
    rq, rk = _inverse_norms(q), _inverse_norms(k)
    target = target_of(q.device)
    cfg = _config("fwd", D, q.dtype, target)
    grid, chunk = _grid(N, M, cfg, target)
    run_max, run_sum, positive = torch.empty(3, grid[1], N, dtype=torch.float32, device=q.device)  # [S, N] each
    _contrastive_fwd_kernel[grid](
        q,
        k,
        rq,
        rk,
        run_max,
        run_sum,
        positive,
        N,
        M,
        D,
        q.stride(0),
        k.stride(0),
        label_offset,
        1.0 / temperature,
        chunk,
        **_dot_flags(q),
        **cfg,
    )
    top = run_max.amax(0)
    lse = top + (run_sum * (run_max - top).exp()).sum(0).log()  # the chunks' log-sum-exps merged
    return lse - positive.sum(0), lse, rq, rk


def contrastive_bwd(q, k, rq, rk, lse, dloss, temperature: float, label_offset: int) -> torch.Tensor:
    q, k = q.contiguous(), k.contiguous()
    (N, D), M = q.shape, k.shape[0]
    target = target_of(q.device)
    cfg = _config("bwd", D, q.dtype, target)
    grid, chunk = _grid(N, M, cfg, target)
    # one chunk writes dq itself; several write fp32 partial sums [S, N, D]
    dq = torch.empty_like(q) if grid[1] == 1 else q.new_empty(grid[1], N, D, dtype=torch.float32)
    _contrastive_bwd_kernel[grid](
        q,
        k,
        rq,
        rk,
        lse,
        dloss.float().contiguous(),
        dq,
        N,
        M,
        D,
        q.stride(0),
        k.stride(0),
        D,
        label_offset,
        1.0 / temperature,
        2.0 * temperature / N,
        chunk,
        **_dot_flags(q),
        **cfg,
    )
    return dq if grid[1] == 1 else dq.sum(0).to(q.dtype)


class ContrastiveLossFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, temperature, label_offset):
        loss_rows, lse, rq, rk = contrastive_fwd(q, k, temperature, label_offset)
        ctx.save_for_backward(q, k, rq, rk, lse)
        ctx.temperature, ctx.label_offset = temperature, label_offset
        return loss_rows.mean() * (2.0 * temperature)

    @staticmethod
    def backward(ctx, dloss):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        q, k, rq, rk, lse = ctx.saved_tensors
        return contrastive_bwd(q, k, rq, rk, lse, dloss, ctx.temperature, ctx.label_offset), None, None, None


def contrastive_loss(q: torch.Tensor, k: torch.Tensor, temperature: float, label_offset: int = 0) -> torch.Tensor:
    """Same value and q-gradient as contrastive_loss_ref, in O(N + M) extra memory instead of O(N M)."""
    _check(q, k, label_offset)
    return ContrastiveLossFn.apply(q, k, float(temperature), int(label_offset))


__all__ = ["contrastive_loss", "contrastive_loss_ref"]
