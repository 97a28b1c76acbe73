"""ABD's grid displacement (ABD-R both branches, ABD-I) and CAD's largest low-confidence region, on hand-built
images and constructed confidence maps, 2D and 3D, patch sizes the grid does not divide."""

from __future__ import annotations

import math

import pytest
import torch

from nnunet_ssl.parts.displacement import (
    abd_i,
    abd_r,
    box_means,
    cad_llcr,
    cell_confidence,
    kl_divergence,
    largest_low_confidence_box,
    linear_schedule,
    make_grid,
    most_confident_box,
)


def _images(spatial, batch=1):
    n = math.prod(spatial)
    one = torch.arange(batch * n, dtype=torch.float32).reshape(batch, 1, *spatial)
    return one, -one - 1.0  # every voxel of both views distinct


def _probs(grid, conf_cells, class_cells, batch=1):
    """Two-class softmax whose voxels in cell i have confidence ``conf_cells[i]`` for class ``class_cells[i]``
    (voxels outside the grid: confidence 1)."""
    p = torch.zeros(batch, 2, *grid.spatial)
    p[:, 0] = 1.0
    for i, (c, k) in enumerate(zip(conf_cells, class_cells)):
        region = (slice(None), *grid.slices(i))
        p[:, k][region] = c
        p[:, 1 - k][region] = 1.0 - c
    return p


def test_grid_is_centred_with_equal_cells_on_sizes_it_does_not_divide():
    g = make_grid((10, 9), 4)
    assert g.side == (2, 2) and g.offset == (1, 0) and g.count == 16
    assert g.slices(0) == (slice(1, 3), slice(0, 2)) and g.slices(5) == (slice(3, 5), slice(2, 4))
    assert g.slices(15) == (slice(7, 9), slice(6, 8))
    x = torch.arange(90.0).reshape(1, 1, 10, 9)
    means = g.cell_means(x)[0, :, 0]
    assert float(means[5]) == pytest.approx((29 + 30 + 38 + 39) / 4)  # rows 3-4, columns 2-3 of row-major 9
    g3 = make_grid((7, 9, 11), (3, 2, 4))
    assert g3.side == (2, 4, 2) and g3.offset == (0, 0, 1) and g3.count == 24
    assert g3.slices(23) == (slice(4, 6), slice(4, 8), slice(7, 9))
    with pytest.raises(ValueError, match="does not fit"):
        make_grid((3, 8), 4)


def _r_case(spatial, cells):
    g = make_grid(spatial, cells)
    n = g.count
    # view 1: cell 5 least confident (0.55, class 0); its top cells 0..3
    conf1 = [0.9] * n
    conf1[5], conf1[0], conf1[1], conf1[2], conf1[3] = 0.55, 0.995, 0.994, 0.993, 0.992
    class1 = [0, 1, 0, 1] + [0] * (n - 4)
    # view 2: cell 9 least confident (0.6, class 1); top 4: 0.99 (class 0), 0.98 (1), 0.97 (0), 0.96 (1)
    conf2 = [0.9] * n
    conf2[9], conf2[10], conf2[11], conf2[12], conf2[13] = 0.6, 0.99, 0.98, 0.97, 0.96
    class2 = [0] * n
    class2[9], class2[11], class2[13] = 1, 1, 1
    return g, _probs(g, conf1, class1), _probs(g, conf2, class2)


@pytest.mark.parametrize("spatial,cells", [((10, 9), 4), ((9, 7, 11), (2, 4, 2))])
def test_abd_r_replaces_the_least_confident_cell_by_the_rule_of_each_branch(spatial, cells):
    g, p1, p2 = _r_case(spatial, cells)
    x1, x2 = _images(spatial)
    # KL(p || q) of view 1's cell 5, p = (0.55, 0.45), to view 2's candidates by hand: 1.39, 1.47, 0.906, 1.10
    p = torch.tensor([0.55, 0.45])
    kls = [float(kl_divergence(p, torch.tensor(q))) for q in ([0.99, 0.01], [0.02, 0.98], [0.97, 0.03],
                                                              [0.04, 0.96])]
    assert kls == pytest.approx([1.3897, 1.4726, 0.9063, 1.1013], abs=1e-3)
    # view 2's cell 9, p = (0.4, 0.6), to view 1's top cells 0-3 (0.995 c0, 0.994 c1, 0.993 c0, 0.992 c1):
    # 2.17, 1.377, 2.04, 1.263 -> cell 3
    kls = [float(kl_divergence(torch.tensor([0.4, 0.6]), torch.tensor(q))) for q in ([0.995, 0.005], [0.006, 0.994],
                                                                                    [0.993, 0.007], [0.008, 0.992])]
    assert min(range(4), key=kls.__getitem__) == 3 and kls[3] == pytest.approx(1.263, abs=1e-3)
    for probability, c, a in ((1.0, 12, 3), (0.0, 10, 0)):
        d = abd_r(x1, x2, p1, p2, cells, top_k=4, kl_probability=probability)
        assert d.kl_branch.tolist() == [probability == 1.0]
        expected1, expected2 = x1.clone(), x2.clone()
        expected1[(0, 0, *g.slices(5))] = x2[(0, 0, *g.slices(c))]
        expected2[(0, 0, *g.slices(9))] = x1[(0, 0, *g.slices(a))]
        assert torch.equal(d.images[0], expected1) and torch.equal(d.images[1], expected2)
        assert d.replaced == ([g.slices(5)], [g.slices(9)]) and d.sources == ([g.slices(c)], [g.slices(a)])
        mask = torch.zeros(1, *spatial, dtype=torch.bool)
        mask[(0, *g.slices(5))] = True
        assert torch.equal(d.masks[0], mask)
        assert d.fraction == pytest.approx(math.prod(g.side) / math.prod(spatial))
    # top 1: the KL branch has one candidate, the most confident cell
    d = abd_r(x1, x2, p1, p2, cells, top_k=1, kl_probability=1.0)
    assert d.sources == ([g.slices(10)], [g.slices(0)])


