"""The one switch between the fused Triton kernels and the plain-PyTorch references (`run.kernels`), read when
modules are built; nothing switches per call. Fused kernels run compiled on CUDA devices only: on a CPU the
references train (the Triton interpreter is for the tests).

Each operation is a name with its reference (the specification, in the package that uses it: methods/losses.py,
methods/ema.py, optim/, data/gmml.py) and its kernel in this folder. Models, methods and optimizers receive
an `Ops` and look operations up by name (`ops["contrastive_loss"]`); they never import this module. A new kernel is
a line in KERNELS.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Mapping

import torch

from fastvit_ssl.data.gmml import take_rounds_ref
from fastvit_ssl.methods.ema import ema_update_ref_
from fastvit_ssl.methods.losses import contrastive_loss_ref, linear_cross_entropy_ref, prototype_cross_entropy_ref
from fastvit_ssl.optim.lamb import LAMB
from fastvit_ssl.optim.lars import LARS

log = logging.getLogger(__name__)

# name -> (reference, "module:attribute" of the fused kernel in fastvit_ssl.kernels)
KERNELS: dict[str, tuple[Callable | type | None, str]] = {
    "contrastive_loss": (contrastive_loss_ref, "contrastive:contrastive_loss"),
    "ema_update_": (ema_update_ref_, "ema:ema_update_"),
    "patch_embed": (None, "patch_embed:patch_embed"),  # None: the ViT's own conv -> flatten -> cat -> add
    "lars": (LARS, "lars_lamb:FusedLARS"),
    "lamb": (LAMB, "lars_lamb:FusedLAMB"),
    "take_rounds": (take_rounds_ref, "gmml:take_rounds"),  # GMML's corruption rounds
    "lm_head_loss": (linear_cross_entropy_ref, "linear_ce:linear_cross_entropy"),  # a masked-token LM head's loss
    "prototype_loss": (prototype_cross_entropy_ref, "prototype_ce:prototype_cross_entropy"),  # DINO's loss
}


class Ops(Mapping):
    """The operations a run computes with, by name; `fused` says whether they are the Triton kernels."""

    def __init__(self, table: dict[str, Callable | type | None], fused: bool):
        self.table, self.fused = dict(table), fused

    def __getitem__(self, name: str):
        return self.table[name]

    def __iter__(self):
        return iter(self.table)

    def __len__(self) -> int:
        return len(self.table)


REFERENCE_OPS = Ops({name: reference for name, (reference, _) in KERNELS.items()}, fused=False)


def select_ops(kernels: str, device: torch.device) -> Ops:
    """Ops for `run.kernels` ("fused" | "reference") on `device`."""
    if kernels == "reference":
        return REFERENCE_OPS
    if device.type not in ("cuda", "meta"):  # meta: planning or counting for a GPU (benchmarks/step_cost.py)
        log.warning("run.kernels=fused needs a CUDA device; on %s the plain-PyTorch references run", device.type)
        return REFERENCE_OPS
    return fused_ops()


def fused_ops() -> Ops:
    """The Triton kernels, wherever the tensors are (on CPU tensors only under TRITON_INTERPRET=1, for tests)."""
    table = {}
    for name, (_, where) in KERNELS.items():
        module, attribute = where.split(":")
        table[name] = getattr(importlib.import_module(f"fastvit_ssl.kernels.{module}"), attribute)
    return Ops(table, fused=True)
