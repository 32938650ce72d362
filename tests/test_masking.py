"""BEiT's blockwise masking: the statistics of its masks and blocks, determinism, fixed-size positions."""

import math
import random

import numpy as np
import pytest
import torch

from fastvit_ssl.data.masking import BlockMasking, mask_rng, masked_positions

BEIT = BlockMasking(grid=(14, 14), count=75)


def test_masks_never_exceed_the_target_and_come_close_on_average():
    counts = torch.tensor([int(BEIT(mask_rng(0, 0, i)).sum()) for i in range(400)], dtype=torch.float)
    assert counts.max() <= 75 and counts.min() >= 16  # a first block always fits an empty 14 x 14 grid
    assert counts.mean() > 0.93 * 75  # seeded draws, the same on any machine: measured 74.5 (~40% of 196)


def test_block_sides_follow_the_area_and_aspect_draws():
    rng = random.Random(0)
    sides = [BEIT.sides(75, rng) for _ in range(2000)]
    areas = torch.tensor([h * w for h, w in sides], dtype=torch.float)
    aspects = torch.tensor([h / w for h, w in sides])
    # rounding each side by <= 1/2 moves an area A drawn at aspect r by <= (sqrt(r) + 1/sqrt(r)) sqrt(A) / 2 + 1/4
    spread = (math.sqrt(0.3) + 1 / math.sqrt(0.3)) / 2
    assert areas.min() >= 16 - spread * 4 and areas.max() <= 75 + spread * math.sqrt(75) + 0.25
    assert areas.mean() == pytest.approx((16 + 75) / 2, rel=0.1)  # uniform in [16, 75]; 2,000 seeded draws
    assert aspects.min() >= 0.3 / 2 and aspects.max() <= 2 / 0.3  # 0.3..3.3 before rounding short sides
    assert (aspects > 1).float().mean() == pytest.approx(0.5, abs=0.05)  # log-uniform: symmetric about 1


def test_a_block_adds_new_patches_only_up_to_what_is_wanted():
    mask = np.zeros((14, 14), dtype=bool)
    mask[:7] = True  # half the grid already masked
    rng = random.Random(1)
    for _ in range(50):
        before = mask.copy()
        added = BEIT.block(mask, 5, rng)
        assert added == int((mask & ~before).sum()) and 0 <= added <= 5
        assert (mask | ~before).all()  # nothing unmasked


def test_masks_are_a_function_of_seed_step_and_index():
    assert torch.equal(BEIT(mask_rng(3, 1, 7)), BEIT(mask_rng(3, 1, 7)))
    assert not torch.equal(BEIT(mask_rng(3, 1, 7)), BEIT(mask_rng(3, 2, 7)))


def test_masked_positions_are_padded_to_a_fixed_count():
    masks = torch.stack([BEIT(mask_rng(0, 0, i)) for i in range(5)])
    positions, valid = masked_positions(masks, 75)
    assert positions.shape == valid.shape == (5, 75)
    for m, p, v in zip(masks.flatten(1), positions, valid):
        assert int(v.sum()) == int(m.sum())
        assert torch.equal(p[v], m.nonzero().squeeze(1))  # the masked patches, in index order
        assert (p[~v] == 0).all()


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="count 300"):
        BlockMasking(grid=(14, 14), count=300)
