"""BCP's box mask, the pairing into halves, the mixing of images and labels, and the largest-component filter."""

from __future__ import annotations

import pytest
import torch

from nnunet_ssl.parts.copy_paste import (
    box_mask,
    halves,
    largest_component_per_class,
    number_of_pairs,
    paste,
    resize_mask,
)


def _box_extent(keep: torch.Tensor) -> list[tuple[int, int]]:
    inside = (~keep).nonzero()
    return [(int(inside[:, d].min()), int(inside[:, d].max()) + 1) for d in range(keep.ndim)]


@pytest.mark.parametrize("spatial", [(16, 32, 32), (20, 9, 30), (64, 48), (7, 3)])
def test_box_mask_is_one_box_of_two_thirds_inside_the_patch(spatial):
    g = torch.Generator().manual_seed(0)
    starts = set()
    for _ in range(30):
        keep = box_mask(spatial, generator=g)
        assert keep.shape == spatial and keep.dtype == torch.bool
        extent = _box_extent(keep)
        sides = [hi - lo for lo, hi in extent]
        assert sides == [int(n * 2 / 3) for n in spatial]  # the official int(n * 2 / 3)
        assert all(0 <= lo and hi <= n for (lo, hi), n in zip(extent, spatial))
        # zeros exactly in the box, ones everywhere else
        expected = torch.ones(spatial, dtype=torch.bool)
        expected[tuple(slice(lo, hi) for lo, hi in extent)] = False
        assert torch.equal(keep, expected)
        starts.add(tuple(lo for lo, _ in extent))
    assert len(starts) > 1  # the position is random


def test_box_of_the_whole_axis_and_at_least_one_voxel():
    keep = box_mask((4, 1, 6), ratio=1.0)
    assert not keep.any()
    keep = box_mask((1, 5), ratio=2 / 3)  # int(2/3) = 0 -> one voxel
    assert _box_extent(keep)[0] == (0, 1) and (~keep).sum() == int(5 * 2 / 3)


def test_halves_pair_even_odd_and_single_batches():
    x = torch.arange(4).view(4, 1)
    a, b = halves(x, 2)
    assert a.flatten().tolist() == [0, 1] and b.flatten().tolist() == [2, 3]  # the official split
    a, b = halves(torch.arange(3), number_of_pairs(3, 3))
    assert a.tolist() == [0, 1] and b.tolist() == [2, 0]  # the odd one out pairs with the first
    a, b = halves(torch.arange(1), number_of_pairs(1, 1))
    assert a.tolist() == [0] and b.tolist() == [0]  # with itself
    assert number_of_pairs(2, 2) == 1 and number_of_pairs(2, 4) == 2 and number_of_pairs(1, 1) == 1


def test_images_and_labels_are_mixed_with_exactly_the_mask():
    keep = torch.ones(4, 5, 6, dtype=torch.bool)
    keep[1:3, 0:4, 2:6] = False
    g = torch.Generator().manual_seed(1)
    labeled = torch.randn(2, 2, 4, 5, 6, generator=g)
    unlabeled = torch.randn(2, 2, 4, 5, 6, generator=g)
    y = torch.randint(0, 3, (2, 4, 5, 6), generator=g)
    pseudo = torch.randint(0, 3, (2, 4, 5, 6), generator=g)
    (la, lb), (ua, ub) = halves(labeled, 1), halves(unlabeled, 1)
    (ya, yb), (pa, pb) = halves(y, 1), halves(pseudo, 1)
    x_in, t_in = paste(ua, la, keep), paste(pa, ya, keep)
    x_out, t_out = paste(lb, ub, keep), paste(yb, pb, keep)
    for idx in torch.cartesian_prod(torch.arange(4), torch.arange(5), torch.arange(6)).tolist():
        i, j, k = idx
        if keep[i, j, k]:  # M = 1: X_in shows U_a, X_out shows L_b
            assert torch.equal(x_in[0, :, i, j, k], unlabeled[0, :, i, j, k]) and t_in[0, i, j, k] == pseudo[0, i, j, k]
            assert torch.equal(x_out[0, :, i, j, k], labeled[1, :, i, j, k]) and t_out[0, i, j, k] == y[1, i, j, k]
        else:  # inside the box: X_in shows L_a, X_out shows U_b
            assert torch.equal(x_in[0, :, i, j, k], labeled[0, :, i, j, k]) and t_in[0, i, j, k] == y[0, i, j, k]
            assert torch.equal(x_out[0, :, i, j, k], unlabeled[1, :, i, j, k])
            assert t_out[0, i, j, k] == pseudo[1, i, j, k]
    # nnU-Net's (B, 1, *spatial) targets mix the same way
    assert torch.equal(paste(y[:1, None], y[1:, None], keep)[:, 0], paste(y[:1], y[1:], keep))
    with pytest.raises(ValueError):
        paste(x_in, x_out, keep[:3])


def test_resized_mask_keeps_the_box_at_a_coarser_scale():
    keep = torch.ones(8, 8, dtype=torch.bool)
    keep[2:6, 4:8] = False
    coarse = resize_mask(keep, (4, 4))
    expected = torch.ones(4, 4, dtype=torch.bool)
    expected[1:3, 2:4] = False
    assert torch.equal(coarse, expected)
    assert resize_mask(keep, (8, 8)) is keep


def test_largest_component_per_class_keeps_one_component_each():
    labels = torch.zeros(2, 6, 8, 8, dtype=torch.long)
    labels[0, 0:3, 0:3, 0:3] = 1   # class 1: 27 voxels, kept
    labels[0, 5, 7, 7] = 1         # class 1: one stray voxel, removed
    labels[0, 4:6, 0:2, 5:8] = 2   # class 2: 12 voxels, kept
    labels[0, 0, 6:8, 6:8] = 2     # class 2: 4 voxels, removed
    labels[0, 3, 3, 3] = 2         # touches class-1 voxel (2,2,2) by a corner only: its own class-2 component
    labels[1, 1, 1, 1] = 1         # sample 1: a diagonal pair is one component (full connectivity)
    labels[1, 2, 2, 2] = 1
    filtered, removed = largest_component_per_class(labels, 3)
    expected = labels.clone()
    expected[0, 5, 7, 7] = 0
    expected[0, 0, 6:8, 6:8] = 0
    expected[0, 3, 3, 3] = 0
    assert torch.equal(filtered, expected)
    foreground = int((labels > 0).sum())
    assert removed == pytest.approx(6 / foreground)
    assert filtered.dtype == labels.dtype
    # 2D labels, and a class absent from a sample stays absent
    flat = torch.zeros(1, 5, 5, dtype=torch.long)
    flat[0, 0, 0] = 2
    flat[0, 3:5, 3:5] = 2
    out, _ = largest_component_per_class(flat, 3)
    assert out[0, 0, 0] == 0 and (out == 2).sum() == 4 and not (out == 1).any()
    empty, removed = largest_component_per_class(torch.zeros(1, 3, 3, dtype=torch.long), 3)
    assert not empty.any() and removed == 0.0
