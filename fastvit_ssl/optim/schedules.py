"""Per-iteration schedules of MoCo v3, as pure functions of the (fractional) epoch."""

from __future__ import annotations

import math


def learning_rate(epoch: float, peak_lr: float, warmup_epochs: float, epochs: float) -> float:
    """Linear warm-up from 0 to peak_lr over warmup_epochs, then a half-cosine down to 0 at `epochs`."""
    if epoch < warmup_epochs:
        return peak_lr * epoch / warmup_epochs
    progress = (epoch - warmup_epochs) / (epochs - warmup_epochs)
    return peak_lr * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def moco_momentum(epoch: float, epochs: float, base_momentum: float, cosine: bool = True) -> float:
    """m = 1 - (1 - m0) (1 + cos(pi t / T)) / 2: from m0 at the start to 1 at the end (constant m0 if not cosine)."""
    if not cosine:
        return base_momentum
    return 1.0 - (1.0 - base_momentum) * 0.5 * (1.0 + math.cos(math.pi * min(epoch / epochs, 1.0)))


def peak_learning_rate(base_lr: float, global_batch: int) -> float:
    """The linear scaling rule of the paper: lr = base_lr * batch / 256."""
    return base_lr * global_batch / 256