def test_abd_r_draws_one_branch_per_sample_from_the_generator():
    g, p1, p2 = _r_case((10, 9), 4)
    p1, p2 = p1.repeat(6, 1, 1, 1), p2.repeat(6, 1, 1, 1)
    x1, x2 = _images((10, 9), batch=6)
    d = abd_r(x1, x2, p1, p2, 4, kl_probability=0.5, generator=torch.Generator().manual_seed(1))
    expected = torch.rand(6, generator=torch.Generator().manual_seed(1)) < 0.5
    assert torch.equal(d.kl_branch, expected) and 0 < int(expected.sum()) < 6
    assert d.sources[0] == [g.slices(12 if k else 10) for k in expected.tolist()]


def test_abd_r_reads_the_original_views_when_cells_coincide():
    # uniform confidence: every rule names cell 0 in both views; the views swap that cell
    x1, x2 = _images((8, 8))
    p = torch.full((1, 2, 8, 8), 0.5)
    d = abd_r(x1, x2, p, p, 4, kl_probability=0.0)
    assert torch.equal(d.images[0][..., :2, :2], x2[..., :2, :2])
    assert torch.equal(d.images[1][..., :2, :2], x1[..., :2, :2])


@pytest.mark.parametrize("spatial,cells", [((9, 10), 3), ((5, 9, 7), (1, 3, 3))])
def test_abd_i_swaps_most_confident_for_the_other_views_least_confident_with_labels(spatial, cells):
    g = make_grid(spatial, cells)
    x1, x2 = _images(spatial, batch=2)
    y = torch.randint(0, 3, (2, 1, *spatial), generator=torch.Generator().manual_seed(0))
    c1, c2 = torch.full((2, *spatial), 0.8), torch.full((2, *spatial), 0.8)
    c1[(slice(None), *g.slices(2))], c1[(slice(None), *g.slices(4))] = 0.99, 0.3  # view 1: max 2, min 4
    c2[(slice(None), *g.slices(7))], c2[(slice(None), *g.slices(1))] = 0.97, 0.4  # view 2: max 7, min 1
    assert cell_confidence(c1, g)[0].argmax() == 2 and cell_confidence(c2, g)[0].argmin() == 1
    d = abd_i(x1, x2, y, y, c1, c2, cells, probability=1.0)
    e1, e2, l1, l2 = x1.clone(), x2.clone(), y.clone(), y.clone()
    e1[(slice(None), slice(None), *g.slices(2))] = x2[(slice(None), slice(None), *g.slices(1))]
    e2[(slice(None), slice(None), *g.slices(7))] = x1[(slice(None), slice(None), *g.slices(4))]
    l1[(slice(None), slice(None), *g.slices(2))] = y[(slice(None), slice(None), *g.slices(1))]
    l2[(slice(None), slice(None), *g.slices(7))] = y[(slice(None), slice(None), *g.slices(4))]
    assert torch.equal(d.images[0], e1) and torch.equal(d.images[1], e2)
    assert torch.equal(d.labels[0], l1) and torch.equal(d.labels[1], l2)
    assert int(d.masks[0].sum()) == 2 * math.prod(g.side)
    # probability 0: nothing moves; a seeded draw per sample picks which samples move
    d = abd_i(x1, x2, y, y, c1, c2, cells, probability=0.0)
    assert torch.equal(d.images[0], x1) and torch.equal(d.labels[1], y) and not d.masks[0].any()
    d = abd_i(x1, x2, y, y, c1, c2, cells, probability=0.5, generator=torch.Generator().manual_seed(1))
    moved = (torch.rand(2, generator=torch.Generator().manual_seed(1)) < 0.5).tolist()
    assert [r is not None for r in d.replaced[0]] == moved
    assert [bool(m.any()) for m in d.masks[1]] == moved


