"""Faults injected from outside the engines, for the reliability tests (production code has no test hooks).

They wrap `Method.step_losses`, which both engines call once per training step, and are set in the environment of
a test process (in-process tests use `install` directly):
    FAULT_NAN_AT=4,5,6            make the loss NaN at these steps (1-based calls, counted per process)
    FAULT_DIE_AT=1:3              rank 1 exits abruptly at its 3rd step
    FAULT_KILL_AT=1:3             rank 1 sends itself SIGKILL at its 3rd step, in torchrun's first attempt only (what an
                                  out-of-memory kill or a lost node looks like; the restarted worker must live)
    FAULT_SIGNAL_AT=0:3:SIGTERM   rank 0 sends itself SIGTERM at its 3rd step (as a launcher would)
`python tests/faulty_train.py ...` is train.py with them installed.
"""

from __future__ import annotations

import os
import signal
import sys
import time

from fastvit_ssl import distributed
from fastvit_ssl.methods.base import Method


def install(nan_at=(), die_at: int | None = None, signal_at: tuple[int, signal.Signals] | None = None, patch=None):
    """Wrap Method.step_losses; `patch(obj, name, value)` sets it (default setattr; a test passes
    monkeypatch.setattr, which undoes it)."""
    original, calls = Method.step_losses, [0]

    def step_losses(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] == die_at:
            os._exit(17)
        if signal_at and calls[0] == signal_at[0]:
            print(f"fault: {signal_at[1].name} to itself at step {calls[0]}, time {time.time():.3f}", file=sys.stderr)
            sys.stderr.flush()
            os.kill(os.getpid(), signal_at[1])
        losses = original(self, *args, **kwargs)
        return {**losses, "loss": losses["loss"] * float("nan")} if calls[0] in nan_at else losses

    (patch or setattr)(Method, "step_losses", step_losses)


def install_from_env() -> None:
    """The faults the environment names for this rank."""
    rank = distributed.rank() if distributed.is_initialized() else int(os.environ.get("RANK", "0"))
    nan_at = {int(i) for i in os.environ.get("FAULT_NAN_AT", "").split(",") if i.strip()}
    die_rank, _, die_step = os.environ.get("FAULT_DIE_AT", "").partition(":")
    install(nan_at, int(die_step) if die_rank and int(die_rank) == rank else None, _signal_at(rank))


def _signal_at(rank: int) -> tuple[int, signal.Signals] | None:
    """(step, signal) of FAULT_SIGNAL_AT or, in torchrun's first attempt, FAULT_KILL_AT for this rank."""
    kill_rank, _, kill_step = os.environ.get("FAULT_KILL_AT", "").partition(":")
    if kill_rank and int(kill_rank) == rank and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
        return int(kill_step), signal.SIGKILL
    signal_rank, _, rest = os.environ.get("FAULT_SIGNAL_AT", "").partition(":")
    at, _, name = rest.partition(":")
    return (int(at), signal.Signals[name]) if signal_rank and int(signal_rank) == rank else None
