"""Fused LARS and LAMB: every parameter tensor in two multi-tensor launches per step (and dtype group).

Pass 1 walks all tensors chunk by chunk and accumulates, per tensor, |p|^2 and |u|^2 of the update u into a
[T, 2] fp32 buffer (atomic adds); LAMB also writes its new moments there. Pass 2 turns the two norms of the
chunk's tensor into its trust ratio and applies the step. The semantics are those of the references
(fastvit_ssl.optim.lars.LARS, fastvit_ssl.optim.lamb.LAMB): tensors with ndim <= 1 get neither weight decay nor
trust ratio; parameters may be bf16, the state is fp32 and has the references' names, so checkpoints move between
the fused and the reference optimizers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastvit_ssl.kernels.multi_tensor import address_table, chunk_table, group_by_dtype, tensor_ptr, triton_dtype
from fastvit_ssl.optim.lamb import LAMB
from fastvit_ssl.optim.lars import LARS
from fastvit_ssl.optim.trust_ratio import Slot

BLOCK = 4096
# 16 warps: 8 elements a thread, at most 73 registers, 32 resident warps per SM on sm_80/sm_90a (the
# ahead-of-time check's numbers); the default 4 warps needs up to 254 registers on sm_90a and keeps 8.
NUM_WARPS = 16


@triton.jit
def _chunk(chunk_tensor, chunk_start, numels, BLOCK: tl.constexpr):
    """(tensor index, element offsets, mask) of this program's chunk."""
    chunk = tl.program_id(0)
    t = tl.load(chunk_tensor + chunk)
    offsets = tl.load(chunk_start + chunk) + tl.arange(0, BLOCK)
    return t, offsets, offsets < tl.load(numels + t)


@triton.jit
def _add_norms(norms_ptr, t, p, u):
    """Add this chunk's |p|^2 and |u|^2 to tensor t's running sums (chunks of a tensor run in parallel)."""
    tl.atomic_add(norms_ptr + 2 * t, tl.sum(p * p, axis=0))
    tl.atomic_add(norms_ptr + 2 * t + 1, tl.sum(u * u, axis=0))


@triton.jit
def _trust_ratio(norms_ptr, t, adapt, coefficient):
    """coefficient * |p| / |u| for adapted tensors with both norms > 0, else 1."""
    p_norm = tl.sqrt(tl.load(norms_ptr + 2 * t))
    u_norm = tl.sqrt(tl.load(norms_ptr + 2 * t + 1))
    use = (adapt != 0) & (p_norm > 0) & (u_norm > 0)
    return tl.where(use, coefficient * p_norm / tl.where(use, u_norm, 1.0), 1.0)


