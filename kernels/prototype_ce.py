"""Fused DINO loss: the cross-entropy between the teacher's and the student's prototype distributions over all
(teacher crop, student crop) pairs, without any [V B, K] probability tensor in memory.

The specification (prototype_cross_entropy_ref): V student crops of B rows each, crop-major in s [V B, K]; the first
G of them (the global crops) also seen by the teacher, t [G B, K], centred by c [1, K]; temperatures ts and tt;

    q_i[b] = softmax((t_i[b] - c) / tt)      loss = 1 / (B P) sum_{i < G, v != i} sum_b H(q_i[b], softmax(s_v[b] / ts))

with P the number of pairs. As each q_i[b] sums to one, H(q, softmax(x)) = LSE(x) - <q, x>, and the pairs that share
a student row add up: with count_v = #{i < G : i != v} (G - 1 for a global crop, G for a local one) and
Q_v[b] = sum_{i < G, i != v} q_i[b],

    loss = 1 / (B P) sum_{v, b} [ count_v LSE_k(s_v[b, k] / ts) - <Q_v[b], s_v[b]> / ts ],   P = sum_v count_v.

Two forward kernels: the G B teacher rows' log-sum-exps of (t - c) / tt, then one pass over K per student row with an
online log-sum-exp of s / ts and the dot with Q_v, whose q_i are recomputed on the fly from t, c and the teacher's
log-sum-exps (each teacher row is re-read by the V crops of its sample, which are consecutive programs so that those
reads can come from L2). Saved: the inputs themselves (which keeps the student's logits alive until backward) and
the (V + G) B log-sum-exps. Backward recomputes, one tile per program,

    dL/ds_v[b, k] = dL / (B P) * (count_v softmax(s_v[b] / ts)_k - Q_v[b, k]) / ts,

and nothing for the teacher or the centre (DINO's teacher is a momentum encoder; the reference detaches q). All
arithmetic in fp32 whatever the storage (fp32, bf16, fp16); the gradient in the student's dtype. Memory beyond the
inputs: the gradient and O((V + G) B) floats; at DINO's V = 10, B = 64, K = 65,536 in bf16, 80 MiB against the
reference's 496 MiB (its fp32 log-probabilities and one fp32 copy of q_i per pair, saved for backward).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastvit_ssl.kernels.target import Target, target_of
from fastvit_ssl.methods.losses import prototype_cross_entropy_ref

FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def _config(K: int, target: Target) -> dict:
    """BLOCK_K prototypes a program handles at once, in all three kernels.

    The interpreter takes a whole row per tile (few, large programs). On a GPU, tiles of 1,024 with 8 warps, 4 values
    a thread, from the ahead-of-time check (python -m fastvit_ssl.kernels.aot; no spills on sm_80/sm_90a). The
    forward keeps a running max, sum and dot per lane (as linear_ce does): 48 registers, 5 resident blocks per SM,
    so DINO's 640 student rows take one wave on an H100 (660 slots) and 1.2 on an A100 (540); tiles of 2,048 need 80
    registers, 3 blocks per SM, two waves. Not yet timed on a GPU.
    """
    if target.interpreted:
        return dict(BLOCK_K=triton.next_power_of_2(K), num_warps=4)
    return dict(BLOCK_K=min(1024, triton.next_power_of_2(K)), num_warps=8)


@triton.jit
def _teacher_lse_kernel(t_ptr, c_ptr, lse_ptr, K, stride_t, inv_tt, BLOCK_K: tl.constexpr):
    """lse[r] = LSE_k((t[r, k] - c[k]) / tt) for teacher row r = program id."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_K)
    # per-lane running max and sum (finite start: lanes past K stay at sum 0), merged at the end
    run_max = tl.full([BLOCK_K], -1e30, tl.float32)
    run_sum = tl.zeros([BLOCK_K], tl.float32)
    for start in range(0, K, BLOCK_K):
        inside = start + cols < K
        t = tl.load(t_ptr + row * stride_t + start + cols, mask=inside, other=-float("inf")).to(tl.float32)
        c = tl.load(c_ptr + start + cols, mask=inside, other=0.0).to(tl.float32)
        z = (t - c) * inv_tt
        new_max = tl.maximum(run_max, z)
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.exp(z - new_max)
        run_max = new_max
    top = tl.max(run_max, axis=0)
    tl.store(lse_ptr + row, top + tl.log(tl.sum(run_sum * tl.exp(run_max - top), axis=0)))


@triton.jit
def _student_row(V, B, G):
    """(student row, crop v, sample b, count_v) of this program: consecutive programs are the V crops of a sample,
    which read the same G teacher rows."""
    pid = tl.program_id(0)
    b = pid // V
    v = pid % V
    count = (G - tl.where(v < G, 1, 0)).to(tl.float32)
    return (v * B + b).to(tl.int64), v, b, count


