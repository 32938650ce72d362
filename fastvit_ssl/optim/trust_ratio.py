"""What LARS and LAMB share: a trust ratio per original parameter tensor, also when ZeRO has cut the tensors up.

Plainly, each parameter is one "slot". Under DeepSpeed ZeRO the optimizer sees flat fp32 partitions instead: every
rank owns a fragment of many tensors (and a tensor may span ranks). `partition_like_zero` gives the optimizer the
layout of its partitions; each fragment becomes a slot, its partial squared norms are summed over the
data-parallel group by tensor, and the trust ratio of the whole tensor is applied to every fragment of it. Without
this an optimizer under ZeRO would compute one ratio per shard: silently wrong training.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Fragment:
    key: int  # index of the original tensor (the same on every rank)
    start: int  # offset in the flat partition
    numel: int
    adapt: bool  # original ndim > 1: weight decay and trust ratio apply


@dataclass
class Slot:
    param: torch.Tensor  # a parameter, or a fragment (view) of a flat partition
    grad: torch.Tensor
    state: dict[str, torch.Tensor]  # views of the owner's state tensors
    owner: torch.Tensor  # what self.state is keyed by
    adapt: bool
    key: int | None = None


class TrustRatioOptimizer(torch.optim.Optimizer):
    zero_layout: dict[int, list[Fragment]] | None = None
    num_keys = 0
    process_group = None

    def partition_like_zero(self, layout: dict[int, list[Fragment]], num_keys: int, process_group=None) -> None:
        """Treat each flat partition (keyed by id) as the listed fragments of `num_keys` original tensors."""
        self.zero_layout, self.num_keys, self.process_group = layout, num_keys, process_group

    def init_state(self, owner: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def slots(self, group: dict) -> list[Slot]:
        out = []
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state.update(self.init_state(p))
            fragments = (self.zero_layout or {}).get(id(p))
            if fragments is None:
                out.append(Slot(p, p.grad, state, p, p.ndim > 1))
                continue
            flat, grad = p.view(-1), p.grad.view(-1)
            for f in fragments:
                views = {k: v.view(-1).narrow(0, f.start, f.numel) if v.ndim else v for k, v in state.items()}
                out.append(
                    Slot(flat.narrow(0, f.start, f.numel), grad.narrow(0, f.start, f.numel), views, p, f.adapt, f.key)
                )
        return out

    def reduce_norms(self, norms: torch.Tensor, slots: list[Slot]) -> torch.Tensor:
        """[S, 2] squared norms (|p|^2, |u|^2) of the slots -> those of the whole tensors the slots belong to."""
        if self.zero_layout is None or not slots:
            return norms
        keys = torch.tensor([s.key for s in slots], device=norms.device)
        total = torch.zeros(self.num_keys, 2, dtype=norms.dtype, device=norms.device).index_add_(0, keys, norms)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(total, group=self.process_group)
        return total[keys]


def trust_ratio(p_norm_sq: torch.Tensor, u_norm_sq: torch.Tensor, coefficient: float) -> torch.Tensor:
    """coefficient * |p| / |u|, or 1 when either norm is 0."""
    ok = (p_norm_sq > 0) & (u_norm_sq > 0)
    return torch.where(ok, coefficient * p_norm_sq.sqrt() / u_norm_sq.clamp_min(1e-30).sqrt(), 1.0)
