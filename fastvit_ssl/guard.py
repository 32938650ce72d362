"""What keeps a long run alive: the non-finite step guard, and the fault hooks the tests use to provoke failures.

A step whose loss or gradient norm is not finite is skipped by the engine (no optimizer update; the batch is
dropped, the schedules move on) and counted here. After `max_bad_steps` in a row the run rolls back to its last
checkpoint with the learning rate scaled by `rollback_lr_scale`, at most `max_rollbacks` times, or stops with a
message (policy "stop"). A non-finite model is never saved.
"""

from __future__ import annotations

import logging
import os
import signal

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """The run cannot go on; the message says what happened and what to try."""


class NonFiniteGuard:
    """Args:
    max_bad_steps: consecutive non-finite steps that trigger the policy.
    policy: "rollback" to the last checkpoint, or "stop".
    rollback_lr_scale: multiplies the learning rate at each rollback.
    max_rollbacks: rollbacks allowed before stopping.
    lr_scale: the scale restored from a checkpoint (earlier rollbacks).
    """

    def __init__(
        self, max_bad_steps: int, policy: str, rollback_lr_scale: float, max_rollbacks: int, lr_scale: float = 1.0
    ):
        self.max_bad_steps, self.policy = max_bad_steps, policy
        self.rollback_lr_scale, self.max_rollbacks = rollback_lr_scale, max_rollbacks
        self.lr_scale, self.in_a_row, self.skipped, self.rollbacks = lr_scale, 0, 0, 0

    def observe(self, finite: bool, step: int) -> bool:
        """Count step `step`; True when the run must roll back now (raises TrainingDiverged to stop)."""
        if finite:
            self.in_a_row = 0
            return False
        self.in_a_row += 1
        self.skipped += 1
        log.warning("step %d: non-finite loss or gradient; the update was skipped (%d in a row)", step, self.in_a_row)
        if self.in_a_row < self.max_bad_steps:
            return False
        if self.policy == "stop" or self.rollbacks >= self.max_rollbacks:
            raise TrainingDiverged(
                f"{self.in_a_row} non-finite steps in a row at step {step} ({self.rollbacks} rollbacks so far). "
                "Try a lower optim.base_lr, optim.clip_grad > 0, model.frozen_patch_embed=true or run.precision=fp32; "
                "the last checkpoint holds the last finite weights"
            )
        self.rollbacks += 1
        self.in_a_row = 0
        self.lr_scale *= self.rollback_lr_scale
        log.warning(
            "rolling back to the last checkpoint with the learning rate scaled by %.3g (rollback %d of %d)",
            self.lr_scale,
            self.rollbacks,
            self.max_rollbacks,
        )
        return True


class FaultHooks:
    """Failures on demand, for tests (read from the environment, inert when unset):
    FASTVIT_SSL_NAN_ITERATIONS=4,5,6   make the loss NaN at these engine calls (1-based, counted per process)
    FASTVIT_SSL_DIE_AT=1:3             rank 1 exits abruptly at its 3rd engine call
    FASTVIT_SSL_SIGNAL_AT=0:3:SIGTERM  rank 0 sends itself SIGTERM at its 3rd engine call (as a launcher would)
    """

    def __init__(self, rank: int):
        spec = os.environ.get("FASTVIT_SSL_NAN_ITERATIONS", "")
        self.nan_iterations = {int(i) for i in spec.split(",") if i.strip()}
        die = os.environ.get("FASTVIT_SSL_DIE_AT", "")
        self.die_iteration = int(die.split(":")[1]) if die and int(die.split(":")[0]) == rank else None
        signal_rank, _, rest = os.environ.get("FASTVIT_SSL_SIGNAL_AT", "").partition(":")
        at, _, name = rest.partition(":")
        self.signal_at = (int(at), signal.Signals[name]) if signal_rank and int(signal_rank) == rank else None
        self.iteration = 0

    def next_iteration(self) -> bool:
        """Advance the call counter; True when this call's loss must be poisoned."""
        self.iteration += 1
        if self.iteration == self.die_iteration:
            log.error("fault hook: this rank exits now (FASTVIT_SSL_DIE_AT)")
            os._exit(17)
        if self.signal_at and self.iteration == self.signal_at[0]:
            os.kill(os.getpid(), self.signal_at[1])
        return self.iteration in self.nan_iterations
