"""GMML rounds in one launch: SiT's rectangle-at-a-time corruption loop for a whole batch and ROUNDS rectangles.

A program owns one image: it loads the image's ROUNDS rectangles once, then walks its pixels twice in tiles of
BLOCK, testing a tile against all rectangles at once. Pass 1 stamps each pixel with the first round whose
rectangle covers it (-1 if masked before, ROUNDS if none), keeps it in the mask's place and counts the stamps;
the cumulative counts are the image's coverage before each round, so the rounds it takes are those that start
below its target. Pass 2 turns the stamps into mask = stamp < rounds taken. Integer work only, no
[ROUNDS, B, H, W] tensor: the reference (data/gmml.py, take_rounds_ref) materialises one and needs a bincount
with a host sync.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastvit_ssl.data.gmml import take_rounds_ref

BLOCK = 256  # pixels per tile: the [BLOCK, 32 rounds] tile is 32 values a thread
NUM_WARPS = 8


@triton.jit
def _take_rounds_kernel(
    mask_ptr,
    top_ptr,
    height_ptr,
    left_ptr,
    width_ptr,
    target_ptr,
    taken_ptr,
    B,
    H,
    W,
    ROUNDS: tl.constexpr,
    R: tl.constexpr,
    BINS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    image = tl.program_id(0)
    mask_ptr += image * H * W
    r = tl.arange(0, R)
    valid = r < ROUNDS
    top = tl.load(top_ptr + r * B + image, mask=valid, other=0)
    bottom = top + tl.load(height_ptr + r * B + image, mask=valid, other=0)  # rounds past ROUNDS: empty
    left = tl.load(left_ptr + r * B + image, mask=valid, other=0)
    right = left + tl.load(width_ptr + r * B + image, mask=valid, other=0)
    # Pass 1: stamp each pixel with its first covering round (-1 masked before, ROUNDS none), kept in the mask's
    # place; count the stamps in bins 0 (masked before), r + 1 (round r), ROUNDS + 1 (none), BINS - 1 (off-image).
    counts = tl.zeros([BINS], tl.int32)
    for start in range(0, H * W, BLOCK):
        pixels = start + tl.arange(0, BLOCK)
        inside = pixels < H * W
        y, x = (pixels // W)[:, None], (pixels % W)[:, None]
        covered = (y >= top[None, :]) & (y < bottom[None, :]) & (x >= left[None, :]) & (x < right[None, :])
        first = tl.min(tl.where(covered, r[None, :], ROUNDS), axis=1)  # (BLOCK,)
        first = tl.where(tl.load(mask_ptr + pixels, mask=inside, other=0) != 0, -1, first)
        tl.store(mask_ptr + pixels, first.to(tl.int8), mask=inside)
        counts += tl.histogram(tl.where(inside, first + 1, BINS - 1), BINS)
    before = tl.cumsum(counts, 0)  # before[r]: pixels covered before round r
    target = tl.load(target_ptr + image)
    bins = tl.arange(0, BINS)
    taken = tl.sum(((bins < ROUNDS) & (before.to(tl.float32) < target)).to(tl.int32), axis=0)
    tl.store(taken_ptr + image, taken)
    tl.debug_barrier()  # pass 1's stamps visible to every thread of the program
    # Pass 2: the image takes rounds 0..taken-1
    for start in range(0, H * W, BLOCK):
        pixels = start + tl.arange(0, BLOCK)
        inside = pixels < H * W
        first = tl.load(mask_ptr + pixels, mask=inside, other=0)
        tl.store(mask_ptr + pixels, (first < taken).to(tl.int8), mask=inside)


def take_rounds(
    mask: torch.Tensor, top: torch.Tensor, height: torch.Tensor, left: torch.Tensor, width: torch.Tensor, target
) -> tuple[torch.Tensor, torch.Tensor]:
    """take_rounds_ref's result (mask [B, H, W] bool, rounds taken [B]) in one launch; mask is updated in place."""
    rounds, B = top.shape
    if mask.dtype != torch.bool or mask.ndim != 3 or mask.shape[0] != B or target.shape != (B,):
        raise ValueError(f"take_rounds: mask [B, H, W] bool and target [B] for B={B}, got {tuple(mask.shape)}")
    mask = mask.contiguous()
    taken = torch.empty(B, dtype=torch.int32, device=mask.device)
    _take_rounds_kernel[(B,)](
        mask.view(torch.int8),
        *(t.to(torch.int32).contiguous() for t in (top, height, left, width)),
        target.float().contiguous(),
        taken,
        B,
        mask.shape[1],
        mask.shape[2],
        ROUNDS=rounds,
        R=triton.next_power_of_2(rounds),
        BINS=triton.next_power_of_2(rounds + 3),
        BLOCK=BLOCK,
        num_warps=NUM_WARPS,
    )
    return mask, taken


__all__ = ["take_rounds", "take_rounds_ref"]
