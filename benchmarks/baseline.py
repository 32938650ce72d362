"""The official code's training step, the baseline of the benchmarks: what users of facebookresearch/moco-v3 (and of
SiT's and BEiT's official code) run today, on the same model code so that only the way of training differs.

Read from main_moco.py's train() and moco/builder.py (SiT's main.py and BEiT's engine_for_pretraining.py train the
same way): fp16 autocast with a GradScaler (gradients unscaled and clipped where the recipe clips); the online
forward first, then the momentum update as a Python loop over parameter pairs, then the targets; one encoder pass
per view where the official code makes one; the logits materialised (the reference loss); torch's default AdamW
(foreach on CUDA); optimizer.zero_grad() before backward.
Its attention is timm 0.4.9's plain ops as pinned ("explicit"), or torch's SDPA as a modern timm runs it ("auto").
"""

from __future__ import annotations

import contextlib

import torch

from fastvit_ssl.config import Config
from fastvit_ssl.engine.local import clip_gradients
from fastvit_ssl.kernels.dispatch import REFERENCE_OPS
from fastvit_ssl.methods.base import method_class, no_mark
from fastvit_ssl.methods.build import build_method
from fastvit_ssl.optim.schedules import Hyperparameters, Schedules

PINNED, MODERN = "explicit", "auto"  # model.attention of the two forms of the baseline


def timed_hyperparameters(cfg: Config) -> Hyperparameters:
    """What every timed step trains with, ours and the baseline: the config's schedules where the warm-up ends
    (the peak lr, the method's own values there)."""
    return Schedules(cfg, method_class(cfg.method.name), steps_per_epoch=1).at(int(cfg.optim.warmup_epochs))


class OfficialStep:
    """Args:
    cfg: the run's config (model.attention says which form of the baseline; run.precision fp16 trains with a
        GradScaler, as the official scripts, bf16 or fp32 without).
    device: where it trains.
    """

    def __init__(self, cfg: Config, device: torch.device):
        torch.manual_seed(cfg.run.seed)
        self.model = build_method(cfg, REFERENCE_OPS).to(device)
        self.model.encode_views_in_one_pass(False)
        wd = cfg.optim.weight_decay
        groups = [{"params": g["params"], "weight_decay": wd * g["wd_scale"]} for g in self.model.param_groups()]
        self.optimizer = torch.optim.AdamW(groups, lr=1e-4)
        self.hparams = timed_hyperparameters(cfg)
        self.device, self.momentum = device, self.hparams.momentum
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.run.precision)
        autocast = dtype is not None and device.type != "meta"  # on meta, step_cost.py emulates autocast
        self.autocast = torch.autocast(device.type, dtype=dtype) if autocast else contextlib.nullcontext()
        self.scaler = torch.amp.GradScaler(device.type) if cfg.run.precision == "fp16" else None
        self.clip, self.clip_mode = cfg.optim.clip_grad, cfg.optim.clip_mode  # SiT: per tensor; BEiT: global
        self.params = [p for g in groups for p in g["params"]]
        self.mark = no_mark

    @torch.no_grad()
    def momentum_update(self) -> None:
        """builder.py's _update_momentum_encoder: one multiply-add per parameter pair."""
        for p, ema in self.model.ema_pairs():
            ema.data = ema.data * self.momentum + p.data * (1.0 - self.momentum)

    def clip_gradients(self) -> None:
        """As the recipe clips (none for MoCo v3)."""
        if self.clip:
            grads = [p.grad for p in self.params if p.grad is not None]
            clip_gradients(grads, torch.stack(torch._foreach_norm(grads)), self.clip, self.clip_mode)

    def step(self, views: list[torch.Tensor], step: int) -> torch.Tensor:
        views = [v.to(self.device, non_blocking=True) for v in views]
        self.mark("data")
        with self.autocast:
            batch = self.model.prepare(views, step)
            batch["hparams"] = self.hparams
            self.mark("prepare")
            outputs = self.model.online(*self.model.online_inputs(batch))
            self.mark("forward")
            self.momentum_update()
            self.mark("ema")
            targets = self.model.targets(batch)
            self.mark("targets")
            loss = self.model.losses(outputs, targets, batch)["loss"]
            self.mark("loss")
        self.optimizer.zero_grad()
        if self.scaler is None:
            loss.backward()
            self.mark("backward")
            self.clip_gradients()
            self.optimizer.step()
        else:
            self.scaler.scale(loss).backward()
            self.mark("backward")
            if self.clip:
                self.scaler.unscale_(self.optimizer)
                self.clip_gradients()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.mark("optimizer")
        return loss.detach()
