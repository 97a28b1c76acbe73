"""A least-squares ellipse on the outline of a 2D mask, the two scores of ERSR's filter, and the refinement profile.

Everything here is per sample and on the CPU (numpy, scipy, scikit-image), except :func:`normalised_radius` and
:func:`refinement_profile`, which take numpy arrays or torch tensors alike, so the trainer evaluates them on the
training device. Coordinates are (row, column) of the array throughout; an ellipse is its centre, semi-axes
``a >= b`` and the angle ``theta`` of the ``a`` axis, measured from the row axis towards the column axis.

- Fit: scikit-image's ``EllipseModel`` (Halir & Flusser's numerically stable direct least squares) on the outline
  that ``skimage.measure.find_contours`` traces at 0.5 around the mask with its holes filled; outline points on the
  patch border are left out, so an object cut by the patch is fitted on its true arc only.
- Normalised radius ``rho``: with ``(u, v)`` the offset from the centre rotated into the ellipse's axes,
  ``rho = sqrt((u / a)^2 + (v / b)^2)``: 0 at the centre, 1 on the ellipse, > 1 outside.
- Boundary consistency ``S_b = (1/N) sum_i 1[|rho(p_i) - 1| <= max(delta, delta_px / sqrt(a b))]`` over the N outline
  points ``p_i``: the fraction of the predicted boundary that lies on the fitted ellipse, within ``delta`` of its
  radius or ``delta_px`` pixels, whichever is larger (the outline of a rasterised ellipse is off by up to half a
  pixel, a large share of the radius of a small one).
- Contour regularity ``S_r`` = solidity of the kept region measured on the same outline: the area the outline
  encloses less the region's hole pixels, over the area of the outline's convex hull: 1 for a convex region without
  holes, lower for notches, spurs and holes. (Not ``regionprops``' solidity, which counts the pixels of the
  rasterised hull and so the staircase of a small pixelated ellipse as concavity: 0.90 for semi-axes of 6 x 4
  pixels, 0.95 on the outline; it also took 7 ms a call on a 256 x 256 fetal head, scipy's ``ConvexHull`` of the
  outline well under 1 ms.)
- Refinement profile ``w(rho) = f + (1 - f) h(rho)``, floor ``f``, with ``h`` a Gaussian bump inside the ellipse
  rescaled to 1 at the centre and 0 on the ellipse, ``h(rho) = (exp(-rho^2 / 2 s^2) - exp(-1 / 2 s^2)) /
  (1 - exp(-1 / 2 s^2))``, and outside a rise back towards 1 away from it, ``h(rho) = 1 - exp(-(rho - 1)^2 / 2
  s_o^2)``: a pixel weighs most at the centre and far outside, least on the ellipse, where a fitted outline is
  least certain.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage
from scipy.spatial import ConvexHull
from skimage.measure import EllipseModel, find_contours

#: fewest outline points an ellipse is fitted to (five determine one; one more leaves a residual)
MIN_POINTS = 6


@dataclass(frozen=True)
class Ellipse:
    """Centre (row, column), semi-axes ``a >= b`` (pixels) and angle ``theta`` in [0, pi) of the ``a`` axis."""

    center: tuple[float, float]
    axes: tuple[float, float]
    theta: float

    @property
    def mean_radius(self) -> float:
        """``sqrt(a b)``, the radius of the circle of the same area."""
        return math.sqrt(self.axes[0] * self.axes[1])


def canonical(center: tuple[float, float], a: float, b: float, theta: float) -> Ellipse:
    """The same ellipse with ``a >= b`` and ``theta`` in [0, pi) (a fit may return the axes in either order)."""
    if b > a:
        a, b, theta = b, a, theta + math.pi / 2
    return Ellipse((float(center[0]), float(center[1])), (float(a), float(b)), float(theta % math.pi))


def fit_ellipse(points: np.ndarray, max_axis: float = math.inf) -> Ellipse | None:
    """The least-squares ellipse through ``points`` (N, 2) of (row, column); None when fewer than
    :data:`MIN_POINTS` are given, the fit fails (collinear points) or a semi-axis is not finite, below half a
    pixel or above ``max_axis``."""
    points = np.asarray(points, dtype=np.float64)
    if points.ndim != 2 or points.shape[0] < MIN_POINTS:
        return None
    with np.errstate(all="ignore"):
        if hasattr(EllipseModel, "from_estimate"):  # scikit-image >= 0.26; estimate() and params are deprecated
            model = EllipseModel.from_estimate(points)
            if not model:
                return None
            center, (a, b), theta = model.center, model.axis_lengths, model.theta
        else:
            model = EllipseModel()
            if not model.estimate(points):
                return None
            xc, yc, a, b, theta = model.params
            center = (xc, yc)
    values = [*center, a, b, theta]
    if not all(math.isfinite(float(v)) for v in values) or min(a, b) < 0.5 or max(a, b) > max_axis:
        return None
    return canonical(center, float(a), float(b), float(theta))


def normalised_radius(ellipse: Ellipse, rows, cols):
    """``rho`` of the points (rows, cols) (numpy arrays or torch tensors of one shape, broadcastable)."""
    (r0, c0), (a, b) = ellipse.center, ellipse.axes
    cos, sin = math.cos(ellipse.theta), math.sin(ellipse.theta)
    dr, dc = rows - r0, cols - c0
    u = dr * cos + dc * sin
    v = -dr * sin + dc * cos
    return ((u / a) ** 2 + (v / b) ** 2) ** 0.5


def radius_map(ellipse: Ellipse, shape: tuple[int, int], device: torch.device | str = "cpu") -> torch.Tensor:
    """``rho`` of every pixel centre of a (rows, cols) grid, float32 on ``device``."""
    rows = torch.arange(shape[0], dtype=torch.float32, device=device)[:, None]
    cols = torch.arange(shape[1], dtype=torch.float32, device=device)[None, :]
    return normalised_radius(ellipse, rows, cols)


def refinement_profile(rho: torch.Tensor, sigma: float = 0.5, floor: float = 0.2,
                       outside_sigma: float = 0.25) -> torch.Tensor:
    """The per-pixel weight ``w(rho)`` of the module docstring: 1 at the centre, ``floor`` on the ellipse, rising
    back towards 1 outside it (``rho`` a torch tensor)."""
    edge = math.exp(-1.0 / (2 * sigma**2))
    inside = (torch.exp(-(rho**2) / (2 * sigma**2)) - edge) / (1.0 - edge)
    outside = 1.0 - torch.exp(-((rho - 1.0) ** 2) / (2 * outside_sigma**2))
    return floor + (1.0 - floor) * torch.where(rho <= 1.0, inside, outside)


def largest_region(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected component of a 2D boolean mask (empty stays empty)."""
    components, count = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    if count <= 1:
        return components > 0
    sizes = np.bincount(components.ravel())[1:]
    return components == int(np.argmax(sizes)) + 1