@triton.jit
def _lars_norms_kernel(
    p_addrs,
    g_addrs,
    adapt_ptr,
    numels,
    chunk_tensor,
    chunk_start,
    norms_ptr,
    weight_decay,
    P_DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    t, offsets, mask = _chunk(chunk_tensor, chunk_start, numels, BLOCK)
    if tl.load(adapt_ptr + t) != 0:
        p = tl.load(tensor_ptr(p_addrs, t, P_DTYPE) + offsets, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(tensor_ptr(g_addrs, t, P_DTYPE) + offsets, mask=mask, other=0.0).to(tl.float32)
        _add_norms(norms_ptr, t, p, g + weight_decay * p)


@triton.jit
def _lars_update_kernel(
    p_addrs,
    g_addrs,
    mu_addrs,
    adapt_ptr,
    numels,
    chunk_tensor,
    chunk_start,
    norms_ptr,
    lr,
    weight_decay,
    momentum,
    trust_coefficient,
    P_DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    t, offsets, mask = _chunk(chunk_tensor, chunk_start, numels, BLOCK)
    adapt = tl.load(adapt_ptr + t)
    p_ptr = tensor_ptr(p_addrs, t, P_DTYPE)
    mu_ptr = tensor_ptr(mu_addrs, t, tl.float32)
    p = tl.load(p_ptr + offsets, mask=mask).to(tl.float32)
    g = tl.load(tensor_ptr(g_addrs, t, P_DTYPE) + offsets, mask=mask).to(tl.float32)
    u = (g + tl.where(adapt != 0, weight_decay, 0.0) * p) * _trust_ratio(norms_ptr, t, adapt, trust_coefficient)
    mu = tl.load(mu_ptr + offsets, mask=mask) * momentum + u
    tl.store(mu_ptr + offsets, mu, mask=mask)
    tl.store(p_ptr + offsets, (p - lr * mu).to(P_DTYPE), mask=mask)


@triton.jit
def _lamb_update_direction(p, m, v, t, adapt, corrections_ptr, weight_decay, eps):
    """Adam's bias-corrected direction (per-tensor corrections 1 - beta^step) plus decoupled weight decay."""
    u = (m / tl.load(corrections_ptr + 2 * t)) / (tl.sqrt(v / tl.load(corrections_ptr + 2 * t + 1)) + eps)
    return u + tl.where(adapt != 0, weight_decay, 0.0) * p


@triton.jit
def _lamb_moments_kernel(
    p_addrs,
    g_addrs,
    m_addrs,
    v_addrs,
    adapt_ptr,
    numels,
    chunk_tensor,
    chunk_start,
    norms_ptr,
    corrections_ptr,
    beta1,
    beta2,
    eps,
    weight_decay,
    P_DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    t, offsets, mask = _chunk(chunk_tensor, chunk_start, numels, BLOCK)
    adapt = tl.load(adapt_ptr + t)
    m_ptr = tensor_ptr(m_addrs, t, tl.float32)
    v_ptr = tensor_ptr(v_addrs, t, tl.float32)
    p = tl.load(tensor_ptr(p_addrs, t, P_DTYPE) + offsets, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(tensor_ptr(g_addrs, t, P_DTYPE) + offsets, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + offsets, mask=mask, other=0.0) * beta1 + (1.0 - beta1) * g
    v = tl.load(v_ptr + offsets, mask=mask, other=0.0) * beta2 + (1.0 - beta2) * g * g
    tl.store(m_ptr + offsets, m, mask=mask)
    tl.store(v_ptr + offsets, v, mask=mask)
    if adapt != 0:
        u = tl.where(mask, _lamb_update_direction(p, m, v, t, adapt, corrections_ptr, weight_decay, eps), 0.0)
        _add_norms(norms_ptr, t, p, u)


@triton.jit
def _lamb_update_kernel(
    p_addrs,
    m_addrs,
    v_addrs,
    adapt_ptr,
    numels,
    chunk_tensor,
    chunk_start,
    norms_ptr,
    corrections_ptr,
    lr,
    eps,
    weight_decay,
    P_DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    t, offsets, mask = _chunk(chunk_tensor, chunk_start, numels, BLOCK)
    adapt = tl.load(adapt_ptr + t)
    p_ptr = tensor_ptr(p_addrs, t, P_DTYPE)
    p = tl.load(p_ptr + offsets, mask=mask).to(tl.float32)
    m = tl.load(tensor_ptr(m_addrs, t, tl.float32) + offsets, mask=mask)
    v = tl.load(tensor_ptr(v_addrs, t, tl.float32) + offsets, mask=mask)
    u = _lamb_update_direction(p, m, v, t, adapt, corrections_ptr, weight_decay, eps)
    tl.store(p_ptr + offsets, (p - lr * _trust_ratio(norms_ptr, t, adapt, 1.0) * u).to(P_DTYPE), mask=mask)


class _MultiTensorStep:
    """Address tables of a list of slots (parameters, or ZeRO fragments of them) of one dtype, for one step."""

    def __init__(self, slots: list[Slot], state_names: tuple[str, ...]):
        self.device = slots[0].param.device
        self.p_dtype = triton_dtype(slots[0].param.dtype)
        self.numels, self.chunk_tensor, self.chunk_start = chunk_table(
            tuple(s.param.numel() for s in slots), BLOCK, self.device
        )
        self.grid = (self.chunk_tensor.numel(),)
        self.adapt = torch.tensor([s.adapt for s in slots], dtype=torch.int32).to(self.device, non_blocking=True)
        self.p = address_table([s.param for s in slots], self.device)
        self.g = address_table([s.grad for s in slots], self.device)
        self.state = [address_table([s.state[name] for s in slots], self.device) for name in state_names]
        self.norms = torch.zeros(len(slots), 2, dtype=torch.float32, device=self.device)


def _dtype_groups(slots: list[Slot]):
    """The slots split by parameter dtype: one pair of launches per dtype."""
    for s in slots:
        if s.grad.dtype != s.param.dtype or not s.grad.is_contiguous():
            raise ValueError(f"fused optimizers need contiguous gradients of the parameter's dtype ({s.param.dtype})")
    for idx in group_by_dtype([s.param for s in slots]).values():
        yield [slots[i] for i in idx]


class FusedLARS(LARS):
    """LARS with the reference's semantics and state (ZeRO fragments included), in two multi-tensor launches per
    step and dtype."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = None if closure is None else closure()
        for group in self.param_groups:
            for slots in _dtype_groups(self.slots(group)):
                t = _MultiTensorStep(slots, ("mu",))
                table = (t.adapt, t.numels, t.chunk_tensor, t.chunk_start)
                _lars_norms_kernel[t.grid](
                    t.p,
                    t.g,
                    *table,
                    t.norms,
                    group["weight_decay"],
                    P_DTYPE=t.p_dtype,
                    BLOCK=BLOCK,
                    num_warps=NUM_WARPS,
                )
                norms = self.reduce_norms(t.norms, slots).contiguous()
                _lars_update_kernel[t.grid](
                    t.p,
                    t.g,
                    t.state[0],
                    *table,
                    norms,
                    group["lr"],
                    group["weight_decay"],
                    group["momentum"],
                    group["trust_coefficient"],
                    P_DTYPE=t.p_dtype,
                    BLOCK=BLOCK,
                    num_warps=NUM_WARPS,
                )
        return loss


class FusedLAMB(LAMB):
    """LAMB with the reference's semantics and state (ZeRO fragments included), in two multi-tensor launches per
    step and dtype."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = None if closure is None else closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            all_slots = self.slots(group)
            for owner in {id(s.owner): s.owner for s in all_slots}.values():
                self.state[owner]["step"] += 1
            for slots in _dtype_groups(all_slots):
                steps = torch.stack([s.state["step"] for s in slots]).double()  # CPU tensors: no device sync
                corrections = torch.stack([1 - beta1**steps, 1 - beta2**steps], dim=1).float().to(slots[0].param.device)
                t = _MultiTensorStep(slots, ("exp_avg", "exp_avg_sq"))
                table = (t.adapt, t.numels, t.chunk_tensor, t.chunk_start)
                _lamb_moments_kernel[t.grid](
                    t.p,
                    t.g,
                    *t.state,
                    *table,
                    t.norms,
                    corrections,
                    beta1,
                    beta2,
                    group["eps"],
                    group["weight_decay"],
                    P_DTYPE=t.p_dtype,
                    BLOCK=BLOCK,
                    num_warps=NUM_WARPS,
                )
                norms = self.reduce_norms(t.norms, slots).contiguous()
                _lamb_update_kernel[t.grid](
                    t.p,
                    *t.state,
                    *table,
                    norms,
                    corrections,
                    group["lr"],
                    group["eps"],
                    group["weight_decay"],
                    P_DTYPE=t.p_dtype,
                    BLOCK=BLOCK,
                    num_warps=NUM_WARPS,
                )
        return loss


__all__ = ["LAMB", "LARS", "FusedLAMB", "FusedLARS"]
