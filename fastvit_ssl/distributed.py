"""torch.distributed helpers that also work when no process group exists (plain `python train.py`)."""

from __future__ import annotations

import datetime
import gc
import logging
import os
import socket

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def init_from_env(device: torch.device, timeout_s: float = 600.0) -> None:
    """Join the process group that torchrun / the deepspeed launcher describe in the environment, if any."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    log.info("joined process group: rank %d of %d (%s)", rank(), world_size(), backend)


def init_single_process(device: torch.device) -> None:
    """A process group of one, for what needs a group even alone (DeepSpeed, started without a launcher): the
    environment a launcher would set, on a free local port."""
    if is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "LOCAL_RANK": "0"}.items():
        os.environ.setdefault(key, value)
    os.environ["WORLD_SIZE"] = "1"
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", world_size=1, rank=0)


def shutdown(wait_for_others: bool = True) -> None:
    """Leave the process group before the interpreter exits. A gloo group torn down during interpreter finalization
    can abort the process ("terminate called without an active exception"), so: wait until every rank is done
    communicating, destroy the group, then collect the reference cycles (DDP and DeepSpeed engines) that still hold
    it, all while the interpreter is fully alive."""
    if is_initialized():
        if wait_for_others:
            dist.barrier()
        dist.destroy_process_group()
        gc.collect()


@torch.no_grad()
def all_gather_cat(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` from all ranks along dim 0 (no gradient), rank order; identity single-process."""
    if world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    return _all_reduce(x, dist.ReduceOp.SUM) if world_size() > 1 else x


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    return _all_reduce(x, dist.ReduceOp.SUM) / world_size() if world_size() > 1 else x


def all_reduce_max(x: torch.Tensor) -> torch.Tensor:
    return _all_reduce(x, dist.ReduceOp.MAX) if world_size() > 1 else x


def _all_reduce(x: torch.Tensor, op) -> torch.Tensor:
    x = x.clone()
    dist.all_reduce(x, op=op)
    return x


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    """Rank `src`'s picklable object on every rank (identity without a process group)."""
    if not is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
