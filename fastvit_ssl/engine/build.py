"""The engine for `engine.name`: both run one training step, save and load checkpoints the same way."""

from __future__ import annotations

import importlib.util

import torch

from fastvit_ssl.config import Config, ConfigError
from fastvit_ssl.engine.local import LocalEngine
from fastvit_ssl.kernels.dispatch import Ops
from fastvit_ssl.methods.base import Method
from fastvit_ssl.optim.build import build_optimizer


def check_engine(cfg: Config, device: torch.device) -> None:
    """A config error, before anything is built or written, when the engine cannot run here."""
    if cfg.engine.name != "deepspeed":
        return
    if importlib.util.find_spec("deepspeed") is None:
        raise ConfigError("engine.name=deepspeed but DeepSpeed is not installed: pip install deepspeed")
    if cfg.run.precision == "fp16" and device.type != "cuda":
        raise ConfigError(
            "run.precision=fp16 with engine.name=deepspeed needs a GPU (DeepSpeed's CPU accelerator has no fp16); "
            "use run.precision=bf16, or engine.name=local"
        )


def build_engine(cfg: Config, model: Method, device: torch.device, ops: Ops):
    check_engine(cfg, device)
    if cfg.engine.name == "deepspeed":
        from fastvit_ssl.engine.deepspeed_engine import DeepSpeedEngine

        return DeepSpeedEngine(model, cfg, device, ops)
    optimizer = build_optimizer(cfg.optim, model.param_groups(), ops)
    return LocalEngine(model, optimizer, device, cfg.run.precision, cfg.optim.clip_grad, cfg.optim.clip_mode)