@triton.jit
def _teacher_mass(t_ptr, lse_t_ptr, c, b, v, B, G, k, inside, stride_t, inv_tt):
    """Q_v[b, k] = sum_{i < G, i != v} q_i[b, k] on the tile k [BLOCK_K] (0 past K), c the centre's tile."""
    mass = tl.zeros_like(c)
    for i in range(G):
        if i != v:
            row = (i * B + b).to(tl.int64)
            t = tl.load(t_ptr + row * stride_t + k, mask=inside, other=-float("inf")).to(tl.float32)
            mass += tl.exp((t - c) * inv_tt - tl.load(lse_t_ptr + row))
    return mass


@triton.jit
def _prototype_fwd_kernel(
    s_ptr,
    t_ptr,
    c_ptr,
    lse_t_ptr,
    loss_ptr,
    lse_s_ptr,
    V,
    B,
    G,
    K,
    stride_s,
    stride_t,
    inv_ts,
    inv_tt,
    BLOCK_K: tl.constexpr,
):
    row, v, b, count = _student_row(V, B, G)
    cols = tl.arange(0, BLOCK_K)
    run_max = tl.full([BLOCK_K], -1e30, tl.float32)
    run_sum = tl.zeros([BLOCK_K], tl.float32)
    dot = tl.zeros([BLOCK_K], tl.float32)  # per lane: sum over tiles of Q_v[b, k] s[k]
    for start in range(0, K, BLOCK_K):
        k = start + cols
        inside = k < K
        s = tl.load(s_ptr + row * stride_s + k, mask=inside, other=0.0).to(tl.float32)
        c = tl.load(c_ptr + k, mask=inside, other=0.0).to(tl.float32)
        z = tl.where(inside, s * inv_ts, -float("inf"))
        new_max = tl.maximum(run_max, z)
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.exp(z - new_max)
        run_max = new_max
        dot += _teacher_mass(t_ptr, lse_t_ptr, c, b, v, B, G, k, inside, stride_t, inv_tt) * s
    top = tl.max(run_max, axis=0)
    lse = top + tl.log(tl.sum(run_sum * tl.exp(run_max - top), axis=0))
    tl.store(lse_s_ptr + row, lse)
    tl.store(loss_ptr + row, count * lse - tl.sum(dot, axis=0) * inv_ts)


@triton.jit
def _prototype_bwd_kernel(
    s_ptr,
    t_ptr,
    c_ptr,
    lse_t_ptr,
    lse_s_ptr,
    dloss_ptr,
    ds_ptr,
    V,
    B,
    G,
    K,
    stride_s,
    stride_t,
    stride_ds,
    inv_ts,
    inv_tt,
    inv_pairs,
    BLOCK_K: tl.constexpr,
):
    row, v, b, count = _student_row(V, B, G)
    k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    inside = k < K
    s = tl.load(s_ptr + row * stride_s + k, mask=inside, other=0.0).to(tl.float32)
    c = tl.load(c_ptr + k, mask=inside, other=0.0).to(tl.float32)
    p = tl.exp(s * inv_ts - tl.load(lse_s_ptr + row))
    mass = _teacher_mass(t_ptr, lse_t_ptr, c, b, v, B, G, k, inside, stride_t, inv_tt)
    scale = tl.load(dloss_ptr) * inv_pairs * inv_ts  # dL / (B P ts)
    ds = scale * (count * p - mass)
    tl.store(ds_ptr + row * stride_ds + k, ds.to(ds_ptr.dtype.element_ty), mask=inside)


def _pairs(V: int, G: int) -> int:
    """P = sum_v count_v: every (i < G, v < V) but the G' = min(G, V) with v = i."""
    return V * G - min(V, G)


