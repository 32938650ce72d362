"""The local engine: one process, or one per device under torchrun with DistributedDataParallel."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from fastvit_ssl import checkpoint, distributed


class LocalEngine:
    """Runs forward, backward, gradient clipping and the optimizer step of a MoCo v3 model.

    Args:
        model: the MoCoV3 module, already on `device`.
        optimizer: over the model's trainable parameters.
        device: where the model lives.
        precision: "fp32", or "bf16" for autocast on CUDA (the CPU demo and tests run fp32).
        clip_grad: max global gradient norm; 0 disables clipping (the norm is still measured).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        device: torch.device,
        precision: str = "fp32",
        clip_grad: float = 0.0,
    ):
        self.model, self.optimizer, self.device, self.clip_grad = model, optimizer, device, clip_grad
        self.params = [p for p in model.parameters() if p.requires_grad]
        if distributed.world_size() > 1:
            self.forward_module = DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None
            )
        else:
            self.forward_module = model
        self.autocast = (
            torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
        )

    def step(self, views: list[torch.Tensor], lr: float, momentum: float, poison: bool = False):
        """One training iteration on this rank's share of the global batch: (detached metrics, finite). A step whose
        loss or gradient is not finite changes nothing: no update, BN statistics restored. `poison` makes the loss
        NaN (a test hook)."""
        x1, x2 = (v.to(self.device, non_blocking=True) for v in views[:2])
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        buffers = [b.clone() for b in self.model.buffers()]  # BN running statistics: small
        with self.autocast:
            loss = self.forward_module(x1, x2, momentum)
        if poison:
            loss = loss * float("nan")
        loss.backward()
        layer_norms = grad_norms_by_layer(self.model)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.clip_grad or float("inf"))
        finite = bool(torch.isfinite(loss) & torch.isfinite(grad_norm))  # one device sync per step
        if finite:
            self.optimizer.step()
        else:
            torch._foreach_copy_(list(self.model.buffers()), buffers)
        self.optimizer.zero_grad(set_to_none=True)
        return {"loss": loss.detach(), "grad_norm": grad_norm.detach(), **layer_norms}, finite

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


def grad_norms_by_layer(model) -> dict[str, torch.Tensor]:
    """Gradient norm of the first layer (the patch projection when it trains, else block 0), of every block and of
    the heads: the paper's instability shows as spikes in the first layer's gradient."""
    groups: dict[str, list[torch.Tensor]] = {}
    for name, p in model.online.named_parameters():
        if p.grad is None:
            continue
        parts = name.split(".")
        key = (
            f"grad/block{int(parts[2]):02d}"
            if parts[1] == "blocks"
            else "grad/patch_embed"
            if parts[1] == "patch_embed"
            else f"grad/{parts[0].removeprefix('base_')}"
            if parts[0] != "base_encoder"
            else "grad/encoder_other"
        )
        groups.setdefault(key, []).append(p.grad)
    return {k: torch.linalg.vector_norm(torch.stack(torch._foreach_norm(g))) for k, g in groups.items()}
