"""Stopping early without losing work: SIGTERM (what Slurm, Kubernetes and spot instances send before they kill a
job), SIGINT (Ctrl-C) and an optional wall-clock budget (`run.max_minutes`, for queue limits).

A signal only raises a flag; the loop finishes its step, all ranks agree to stop after the same step (the flag is
all-reduced every step, so a signal that reaches one rank first stops them all there), the run saves a complete
checkpoint, flushes its metrics and exits with RESUMABLE_EXIT, telling the user to rerun the same command. The same
signal a second time exits at once; another signal does not (torchrun forwards a terminal's Ctrl-C as SIGTERM).
DataLoader workers ignore both signals (`ignore_in_worker`), so a Ctrl-C that reaches the whole process group cannot
kill the batch the current step is waiting for.
"""

from __future__ import annotations

import logging
import os
import signal
import time

import torch

from fastvit_ssl import distributed

log = logging.getLogger(__name__)
RESUMABLE_EXIT = 3  # stopped early with a checkpoint: rerun the same command to continue
SIGNALS = (signal.SIGTERM, signal.SIGINT)
BUDGET = 1000  # the wall-clock budget's code in the all-reduce (signal numbers are smaller)


class EarlyStop(Exception):
    """The run stopped before its end with a complete checkpoint; the message says how to continue."""

    exit_code = RESUMABLE_EXIT


class StopRequests:
    """Collects stop requests (signals, the wall-clock budget) and turns them into one decision for all ranks.

    Args:
        max_minutes: stop once the run has trained this long in this process; 0 disables the budget.
    """

    def __init__(self, max_minutes: float = 0.0):
        self.deadline = time.monotonic() + 60 * max_minutes if max_minutes > 0 else None
        self.max_minutes, self.signum = max_minutes, None
        self.previous = {}

    def __enter__(self) -> StopRequests:
        for sig in SIGNALS:
            self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        if signum == self.signum:  # the same signal again: no more waiting
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        if self.signum is None:
            self.signum = signum
            log.warning(
                "%s received: finishing this step and saving a checkpoint (send it again to stop at once)",
                signal.Signals(signum).name,
            )

    def reason(self, device: torch.device) -> str | None:
        """Why all ranks stop now ("SIGTERM", "SIGINT", "the budget of run.max_minutes=N"), or None. Every rank
        calls this after every step: with several ranks it is a collective (one host sync), alone a flag check."""
        over_budget = self.deadline is not None and time.monotonic() > self.deadline
        local = BUDGET if over_budget else self.signum or 0
        if distributed.world_size() > 1:
            local = int(distributed.all_reduce_max(torch.tensor(float(local), device=device)))
        if local == 0:
            return None
        if local == BUDGET:
            return f"the budget of run.max_minutes={self.max_minutes:g}"
        return signal.Signals(local).name


def ignore_in_worker(_worker_id: int) -> None:
    """DataLoader worker_init_fn: leave SIGTERM and SIGINT to the main process, which stops cleanly."""
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
