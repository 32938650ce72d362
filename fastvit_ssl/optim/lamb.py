"""LAMB (You et al. 2019) in plain PyTorch: the specification of the fused kernel."""

from __future__ import annotations

import torch

from fastvit_ssl.optim.trust_ratio import TrustRatioOptimizer, trust_ratio


class LAMB(TrustRatioOptimizer):
    """Adam moments with bias correction, then a layer-wise trust ratio.

    m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2;  u = (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps).
    For a tensor with ndim > 1: u += wd * p and p -= lr * (||p|| / ||u||) * u (ratio 1 when either norm is 0).
    Tensors with ndim <= 1 take the plain Adam step, without weight decay or trust ratio, as LARS does here.
    State is fp32 whatever the parameters' dtype. Under ZeRO the norms are those of the whole tensors.

    Args:
        params: tensors or param groups.
        lr: learning rate (the schedule sets it every step).
        betas: (b1, b2).
        eps: added to the root of the second moment.
        weight_decay: decoupled decay of ndim > 1 tensors, inside the trust ratio.
    """

    def __init__(
        self,
        params,
        lr: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
    ):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    def init_state(self, owner: torch.Tensor) -> dict[str, torch.Tensor]:
        return {
            "step": torch.zeros((), dtype=torch.float32),
            "exp_avg": torch.zeros_like(owner, dtype=torch.float32),
            "exp_avg_sq": torch.zeros_like(owner, dtype=torch.float32),
        }

    @torch.no_grad()
    def step(self, closure=None):
        loss = None if closure is None else closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            slots = self.slots(group)
            for owner in {id(s.owner): s.owner for s in slots}.values():
                self.state[owner]["step"] += 1
            updates = []
            for s in slots:
                grad, t = s.grad.float(), s.state["step"].item()
                exp_avg = s.state["exp_avg"].lerp_(grad, 1 - beta1)
                exp_avg_sq = s.state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                u = (exp_avg / (1 - beta1**t)) / ((exp_avg_sq / (1 - beta2**t)).sqrt() + group["eps"])
                updates.append(u.add_(s.param.float(), alpha=group["weight_decay"]) if s.adapt else u)
            norms = [torch.stack([s.param.float().square().sum(), u.square().sum()]) for s, u in zip(slots, updates)]
            norms = self.reduce_norms(torch.stack(norms), slots) if slots else []
            for s, u, (p_sq, u_sq) in zip(slots, updates, norms):
                ratio = trust_ratio(p_sq, u_sq, 1.0) if s.adapt else 1.0
                s.param.copy_(s.param.float().sub_(u * (group["lr"] * ratio)))
        return loss
