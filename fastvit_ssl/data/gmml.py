"""Group-masked model learning (GMML, SiT): corrupt random groups of connected pixels of each view, remember where.

As the official SiT code (datasets_utils.GMML_drop_rand_patches / GMML_replace_list), per image: draw a target
fraction, then add random rectangles (top-left anywhere, sides from `align` pixels to below `max_side` of the image
side, snapped to `align`) until the covered fraction reaches it; fill them with zeros, Gaussian noise, content
from elsewhere in the same image, or the same region of another image.

Here all images of a batch draw their rectangles together, ROUNDS at a time, on the tensors' device, and an image
takes them in order while it is below its target (`take_rounds_ref`, or its kernel in kernels/gmml.py), so each
follows the official loop. The draws come from generators the caller seeds (the run's seed and the step), so a
resumed run corrupts its batches exactly as before; and every draw is made for the whole global batch and sliced
to this rank's share (`Draws`), so an image's corruption does not depend on how many ranks share the batch (except
noise, drawn per rank, and the partner of a replacement, which comes from the rank's own images as in the
official code).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

FILLS = ("zeros", "noise", "self", "other")
ROUNDS = 32  # rectangles drawn per image at once; the host checks "is every image covered?" once per ROUNDS
# (SiT's 0.5 coverage takes ~30 rectangles of up to 0.3 x 0.3 of the side on average)
# Meta tensors hold no values (benchmarks/step_cost.py counts a step on them): the loop then makes the calls of
# ROUNDS a real batch takes, measured at 2 for SiT's 50% (B = 128, 224 px; 1-2 for its 30% replacement).
META_CALLS = 2


@dataclass
class Draws:
    """Random numbers for images offset..offset+B of a global batch of `total` (None: this batch is all)."""

    generator: torch.Generator  # seeded alike on every rank
    offset: int = 0
    total: int | None = None
    device: torch.device | None = None  # where the draws go (None: the generator's; meta tensors draw on a CPU)

    def uniform(self, B: int, *lead: int) -> torch.Tensor:
        """U[0, 1) of shape (*lead, B)."""
        n = self.total or B
        out = torch.rand(*lead, n, generator=self.generator, device=self.generator.device)
        return out[..., self.offset : self.offset + B].to(self.device or out.device)

    def integers(self, low: int, high: int, B: int, *lead: int) -> torch.Tensor:
        """Integers in [low, high) of shape (*lead, B)."""
        n = self.total or B
        out = torch.randint(low, high, (*lead, n), generator=self.generator, device=self.generator.device)
        return out[..., self.offset : self.offset + B].to(self.device or out.device)


def generator(device: torch.device, seed: int) -> torch.Generator:
    """A seeded generator on `device`, or on the CPU for meta tensors (the meta device has none)."""
    return torch.Generator("cpu" if device.type == "meta" else device).manual_seed(seed)


def take_rounds_ref(
    mask: torch.Tensor, top: torch.Tensor, height: torch.Tensor, left: torch.Tensor, width: torch.Tensor, target
) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch of GMML rounds: mask [B, H, W] bool, rectangles (top, height, left, width) [ROUNDS, B], target
    [B] pixels -> (mask with the rounds each image takes, rounds taken [B]).

    An image takes round r while its coverage before round r is below its target: the official loop, one rectangle
    at a time. Each pixel is stamped with the first round covering it, and the coverage before every round is a
    cumulative histogram of the stamps. The spec of kernels/gmml.py's take_rounds.
    """
    rounds, B = top.shape
    _, H, W = mask.shape
    device = mask.device
    later = torch.arange(rounds, 0, -1, dtype=torch.uint8, device=device)[:, None, None]  # round r -> rounds - r
    in_rows, in_cols = _sides(H, W, top, height, left, width)  # (ROUNDS, B, H), (ROUNDS, B, W)
    stamp = torch.minimum((in_rows * later)[..., :, None], (in_cols * later)[..., None, :]).amax(0)  # (B, H, W)
    first = torch.where(mask, -1, rounds - stamp.long())  # -1 masked before, 0..ROUNDS-1, ROUNDS none
    bins = torch.arange(B, device=device)[:, None, None] * (rounds + 2) + first + 1
    bins = bins.flatten()
    counts = torch.zeros(B * (rounds + 2), dtype=torch.long, device=device)  # a bincount, also on meta tensors
    counts.scatter_add_(0, bins, torch.ones(1, dtype=torch.long, device=device).expand(bins.numel()))
    before = counts.view(B, rounds + 2).cumsum(1)
    taken = (before[:, :rounds] < target[:, None]).sum(1)  # (B,)
    return first < taken[:, None, None], taken


