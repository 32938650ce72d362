"""SiT's GMML rounds kernel against its reference (data/gmml.py): integer results, so equal, not close."""

import pytest
import torch

from fastvit_ssl.data import gmml
from fastvit_ssl.data.gmml import Draws, corrupt, replace_from_batch, take_rounds_ref
from fastvit_ssl.kernels.gmml import take_rounds


def rectangles(rounds: int, B: int, H: int, W: int, g: torch.Generator):
    """Random (top, height, left, width) [rounds, B], some cut at the image's edge."""
    top, left = torch.randint(0, H, (rounds, B), generator=g), torch.randint(0, W, (rounds, B), generator=g)
    height = torch.minimum(torch.randint(1, H // 2 + 2, (rounds, B), generator=g), H - top)
    width = torch.minimum(torch.randint(1, W // 2 + 2, (rounds, B), generator=g), W - left)
    return top, height, left, width


# (rounds, B, H, W): one round; a tile boundary inside a row (H W = 377); more pixels than a tile; 224 px rows
@pytest.mark.parametrize("shape", [(1, 3, 5, 7), (5, 5, 13, 29), (32, 4, 40, 33), (7, 2, 9, 224)], ids=str)
def test_the_kernel_takes_the_reference_rounds(shape, device):
    rounds, B, H, W = shape
    g = torch.Generator().manual_seed(sum(shape))
    prior = torch.rand(B, H, W, generator=g) < torch.rand(B, 1, 1, generator=g) * 0.3  # masked before the rounds
    rects = rectangles(rounds, B, H, W, g)
    reachable = take_rounds_ref(prior, *rects, torch.full((B,), float("inf")))[0].sum((1, 2))
    target = torch.rand(B, generator=g) * reachable  # images stop at different rounds
    mask_ref, taken_ref = take_rounds_ref(prior, *rects, target)
    mask, taken = take_rounds(prior.to(device), *(r.to(device) for r in rects), target.to(device))
    assert torch.equal(taken.cpu().long(), taken_ref)
    assert torch.equal(mask.cpu(), mask_ref)
    assert taken_ref.min() < rounds or rounds == 1


def test_sit_corruption_through_the_kernel_is_the_reference_corruption(device):
    x = torch.randn(6, 3, 24, 20, generator=torch.Generator().manual_seed(0)).to(device)

    def run(rounds_fn):
        d = Draws(torch.Generator(device).manual_seed(3))
        out, mask = corrupt(x, d, 0.5, take_rounds=rounds_fn)
        return replace_from_batch(x, out, mask, d, 0.5, 0.3, take_rounds=rounds_fn)

    (a, mask_a), (b, mask_b) = run(take_rounds_ref), run(take_rounds)
    assert torch.equal(a, b) and torch.equal(mask_a, mask_b)
    assert mask_a.float().mean() >= 0.3


def test_bad_shapes_are_named():
    rects = rectangles(gmml.ROUNDS, 4, 8, 8, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"mask \[B, H, W\] bool and target \[B\] for B=4"):
        take_rounds(torch.zeros(3, 8, 8, dtype=torch.bool), *rects, torch.zeros(4))
