"""GMML corruption (SiT): coverage, rectangle sides, fills, SiT's replacement from the batch, determinism."""

import pytest
import torch

from fastvit_ssl.data import gmml
from fastvit_ssl.data.gmml import Draws, corrupt, replace_from_batch


def draws(seed=0, **kw) -> Draws:
    return Draws(torch.Generator().manual_seed(seed), **kw)


def images(n=256, side=28, seed=1) -> torch.Tensor:
    return torch.randn(n, 3, side, side, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("fill", ["zeros", "noise", "self"])
def test_every_image_is_covered_to_the_target_and_the_rest_is_untouched(fill):
    x = images()
    noise = torch.Generator().manual_seed(9) if fill == "noise" else None
    out, mask = corrupt(x, draws(), 0.5, fill, noise=noise)
    covered = mask.float().mean((1, 2))
    assert covered.min() >= 0.5  # the loop stops at the first rectangle that reaches the target
    assert covered.mean() < 0.56 and covered.max() < 0.65  # one rectangle (< 0.3 x 0.3 of 28 px) beyond at most
    keep = ~mask[:, None].expand_as(x)
    assert torch.equal(out[keep], x[keep])
    changed = out[~keep]
    if fill == "zeros":
        assert torch.all(changed == 0)
    if fill == "noise":  # standard normal values, not the image's
        assert abs(changed.mean()) < 0.02 and abs(changed.std() - 1) < 0.02
        assert not torch.equal(changed, x[~keep])
    if fill == "self":  # content moved from elsewhere in the same image
        for i in range(4):
            assert torch.isin(out[i][mask[i].expand(3, -1, -1)], x[i]).all()


def test_rectangle_sides_lie_between_one_pixel_and_below_the_maximum():
    d = draws()
    starts, lengths = zip(*(gmml._spans(d, 4096, 28, 0.3, 1) for _ in range(4)))
    starts, lengths = torch.cat(starts), torch.cat(lengths)
    assert starts.min() == 0 and starts.max() == 26  # [0, 28 - 1)
    assert lengths.min() == 1 and lengths.max() == 7  # [1, int(28 * 0.3) = 8), cut at the edge
    assert torch.all(starts + lengths <= 28)


def test_the_batched_rounds_are_the_official_one_rectangle_at_a_time_loop():
    """Each image gets exactly the rectangles the official per-image loop takes from the same draws: one at a time,
    in order, while the image is below its target (drawn from U(0.5, 0.7) here)."""
    B, side = 64, 20
    _, mask = corrupt(images(B, side), draws(4), 0.7)
    d = draws(4)
    target = (0.5 + 0.2 * d.uniform(B)) * side * side
    expected = torch.zeros(B, side, side, dtype=torch.bool)
    while (expected.sum((1, 2)) < target).any():
        (top, height), (left, width) = gmml._spans(d, B, side, 0.3, 1), gmml._spans(d, B, side, 0.3, 1)
        for i in range(B):
            for r in range(gmml.ROUNDS):
                if expected[i].sum() < target[i]:
                    expected[i, top[r, i] : top[r, i] + height[r, i], left[r, i] : left[r, i] + width[r, i]] = True
    assert torch.equal(mask, expected)


def test_replacement_takes_half_the_images_and_copies_another_images_regions():
    x = images(512)
    corrupted, mask = corrupt(x, draws(2), 0.5)
    out, out_mask = replace_from_batch(x, corrupted, mask, draws(3), prob=0.5, fraction=0.3)
    replaced = (out_mask != mask).flatten(1).any(1)
    assert 0.42 < replaced.float().mean() < 0.58
    coverage = out_mask[replaced].float().mean((1, 2))
    assert coverage.min() >= 0.3 and coverage.max() < 0.45
    assert torch.equal(out[~replaced], corrupted[~replaced])
    for i in replaced.nonzero()[:8, 0]:  # the corrupted pixels hold some batch image's pixels at the same place
        region = out_mask[i].expand(3, -1, -1)
        assert any(torch.equal(out[i][region], x[j][region]) for j in range(len(x)))


def test_the_same_seed_gives_the_same_corruption_and_a_share_of_the_batch_its_slice():
    x = images(8)
    a, mask_a = corrupt(x, draws(5), 0.5)
    b, _ = corrupt(x, draws(5), 0.5)
    c, _ = corrupt(x, draws(6), 0.5)
    assert torch.equal(a, b) and not torch.equal(a, c)
    half, mask_half = corrupt(x[4:], draws(5, offset=4, total=8), 0.5)  # rank 1 of 2
    assert torch.equal(half, a[4:]) and torch.equal(mask_half, mask_a[4:])


def test_bad_fill_arguments_are_named():
    with pytest.raises(ValueError, match="fill must be one of"):
        corrupt(images(2), draws(), 0.5, "blur")
    with pytest.raises(ValueError, match="`noise` for 'noise'"):
        corrupt(images(2), draws(), 0.5, "noise")
