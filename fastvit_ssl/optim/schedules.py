"""Per-iteration schedules, as pure functions of the (fractional) epoch, and the values one step trains with."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fastvit_ssl.config import OptimConfig


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


def moco_momentum(epoch: float, epochs: float, base_momentum: float, cosine: bool = True) -> float:
    """m = 1 - (1 - m0) (1 + cos(pi t / T)) / 2: from m0 at the start to 1 at the end (constant m0 if not cosine)."""
    return half_cosine(epoch, epochs, base_momentum, 1.0) if cosine else base_momentum


def peak_learning_rate(base_lr: float, global_batch: int) -> float:
    """The linear scaling rule of the paper: lr = base_lr * batch / 256."""
    return base_lr * global_batch / 256


@dataclass(frozen=True)
class Hyperparameters:
    """What one step trains with."""

    lr: float
    weight_decay: float
    momentum: float  # of the EMA networks (1 for methods without)


def hyperparameters(
    cfg: OptimConfig,
    epoch: float,
    peak_lr: float,
    momentum: float,
    lr_scale: float = 1.0,
    warmup: str = "ramp",
    steps_per_epoch: int = 1,
) -> Hyperparameters:
    """The values at `epoch`: warm-up (`learning_rate`'s kinds) + cosine lr (times the NaN guard's `lr_scale`);
    weight decay constant, or on a cosine to cfg.weight_decay_end when that is >= 0."""
    lr = lr_scale * learning_rate(epoch, peak_lr, cfg.warmup_epochs, cfg.epochs, cfg.min_lr, warmup, steps_per_epoch)
    if cfg.weight_decay_end < 0:
        return Hyperparameters(lr, cfg.weight_decay, momentum)
    return Hyperparameters(lr, half_cosine(epoch, cfg.epochs, cfg.weight_decay, cfg.weight_decay_end), momentum)


def set_hyperparameters(optimizer: torch.optim.Optimizer, hparams: Hyperparameters) -> None:
    """lr into every group, weight decay into the groups that decay (Method.param_groups' "decay")."""
    for group in optimizer.param_groups:
        group["lr"] = hparams.lr
        if group.get("decay", True):  # checkpoints from before the groups had the flag: one decayed group
            group["weight_decay"] = hparams.weight_decay
