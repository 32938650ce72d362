"""The local engine: one process, or one per device under torchrun with DistributedDataParallel."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from fastvit_ssl import checkpoint, distributed
from fastvit_ssl.methods.base import Method, no_mark
from fastvit_ssl.models.vit import begin_graph_step
from fastvit_ssl.optim.schedules import Hyperparameters, frozen_parameters, set_hyperparameters


class LocalEngine:
    """Runs forward, backward, gradient clipping and the optimizer step of a method.

    Args:
        model: the method (fastvit_ssl.methods.base.Method), already on `device`; DDP wraps its `online` module.
        optimizer: over the method's parameter groups.
        device: where the model lives.
        precision: "fp32"; "bf16" (autocast); or "fp16" (autocast with dynamic loss scaling, torch's GradScaler, for
            GPUs without bf16: a step whose scaled gradients overflow is skipped, counted in `overflows`, and the
            scale halved; not a non-finite step for the guard).
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
        self.grad_norms = GradientNorms(model, self.params)
        if distributed.world_size() > 1:
            self.online = DistributedDataParallel(
                model.online, device_ids=[device.index] if device.type == "cuda" else None
            )
        else:
            self.online = model.online
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        self.autocast = torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
        self.overflows = 0  # fp16 steps skipped by the loss scaler
        self.mark = no_mark  # the phase hook (methods/base.py); the benchmarks set theirs

    def step(self, views: list[torch.Tensor], step: int, hparams: Hyperparameters):
        """Training iteration `step` on this rank's share of the global batch: (detached metrics, finite). A step
        whose loss or gradient is not finite changes nothing: no update, BN statistics restored."""
        views = [v.to(self.device, non_blocking=True) for v in views]
        begin_graph_step()
        set_hyperparameters(self.optimizer, hparams)
        buffers = [b.clone() for b in self.model.buffers()]  # BN running statistics: small
        self.mark("data")
        with self.autocast:
            losses = self.model.step_losses(views, step, hparams, online=self.online, mark=self.mark)
        loss = losses["loss"]
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()
        self.mark("backward")
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)  # norms, clipping and the update see the true gradients
        grad_norm, layer_norms = self.grad_norms(self.clip_grad, self.clip_mode)
        for p in frozen_parameters(self.optimizer, hparams):
            p.grad = None
        finite = bool(torch.isfinite(loss) & torch.isfinite(grad_norm))  # one device sync per step
        if finite:
            self.optimizer.step()
        else:
            torch._foreach_copy_(list(self.model.buffers()), buffers)
        metrics = {**losses, "loss": loss.detach(), "grad_norm": grad_norm.detach(), **layer_norms}
        if self.scaler is not None:
            metrics["loss_scale"] = self.scaler.get_scale()  # before update: the scale this step used
            self.scaler.update()  # halved after an overflow, doubled after 2,000 clean steps
            if not finite and bool(torch.isfinite(loss)):  # the gradients overflowed: the scaler's business
                self.overflows += 1
                finite = True
        self.optimizer.zero_grad(set_to_none=True)
        self.mark("optimizer")
        return metrics, finite

    def evaluation_model(self) -> Method | None:
        """The method, for rank 0's evaluations and pictures (None on the other ranks)."""
        return self.model if distributed.is_main() else None

    def checkpoints(self, run_dir: Path) -> list[Path]:
        """Complete checkpoints in the run folder, oldest first."""
        return checkpoint.list_checkpoints(run_dir)

    def save(self, run_dir: Path, step: int, client_state: dict, keep_last: int) -> Path:
        """Rank 0 writes model (with the momentum networks), optimizer and `client_state` atomically."""
        path = checkpoint.path_for(run_dir, step)
        if distributed.is_main():
            state = {**client_state, "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}
            if self.scaler is not None:
                state["scaler"] = self.scaler.state_dict()
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
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        return state


def clip_gradients(grads: list[torch.Tensor], norms: torch.Tensor, max_norm: float, mode: str = "global") -> None:
    """Scale `grads` in place from their norms [P]: "global" by max_norm / (total norm + 1e-6) when the total
    exceeds max_norm (torch's clip_grad_norm_), "per_tensor" each tensor whose own norm exceeds max_norm (DINO's
    and SiT's clip_gradients); max_norm 0 leaves them (and launches nothing)."""
    if not max_norm:
        return
    if mode == "global":
        scale = (max_norm / (torch.linalg.vector_norm(norms) + 1e-6)).clamp(max=1.0)
        torch._foreach_mul_(grads, scale)
    else:
        torch._foreach_mul_(grads, list((max_norm / (norms + 1e-6)).clamp(max=1.0).unbind()))


def layer_groups(method: Method) -> dict[str, list[torch.nn.Parameter]]:
    """The trained parameters by layer: the first layer (the patch projection when it trains, else block 0), every
    block, the rest of the backbone and each head (by its module's name): MoCo v3's instability shows as spikes in
    the first layer's gradient."""
    backbone = {id(p): name.split(".") for name, p in method.backbone.named_parameters()}
    groups: dict[str, list[torch.nn.Parameter]] = {}
    for name, p in method.online.named_parameters():
        if not p.requires_grad:
            continue
        parts = backbone.get(id(p))
        if parts is None:
            key = f"grad/{name.split('.')[0]}"
        elif parts[0] == "blocks":
            key = f"grad/block{int(parts[1]):02d}"
        else:
            key = "grad/patch_embed" if parts[0] == "patch_embed" else "grad/encoder_other"
        groups.setdefault(key, []).append(p)
    return groups


class GradientNorms:
    """Every gradient's norm in one multi-tensor pass; from them the global norm and the norm of each of
    `layer_groups`, and the clipping (a handful of launches in all, whatever the number of tensors)."""

    def __init__(self, method: Method, params: list[torch.nn.Parameter]):
        groups = layer_groups(method)
        self.names = list(groups)
        group_of = {id(p): i for i, ps in enumerate(groups.values()) for p in ps}
        self.params, self.group_of = params, [group_of.get(id(p), -1) for p in params]
        self.index: dict[tuple, torch.Tensor] = {}  # which tensors have gradients -> their groups, on the device

    def __call__(self, max_norm: float, mode: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(global norm before clipping, {layer: norm}); the gradients clipped in place."""
        present = tuple(p.grad is not None for p in self.params)
        grads = [p.grad for p in self.params if p.grad is not None]
        norms = torch.stack(torch._foreach_norm(grads))  # (P,)
        if present not in self.index:
            groups = [g for g, has in zip(self.group_of, present) if has]
            self.index[present] = torch.tensor(groups, device=norms.device)
        groups = self.index[present]
        squares = norms.square().to(torch.promote_types(norms.dtype, torch.float32))
        per_layer = squares.new_zeros(len(self.names) + 1).index_add_(0, groups + 1, squares)  # slot 0: no layer
        clip_gradients(grads, norms, max_norm, mode)
        return squares.sum().sqrt(), dict(zip(self.names, per_layer[1:].sqrt().unbind()))
