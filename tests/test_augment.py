"""The handwriting augmentation: seeded, shape-keeping, and each transform does what its name says."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from digitlab import augment
from digitlab.augment import AugmentConfig, augment_batch

NONE = AugmentConfig(
    style_strokes=0,
    thicker=0,
    thinner=0,
    degrees=0,
    shear=0,
    scale=0,
    shift_px=0,
    stretch=0,
    elastic=0,
    low_resolution=0,
    binarise=0,
    cut_edge=0,
)


def bar(b: int = 4, top: int = 4, bottom: int = 23, left: int = 12, right: int = 15) -> torch.Tensor:
    """A batch of upright bars (a plain "1"), ink 1 on 0: (B, 1, 28, 28)."""
    x = torch.zeros(b, 1, 28, 28)
    x[:, :, top : bottom + 1, left : right + 1] = 1.0
    return x


def only(**fields) -> AugmentConfig:
    return dataclasses.replace(NONE, **fields)


def test_the_same_seed_gives_the_same_batch_and_another_seed_another():
    x, y = torch.rand(16, 1, 28, 28), torch.arange(16) % 10
    a = augment_batch(x, y, torch.Generator().manual_seed(3), 0.13, 0.31)
    b = augment_batch(x, y, torch.Generator().manual_seed(3), 0.13, 0.31)
    c = augment_batch(x, y, torch.Generator().manual_seed(4), 0.13, 0.31)
    assert a.shape == x.shape and torch.equal(a, b)
    assert not torch.equal(a, c)


def test_with_every_transform_off_the_batch_comes_back_unchanged():
    x, y = torch.rand(8, 1, 28, 28), torch.arange(8)
    out = augment_batch((x - 0.13) / 0.31, y, torch.Generator().manual_seed(0), 0.13, 0.31, NONE)
    torch.testing.assert_close(out * 0.31 + 0.13, x, atol=1e-4, rtol=0)


def test_ink_box_finds_each_images_ink():
    box = augment.ink_box(bar(2, top=3, bottom=20, left=9, right=11))
    assert box.tolist() == [[3, 20, 9, 11]] * 2


def test_crossbars_go_on_sevens_and_flags_on_ones_only():
    x = bar(3)
    labels = torch.tensor([7, 1, 3])
    out = augment.add_style_strokes(x, labels, torch.Generator().manual_seed(0), probability=1.0)
    added = (out - x).clamp_min(0)[:, 0]  # (3, 28, 28)
    assert added[2].sum() == 0  # a 3 is left alone
    # The 7 gets a horizontal bar through its stem below mid-height: ink left and right of the stem.
    rows = added[0].sum(dim=1).nonzero().flatten()
    assert rows.float().mean() > 12 and added[0][:, :12].sum() > 0 and added[0][:, 16:].sum() > 0
    # The 1 gets a flag reaching left of the stem near the top, or a base at the foot.
    assert added[1][:8, :12].sum() > 0 or added[1][20:, :].sum() > 0


def test_thicker_strokes_have_more_ink_and_thinner_less():
    x = torch.nn.functional.avg_pool2d(bar(4), 3, stride=1, padding=1)  # soft edges, as MNIST has
    thicker = augment.vary_stroke_width(x, torch.Generator().manual_seed(0), thicker=1.0, thinner=0.0)
    thinner = augment.vary_stroke_width(x, torch.Generator().manual_seed(0), thicker=0.0, thinner=1.0)
    assert (thicker.sum(dim=(1, 2, 3)) > x.sum(dim=(1, 2, 3))).all()
    assert (thinner.sum(dim=(1, 2, 3)) < x.sum(dim=(1, 2, 3))).all()
    assert (thinner.amax(dim=(1, 2, 3)) == 1).all()  # the stroke's core stays


def test_widening_makes_a_narrow_digit_wider_but_never_wider_than_tall():
    x = bar(8)  # 20 tall, 4 wide
    out = augment.warp(x, torch.Generator().manual_seed(0), only(stretch=1.0))
    box = augment.ink_box(out, level=0.5)
    widths, heights = box[:, 3] - box[:, 2] + 1, box[:, 1] - box[:, 0] + 1
    assert (widths >= 4).all() and (widths > 5).any()
    assert (widths <= heights + 1).all()


def test_rotation_and_slant_move_the_ink_but_keep_most_of_it():
    x = bar(8)
    out = augment.warp(x, torch.Generator().manual_seed(1), only(degrees=12, shear=0.3, elastic=1.0))
    assert not torch.allclose(out, x)
    kept = out.sum(dim=(1, 2, 3)) / x.sum(dim=(1, 2, 3))
    assert ((kept > 0.7) & (kept < 1.3)).all()  # an elastic wobble stretches some parts, squeezes others


def test_binarised_images_are_pure_black_and_white():
    x = torch.rand(6, 1, 28, 28)
    out = augment.binarise(x, torch.Generator().manual_seed(0), probability=1.0)
    assert set(out.unique().tolist()) <= {0.0, 1.0}


def test_low_resolution_images_are_blocky():
    x = torch.rand(6, 1, 28, 28)
    out = augment.low_resolution(x, torch.Generator().manual_seed(0), probability=1.0)
    # Enlarged from at most 22x22 with nearest neighbours: many rows repeat the row above.
    repeats = (out[:, :, 1:] == out[:, :, :-1]).all(dim=3).sum()
    assert repeats >= 6 * 6


def test_a_cut_edge_removes_ink_on_one_side_only():
    x = bar(8)
    out = augment.cut_an_edge(x, torch.Generator().manual_seed(0), probability=1.0)
    lost = x.sum(dim=(1, 2, 3)) - out.sum(dim=(1, 2, 3))
    assert (lost > 0).all() and (lost <= 2 * 20).all()  # at most 2 rows or columns of the bar
    assert (out <= x).all()


@pytest.mark.parametrize("probability", [0.0, 1.0])
def test_probabilities_choose_how_many_images_change(probability):
    x = torch.rand(32, 1, 28, 28)
    out = augment.binarise(x, torch.Generator().manual_seed(0), probability)
    changed = (out != x).flatten(1).any(dim=1).float().mean()
    assert changed == probability
