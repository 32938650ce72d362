"""The method interface that the training loop, both engines, the data, the evaluations and the benchmarks drive.
None of them knows a method by name: a method is one file in this folder that subclasses Method, says what it is
(the class attributes and class methods below) and registers itself (`@register`).

One step, as both engines run it (`step_losses`):

    batch = method.prepare(views, step)              # on the device: e.g. corrupted views and their masks
    method.update_ema(hparams.momentum)              # target networks move from the previous step's weights
    targets = method.targets(batch)                  # without gradient
    outputs = online(*method.online_inputs(batch))   # `online`, the trained module, possibly wrapped (DDP, ZeRO)
    losses = method.losses(outputs, targets, batch)  # {"loss": total, "loss/<part>": ...}

then backward and the optimizer step. `batch["hparams"]` holds the step's values of every schedule (the
method's own too: `schedules`). Engines and the method call `mark(phase)` when each phase of PHASES ends; training
marks nothing (`no_mark`), the benchmarks time and count the phases of this very step through it.

What a method says about itself, besides its modules:
- its config section (`section`, `Config`: a dataclass; `validate`), the keys of it that define its tensors
  (`model_keys`), the views its loader makes (`views`), what must exist before it is built (`before_training`,
  e.g. BEiT's tokenizer), its schedules beyond lr and weight decay (`schedules`) and its warm-up kind;
- its parameter groups with their multipliers (`param_groups`: lr_scale, wd_scale);
- its evaluation defaults (`probe_protocol`, `finetune_pool`, `finetune_layer_decay`, `finetuning_layout`), its
  pictures, and for the benchmarks its GPU recipe (`recipe`), small-model overrides and step FLOPs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from fastvit_ssl import config
from fastvit_ssl.checkpoint import CheckpointError
from fastvit_ssl.methods.ema import ema_update_ref_
from fastvit_ssl.models.vit import VisionTransformer

PHASES = ("data", "prepare", "ema", "targets", "forward", "loss", "backward", "optimizer")
METHODS: dict[str, type[Method]] = {}  # by name, filled by @register


def register(cls: type[Method]) -> type[Method]:
    """Class decorator of a method file: the method and its config section become known to the project."""
    METHODS[cls.name] = cls
    config.register_method(cls.name, cls.section, cls.Config, cls.validate, cls.model_keys)
    return cls


def method_class(name: str) -> type[Method]:
    return METHODS[name]


def no_mark(phase: str) -> None:
    """The phase hook of a training run: nothing."""


def cosine(start: float, end: float, total_steps: int) -> np.ndarray:
    """Per-iteration half-cosine from `start` to `end` over `total_steps` (DINO's and MoCo v3's momentum rule)."""
    steps = np.arange(total_steps, dtype=np.float64)
    return end + (start - end) * 0.5 * (1.0 + np.cos(math.pi * steps / total_steps))


def momentum_schedule(start: float, rising: bool, total_steps: int) -> np.ndarray:
    """An EMA's momentum per iteration: `start` rising to 1 on the half-cosine (MoCo v3, SiT, DINO), or constant."""
    return cosine(start, 1.0, total_steps) if rising else np.full(total_steps, start)


def weight_decay_groups(module: nn.Module, exempt: tuple[str, ...] = ()) -> list[dict]:
    """The trained parameters of `module` in two groups: with weight decay, and without it for biases, 1-D tensors
    and parameters whose last name is in `exempt` (the official codes of DINO, SiT, BEiT and MAE)."""
    trained = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    plain = {id(p) for n, p in trained if p.ndim == 1 or n.endswith(".bias") or n.split(".")[-1] in exempt}
    return [
        {"params": [p for _, p in trained if id(p) not in plain], "lr_scale": 1.0, "wd_scale": 1.0},
        {"params": [p for _, p in trained if id(p) in plain], "lr_scale": 1.0, "wd_scale": 0.0},
    ]


