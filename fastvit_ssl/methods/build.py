"""The method of `method.name`, built with the reference computations or the fused kernels."""

from __future__ import annotations

from fastvit_ssl.config import Config
from fastvit_ssl.kernels.dispatch import REFERENCE_OPS, Ops
from fastvit_ssl.methods.base import Method
from fastvit_ssl.methods.beit import BEiT, build_beit
from fastvit_ssl.methods.mocov3 import MoCoV3, build_mocov3
from fastvit_ssl.methods.sit import SiT, build_sit
from fastvit_ssl.models.vit import compile_blocks

METHODS = {"mocov3": (MoCoV3, build_mocov3), "sit": (SiT, build_sit), "beit": (BEiT, build_beit)}


def build_method(cfg: Config, ops: Ops = REFERENCE_OPS) -> Method:
    method = METHODS[cfg.method.name][1](cfg, ops)
    if cfg.model.compile:  # after the momentum copies exist: they are compiled too
        compile_blocks(method, cfg.model.compile_mode)
    return method


def method_class(name: str) -> type[Method]:
    return METHODS[name][0]