def test_box_means_and_the_most_confident_box_match_brute_force():
    conf = torch.rand(6, 7, 5, generator=torch.Generator().manual_seed(0))
    means = box_means(conf, (2, 3, 4))
    assert means.shape == (5, 5, 2)
    assert float(means[3, 1, 1]) == pytest.approx(float(conf[3:5, 1:4, 1:5].mean()), abs=1e-6)
    conf[2:4, 4:7, 0:4] = 2.0
    assert most_confident_box(conf, (2, 3, 4)) == (slice(2, 4), slice(4, 7), slice(0, 4))


def test_llcr_boxes_the_largest_component_capped_and_centred():
    conf = torch.full((12, 12), 0.99)
    conf[2:5, 1:6] = 0.3  # 15 voxels, bounding box 3 x 5
    conf[5, 6] = 0.3  # touches only by a corner: the same component with full connectivity (16 voxels)
    conf[9:12, 9:12] = 0.2  # 9 voxels, separate
    # bounding box rows 2..5, cols 1..6 (4 x 6); cap floor(0.25 * 12) = 3 per axis, centred: rows 2+0, cols 1+1
    assert largest_low_confidence_box(conf, 0.5, 0.25) == (slice(2, 5), slice(2, 5))
    assert largest_low_confidence_box(conf, 0.5, 1.0) == (slice(2, 6), slice(1, 7))
    assert largest_low_confidence_box(conf, 0.25, 1.0) == (slice(9, 12), slice(9, 12))  # only the 0.2 block
    assert largest_low_confidence_box(conf, 0.1, 1.0) is None


@pytest.mark.parametrize("spatial", [(12, 12), (7, 12, 12)])
def test_cad_replaces_the_low_region_by_the_other_views_most_confident_box(spatial):
    x1, x2 = _images(spatial)
    c1, c2 = torch.full((1, *spatial), 0.99), torch.full((1, *spatial), 0.9)
    lead = (0,) + (slice(1, 4),) * (len(spatial) - 2)  # 3D: three slices deep
    c1[(*lead, slice(2, 5), slice(1, 6))] = 0.3  # view 1's low region: box side capped at 3 along the in-plane axes
    c2[(*lead, slice(6, 9), slice(7, 10))] = 1.0  # view 2's most confident 3 x 3 box
    c2[(*lead, slice(0, 2), slice(0, 2))] = 0.1  # view 2's low region, 2 x 2
    c1[(*lead, slice(8, 10), slice(0, 2))] = 1.0  # view 1's most confident 2 x 2 box
    d = cad_llcr(x1, x2, c1, c2, threshold=0.5, max_fraction=0.25)
    # 3D: the depth of 3 is capped at floor(0.25 * 7) = 1, centred (slice 2); the sources' first such slice is 1
    depth, first = ((slice(2, 3),), (slice(1, 2),)) if len(spatial) == 3 else ((), ())
    replaced1, source2 = (*depth, slice(2, 5), slice(2, 5)), (*first, slice(6, 9), slice(7, 10))
    replaced2, source1 = (*depth, slice(0, 2), slice(0, 2)), (*first, slice(8, 10), slice(0, 2))
    assert d.replaced == ([replaced1], [replaced2]) and d.sources == ([source2], [source1])
    e1, e2 = x1.clone(), x2.clone()
    e1[(0, 0, *replaced1)] = x2[(0, 0, *source2)]
    e2[(0, 0, *replaced2)] = x1[(0, 0, *source1)]
    assert torch.equal(d.images[0], e1) and torch.equal(d.images[1], e2)
    assert int(d.masks[0].sum()) == 9 and int(d.masks[1].sum()) == 4
    # no voxel below the threshold: nothing replaced
    d = cad_llcr(x1, x2, c1, c2, threshold=0.05, max_fraction=0.25)
    assert d.replaced == ([None], [None]) and torch.equal(d.images[0], x1) and d.fraction == 0.0


def test_dte_schedule_rises_linearly_and_clips():
    assert linear_schedule(0.0, 0.75, 0.95) == pytest.approx(0.75)
    assert linear_schedule(0.5, 0.75, 0.95) == pytest.approx(0.85)
    assert linear_schedule(0.25, 0.25, 0.5) == pytest.approx(0.3125)
    assert linear_schedule(1.7, 0.25, 0.5) == pytest.approx(0.5) and linear_schedule(-1, 0.25, 0.5) == 0.25