def corrupt(
    images: torch.Tensor,
    draws: Draws,
    fraction: float,
    fill: str = "zeros",
    source: torch.Tensor | None = None,
    max_side: float = 0.3,
    align: int = 1,
    noise: torch.Generator | None = None,
    take_rounds: Callable = take_rounds_ref,
) -> tuple[torch.Tensor, torch.Tensor]:
    """images [B, C, H, W] -> (corrupted copy, mask [B, H, W] bool of the corrupted pixels).

    fraction: each image is covered to at least U(min(0.5, fraction), fraction) of its pixels (the official rule).
    fill: "zeros" | "noise" (standard normal, from the `noise` generator) | "self" (a same-sized block from
        elsewhere in the image, as the image is at that moment) | "other" (the same region of `source`).
    take_rounds: take_rounds_ref or its kernel. Rectangles are drawn ROUNDS per image at a time and placed in one
        call: a few launches per batch instead of the thousands of a rectangle at a time.
    """
    if fill not in FILLS or (fill == "other") != (source is not None) or (fill == "noise") != (noise is not None):
        raise ValueError(f"fill must be one of {FILLS}, with `source` exactly for 'other' and `noise` for 'noise'")
    B, _, H, W = images.shape
    low = min(0.5, fraction)
    target = (low + (fraction - low) * draws.uniform(B)) * H * W  # pixels to cover, (B,)
    out, mask = images.clone(), torch.zeros(B, H, W, dtype=torch.bool, device=images.device)
    calls = 0
    while True:
        top, height = _spans(draws, B, H, max_side, align)  # (ROUNDS, B) each
        left, width = _spans(draws, B, W, max_side, align)
        mask, taken = take_rounds(mask, top, height, left, width, target)
        if fill == "self":  # copies what the image holds now: rectangle by rectangle
            in_rows, in_cols = _sides(H, W, top, height, left, width)  # (ROUNDS, B, H), (ROUNDS, B, W)
            for r in range(ROUNDS):
                rect = in_rows[r, :, :, None] & in_cols[r, :, None, :] & (r < taken)[:, None, None]  # (B, H, W)
                out = torch.where(rect[:, None], _shifted(out, draws, top[r], height[r], left[r], width[r], align), out)
        calls += 1
        if calls == META_CALLS if images.is_meta else not bool((mask.sum((1, 2)) < target).any()):
            break
    if fill == "self":
        return out, mask
    # The other fills do not depend on the order of the rectangles: one pass at the end.
    if fill == "zeros":
        values = torch.zeros_like(out)
    elif fill == "noise":
        values = torch.randn(out.shape, generator=noise, device=noise.device, dtype=out.dtype).to(out.device)
    else:
        values = source
    return torch.where(mask[:, None], values, out), mask


def _sides(H: int, W: int, top, height, left, width) -> tuple[torch.Tensor, torch.Tensor]:
    """Rectangles [..., B] -> (rows inside [..., B, H], columns inside [..., B, W]) bool."""
    rows, cols = torch.arange(H, device=top.device), torch.arange(W, device=top.device)
    in_rows = (rows >= top[..., None]) & (rows < (top + height)[..., None])
    in_cols = (cols >= left[..., None]) & (cols < (left + width)[..., None])
    return in_rows, in_cols


def _spans(draws: Draws, B: int, size: int, max_side: float, align: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(start, length) [ROUNDS, B] of one side: start in [0, size - align) snapped to align; length in
    [align, int(size * max_side)), cut at the image's edge and rounded to align."""
    start = draws.integers(0, size - align, B, ROUNDS) // align * align
    length = torch.minimum(draws.integers(align, int(size * max_side), B, ROUNDS), size - start)
    return start, torch.round(length / align).long() * align


def _shifted(out, draws: Draws, top, height, left, width, align) -> torch.Tensor:
    """[B, C, H, W] images moved so that a same-sized block at a random (top2, left2) lands on each rectangle."""
    B, _, H, W = out.shape
    top2 = (draws.uniform(B) * (H - height)).long() // align * align  # in [0, H - height)
    left2 = (draws.uniform(B) * (W - width)).long() // align * align
    src_rows = (torch.arange(H, device=out.device) - top[:, None] + top2[:, None]).clamp(0, H - 1)  # (B, H)
    src_cols = (torch.arange(W, device=out.device) - left[:, None] + left2[:, None]).clamp(0, W - 1)  # (B, W)
    batch = torch.arange(B, device=out.device)[:, None, None]
    return out[batch, :, src_rows[:, :, None], src_cols[:, None, :]].permute(0, 3, 1, 2)  # (B, C, H, W)


def replace_from_batch(
    clean: torch.Tensor,
    corrupted: torch.Tensor,
    mask: torch.Tensor,
    draws: Draws,
    prob: float,
    fraction: float,
    max_side: float = 0.3,
    align: int = 1,
    take_rounds: Callable = take_rounds_ref,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SiT's second corruption: each image, with probability `prob`, is instead its clean view with `fraction` of it
    replaced by the same regions of a random image of this rank's batch (possibly itself, as the official code)."""
    B = clean.shape[0]
    take = draws.uniform(B) < prob
    partner = (draws.uniform(B) * B).long().clamp(max=B - 1)
    replaced, replaced_mask = corrupt(
        clean, draws, fraction, "other", clean[partner], max_side, align, take_rounds=take_rounds
    )
    return (
        torch.where(take[:, None, None, None], replaced, corrupted),
        torch.where(take[:, None, None], replaced_mask, mask),
    )
