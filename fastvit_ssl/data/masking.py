"""BEiT's blockwise masking (Bao et al. 2021, Algorithm 1): rectangles of patches are masked until about `count`
patches of the grid are covered.

Each block: an area drawn from U(min_patches, still wanted), an aspect ratio r = exp(U(ln a, ln 1/a)), sides
h = round(sqrt(area r)) and w = round(sqrt(area / r)) (both smaller than the grid), a random position; it is kept
if it adds between 1 and `still wanted` new patches, with up to `tries` tries per block. Blocks are added until
the target is reached or a whole block's tries fail, so a mask holds at most `count` patches.

Masks come from a seeded `random.Random`, one per (seed, step, image index in the global batch): the same masks
after a resume and whatever the number of ranks.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class BlockMasking:
    grid: tuple[int, int]  # patches (rows, columns)
    count: int  # target number of masked patches (BEiT: 75 of 14 x 14)
    min_patches: int = 16  # smallest block area drawn
    min_aspect: float = 0.3
    tries: int = 10

    def __post_init__(self):
        rows, cols = self.grid
        if not 0 < self.count <= rows * cols:
            raise ValueError(f"masking: count {self.count} must be in 1..{rows * cols} (the {rows}x{cols} grid)")
        if not 0 < self.min_aspect <= 1:
            raise ValueError(f"masking: min_aspect {self.min_aspect} must be in (0, 1]")

    def sides(self, wanted: int, rng: random.Random) -> tuple[int, int]:
        """A block's (height, width) in patches: area ~ U(min_patches, wanted), log aspect ratio uniform."""
        area = rng.uniform(self.min_patches, wanted)
        aspect = math.exp(rng.uniform(math.log(self.min_aspect), -math.log(self.min_aspect)))
        return round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))

    def block(self, mask: np.ndarray, wanted: int, rng: random.Random) -> int:
        """Mask one block adding 1..`wanted` new patches to `mask` ([rows, cols] bool, in place); the number added
        (0 when every try failed)."""
        rows, cols = self.grid
        for _ in range(self.tries):
            h, w = self.sides(wanted, rng)
            if not (h < rows and w < cols):
                continue
            top, left = rng.randint(0, rows - h), rng.randint(0, cols - w)
            new = h * w - int(mask[top : top + h, left : left + w].sum())
            if 0 < new <= wanted:
                mask[top : top + h, left : left + w] = True
                return new
        return 0

    def __call__(self, rng: random.Random) -> torch.Tensor:
        """A [rows, cols] bool mask with at most `count` patches set (numpy: ~10x faster than torch for this)."""
        mask = np.zeros(self.grid, dtype=bool)
        masked = 0
        while masked < self.count:
            added = self.block(mask, self.count - masked, rng)
            if added == 0:
                break
            masked += added
        return torch.from_numpy(mask)


def mask_rng(seed: int, step: int, index: int) -> random.Random:
    """The generator of the mask of image `index` of the global batch at training step `step`."""
    return random.Random(f"beit-mask/{seed}/{step}/{index}")


def masked_positions(masks: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, rows, cols] bool -> (positions [B, count] long, valid [B, count] bool): each image's masked patch indices
    (row-major), padded with 0 to a fixed `count` so that the masked-token tensors keep one shape on the GPU."""
    flat = masks.flatten(1)  # (B, L)
    masked = flat.sum(1, keepdim=True)  # (B, 1)
    if int(masked.max()) > count:
        raise ValueError(f"masked_positions: a mask holds more than {count} patches")
    order = torch.argsort((~flat).to(torch.int8), dim=1, stable=True)[:, :count]  # masked first, in index order
    valid = torch.arange(count).expand(len(flat), -1) < masked
    return torch.where(valid, order, 0), valid
