"""The method interface that the training loop and both engines drive. They know nothing of MoCo or SiT: a method
is one nn.Module that says what it trains, how it makes its inputs and targets, and what its losses are.

One step, as both engines run it (`step_losses`):

    batch = method.prepare(views, step)              # on the device: e.g. corrupted views and their masks
    method.update_ema(momentum)                      # target networks move from the previous step's weights
    targets = method.targets(batch)                  # without gradient
    outputs = online(*method.online_inputs(batch))   # `online`, the trained module, possibly wrapped (DDP, ZeRO)
    losses = method.losses(outputs, targets, batch)  # {"loss": total, "loss/<part>": ...}

then backward and the optimizer step. A new method is one file in this folder and a config section.

Engines and the method call `mark(phase)` when each phase of PHASES ends; training marks nothing (`no_mark`),
the benchmarks time and count the phases of this very step through it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn

from fastvit_ssl.methods.ema import ema_update_ref_
from fastvit_ssl.models.vit import VisionTransformer

PHASES = ("data", "prepare", "ema", "targets", "forward", "loss", "backward", "optimizer")


def no_mark(phase: str) -> None:
    """The phase hook of a training run: nothing."""


class Method(nn.Module):
    """Subclasses set `self.online` and the class attributes below.

    Args:
        ema_fn: in-place EMA with ema_update_ref_'s signature (reference or fused kernel).
    """

    backbone_name: ClassVar[str]  # submodule of the backbone that kNN, probe, fine-tune and export use
    ema_modules: ClassVar[dict[str, str]] = {}  # trained submodule -> its EMA copy (none: no momentum networks)
    picture_name: ClassVar[str] = "reconstructions.png"  # the file `pictures` writes into the run folder
    lr_warmup: ClassVar[str] = "ramp"  # the official code's warm-up: see optim/schedules.learning_rate

    def __init__(self, ema_fn: Callable = ema_update_ref_):
        super().__init__()
        self.ema_fn = ema_fn

    @property
    def backbone(self) -> VisionTransformer:
        return self.get_submodule(self.backbone_name)

    def prepare(self, views: list[torch.Tensor], step: int) -> dict[str, Any]:
        """The step's inputs made from the loader's views (already on the device)."""
        return {"views": views}

    def online_inputs(self, batch: dict[str, Any]) -> tuple:
        return tuple(batch["views"])

    def targets(self, batch: dict[str, Any]) -> Any:
        raise NotImplementedError

    def losses(self, outputs: Any, targets: Any, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def momentum(self, epoch: float, epochs: float) -> float:
        """EMA momentum at the (fractional) epoch; 1 for methods without EMA."""
        return 1.0

    def ema_pairs(self) -> list[tuple[nn.Parameter, nn.Parameter]]:
        """(trained, EMA) tensor pairs. Frozen tensors (a random patch projection, a fixed position table) are equal
        by construction and skipped."""
        return [
            (p, e)
            for trained, copy in self.ema_modules.items()
            for p, e in zip(self.get_submodule(trained).parameters(), self.get_submodule(copy).parameters())
            if p.requires_grad
        ]

    @torch.no_grad()
    def update_ema(self, momentum: float) -> None:
        pairs = self.ema_pairs()
        if pairs:
            self.ema_fn([e for _, e in pairs], [p for p, _ in pairs], momentum)

    def encode_views_in_one_pass(self, enabled: bool) -> None:
        """Whether the views of a step share one encoder pass (the default). The benchmarks' baseline turns it off
        for methods whose official code encodes them one by one; a method with one view, or whose official code
        batches them too, has nothing to switch."""

    def param_groups(self) -> list[dict]:
        """Optimizer groups of the trained parameters; "decay" says whether weight decay applies."""
        return [{"params": [p for p in self.online.parameters() if p.requires_grad], "decay": True}]

    def step_losses(
        self,
        views: list[torch.Tensor],
        step: int,
        momentum: float,
        online: Callable | None = None,
        update_ema: Callable | None = None,
        mark: Callable[[str], None] = no_mark,
    ) -> dict[str, torch.Tensor]:
        """The forward half of a training step (see the module docstring); engines pass their wrapped `online`,
        under ZeRO-3 their own `update_ema`, and their phase hook."""
        batch = self.prepare(views, step)
        mark("prepare")
        (update_ema or self.update_ema)(momentum)
        mark("ema")
        targets = self.targets(batch)
        mark("targets")
        outputs = (online or self.online)(*self.online_inputs(batch))
        mark("forward")
        losses = self.losses(outputs, targets, batch)
        mark("loss")
        return losses

    def pictures(self, images: torch.Tensor, path) -> bool:
        """Write the method's pictures of `images` ([B, 3, H, W] normalised) to `path`; False if it has none."""
        return False
