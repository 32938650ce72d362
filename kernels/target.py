"""The GPU a launcher picks its block sizes for: compute capability and SM count of the tensors' device.

Launch configurations are functions of the target, so the same table serves the real launch on a GPU, the Triton
interpreter on CPU tensors (the tests) and the ahead-of-time compile check (`fastvit_ssl.kernels.aot`), which runs
the launchers on `meta` tensors while `planning_for(Target(...))` names the GPU to plan for. The tests use
`planning_for` on CPU tensors too, to run the shipped GPU configurations through the interpreter.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Target:
    arch: int  # compute capability x 10: 80 = A100 (sm_80), 90 = H100 (sm_90a); 0 = the Triton interpreter
    sms: int  # streaming multiprocessors

    @property
    def interpreted(self) -> bool:
        """The interpreter's configuration: few, large programs (each costs ~1 ms there)."""
        return self.arch == 0


INTERPRETER = Target(arch=0, sms=1)
A100 = Target(arch=80, sms=108)
H100 = Target(arch=90, sms=132)

_planned: contextvars.ContextVar[Target | None] = contextvars.ContextVar("planned_target", default=None)


def target_of(device: torch.device) -> Target:
    """The target of a CUDA device; otherwise the planned one, and by default the interpreter for CPU tensors."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return Target(10 * major + minor, torch.cuda.get_device_properties(device).multi_processor_count)
    planned = _planned.get()
    if planned is None and device.type == "meta":
        raise RuntimeError("kernels: meta tensors are only launched inside target.planning_for(...)")
    return planned or INTERPRETER


def interpreted(device: torch.device) -> bool:
    """Whether kernels on `device` run through the Triton interpreter (CPU tensors), whatever the configuration:
    its low-precision tl.dot multiplies raw bits, so operands are upcast to fp32 there."""
    return device.type == "cpu"


@contextlib.contextmanager
def planning_for(target: Target):
    """Within this block, launchers given meta tensors choose their configuration for `target`."""
    token = _planned.set(target)
    try:
        yield
    finally:
        _planned.reset(token)
