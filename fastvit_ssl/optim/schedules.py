"""Per-iteration schedules, as pure functions of the (fractional) epoch, and the values one step trains with."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch


def learning_rate(
    epoch: float,
    peak_lr: float,
    warmup_epochs: float,
    epochs: float,
    min_lr: float = 0.0,
    warmup: str = "ramp",
    steps_per_epoch: int = 1,
) -> float:
    """Linear warm-up from 0 to peak_lr over warmup_epochs, then a half-cosine down to min_lr at `epochs`.

    warmup: "ramp", peak_lr x epoch / warmup_epochs (MoCo v3's adjust_learning_rate: the peak is reached when the
    warm-up ends); or "linspace", np.linspace(0, peak_lr, W) over the W = warmup_epochs x steps_per_epoch warm-up
    iterations (the cosine_scheduler of DINO, SiT and BEiT: the peak is reached at iteration W - 1)."""
    if epoch < warmup_epochs:
        if warmup == "linspace":
            iteration, iterations = round(epoch * steps_per_epoch), round(warmup_epochs * steps_per_epoch)
            return peak_lr * iteration / max(iterations - 1, 1)
        return peak_lr * epoch / warmup_epochs
    progress = (epoch - warmup_epochs) / (epochs - warmup_epochs)
    return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def half_cosine(epoch: float, epochs: float, start: float, end: float) -> float:
    """A half-cosine from `start` at epoch 0 to `end` at `epochs`."""
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * min(epoch / epochs, 1.0)))


def peak_learning_rate(base_lr: float, global_batch: int) -> float:
    """The linear scaling rule of the paper: lr = base_lr * batch / 256."""
    return base_lr * global_batch / 256


@dataclass(frozen=True)
class Hyperparameters:
    """What one step trains with."""

    lr: float
    weight_decay: float
    momentum: float = 1.0  # of the EMA networks (1 for methods without)
    values: Mapping[str, float] = field(default_factory=dict)  # every schedule's value, the method's own included


class Schedules:
    """Every scheduled value of a run, per iteration, computed once (as dinov2's build_schedulers): the learning rate
    (the method's warm-up, then a cosine to optim.min_lr), the weight decay (constant, or a cosine to
    optim.weight_decay_end) and the method's own (Method.schedules: "momentum", ...). Pure functions of the config:
    a resumed run reads the same values.

    Args:
        cfg: the run's config.
        method: the method's class (its lr_warmup and schedules).
        steps_per_epoch: iterations of one epoch.
    """

    def __init__(self, cfg, method, steps_per_epoch: int):
        o, spe = cfg.optim, steps_per_epoch
        self.total = o.epochs * spe
        epochs = [i / spe for i in range(self.total)]  # the fractional epoch of every iteration
        peak = peak_learning_rate(o.base_lr, cfg.data.batch_size)
        lr = [learning_rate(e, peak, o.warmup_epochs, o.epochs, o.min_lr, method.lr_warmup, spe) for e in epochs]
        self.lr = np.array(lr)
        if o.weight_decay_end < 0:
            self.weight_decay = np.full(self.total, o.weight_decay)
        else:
            self.weight_decay = np.array([half_cosine(e, o.epochs, o.weight_decay, o.weight_decay_end) for e in epochs])
        self.own = method.schedules(cfg, self.total)

    def at(self, step: int, lr_scale: float = 1.0) -> Hyperparameters:
        """The values of iteration `step` (the NaN guard's `lr_scale` times the lr)."""
        i = min(step, self.total - 1)
        values = {"lr": float(self.lr[i]) * lr_scale, "weight_decay": float(self.weight_decay[i])}
        values |= {name: float(v[i]) for name, v in self.own.items()}
        return Hyperparameters(values["lr"], values["weight_decay"], values.get("momentum", 1.0), values)


def set_hyperparameters(optimizer: torch.optim.Optimizer, hparams: Hyperparameters) -> None:
    """The step's lr and weight decay into every group, times the group's multipliers (Method.param_groups) and
    the value of the group's own schedule, if it names one ("schedule": e.g. DINO's last layer, 0 while frozen)."""
    for group in optimizer.param_groups:
        group["lr"] = hparams.lr * group.get("lr_scale", 1.0) * own_schedule(group, hparams)
        group["weight_decay"] = hparams.weight_decay * wd_scale(group)


def own_schedule(group: dict, hparams: Hyperparameters) -> float:
    return hparams.values[group["schedule"]] if group.get("schedule") else 1.0


def frozen_parameters(optimizer: torch.optim.Optimizer, hparams: Hyperparameters) -> list[torch.Tensor]:
    """The parameters of the groups whose own schedule is 0 at this step. The local engine drops their gradients
    after clipping, so the optimizer skips them entirely, its moments included (DINO's cancel_gradients_last_layer);
    under DeepSpeed their lr of 0 leaves the weights unchanged."""
    return [
        p for g in optimizer.param_groups if g.get("schedule") and own_schedule(g, hparams) == 0 for p in g["params"]
    ]


def wd_scale(group: dict) -> float:
    """A group's weight-decay multiplier; groups restored from checkpoints made before 2026-12-04 say "decay"."""
    return group.get("wd_scale", 1.0 if group.get("decay", True) else 0.0)
