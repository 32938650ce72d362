"""Multi-tensor launches: one kernel over many tensors through tables of addresses and work chunks.

A program handles one chunk of BLOCK elements of one tensor; it looks up which tensor (`chunk_tensor`) and where
in it (`chunk_start`), then reads that tensor's address from an int64 table and casts it to a typed pointer.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl


def group_by_dtype(*lists: list[torch.Tensor]) -> dict[tuple[torch.dtype, ...], list[int]]:
    """Indices of the tensor tuples (one tensor from each list) grouped by their dtypes: one launch per group."""
    groups: dict[tuple[torch.dtype, ...], list[int]] = {}
    for i, tensors in enumerate(zip(*lists)):
        groups.setdefault(tuple(t.dtype for t in tensors), []).append(i)
    return groups


def address_table(tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """int64 [T] data addresses (tensors must be contiguous)."""
    for t in tensors:
        if not t.is_contiguous():
            raise ValueError(f"multi-tensor kernels need contiguous tensors, got strides {t.stride()}")
    return torch.tensor([t.data_ptr() for t in tensors], dtype=torch.int64).to(device, non_blocking=True)


@functools.lru_cache(maxsize=32)
def chunk_table(numels: tuple[int, ...], block: int, device: torch.device):
    """(numels int64 [T], chunk_tensor int32 [C], chunk_start int64 [C]) covering every element once."""
    tensor_ids, starts = [], []
    for i, n in enumerate(numels):
        for start in range(0, n, block):
            tensor_ids.append(i)
            starts.append(start)
    return (
        torch.tensor(numels, dtype=torch.int64, device=device),
        torch.tensor(tensor_ids, dtype=torch.int32, device=device),
        torch.tensor(starts, dtype=torch.int64, device=device),
    )


@triton.jit
def tensor_ptr(addrs, t, DTYPE: tl.constexpr):
    """Typed pointer to tensor t of an address table."""
    return tl.load(addrs + t).to(tl.pointer_type(DTYPE))


def triton_dtype(dtype: torch.dtype):
    return {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[dtype]
