"""The local engine: one process, or one per device under torchrun with DistributedDataParallel."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from fastvit_ssl import checkpoint, distributed
from fastvit_ssl.methods.base import Method
from fastvit_ssl.optim.schedules import Hyperparameters, set_hyperparameters


class LocalEngine:
    """Runs forward, backward, gradient clipping and the optimizer step of a method.

    Args:
        model: the method (fastvit_ssl.methods.base.Method), already on `device`; DDP wraps its `online` module.
        optimizer: over the method's parameter groups.
        device: where the model lives.
        precision: "fp32", or "bf16" for autocast on CUDA (the CPU demo and tests run fp32).
        clip_grad: max gradient norm; 0 disables clipping (the norm is still measured).
        clip_mode: "global" (one norm over all tensors) or "per_tensor" (each tensor on its own, as SiT/DINO).
    """

    def __init__(
        self,
        model: Method,
        optimizer: torch.optim.Optimizer,
        device: torch.device,
        precision: str = "fp32",
        clip_grad: float = 0.0,
        clip_mode: str = "global",
    ):
        self.model, self.optimizer, self.device = model, optimizer, device
        self.clip_grad, self.clip_mode = clip_grad, clip_mode
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        if distributed.world_size() > 1:
            self.online = DistributedDataParallel(
                model.online, device_ids=[device.index] if device.type == "cuda" else None
            )
        else:
            self.online = model.online
        self.autocast = (
            torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
        )

    def step(self, views: list[torch.Tensor], step: int, hparams: Hyperparameters, poison: bool = False):
        """Training iteration `step` on this rank's share of the global batch: (detached metrics, finite). A step
        whose loss or gradient is not finite changes nothing: no update, BN statistics restored. `poison` makes the
        loss NaN (a test hook)."""
        views = [v.to(self.device, non_blocking=True) for v in views]
        set_hyperparameters(self.optimizer, hparams)
        buffers = [b.clone() for b in self.model.buffers()]  # BN running statistics: small
        with self.autocast:
            losses = self.model.step_losses(views, step, hparams.momentum, online=self.online)
        loss = losses["loss"] * float("nan") if poison else losses["loss"]
        loss.backward()
        layer_norms = grad_norms_by_layer(self.model)
        grad_norm = clip_gradients(self.params, self.clip_grad, self.clip_mode)
        finite = bool(torch.isfinite(loss) & torch.isfinite(grad_norm))  # one device sync per step
        if finite:
            self.optimizer.step()
        else:
            torch._foreach_copy_(list(self.model.buffers()), buffers)
        self.optimizer.zero_grad(set_to_none=True)
        return {**losses, "loss": loss.detach(), "grad_norm": grad_norm.detach(), **layer_norms}, finite

    def checkpoints(self, run_dir: Path) -> list[Path]:
        """Complete checkpoints in the run folder, oldest first."""
        return checkpoint.list_checkpoints(run_dir)

    def save(self, run_dir: Path, step: int, client_state: dict, keep_last: int) -> Path:
        """Rank 0 writes model (with the momentum networks), optimizer and `client_state` atomically."""
        path = checkpoint.path_for(run_dir, step)
        if distributed.is_main():
            state = {**client_state, "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}
            checkpoint.save(path, state)
            checkpoint.prune(run_dir, keep_last)
        distributed.barrier()
        return path

    def load(self, path: Path, config: dict) -> dict:
        """Restore model and optimizer from `path` after checking it was written for this model; returns the
        whole stored state (step, rng, ...)."""
        state = checkpoint.load(path)
        checkpoint.check_compatible(state["config"], config, path)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        return state


def clip_gradients(params: list[torch.Tensor], max_norm: float, mode: str = "global") -> torch.Tensor:
    """Clip in place; returns the global gradient norm before clipping. "per_tensor" scales each tensor whose own
    norm exceeds max_norm by max_norm / (norm + 1e-6) (DINO's and SiT's clip_gradients); 0 disables clipping."""
    if mode == "global" or not max_norm:
        return torch.nn.utils.clip_grad_norm_(params, max_norm or float("inf"))
    grads = [p.grad for p in params if p.grad is not None]
    norms = torch._foreach_norm(grads)
    torch._foreach_mul_(grads, [(max_norm / (n + 1e-6)).clamp(max=1.0) for n in norms])
    return torch.linalg.vector_norm(torch.stack(norms))


def layer_groups(method: Method) -> dict[str, list[torch.nn.Parameter]]:
    """The trained parameters by layer: the first layer (the patch projection when it trains, else block 0), every
    block, the rest of the backbone and each head: the paper's instability shows as spikes in the first layer's
    gradient."""
    backbone = {id(p): name.split(".") for name, p in method.backbone.named_parameters()}
    groups: dict[str, list[torch.nn.Parameter]] = {}
    for name, p in method.online.named_parameters():
        if not p.requires_grad:
            continue
        parts = backbone.get(id(p))
        if parts is None:
            key = f"grad/{name.split('.')[0].removeprefix('base_')}"
        elif parts[0] == "blocks":
            key = f"grad/block{int(parts[1]):02d}"
        else:
            key = "grad/patch_embed" if parts[0] == "patch_embed" else "grad/encoder_other"
        groups.setdefault(key, []).append(p)
    return groups


def grad_norms_by_layer(method: Method) -> dict[str, torch.Tensor]:
    """Gradient norm of each of `layer_groups`."""
    norms = {}
    for key, params in layer_groups(method).items():
        grads = [p.grad for p in params if p.grad is not None]
        if grads:
            norms[key] = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    return norms
