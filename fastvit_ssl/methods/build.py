"""The method of `method.name`, built with the reference computations or the fused kernels."""

from __future__ import annotations

from fastvit_ssl.config import Config
from fastvit_ssl.methods.base import Method, method_class
from fastvit_ssl.models.vit import compile_blocks


def build_method(cfg: Config, ops) -> Method:
    """`ops`: kernels/dispatch.py's Ops, the references (REFERENCE_OPS) or the fused kernels (select_ops)."""
    method = method_class(cfg.method.name).build(cfg, ops)
    if cfg.model.compile:  # after the momentum copies exist: they are compiled too
        compile_blocks(method, cfg.model.compile_mode)
    return method
