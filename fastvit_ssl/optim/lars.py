"""LARS as MoCo v3 uses it, in plain PyTorch: the specification of the fused kernel."""

from __future__ import annotations

import torch


class LARS(torch.optim.Optimizer):
    """SGD with momentum and a layer-wise trust ratio (You et al. 2017), following MoCo v3's variant.

    For a tensor with ndim > 1: u = g + wd * p, scaled by trust_coefficient * ||p|| / ||u|| (by 1 when either norm
    is 0). Tensors with ndim <= 1 (biases, norm scales) get neither weight decay nor the trust ratio. Then
    mu = momentum * mu + u and p -= lr * mu. State is fp32 whatever the parameters' dtype.

    Args:
        params: tensors or param groups.
        lr: learning rate (the schedule sets it every step).
        weight_decay: L2 coefficient added to the gradient of ndim > 1 tensors.
        momentum: heavy-ball momentum.
        trust_coefficient: eta in the trust ratio.
    """

    def __init__(
        self,
        params,
        lr: float = 0.0,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        trust_coefficient: float = 0.001,
    ):
        super().__init__(
            params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, trust_coefficient=trust_coefficient)
        )

    @torch.no_grad()
    def step(self, closure=None):
        loss = None if closure is None else closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad.float()
                if p.ndim > 1:
                    update = update.add(p.float(), alpha=group["weight_decay"])
                    p_norm, u_norm = p.float().norm(), update.norm()
                    ratio = torch.where((p_norm > 0) & (u_norm > 0), group["trust_coefficient"] * p_norm / u_norm, 1.0)
                    update = update * ratio
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p, dtype=torch.float32)
                mu = state["mu"].mul_(group["momentum"]).add_(update)
                p.copy_(p.float().add_(mu, alpha=-group["lr"]))
        return loss
