"""Kernels the ahead-of-time check must reject, with their launches (test_aot_compile.py)."""

import torch
import triton
import triton.language as tl


@triton.jit
def _tiny_dot_kernel(x_ptr, out_ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs[:, None] * BLOCK + offs[None, :])
    tl.store(out_ptr + offs[:, None] * BLOCK + offs[None, :], tl.dot(x, x))  # tl.dot needs tiles of at least 16


@triton.jit
def _huge_tile_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    """A pipelined loop over 64 x BLOCK operand tiles: num_stages copies of both in shared memory."""
    rows = tl.arange(0, 64)
    cols = tl.arange(0, BLOCK)
    acc = tl.zeros([64, 64], tl.float32)
    for start in range(0, n, 64):
        a = tl.load(x_ptr + (start + rows)[:, None] * BLOCK + cols[None, :])
        acc += tl.dot(a, tl.trans(a))
    tl.store(out_ptr + rows[:, None] * 64 + rows[None, :], acc)


@triton.jit
def _forgotten_kernel(x_ptr):
    tl.store(x_ptr, 0.0)


def tiny_dot():
    x = torch.empty(8, 8, dtype=torch.float16, device="meta")
    _tiny_dot_kernel[(1,)](x, torch.empty_like(x, dtype=torch.float32), BLOCK=8)


def huge_tile():
    x = torch.empty(4096, 1024, dtype=torch.bfloat16, device="meta")
    _huge_tile_kernel[(1,)](x, torch.empty(64, 64, device="meta"), 4096, BLOCK=1024, num_stages=3)


CASES = [("8 x 8 dot", tiny_dot), ("64 x 1024 tiles, 3 stages", huge_tile)]
