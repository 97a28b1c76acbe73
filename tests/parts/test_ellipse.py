"""ERSR's geometry: the least-squares ellipse on noisy points and on masks with holes, speckle and a patch border,
the failures that give no fit, the normalised radius and the refinement profile by hand."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from nnunet_ssl.parts.ellipse import (
    Ellipse,
    assess,
    canonical,
    fit_ellipse,
    normalised_radius,
    outline_points,
    radius_map,
    refinement_profile,
)


def _points(ellipse: Ellipse, n: int, noise: float, rng: np.random.Generator) -> np.ndarray:
    t = rng.uniform(0, 2 * math.pi, n)
    (r0, c0), (a, b), th = ellipse.center, ellipse.axes, ellipse.theta
    rows = r0 + a * math.cos(th) * np.cos(t) - b * math.sin(th) * np.sin(t)
    cols = c0 + a * math.sin(th) * np.cos(t) + b * math.cos(th) * np.sin(t)
    return np.stack([rows, cols], 1) + rng.normal(0, noise, (n, 2))


def _mask(ellipse: Ellipse, shape=(48, 64)) -> np.ndarray:
    return radius_map(ellipse, shape).numpy() <= 1


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def _angle_gap(a: float, b: float) -> float:
    gap = abs(a - b) % math.pi
    return min(gap, math.pi - gap)


def test_fit_recovers_an_ellipse_from_noisy_points_without_warnings():
    rng = np.random.default_rng(0)
    # given with b > a: the fit returns the same ellipse as a >= b, theta turned by 90 degrees, in [0, pi)
    truth = canonical((24.0, 30.0), 7.0, 15.0, 2.9)
    assert truth.axes == (15.0, 7.0) and truth.theta == pytest.approx((2.9 + math.pi / 2) % math.pi)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # scikit-image's deprecated estimate()/params are not used
        fit = fit_ellipse(_points(truth, 300, 0.3, rng))
    assert fit is not None and fit.axes[0] >= fit.axes[1] and 0 <= fit.theta < math.pi
    assert np.allclose(fit.center, truth.center, atol=0.1) and np.allclose(fit.axes, truth.axes, atol=0.2)
    assert _angle_gap(fit.theta, truth.theta) < 0.02
    assert fit.mean_radius == pytest.approx(math.sqrt(fit.axes[0] * fit.axes[1]))


def test_mask_with_holes_speckle_and_a_ragged_edge_keeps_its_ellipse():
    rng = np.random.default_rng(1)
    truth = canonical((22.0, 33.0), 16.0, 10.0, 0.5)
    clean = _mask(truth)
    noisy = clean.copy()
    noisy[18:21, 30:34] = False  # holes inside
    noisy[26, 36] = False
    speckle = rng.random(clean.shape) < 0.01
    noisy[speckle & (radius_map(truth, clean.shape).numpy() > 1.3)] = True  # isolated false positives outside
    edge = (np.abs(radius_map(truth, clean.shape).numpy() - 1) < 0.08) & (rng.random(clean.shape) < 0.4)
    noisy[edge] = ~noisy[edge]  # a ragged outline
    result = assess(noisy)
    assert result.ellipse is not None
    # the speckle is not part of the kept region; the holes are (they lower the regularity, not the fit)
    assert not (result.region & (radius_map(truth, clean.shape).numpy() > 1.3)).any()
    assert _iou(_mask(result.ellipse), clean) > 0.93
    assert np.allclose(result.ellipse.center, truth.center, atol=0.5)
    assert result.regularity < assess(clean).regularity <= 1.0
    assert assess(clean).boundary == 1.0 and result.boundary > 0.7


def test_an_ellipse_cut_by_the_patch_border_is_fitted_on_its_arc_only():
    truth = canonical((3.0, 30.0), 14.0, 9.0, 0.2)  # centre 3 rows from the top: most of the top half is cut off
    mask = _mask(truth)
    points = outline_points(mask)
    assert points[:, 0].min() >= 0  # no point along the border row
    result = assess(mask)
    assert result.ellipse is not None and np.allclose(result.ellipse.center, truth.center, atol=0.6)
    assert np.allclose(result.ellipse.axes, truth.axes, atol=0.8) and result.boundary == 1.0
    # fitting the border segment too (what a plain contour would give) pulls the centre into the patch
    from skimage.measure import find_contours

    closed = max(find_contours(np.pad(mask, 1).astype(float), 0.5), key=len) - 1
    naive = fit_ellipse(closed)
    assert abs(naive.center[0] - truth.center[0]) > 1.5


def test_no_fit_without_enough_points_a_curve_or_a_region():
    assert fit_ellipse(np.array([[0.0, 0.0], [1, 2], [3, 1], [4, 4], [2, 5]])) is None  # five points: no residual
    assert fit_ellipse(np.stack([np.arange(10.0), 2 * np.arange(10.0)], 1)) is None  # collinear
    assert fit_ellipse(np.zeros((0, 2))) is None
    tiny = np.zeros((20, 20), bool)
    tiny[5:8, 5:8] = True  # 9 pixels < min_pixels
    assert assess(tiny).ellipse is None and assess(tiny).boundary == 0.0 and assess(tiny).regularity == 0.0
    assert assess(np.zeros((20, 20), bool)).ellipse is None
    half = np.zeros((32, 32), bool)
    half[:, :13] = True  # a straight edge: no ellipse, or one far larger than the patch
    assert assess(half).ellipse is None
    # a bound on the semi-axes turns an over-large fit into no fit
    big = canonical((16.0, 16.0), 40.0, 30.0, 0.0)
    assert fit_ellipse(_points(big, 50, 0.0, np.random.default_rng(2)), max_axis=39.0) is None


def test_normalised_radius_by_hand_on_numpy_and_torch():
    flat = Ellipse((10.0, 20.0), (5.0, 2.0), 0.0)  # a along the rows
    rows = np.array([10.0, 15.0, 10.0, 20.0, 13.0])
    cols = np.array([20.0, 20.0, 22.0, 20.0, 21.0])
    expected = [0.0, 1.0, 1.0, 2.0, math.sqrt((3 / 5) ** 2 + (1 / 2) ** 2)]
    assert np.allclose(normalised_radius(flat, rows, cols), expected)
    assert torch.allclose(normalised_radius(flat, torch.tensor(rows), torch.tensor(cols)),
                          torch.tensor(expected, dtype=torch.float64))
    turned = Ellipse((10.0, 20.0), (5.0, 2.0), math.pi / 2)  # a along the columns
    assert np.allclose(normalised_radius(turned, rows, cols), [0.0, 2.5, 0.4, 5.0, math.sqrt(0.2**2 + 1.5**2)])
    grid = radius_map(flat, (21, 41))
    assert grid.shape == (21, 41) and grid.dtype == torch.float32
    assert float(grid[10, 20]) == 0.0 and float(grid[15, 20]) == pytest.approx(1.0)


def test_refinement_profile_by_hand():
    sigma, floor, outside = 0.5, 0.2, 0.25
    rho = torch.tensor([0.0, 0.5, 1.0, 1.25, 3.0])
    w = refinement_profile(rho, sigma, floor, outside)
    edge = math.exp(-1 / (2 * sigma**2))
    inside_half = (math.exp(-0.25 / (2 * sigma**2)) - edge) / (1 - edge)
    expected = [1.0, floor + (1 - floor) * inside_half, floor,
                floor + (1 - floor) * (1 - math.exp(-(0.25**2) / (2 * outside**2))),
                floor + (1 - floor) * (1 - math.exp(-4 / (2 * outside**2)))]
    assert torch.allclose(w, torch.tensor(expected), atol=1e-6)
    # strongest at the centre, weakest on the ellipse, rising again outside; continuous at rho = 1
    inner = refinement_profile(torch.linspace(0, 1, 50), sigma, floor, outside)
    outer = refinement_profile(torch.linspace(1, 2, 50), sigma, floor, outside)  # saturates at 1 further out
    assert bool((inner[1:] < inner[:-1]).all()) and bool((outer[1:] > outer[:-1]).all())
    assert float(refinement_profile(torch.tensor(1.0 + 1e-4), sigma, floor, outside)) == pytest.approx(floor, abs=1e-5)
    assert float(refinement_profile(torch.tensor(0.0), 2.0, 0.5, 1.0)) == pytest.approx(1.0)
