"""The losses in plain PyTorch, the specifications the fused kernels are tested against: MoCo v3's contrastive loss,
the cross-entropy of an LM head (BEiT's masked visual tokens) and DINO's cross-entropy between prototype
distributions."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from fastvit_ssl import distributed


def contrastive_loss_ref(q: torch.Tensor, k: torch.Tensor, temperature: float, label_offset: int = 0) -> torch.Tensor:
    """2 tau * mean_i CE(normalize(q_i) . normalize(K)^T / tau, label = i + label_offset).

    q: [N, D] queries of this rank; k: [M, D] keys gathered from all ranks (M = N * world size), so the positive
    key of query i is key i + N * rank.
    """
    q = F.normalize(q, dim=1)
    k = F.normalize(k, dim=1)
    logits = q @ k.T / temperature  # (N, M)
    labels = torch.arange(q.shape[0], device=q.device) + label_offset
    return F.cross_entropy(logits, labels) * (2 * temperature)


def contrastive_across_ranks(loss_fn: Callable, q: torch.Tensor, k: torch.Tensor, temperature: float) -> torch.Tensor:
    """`loss_fn` (this reference or the fused kernel) of this rank's queries against the keys of all ranks."""
    keys = distributed.all_gather_cat(k)  # (N * world, dim)
    return loss_fn(q, keys, temperature, label_offset=q.shape[0] * distributed.rank())


def linear_cross_entropy_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> torch.Tensor:
    """The mean (or with reduction="sum" the sum) over the rows whose target is not `ignore_index` of
    CE(x W^T + b, target), in fp32 or wider (a mean of no rows is 0).

    x: [N, D] tokens; weight: [V, D]; bias: [V] or None; target: [N] long (padding rows: ignore_index).
    """
    logits = F.linear(x, weight, bias)  # (N, V)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    losses = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="none")  # 0 where ignored
    if reduction == "sum":
        return losses.sum()
    return losses.sum() / (target != ignore_index).sum().clamp_min(1)


def prototype_cross_entropy_ref(
    student: torch.Tensor,
    teacher: torch.Tensor,
    center: torch.Tensor,
    student_temp: float,
    teacher_temp: float,
    global_crops: int = 2,
) -> torch.Tensor:
    """DINO's loss: the mean over (teacher crop i, student crop v != i) pairs of the batch mean of
    CE(softmax((teacher_i - center) / teacher_temp), log_softmax(student_v / student_temp)), in fp32 or wider.

    student: [V * B, K] prototype logits of V crops, crop-major (rows v * B ... v * B + B - 1 are crop v); teacher:
    [global_crops * B, K] logits of the first crops (the global ones), no gradient; center: [1, K].
    """
    wide = torch.promote_types(student.dtype, torch.float32)
    B = teacher.shape[0] // global_crops
    log_p = F.log_softmax(student.to(wide) / student_temp, dim=-1).split(B)  # V x (B, K)
    q = F.softmax((teacher.to(wide) - center.to(wide)) / teacher_temp, dim=-1).detach().split(B)  # G x (B, K)
    terms = [(-q[i] * log_p[v]).sum(-1).mean() for i in range(len(q)) for v in range(len(log_p)) if v != i]
    return torch.stack(terms).mean()
