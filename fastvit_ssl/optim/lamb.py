"""LAMB (You et al. 2019) in plain PyTorch: the specification of the fused kernel."""

from __future__ import annotations

import torch


class LAMB(torch.optim.Optimizer):
    """Adam moments with bias correction, then a layer-wise trust ratio.

    m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2;  u = (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps).
    For a tensor with ndim > 1: u += wd * p and p -= lr * (||p|| / ||u||) * u (ratio 1 when either norm is 0).
    Tensors with ndim <= 1 take the plain Adam step, without weight decay or trust ratio, as LARS does here.
    State is fp32 whatever the parameters' dtype.

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

    @torch.no_grad()
    def step(self, closure=None):
        loss = None if closure is None else closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad, state = p.grad.float(), self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
                state["step"] += 1
                t = state["step"].item()
                exp_avg = state["exp_avg"].lerp_(grad, 1 - beta1)
                exp_avg_sq = state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                update = (exp_avg / (1 - beta1**t)) / ((exp_avg_sq / (1 - beta2**t)).sqrt() + group["eps"])
                if p.ndim > 1:
                    update.add_(p.float(), alpha=group["weight_decay"])
                    p_norm, u_norm = p.float().norm(), update.norm()
                    update *= torch.where((p_norm > 0) & (u_norm > 0), p_norm / u_norm, 1.0)
                p.copy_(p.float().add_(update, alpha=-group["lr"]))
        return loss