class Method(nn.Module):
    """Subclasses set `self.online` and the class attributes below.

    Args:
        ema_fn: in-place EMA with ema_update_ref_'s signature (reference or fused kernel).
    """

    name: ClassVar[str]  # method.name
    section: ClassVar[str]  # its config section
    Config: ClassVar[type]  # the dataclass of that section
    model_keys: ClassVar[tuple[str, ...]] = ()  # keys of the section that define tensors (e.g. head widths)
    backbone_name: ClassVar[str]  # submodule of the backbone that kNN, probe, fine-tune and export use
    ema_modules: ClassVar[dict[str, str]] = {}  # trained submodule -> its EMA copy (none: no momentum networks)
    picture_name: ClassVar[str] = "reconstructions.png"  # the file `pictures` writes into the run folder
    lr_warmup: ClassVar[str] = "ramp"  # the official code's warm-up: see optim/schedules.learning_rate
    probe_protocol: ClassVar[str] = "lars_bn"  # eval/linear.py's default protocol for its checkpoints
    finetune_pool: ClassVar[str] = "cls"  # eval/finetune.py's head input: cls | cls+mean
    finetune_layer_decay: ClassVar[float] = 0.75  # eval/finetune.py's layer-wise lr decay (MAE's)
    recipe: ClassVar[str] = ""  # configs/ file of its GPU recipe (the benchmarks' starting point)
    # the GPU throughput suite's cases: (arch, batch per GPU, goal of ours / the official recipe on one GPU)
    suite: ClassVar[tuple[tuple[str, int, float], ...]] = ()

    def __init__(self, ema_fn: Callable = ema_update_ref_):
        super().__init__()
        self.ema_fn = ema_fn

    # ---- what the project asks of the method class ----

    @classmethod
    def build(cls, cfg: config.Config, ops) -> Method:
        """The method for `cfg`, computing with `ops` (kernels/dispatch.py: the references or the fused kernels)."""
        raise NotImplementedError

    @staticmethod
    def validate(cfg: config.Config) -> None:
        """Raise config.ConfigError for values of its section (or of others) it cannot train with."""

    @classmethod
    def views(cls, cfg: config.Config) -> list:
        """The loader's views of each image (data/augment.py's ViewAugment)."""
        raise NotImplementedError

    @classmethod
    def before_training(cls, cfg: config.Config, run_dir: Path, data_root: Path) -> None:
        """Work that must be done, once, before the method can be built (e.g. a tokenizer trained into the run
        folder); resumable: done work is not redone. Nothing by default."""

    @classmethod
    def schedules(cls, cfg: config.Config, total_steps: int) -> dict[str, np.ndarray]:
        """Per-iteration values of its own schedules ("momentum" for EMA methods; any others it reads from
        batch["hparams"].values). None by default (the momentum is then 1: no EMA)."""
        return {}

    @classmethod
    def finetuning_layout(cls, cfg: config.Config) -> dict:
        """VisionTransformer options that differ when its encoder is rebuilt for fine-tuning."""
        return {}

    @classmethod
    def benchmark_overrides(cls, arch: str, img_size: int) -> list[str]:
        """Config overrides for the benchmarks' small models (e.g. narrower heads for the demo ViT)."""
        return []

    @classmethod
    def step_flops(cls, cfg: config.Config, batch: int, keys: int) -> float:
        """Model FLOPs (multiply-adds x 2) of one training step on `batch` images with `keys` gathered keys."""
        raise NotImplementedError

    # ---- checkpoints of its official code (none by default) ----

    @classmethod
    def is_official(cls, state: dict) -> bool:
        """Whether a loaded checkpoint file is in its official code's layout."""
        return False

    @classmethod
    def from_official(cls, state: dict, source: str) -> dict:
        """An official checkpoint -> our checkpoint layout ({"model", "config", "step"})."""
        raise NotImplementedError

    @classmethod
    def to_official(cls, state: dict, source: str) -> dict:
        """Our checkpoint -> its official code's layout (model tensors only)."""
        raise CheckpointError(f"{source}: {cls.name} has no official checkpoint layout here; export --format timm")

    # ---- one step ----

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
        """Optimizer groups of the trained parameters, each with its multipliers of the scheduled values:
        "lr_scale" and "wd_scale" (optim/schedules.set_hyperparameters applies them)."""
        return [{"params": [p for p in self.online.parameters() if p.requires_grad], "lr_scale": 1.0, "wd_scale": 1.0}]

    def step_losses(
        self,
        views: list[torch.Tensor],
        step: int,
        hparams,
        online: Callable | None = None,
        update_ema: Callable | None = None,
        mark: Callable[[str], None] = no_mark,
    ) -> dict[str, torch.Tensor]:
        """The forward half of a training step (see the module docstring) with the step's Hyperparameters;
        engines pass their wrapped `online`, under ZeRO-3 their own `update_ema`, and their phase hook."""
        batch = self.prepare(views, step)
        batch["hparams"] = hparams
        mark("prepare")
        (update_ema or self.update_ema)(hparams.momentum)
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