def _check(student: torch.Tensor, teacher: torch.Tensor, center: torch.Tensor, global_crops: int) -> None:
    name = "prototype_cross_entropy"
    if student.ndim != 2 or teacher.ndim != 2 or student.shape[1] == 0:
        raise ValueError(
            f"{name}: student {tuple(student.shape)}, teacher {tuple(teacher.shape)}: expected [V * B, K], [G * B, K]"
        )
    K = student.shape[1]
    if teacher.shape[1] != K:
        raise ValueError(f"{name}: student has K = {K} prototypes, teacher {teacher.shape[1]}")
    if tuple(center.shape) not in ((1, K), (K,)):
        raise ValueError(f"{name}: center {tuple(center.shape)}, expected [1, {K}]")
    if global_crops < 1 or teacher.shape[0] == 0 or teacher.shape[0] % global_crops:
        raise ValueError(
            f"{name}: teacher has {teacher.shape[0]} rows, not a positive multiple of {global_crops} crops"
        )
    B = teacher.shape[0] // global_crops
    if student.shape[0] == 0 or student.shape[0] % B:
        raise ValueError(f"{name}: student has {student.shape[0]} rows, not V * B for B = {B} (teacher rows / G)")
    if _pairs(student.shape[0] // B, global_crops) == 0:
        raise ValueError(f"{name}: one crop and one global crop: no (teacher, student) pair to compare")
    for what, x in (("student", student), ("teacher", teacher), ("center", center)):
        if x.dtype not in FLOATS or x.device != student.device:
            raise ValueError(f"{name}: {what} is {x.dtype} on {x.device}; expected fp32/bf16/fp16 on {student.device}")


def prototype_ce_fwd(student, teacher, center, student_temp: float, teacher_temp: float, global_crops: int):
    """(row losses [V B], student log-sum-exps [V B], teacher log-sum-exps [G B]), fp32; the loss is
    row_losses.sum() / (B P)."""
    student, teacher, center = student.contiguous(), teacher.contiguous(), center.contiguous()
    (N, K), G = student.shape, global_crops
    B = teacher.shape[0] // G
    target = target_of(student.device)
    lse_t = torch.empty(G * B, dtype=torch.float32, device=student.device)
    cfg = _config(K, target)
    _teacher_lse_kernel[(G * B,)](teacher, center, lse_t, K, teacher.stride(0), 1.0 / teacher_temp, **cfg)
    loss_rows, lse_s = torch.empty(2, N, dtype=torch.float32, device=student.device)
    _prototype_fwd_kernel[(N,)](
        student,
        teacher,
        center,
        lse_t,
        loss_rows,
        lse_s,
        N // B,
        B,
        G,
        K,
        student.stride(0),
        teacher.stride(0),
        1.0 / student_temp,
        1.0 / teacher_temp,
        **cfg,
    )
    return loss_rows, lse_s, lse_t


def prototype_ce_bwd(
    student, teacher, center, lse_s, lse_t, dloss, student_temp: float, teacher_temp: float, global_crops: int
) -> torch.Tensor:
    """dL/dstudent [V B, K] in the student's dtype, for the incoming gradient dloss (a 0-d tensor)."""
    student, teacher, center = student.contiguous(), teacher.contiguous(), center.contiguous()
    (N, K), G = student.shape, global_crops
    B = teacher.shape[0] // G
    cfg = _config(K, target_of(student.device))
    dstudent = torch.empty_like(student)
    _prototype_bwd_kernel[(N, triton.cdiv(K, cfg["BLOCK_K"]))](
        student,
        teacher,
        center,
        lse_t,
        lse_s,
        dloss.float().contiguous(),
        dstudent,
        N // B,
        B,
        G,
        K,
        student.stride(0),
        teacher.stride(0),
        dstudent.stride(0),
        1.0 / student_temp,
        1.0 / teacher_temp,
        1.0 / (B * _pairs(N // B, G)),
        **cfg,
    )
    return dstudent


class PrototypeCrossEntropyFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, center, student_temp, teacher_temp, global_crops):
        loss_rows, lse_s, lse_t = prototype_ce_fwd(student, teacher, center, student_temp, teacher_temp, global_crops)
        # the centre as it was: callers move it in place after the loss (DINO does), which the reference allows
        ctx.save_for_backward(student, teacher, center.clone(), lse_s, lse_t)
        ctx.args = (student_temp, teacher_temp, global_crops)
        B = teacher.shape[0] // global_crops
        return loss_rows.sum() / (B * _pairs(student.shape[0] // B, global_crops))

    @staticmethod
    def backward(ctx, dloss):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None
        student, teacher, center, lse_s, lse_t = ctx.saved_tensors
        dstudent = prototype_ce_bwd(student, teacher, center, lse_s, lse_t, dloss, *ctx.args)
        return dstudent, None, None, None, None, None


def prototype_cross_entropy(
    student: torch.Tensor,
    teacher: torch.Tensor,
    center: torch.Tensor,
    student_temp: float,
    teacher_temp: float,
    global_crops: int = 2,
) -> torch.Tensor:
    """Same value and student gradient as prototype_cross_entropy_ref (student [V B, K] crop-major, teacher
    [G B, K], center [1, K]; fp32 result), in O((V + G) B) extra memory instead of O(V B K); teacher and center get
    no gradient."""
    _check(student, teacher, center, int(global_crops))
    return PrototypeCrossEntropyFn.apply(
        student, teacher.detach(), center.detach(), float(student_temp), float(teacher_temp), int(global_crops)
    )


__all__ = ["prototype_cross_entropy", "prototype_cross_entropy_ref"]