def bounding_box(region: np.ndarray) -> tuple[slice, slice]:
    """The smallest (rows, cols) slices holding every pixel of a non-empty 2D mask."""
    return ndimage.find_objects(region.astype(np.uint8))[0]


def outline(region: np.ndarray) -> tuple[np.ndarray, int]:
    """The closed outer outline of a non-empty ``region``, (M, 2) sub-pixel (row, column) points that
    ``find_contours`` traces at 0.5 around it with its holes filled (the longest contour if marching squares splits
    it), and the number of hole pixels. The work is done on the region's bounding box, whose outside is
    background."""
    rows, cols = bounding_box(region)
    crop = region[rows, cols]
    filled = ndimage.binary_fill_holes(crop)
    contours = find_contours(np.pad(filled, 1).astype(np.float32), 0.5)
    # closed: the last point repeats the first; undo the padding and the crop
    points = max(contours, key=len)[:-1] + np.array([rows.start - 1.0, cols.start - 1.0])
    return points, int(filled.sum() - crop.sum())


def off_border(points: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The outline points that do not run along the border of a patch of ``shape`` (an object cut by the patch)."""
    height, width = shape
    inside = (points[:, 0] >= 0) & (points[:, 0] <= height - 1) & (points[:, 1] >= 0) & (points[:, 1] <= width - 1)
    return points[inside]


def outline_points(region: np.ndarray) -> np.ndarray:
    """(N, 2) points of the outer outline of ``region`` (:func:`outline`) without those along the patch border."""
    if not region.any():
        return np.zeros((0, 2))
    return off_border(outline(region)[0], region.shape)


def boundary_consistency(points: np.ndarray, ellipse: Ellipse, tolerance: float = 0.05,
                         tolerance_pixels: float = 1.0) -> float:
    """``S_b``: the fraction of ``points`` within ``max(tolerance, tolerance_pixels / sqrt(a b))`` of ``rho = 1``."""
    if len(points) == 0:
        return 0.0
    rho = normalised_radius(ellipse, points[:, 0], points[:, 1])
    band = max(tolerance, tolerance_pixels / ellipse.mean_radius)
    return float(np.mean(np.abs(rho - 1.0) <= band))


def solidity(points: np.ndarray, holes: int = 0) -> float:
    """``(A - holes) / A_hull`` of a closed outline: its enclosed (shoelace) area less the hole pixels, over the
    area of its convex hull (scipy's ``ConvexHull``), at most 1."""
    rows, cols = points[:, 0], points[:, 1]
    area = 0.5 * abs(float(np.dot(rows, np.roll(cols, -1)) - np.dot(cols, np.roll(rows, -1))))
    return min(1.0, (area - holes) / ConvexHull(points).volume)  # in 2D, volume is the area


def contour_regularity(region: np.ndarray) -> float:
    """``S_r``: the solidity of ``region`` measured on its outline (:func:`outline`, :func:`solidity`); 0 for an
    empty region."""
    if not region.any():
        return 0.0
    return solidity(*outline(region))


@dataclass(frozen=True)
class Assessment:
    """What ERSR's filter sees of one binary prediction: the kept region, its ellipse (None: no fit) and scores."""

    region: np.ndarray
    ellipse: Ellipse | None
    boundary: float
    regularity: float


def assess(mask: np.ndarray, min_pixels: int = 16, tolerance: float = 0.05, tolerance_pixels: float = 1.0,
           max_axis_factor: float = 2.0) -> Assessment:
    """Keeps the largest component of a 2D boolean prediction, fits the ellipse to its outline and scores it. No
    fit (and both scores 0) when the region has fewer than ``min_pixels`` pixels, too few outline points away from
    the patch border, or the fit fails or has a semi-axis longer than ``max_axis_factor`` times the patch's longer
    side (a nearly straight arc)."""
    region = largest_region(np.asarray(mask, dtype=bool))
    if int(region.sum()) < min_pixels:
        return Assessment(region, None, 0.0, 0.0)
    points, holes = outline(region)
    arc = off_border(points, region.shape)
    ellipse = fit_ellipse(arc, max_axis=max_axis_factor * max(region.shape))
    if ellipse is None:
        return Assessment(region, None, 0.0, 0.0)
    return Assessment(region, ellipse, boundary_consistency(arc, ellipse, tolerance, tolerance_pixels),
                      solidity(points, holes))
