"""What keeps a long run alive: the non-finite step guard.

A step whose loss or gradient norm is not finite is skipped by the engine (no optimizer update; the batch is
dropped, the schedules move on) and counted here. After `max_bad_steps` in a row the run rolls back to its last
checkpoint with the learning rate scaled by `rollback_lr_scale`, at most `max_rollbacks` times, or stops with a
message (policy "stop"). A non-finite model is never saved.
"""

from __future__ import annotations

import logging

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
