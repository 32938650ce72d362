"""Triton kernels of fastvit_ssl, installed as `fastvit_ssl.kernels`; each file holds kernel, launcher,
autograd.Function, public function and plain-PyTorch reference. Importing this package does not import Triton:
the names below load their module on first use, so reference-only runs work where Triton is missing."""

import importlib

_PUBLIC = {
    "contrastive_loss": "contrastive",
    "contrastive_loss_ref": "contrastive",
    "ema_update_": "ema",
    "ema_update_ref_": "ema",
    "patch_embed": "patch_embed",
    "patch_embed_ref": "patch_embed",
    "FusedLARS": "lars_lamb",
    "FusedLAMB": "lars_lamb",
}


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_PUBLIC[name]}"), name)


__all__ = sorted(_PUBLIC)
