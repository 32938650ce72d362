"""LARS as MoCo v3 uses it, in plain PyTorch: the specification of the fused kernel."""

from __future__ import annotations

import torch

from fastvit_ssl.optim.trust_ratio import TrustRatioOptimizer, trust_ratio


class LARS(TrustRatioOptimizer):
    """SGD with momentum and a layer-wise trust ratio (You et al. 2017), following MoCo v3's variant.

    For a tensor with ndim > 1: u = g + wd * p, scaled by trust_coefficient * ||p|| / ||u|| (by 1 when either norm
    is 0). Tensors with ndim <= 1 (biases, norm scales) get neither weight decay nor the trust ratio. Then
    mu = momentum * mu + u and p -= lr * mu. State is fp32 whatever the parameters' dtype. Under ZeRO the norms
    are those of the whole tensors (see trust_ratio.py).

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

    def init_state(self, owner: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"mu": torch.zeros_like(owner, dtype=torch.float32)}

    @torch.no_grad()
    def step(self, closure=None):
        loss = None if closure is None else closure()
        for group in self.param_groups:
            slots = self.slots(group)
            updates = [s.grad.float() + (group["weight_decay"] * s.param.float() if s.adapt else 0) for s in slots]
            norms = [torch.stack([s.param.float().square().sum(), u.square().sum()]) for s, u in zip(slots, updates)]
            norms = self.reduce_norms(torch.stack(norms), slots) if slots else []
            for s, u, (p_sq, u_sq) in zip(slots, updates, norms):
                if s.adapt:
                    u = u * trust_ratio(p_sq, u_sq, group["trust_coefficient"])
                mu = s.state["mu"].mul_(group["momentum"]).add_(u)
                s.param.copy_(s.param.float().add_(mu, alpha=-group["lr"]))
        return loss
