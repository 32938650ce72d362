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

    def step(self, views: list[torch.Tensor], lr: float, momentum: float) -> dict[str, torch.Tensor]:
        """One training iteration on this rank's share of the global batch. Returns detached metrics."""
        x1, x2 = (v.to(self.device, non_blocking=True) for v in views[:2])
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        with self.autocast:
            loss = self.forward_module(x1, x2, momentum)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.clip_grad or float("inf"))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"loss": loss.detach(), "grad_norm": grad_norm.detach()}

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
