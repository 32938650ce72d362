"""Momentum-encoder update in plain PyTorch (multi-tensor foreach ops): the specification of the fused kernel."""

from __future__ import annotations

import torch


@torch.no_grad()
def ema_update_ref_(ema_params: list[torch.Tensor], params: list[torch.Tensor], momentum: float) -> None:
    """In place, for every pair: ema = momentum * ema + (1 - momentum) * p, computed in fp32 (or the storage's dtype
    when it is wider)."""
    ema32 = [e.to(torch.promote_types(e.dtype, torch.float32)) for e in ema_params]  # the same tensors unless bf16
    torch._foreach_mul_(ema32, momentum)
    torch._foreach_add_(ema32, [p.to(e.dtype) for p, e in zip(params, ema32)], alpha=1.0 - momentum)
    low_precision = [(e, e32) for e, e32 in zip(ema_params, ema32) if e32 is not e]
    if low_precision:
        torch._foreach_copy_([e for e, _ in low_precision], [e32 for _, e32 in low_precision])
