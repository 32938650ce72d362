"""The one switch between the fused Triton kernels and the plain-PyTorch references (`run.kernels`), read when
modules are built; nothing switches per call. Fused kernels run compiled on CUDA devices only: on a CPU the
references train (the Triton interpreter is for the tests)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from fastvit_ssl.data.gmml import take_rounds_ref
from fastvit_ssl.methods.ema import ema_update_ref_
from fastvit_ssl.methods.losses import contrastive_loss_ref, linear_cross_entropy_ref
from fastvit_ssl.optim.lamb import LAMB
from fastvit_ssl.optim.lars import LARS

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Ops:
    contrastive_loss: Callable = contrastive_loss_ref
    ema_update_: Callable = ema_update_ref_
    patch_embed: Callable | None = None  # None: the ViT's own conv -> flatten -> cat -> add
    lars: type = LARS
    lamb: type = LAMB
    take_rounds: Callable = take_rounds_ref  # SiT's GMML corruption rounds
    lm_head_loss: Callable = linear_cross_entropy_ref  # BEiT's masked-token cross-entropy
    fused: bool = False


REFERENCE_OPS = Ops()


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
    from fastvit_ssl.kernels.contrastive import contrastive_loss
    from fastvit_ssl.kernels.ema import ema_update_
    from fastvit_ssl.kernels.gmml import take_rounds
    from fastvit_ssl.kernels.lars_lamb import FusedLAMB, FusedLARS
    from fastvit_ssl.kernels.linear_ce import linear_cross_entropy
    from fastvit_ssl.kernels.patch_embed import patch_embed

    return Ops(
        contrastive_loss, ema_update_, patch_embed, FusedLARS, FusedLAMB, take_rounds, linear_cross_entropy, fused=True
    )
