"""Stopping early without losing work: SIGTERM (what Slurm, Kubernetes and spot instances send before they kill a
job), SIGINT (Ctrl-C) and an optional wall-clock budget (`run.max_minutes`, for queue limits).

A signal only raises a flag; the loop finishes its step, all ranks agree to stop after the same step (the flag is
all-reduced every step, so a signal that reaches one rank first stops them all there), the run saves a complete
checkpoint, flushes its metrics and exits with RESUMABLE_EXIT, telling the user to rerun the same command. The same
signal a second time exits at once; another signal does not (torchrun forwards a terminal's Ctrl-C as SIGTERM).
DataLoader workers ignore both signals (`ignore_in_worker`), so a Ctrl-C that reaches the whole process group cannot
kill the batch the current step is waiting for.

With several ranks, a rank whose peers are gone cannot save: every collective fails or waits for them. It exits with
PEERS_LOST_EXIT and one line instead, writing nothing, so the newest complete checkpoint stays the one to resume:
at once when a collective reports the loss (gloo sees a dead peer's closed sockets), or, when a stop signal came
and the ranks do not agree to stop within a grace period (a lost node's collective just waits), from a thread.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import sys
import threading
import time

import torch

from fastvit_ssl import distributed

log = logging.getLogger(__name__)
RESUMABLE_EXIT = 3  # stopped early with a checkpoint: rerun the same command to continue
PEERS_LOST_EXIT = 4  # another rank is gone: stopped without a new checkpoint; rerun to continue from the newest one
SIGNALS = (signal.SIGTERM, signal.SIGINT)
BUDGET = 1000  # the wall-clock budget's code in the all-reduce (signal numbers are smaller)
GRACE_S = 10.0  # after a stop signal, the least time the ranks get to agree on the stop (launchers wait 30 s)


class EarlyStop(Exception):
    """The run stopped before its end with a complete checkpoint; the message says how to continue."""

    exit_code = RESUMABLE_EXIT


class PeersLost(Exception):
    """A collective failed because another rank is gone; nothing was saved. The message says why."""

    exit_code = PEERS_LOST_EXIT


class StopRequests:
    """Collects stop requests (signals, the wall-clock budget) and turns them into one decision for all ranks.

    With several ranks, a thread gives them max(GRACE_S, twice the slowest step so far) after a stop signal to agree
    on the stop; past it this rank concludes a peer is gone and exits (`_watch`).

    Args:
        max_minutes: stop once the run has trained this long in this process; 0 disables the budget.
    """

    def __init__(self, max_minutes: float = 0.0):
        self.deadline = time.monotonic() + 60 * max_minutes if max_minutes > 0 else None
        self.max_minutes, self.signum = max_minutes, None
        self.previous = {}
        self.agreed, self.closing = threading.Event(), False
        self.slowest_step, self.last_reason_at = 0.0, None
        self.wakeup = None

    def __enter__(self) -> StopRequests:
        for sig in SIGNALS:
            self.previous[sig] = signal.signal(sig, self._handle)
        if distributed.world_size() > 1:
            self._watch_signals()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._stop_watching()
        lost = exc is not None and distributed.world_size() > 1 and distributed.is_peer_failure(exc)
        for sig, handler in self.previous.items():  # exiting for lost peers: a launcher's SIGTERM must not cut it short
            signal.signal(sig, signal.SIG_IGN if lost else handler)
        if lost:
            raise PeersLost(
                f"a collective failed, another rank is gone ({_first_line(exc)}): exiting without a new checkpoint; "
                "rerun the same command to continue from the newest complete one"
            ) from None

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
        now = time.monotonic()
        if self.last_reason_at is not None:  # a step, with its checkpoint or evaluation if any
            self.slowest_step = max(self.slowest_step, now - self.last_reason_at)
        self.last_reason_at = now
        over_budget = self.deadline is not None and now > self.deadline
        local = BUDGET if over_budget else self.signum or 0
        if distributed.world_size() > 1:
            local = int(distributed.all_reduce_max(torch.tensor(float(local), device=device)))
        if local == 0:
            return None
        self.agreed.set()
        if local == BUDGET:
            return f"the budget of run.max_minutes={self.max_minutes:g}"
        return signal.Signals(local).name

    def _watch_signals(self) -> None:
        """Start the thread that ends this rank when a stop signal is not followed by an agreement. Why a thread: a
        rank blocked in a collective runs no Python signal handler until the collective returns, which for a lost
        peer means engine.timeout_s; the C-level handler still writes the signal's number to the wakeup socket."""
        reader, writer = socket.socketpair()
        writer.setblocking(False)
        previous_fd = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
        thread = threading.Thread(target=self._watch, args=(reader,), name="stop-watch", daemon=True)
        self.wakeup = (reader, writer, previous_fd, thread)
        thread.start()

    def _watch(self, reader: socket.socket) -> None:
        while (received := reader.recv(1)) and not self.closing:
            if received[0] in SIGNALS:
                grace = max(GRACE_S, 2 * self.slowest_step)
                if not self.agreed.wait(grace) and not self.closing:
                    abandon(
                        f"{signal.Signals(received[0]).name} received, but the ranks did not agree to stop within "
                        f"{grace:.0f} s: another rank is gone or stuck; exiting without a new checkpoint; rerun the "
                        "same command to continue from the newest complete one"
                    )
                return

    def _stop_watching(self) -> None:
        if self.wakeup is None:
            return
        reader, writer, previous_fd, thread = self.wakeup
        self.closing, self.wakeup = True, None
        signal.set_wakeup_fd(previous_fd)
        self.agreed.set()
        with contextlib.suppress(BlockingIOError):  # full: signals the thread has not read yet wake it as well
            writer.send(b"\0")  # wakes the thread if it waits for a signal
        thread.join()
        reader.close()
        writer.close()


def abandon(message: str) -> None:
    """Print `error (rank R): message` and end the process now. Why not a normal exit: the process group cannot be
    left cleanly when a peer is gone (its barrier and teardown wait for the peer), and a launcher's SIGKILL follows."""
    sys.stdout.flush()
    print(f"error (rank {distributed.rank()}): {message}", file=sys.stderr, flush=True)
    os._exit(PEERS_LOST_EXIT)


def _first_line(error: BaseException) -> str:
    """The gist of a collective's error: its first line without gloo's source location and advice."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if text.startswith("[") and "] " in text:
        text = text.split("] ", 1)[1]
    return text.split(". This is typically")[0][:200]


def ignore_in_worker(_worker_id: int) -> None:
    """DataLoader worker_init_fn: leave SIGTERM and SIGINT to the main process, which stops cleanly."""
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
