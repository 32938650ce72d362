"""Two gloo processes on a global batch must give one process's loss and gradients on the same batch: keys are
gathered from all ranks, labels are offset by N * rank, and the heads' BN statistics cover the global batch."""

import subprocess
import sys
from pathlib import Path

import torch

from launch import ENV_1_THREAD, TORCHRUN_2

WORKER = Path(__file__).with_name("dist_worker.py")


def run_worker(nproc: int, out: Path) -> dict:
    cmd = [*(TORCHRUN_2 if nproc == 2 else [sys.executable]), str(WORKER), str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV_1_THREAD)
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(out, weights_only=True)


def test_two_processes_equal_one_process(tmp_path):
    one = run_worker(1, tmp_path / "one.pt")
    two = run_worker(2, tmp_path / "two.pt")
    torch.testing.assert_close(two["loss"], one["loss"], rtol=1e-6, atol=1e-6)
    assert one["grads"].keys() == two["grads"].keys() and len(one["grads"]) > 50
    scale = max(g.abs().max() for g in one["grads"].values())
    for name, grad in one["grads"].items():
        torch.testing.assert_close(two["grads"][name], grad, rtol=1e-4, atol=1e-6 * scale, msg=name)
