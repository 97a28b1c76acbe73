"""ERSR's scores by hand on constructed points and masks, the gate, the refined targets, the refined-label loss and
the mirror consistency against hand computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.spatial import ConvexHull

from nnunet_ssl.losses.shape_prior import (
    RefinedTargets,
    assess_batch,
    class_log_probabilities,
    gate,
    ground_truth_pass_counts,
    mirror_consistency,
    refined_label_loss,
    refined_targets,
    scores,
)
from nnunet_ssl.parts.ellipse import (
    Assessment,
    Ellipse,
    boundary_consistency,
    contour_regularity,
    outline,
    radius_map,
    refinement_profile,
)


def _circle_points(radius: float, n: int, center=(20.0, 20.0)) -> np.ndarray:
    t = np.linspace(0, 2 * math.pi, n, endpoint=False)
    return np.stack([center[0] + radius * np.cos(t), center[1] + radius * np.sin(t)], 1)


def test_boundary_consistency_by_hand():
    circle = Ellipse((20.0, 20.0), (10.0, 10.0), 0.0)
    points = np.concatenate([_circle_points(10.0, 16), _circle_points(10.8, 4), _circle_points(12.0, 4)])
    # band max(0.05, 1 px / 10) = 0.1: rho 1 and 1.08 are on the ellipse, 1.2 is not
    assert boundary_consistency(points, circle, 0.05, 1.0) == pytest.approx(20 / 24)
    # without the pixel floor the band is 0.05: only the 16 points on the circle
    assert boundary_consistency(points, circle, 0.05, 0.0) == pytest.approx(16 / 24)
    # a wide relative band takes all of them; points inside count like points outside
    assert boundary_consistency(points, circle, 0.25, 0.0) == 1.0
    assert boundary_consistency(_circle_points(8.5, 10), circle, 0.1, 0.0) == 0.0
    assert boundary_consistency(np.zeros((0, 2)), circle) == 0.0


def test_contour_regularity_by_hand_on_constructed_masks():
    square = np.zeros((14, 14), bool)
    square[2:12, 2:12] = True
    # the outline at 0.5 runs half a pixel outside the pixel centres and cuts each corner by a triangle of 1/8:
    # it encloses 100 - 4/8 = 99.5 and is convex
    points, holes = outline(square)
    assert holes == 0 and ConvexHull(points).volume == pytest.approx(99.5)
    assert contour_regularity(square) == pytest.approx(1.0)
    holed = square.copy()
    holed[5:7, 5:7] = False  # the same outline, 4 hole pixels
    assert contour_regularity(holed) == pytest.approx((99.5 - 4) / 99.5)
    cross = np.zeros((14, 14), bool)
    cross[5:8, 2:12] = True
    cross[2:12, 5:8] = True  # 51 pixels, outline area 51 - 8/8 + 4/8 (8 convex, 4 concave corners); hull about 68
    assert 0.7 < contour_regularity(cross) < 0.78
    single = np.zeros((5, 5), bool)
    single[2, 2] = True  # a diamond of area 1/2
    line = np.zeros((5, 9), bool)
    line[2, 1:8] = True
    assert contour_regularity(single) == pytest.approx(1.0) and contour_regularity(line) == pytest.approx(1.0)
    assert contour_regularity(np.zeros((5, 5), bool)) == 0.0


def test_assess_batch_scores_and_gate_on_constructed_masks():
    shape = (32, 32)
    disc = radius_map(Ellipse((16.0, 15.0), (9.0, 6.0), 0.4), shape).numpy() <= 1
    bumped = disc.copy()
    bumped[14:18, 20:28] = True  # a spur on the right: off the ellipse, and not convex
    holed = disc.copy()
    holed[14:18, 13:17] = False
    labels = np.zeros((3, *shape), np.int16)
    labels[0][disc] = 2
    labels[1][bumped] = 2
    labels[1][2:8, 2:8] = 1  # class 1: a square, convex and elliptical enough
    labels[2][holed] = 2
    assessments = assess_batch(labels, (1, 2))
    fitted, boundary, regularity = scores(assessments)
    assert fitted.tolist() == [[False, True], [True, True], [False, True]]  # class 1 absent from samples 0 and 2
    assert boundary[0, 1] == 1.0 and boundary[1, 1] < 0.85 and boundary[2, 1] == 1.0
    assert regularity[0, 1] > 0.95 and regularity[1, 1] < 0.9
    # an inner hole leaves the outline and its hull as they were: the solidity falls by the hole over the hull
    hull = ConvexHull(outline(disc)[0]).volume
    assert float(regularity[0, 1] - regularity[2, 1]) == pytest.approx(16 / hull)
    assert boundary[0, 0] == 0.0 and regularity[0, 0] == 0.0
    kept = gate(assessments, boundary_threshold=0.85, regularity_threshold=0.9)
    assert regularity[2, 1] < 0.9  # the hole: 16 of about 140 pixels
    assert kept.tolist() == [[False, True], [True, False], [False, False]]
    # thresholds are inclusive, and one per class
    assert gate(assessments, float(boundary[1, 1]), float(regularity[1, 1]))[1, 1]
    assert gate(assessments, [2.0, 0.0], [2.0, 0.0]).tolist() == [[False, True], [False, True], [False, True]]


def test_ground_truth_pass_counts_score_the_largest_slice_and_skip_absent_classes():
    shape = (32, 32)
    disc = radius_map(Ellipse((16.0, 15.0), (9.0, 6.0), 0.4), shape).numpy() <= 1
    cross = np.zeros(shape, bool)
    cross[14:17, 4:28] = True
    cross[4:28, 14:17] = True
    flat = np.zeros(shape, np.int16)
    flat[disc] = 2
    flat[1:4, 1:4] = 1  # 9 pixels of class 1: fewer than min_pixels, so not held
    # a 3D map: slice 1 holds the largest cross of class 1 and a small disc of class 2, slice 2 the larger disc
    volume = np.zeros((3, *shape), np.int16)
    volume[0, 2:6, 2:6] = 1
    volume[1][cross] = 1
    volume[1][radius_map(Ellipse((26.0, 26.0), (3.0, 3.0), 0.0), shape).numpy() <= 1] = 2
    volume[2][disc] = 2
    counts = ground_truth_pass_counts([flat, volume], (1, 2), 0.8, 0.9)
    assert counts == {1: (1, 0), 2: (2, 2)}  # the cross is not convex; the discs pass
    assessed = assess_batch(volume[1:2], (1,))
    assert not gate(assessed, 0.8, 0.9)[0, 0] and assessed[0][0].regularity < 0.9
    # min_pixels decides what is held: 9 pixels are enough at 9
    assert ground_truth_pass_counts([flat], (1,), 0.8, 0.9, min_pixels=9)[1][0] == 1
    assert ground_truth_pass_counts([], (1, 2), 0.8, 0.9) == {1: (0, 0), 2: (0, 0)}


def test_refined_targets_are_the_ellipse_interior_and_the_profile():
    ellipse = Ellipse((10.0, 12.0), (7.0, 4.0), 0.3)
    region = np.zeros((20, 24), bool)
    dropped = Assessment(region, None, 0.0, 0.0)
    assessments = [[Assessment(region, ellipse, 1.0, 1.0), dropped], [dropped, dropped]]
    kept = torch.tensor([[True, False], [False, False]])
    targets = refined_targets(assessments, kept, (20, 24), "cpu", sigma=0.4, floor=0.3, outside_sigma=0.2)
    rho = radius_map(ellipse, (20, 24))
    assert targets.labels.shape == targets.weights.shape == (2, 2, 20, 24)
    assert torch.equal(targets.labels[0, 0], (rho <= 1).float())
    assert torch.allclose(targets.weights[0, 0], refinement_profile(rho, 0.4, 0.3, 0.2))
    assert float(targets.labels[0, 1:].abs().sum() + targets.labels[1].abs().sum()) == 0.0
    assert float(targets.weights[0, 1:].abs().sum() + targets.weights[1].abs().sum()) == 0.0
    assert torch.equal(targets.kept, kept)


def _softmax(row: list[float]) -> list[float]:
    e = [math.exp(v) for v in row]
    return [v / sum(e) for v in e]


def test_refined_label_loss_by_hand_and_dropped_pairs_give_nothing():
    # two samples, three classes, three pixels; class 2 named, sample 0 kept
    logits = torch.tensor([[[0.2, 1.5, -0.3], [0.1, 0.0, 0.4], [1.0, 2.0, -1.0]],
                           [[3.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 3.0]]], requires_grad=True)
    y = torch.tensor([1.0, 1.0, 0.0])
    w = torch.tensor([1.0, 0.5, 0.25])
    targets = RefinedTargets(labels=torch.stack([y, torch.ones(3)])[:, None], weights=torch.stack([w, w])[:, None],
                             kept=torch.tensor([[True], [False]]))
    loss = refined_label_loss(logits, (2,), targets)
    p = [_softmax([float(logits.detach()[0, k, i]) for k in range(3)])[2] for i in range(3)]
    bce = [-math.log(p[0]), -math.log(p[1]), -math.log(1 - p[2])]
    ce = sum(wi * li for wi, li in zip([1.0, 0.5, 0.25], bce)) / 1.75
    s = 1e-5
    dice = 1 - (2 * (1.0 * p[0] + 0.5 * p[1]) + s) / ((1.0 * p[0] + 0.5 * p[1] + 0.25 * p[2]) + 1.5 + s)
    assert float(loss.detach()) == pytest.approx((ce + dice) / 2, rel=1e-5)
    loss.backward()
    assert float(logits.grad[1].abs().sum()) == 0.0 and float(logits.grad[0].abs().sum()) > 0
    # two named classes: the mean over the kept pairs
    both = RefinedTargets(labels=torch.stack([y, y])[:, None].expand(2, 2, 3).contiguous(),
                          weights=torch.stack([w, w])[:, None].expand(2, 2, 3).contiguous(),
                          kept=torch.tensor([[True, True], [False, False]]))
    one = RefinedTargets(both.labels[:, :1], both.weights[:, :1], both.kept[:, :1])
    other = RefinedTargets(both.labels[:, 1:], both.weights[:, 1:], both.kept[:, 1:])
    z = logits.detach()
    assert float(refined_label_loss(z, (1, 2), both)) == pytest.approx(
        (float(refined_label_loss(z, (1,), one)) + float(refined_label_loss(z, (2,), other))) / 2)
    # nothing kept: zero, and still a graph to backpropagate through
    none = RefinedTargets(targets.labels, targets.weights, torch.zeros(2, 1, dtype=torch.bool))
    empty = refined_label_loss(logits, (2,), none)
    assert float(empty.detach()) == 0.0 and empty.requires_grad


def test_class_log_probabilities_are_exact_and_finite_for_confident_logits():
    logits = torch.tensor([[[0.3], [-1.2], [2.0]], [[60.0], [-60.0], [0.0]]])
    log_p, log_not = class_log_probabilities(logits, 0)
    p = torch.softmax(logits, 1)[:, 0]
    assert torch.allclose(log_p.exp(), p) and torch.allclose(log_not[0], torch.log1p(-p[0]))
    assert bool(torch.isfinite(log_not).all()) and float(log_not[1]) == pytest.approx(-60.0, abs=1e-4)


def test_mirror_consistency_by_hand():
    a = torch.tensor([[[[0.0, 1.0]], [[1.0, 0.0]]]])  # (1, 2, 1, 2)
    b = torch.tensor([[[[0.0, 0.0]], [[0.0, 0.0]]]])
    pa = torch.softmax(a, 1)[:, 1]
    expected = float(((pa - 0.5) ** 2).mean())
    assert float(mirror_consistency(a, b, (1,))) == pytest.approx(expected)
    # a prediction that mirrors with the image is consistent: flipping the mirrored prediction back gives it again
    x = torch.randn(2, 3, 4, 5)
    assert float(mirror_consistency(x, x.flip(-1).flip(-1), (1, 2))) == 0.0
    assert float(mirror_consistency(x, x.flip(-1), (1, 2))) > 0
    # gradients reach both predictions
    s, m = x.clone().requires_grad_(), x.flip(-2).clone().requires_grad_()
    mirror_consistency(s, m, (1,)).backward()
    assert float(s.grad.abs().sum()) > 0 and float(m.grad.abs().sum()) > 0
