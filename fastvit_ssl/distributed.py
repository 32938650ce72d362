"""torch.distributed helpers that also work when no process group exists (plain `python train.py`)."""

from __future__ import annotations

import datetime
import gc
import logging
import os
import socket
import time
import uuid

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)
GENERATION = "fastvit_ssl/generation"  # the store keys under which each attempt forms its group
# what gloo says when a peer died (its sockets closed) or stopped answering (a lost node: the timeout)
GLOO_PEER_FAILURES = ("gloo/transport", "closed by peer", "reset by peer", "pair closure")


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def init_from_env(device: torch.device, timeout_s: float = 600.0) -> None:
    """Join the process group that torchrun / the deepspeed launcher / Slurm describe in the environment, if any, in
    a namespace of the launcher's store that no earlier attempt of the job used (`_open_generation`), so a group
    restarted by torchrun --max-restarts forms again."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        # a collective that fails or times out ends the process instead of leaving it hung (torchrun sets it too)
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    timeout = datetime.timedelta(seconds=timeout_s)
    store, rank_, world = next(dist.rendezvous("env://", timeout=timeout))
    generation = _open_generation(store, rank_, world, timeout)
    store = dist.PrefixStore(f"{GENERATION}/{generation}", store)
    dist.init_process_group(backend, store=store, rank=rank_, world_size=world, timeout=timeout)
    log.info("joined process group: rank %d of %d (%s, generation %s)", rank(), world_size(), backend, generation)


def _open_generation(store: dist.Store, rank_: int, world: int, timeout: datetime.timedelta) -> str:
    """A key prefix that all ranks of this attempt agree on and no earlier attempt used.

    Why: torchrun's agent keeps its store across the restarts of its workers (static and c10d rendezvous alike),
    and init_process_group writes the same keys into it every time, so a restarted rank can read the dead attempt's
    gloo addresses (connection refused, or a hang until the timeout). TORCHELASTIC_RESTART_COUNT is no key either:
    each agent counts its own restarts, and c10d restarts a node's healthy workers for a new round without counting.
    So rank 0 draws a new generation from a counter in the store and answers each rank's nonce under it; a rank
    that read an older generation gets no answer there and follows the newer one when it appears."""
    if rank_ == 0:
        generation = str(store.add(f"{GENERATION}/counter", 1))
        store.set(f"{GENERATION}/current", generation)
        hellos = [f"{GENERATION}/{generation}/hello/{r}" for r in range(1, world)]
        store.wait(hellos, timeout)
        store.multi_set([h.replace("/hello/", "/welcome/") for h in hellos], store.multi_get(hellos))
        return generation
    nonce, generation = uuid.uuid4().hex.encode(), None
    deadline = time.monotonic() + timeout.total_seconds()
    while time.monotonic() < deadline:
        current = store.get(f"{GENERATION}/current").decode()  # waits for the first rank 0 to set it
        if current != generation:
            generation = current
            store.set(f"{GENERATION}/{generation}/hello/{rank_}", nonce)
        welcome = f"{GENERATION}/{generation}/welcome/{rank_}"
        if store.check([welcome]) and store.get(welcome) == nonce:
            return generation
        time.sleep(0.05)
    raise RuntimeError(f"rank {rank_}: rank 0 did not open the process group within {timeout.total_seconds():g} s")


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


def is_peer_failure(error: BaseException) -> bool:
    """Whether `error` is a collective that failed because another rank is gone or stuck. NCCL and the store raise
    DistError subclasses; gloo raises plain RuntimeErrors, told apart here by their text."""
    text = str(error)
    return isinstance(error, dist.DistError) or (
        isinstance(error, RuntimeError) and any(marker in text for marker in GLOO_PEER_FAILURES)
    )


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


def mean_over_ranks(scalars: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each 0-d tensor's mean over the ranks (in fp64), in one all-reduce; the same dict single-process."""
    if world_size() == 1 or not scalars:
        return scalars
    means = all_reduce_mean(torch.stack([v.detach().to(torch.float64) for v in scalars.values()]))
    return dict(zip(scalars, means.unbind()))


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
