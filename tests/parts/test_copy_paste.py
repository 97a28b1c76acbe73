"""BCP's box mask, the pairing into halves, the mixing of images and labels, and the largest-component filter."""

from __future__ import annotations

import pytest
import torch

from nnunet_ssl.parts.copy_paste import (
    block_edges,
    block_mask,
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


# ------------------------------------------------------------------ M3HL's block masks and per-sample pasting
def _cells_of(keep: torch.Tensor, edges: list[list[int]]) -> torch.Tensor:
    """The value of each grid cell of one sample's mask, checking by hand that the cell is constant."""
    cells = torch.zeros([len(e) - 1 for e in edges], dtype=torch.bool)
    for index in torch.cartesian_prod(*[torch.arange(len(e) - 1) for e in edges]).reshape(-1, len(edges)).tolist():
        block = keep[tuple(slice(e[i], e[i + 1]) for e, i in zip(edges, index))]
        assert block.numel() > 0 and (block.all() or not block.any()), index  # one value per cell
        cells[tuple(index)] = block[(0,) * block.ndim]
    return cells


def test_block_edges_cover_every_voxel_once():
    assert block_edges(256, 4) == [0, 64, 128, 192, 256]  # the official 64 px blocks
    assert block_edges(112, 4) == [0, 28, 56, 84, 112] and block_edges(80, 4) == [0, 20, 40, 60, 80]
    assert block_edges(7, 4) == [0, 1, 3, 5, 7] and block_edges(10, 4) == [0, 2, 5, 7, 10]
    assert block_edges(3, 4) == [0, 1, 2, 3]  # at most one cell per voxel


@pytest.mark.parametrize("spatial, grid, cells", [((8, 8), 4, 16), ((7, 10), 4, 16), ((8, 12, 6), (4, 4, 2), 32),
                                                  ((3, 9, 5), 4, 48)])
def test_block_mask_zeroes_half_of_the_grid_cells_of_each_sample(spatial, grid, cells):
    g = torch.Generator().manual_seed(0)
    keep = block_mask(5, spatial, grid, 0.5, generator=g)
    assert keep.shape == (5, *spatial) and keep.dtype == torch.bool
    grid = (grid,) * len(spatial) if isinstance(grid, int) else grid
    edges = [block_edges(n, c) for n, c in zip(spatial, grid)]
    patterns = set()
    for b in range(5):
        values = _cells_of(keep[b], edges)
        assert values.numel() == cells and int((~values).sum()) == cells // 2  # int(G * 0.5) cells are zero
        patterns.add(tuple(values.flatten().tolist()))
    assert len(patterns) > 1  # drawn per sample
    again = block_mask(5, spatial, grid, 0.5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(keep, again)  # the generator decides everything


def test_block_mask_official_sizes_and_ratio():
    keep = block_mask(2, (256, 256), 4, 0.5, generator=torch.Generator().manual_seed(1))
    assert float((~keep).float().mean()) == 0.5  # 8 of 16 blocks of 64 x 64
    keep = block_mask(1, (112, 112, 80), 4, 0.5, generator=torch.Generator().manual_seed(1))
    assert int((~keep).sum()) == 32 * 28 * 28 * 20
    keep = block_mask(3, (8, 8), 4, 0.25, generator=torch.Generator().manual_seed(1))
    assert all(int((~k).sum()) == 4 * 4 for k in keep)  # int(16 * 0.25) = 4 cells of 2 x 2
    with pytest.raises(ValueError, match="grid"):
        block_mask(1, (8, 8, 8), (4, 4))


def test_paste_with_per_sample_masks_matches_a_hand_made_mix():
    outer = torch.arange(12.0).reshape(2, 1, 2, 3)
    inner = -torch.arange(12.0).reshape(2, 1, 2, 3) - 1
    keep = torch.tensor([[[1, 0, 1], [0, 0, 1]], [[0, 1, 1], [1, 0, 0]]], dtype=torch.bool)
    expected = torch.tensor([[[[0.0, -2.0, 2.0], [-4.0, -5.0, 5.0]]], [[[-7.0, 7.0, 8.0], [9.0, -11.0, -12.0]]]])
    assert torch.equal(paste(outer, inner, keep, per_sample=True), expected)
    labels_outer, labels_inner = torch.full((2, 2, 3), 1), torch.full((2, 2, 3), 2)
    mixed = paste(labels_outer, labels_inner, keep, per_sample=True)
    assert torch.equal(mixed, torch.where(keep, 1, 2))  # labels with exactly the images' mask
    assert torch.equal(mixed == 1, expected[:, 0] >= 0)
    with pytest.raises(ValueError, match="per-sample mask"):
        paste(outer, inner, keep[:1], per_sample=True)
    # B == C == 2 with a shared mask of the same trailing shape keeps the shared meaning without the flag
    images = torch.arange(24.0).reshape(2, 2, 2, 3)
    assert torch.equal(paste(images, -images, keep), torch.where(keep, images, -images))
