"""Masks of variable quality for training the quality predictor (QG-SSL Phase 1, "VQM").

Paper: Abhishek & Hamarneh, QG-SSL (arXiv 2606.01753); official code sfu-mial/QG-SSL builds corrupted versions of
each ground-truth mask and trains g_phi to regress their true Dice q = Dice(m_corrupted, m_GT).

This module holds pure numpy/scipy functions on nnU-Net label maps (``(*spatial)`` integer arrays, 2D or 3D, values
0..K-1, background 0) and ``MaskQualitySampler``, which mixes them like the official generator:

    category ~ {identity, single, chained, cross-case, heavy, catastrophic, weak model}
    mask     = category applied to the ground truth (or a weak model's prediction, supplied by the caller)
    target_c = Dice_c(mask, GT) for every foreground class c                              (``dice_per_class``)

Dice convention (patches often miss a class): Dice_c = (2 sum(p_c g_c) + 1) / (sum(p_c) + sum(g_c) + 1), sums over
valid voxels (nnU-Net's padding, label -1, and the ignore label are excluded), with p_c the mask's (soft or hard)
probability of class c. The +1 (one voxel) makes a class absent from both mask and ground truth score 1 (the mask
is right about it), and a class present in only one of them score close to 0 (1/(n+1) for n voxels); for any
structure of realistic size it differs from the plain Dice by less than 1/(|P|+|G|).

Deviations from the official generator, and why:

- Label maps with K classes, 2D and 3D, instead of binary 2D masks: morphological corruptions act on a random subset
  of the classes present; "invert" becomes swaps between labels; "full" fills with one random class.
- Sizes (radii, shifts, displacements) are in voxels scaled by ``unit = max(1, round(min(patch shape) / 24))``
  instead of the official fixed pixel sizes for 224x224 images: nnU-Net patches are often small (e.g. 40x56x40).
  Voxel spacing is ignored (the structuring elements are isotropic in voxels).
- Ellipse/polygon approximation, convex hull and grid distortion are left out (costly or 2D-only in 3D); the bounding
  box fill, elastic deformation and random affine cover the same kinds of shape errors.
- Soft masks: with probability ``soft_prob`` a corrupted one-hot mask is smoothed (Gaussian blur of each class
  channel, renormalised), and weak models give softmax probabilities half the time, with the soft Dice as target.
  The official predictor is trained on binary masks only, yet QAR feeds it soft predictions (a gap noted in our
  reading of the code); training on both keeps QAR's inputs in distribution.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from scipy import ndimage

#: category probabilities (official class defaults, with "weak" at 0.15 and cross-case at 0.10 as in the script;
#: they are renormalised, and "weak" is dropped when no weak model is available)
DEFAULT_CATEGORY_PROBS: dict[str, float] = {
    "identity": 0.12,
    "single": 0.28,
    "chained": 0.18,
    "cross_case": 0.10,
    "heavy": 0.12,
    "catastrophic": 0.05,
    "weak": 0.15,
}


# ----------------------------------------------------------------------------------------------------- Dice targets


def one_hot(label: np.ndarray, num_classes: int) -> np.ndarray:
    """(*spatial) labels -> (K, *spatial) float32 one-hot; values outside 0..K-1 (padding -1) give all zeros."""
    out = np.zeros((num_classes, *label.shape), dtype=np.float32)
    for c in range(num_classes):
        out[c] = label == c
    return out


def valid_voxels(gt: np.ndarray, ignore_label: int | None = None) -> np.ndarray:
    """Voxels that count for the Dice: not nnU-Net's padding (-1) and not the ignore label."""
    valid = gt >= 0
    if ignore_label is not None:
        valid &= gt != ignore_label
    return valid


def dice_per_class(mask: np.ndarray, gt: np.ndarray, num_classes: int, valid: np.ndarray | None = None,
                   smooth: float = 1.0) -> np.ndarray:
    """Dice of every foreground class, (K-1,) float32 (module docstring: convention for empty classes).

    ``mask``: (K, *spatial) probabilities or one-hot, or (*spatial) labels; ``gt``: (*spatial) labels."""
    if mask.ndim == gt.ndim:
        mask = one_hot(mask, num_classes)
    if valid is None:
        valid = valid_voxels(gt)
    out = np.empty(num_classes - 1, dtype=np.float32)
    for c in range(1, num_classes):
        p = mask[c][valid].astype(np.float64)
        g = (gt[valid] == c).astype(np.float64)
        out[c - 1] = (2 * (p * g).sum() + smooth) / (p.sum() + g.sum() + smooth)
    return out


# ------------------------------------------------------------------------------------------------------- helpers


def _unit(shape: Sequence[int]) -> int:
    return max(1, int(round(min(shape) / 24)))


def _present(label: np.ndarray, num_classes: int) -> list[int]:
    return [c for c in range(1, num_classes) if (label == c).any()]


def _pick_classes(label: np.ndarray, num_classes: int, rng: np.random.Generator) -> list[int]:
    """A random non-empty subset of the foreground classes present (all foreground classes if none is)."""
    present = _present(label, num_classes) or list(range(1, num_classes))
    n = int(rng.integers(1, len(present) + 1))
    return sorted(int(c) for c in rng.choice(present, size=n, replace=False))


def _ball(dim: int, radius: int) -> np.ndarray:
    grid = np.indices((2 * radius + 1,) * dim) - radius
    return (grid ** 2).sum(0) <= radius ** 2 + 0.5


def _per_class(label: np.ndarray, classes: Sequence[int], op: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Applies a binary operation to each class mask: removed voxels become background, added voxels class c."""
    out = label.copy()
    for c in classes:
        m = label == c
        new = op(m)
        out[m & ~new] = 0
        out[new & ~m] = c
    return out


def _sphere_mask(shape: Sequence[int], center: Sequence[float], radius: float) -> np.ndarray:
    grid = np.ogrid[tuple(slice(0, s) for s in shape)]
    return sum((g - c) ** 2 for g, c in zip(grid, center)) <= radius ** 2


def _resample_nearest(label: np.ndarray, coords: np.ndarray) -> np.ndarray:
    return ndimage.map_coordinates(label, coords, order=0, mode="nearest").astype(label.dtype)


# --------------------------------------------------------------------------------------------------- corruptions
# Each corruption: (label, rng, num_classes, strength in [0, 1]) -> new label map of the same shape and dtype.


def erode(label, rng, num_classes, strength=0.5):
    """Binary erosion of some classes, radius 1 + 3*strength units."""
    r = 1 + int(round(3 * strength * _unit(label.shape)))
    return _per_class(label, _pick_classes(label, num_classes, rng),
                      lambda m: ndimage.binary_erosion(m, _ball(label.ndim, r)))


def dilate(label, rng, num_classes, strength=0.5):
    """Binary dilation of some classes (over the background and other classes)."""
    r = 1 + int(round(3 * strength * _unit(label.shape)))
    return _per_class(label, _pick_classes(label, num_classes, rng),
                      lambda m: ndimage.binary_dilation(m, _ball(label.ndim, r)))


def opening(label, rng, num_classes, strength=0.5):
    """Morphological opening (removes thin parts and small components)."""
    r = 1 + int(round(3 * strength * _unit(label.shape)))
    return _per_class(label, _pick_classes(label, num_classes, rng),
                      lambda m: ndimage.binary_opening(m, _ball(label.ndim, r)))


def closing(label, rng, num_classes, strength=0.5):
    """Morphological closing (fills concavities and gaps)."""
    r = 1 + int(round(3 * strength * _unit(label.shape)))
    return _per_class(label, _pick_classes(label, num_classes, rng),
                      lambda m: ndimage.binary_closing(m, _ball(label.ndim, r), border_value=0))


def boundary_noise(label, rng, num_classes, strength=0.5):
    """Jagged boundaries: voxels within a band around label boundaries take the label of a random nearby voxel."""
    width = 1 + int(round(strength * _unit(label.shape)))
    edges = np.zeros(label.shape, dtype=bool)
    for axis in range(label.ndim):
        d = np.diff(label, axis=axis) != 0
        lo = [slice(None)] * label.ndim
        hi = [slice(None)] * label.ndim
        lo[axis], hi[axis] = slice(0, -1), slice(1, None)
        edges[tuple(lo)] |= d
        edges[tuple(hi)] |= d
    band = ndimage.binary_dilation(edges, iterations=width)
    flip = band & (rng.random(label.shape) < 0.25 + 0.6 * strength)
    offsets = rng.integers(-width - 1, width + 2, size=(label.ndim, *label.shape))
    coords = np.indices(label.shape) + offsets
    out = label.copy()
    out[flip] = _resample_nearest(label, coords)[flip]
    return out


def smooth_boundary(label, rng, num_classes, strength=0.5):
    """Over-smoothed boundaries: Gaussian blur of the one-hot mask, then argmax (thin parts and corners vanish)."""
    sigma = (1.0 + 3.0 * strength) * _unit(label.shape)
    blurred = np.stack([ndimage.gaussian_filter(c, sigma) for c in one_hot(label, num_classes)])
    return blurred.argmax(0).astype(label.dtype)


def elastic(label, rng, num_classes, strength=0.5):
    """Elastic deformation: smooth random displacement, at most (1 + 5*strength) units, nearest resampling."""
    unit = _unit(label.shape)
    sigma = 3.0 * unit
    alpha = (1.0 + 5.0 * strength) * unit
    disp = np.stack([ndimage.gaussian_filter(rng.standard_normal(label.shape), sigma) for _ in range(label.ndim)])
    disp *= alpha / (np.abs(disp).max() + 1e-8)
    return _resample_nearest(label, np.indices(label.shape) + disp)


def _random_rotation(dim: int, angle: float, rng: np.random.Generator) -> np.ndarray:
    if dim == 2:
        c, s = np.cos(angle), np.sin(angle)
        return np.array([[c, -s], [s, c]])
    axis = rng.standard_normal(3)
    axis /= np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k  # Rodrigues


def affine(label, rng, num_classes, strength=0.5):
    """Random rotation (up to 5 + 25*strength degrees), scaling (1 +- (0.05 + 0.25*strength)) and shift around the
    patch centre, nearest resampling."""
    dim = label.ndim
    angle = np.deg2rad(rng.uniform(-1, 1) * (5 + 25 * strength))
    scale = 1 + rng.uniform(-1, 1) * (0.05 + 0.25 * strength)
    matrix = _random_rotation(dim, angle, rng) / scale
    shift = rng.uniform(-1, 1, size=dim) * (1 + 3 * strength) * _unit(label.shape)
    center = (np.array(label.shape) - 1) / 2
    offset = center - matrix @ center + shift
    return ndimage.affine_transform(label, matrix, offset=offset, order=0, mode="nearest").astype(label.dtype)


def shift(label, rng, num_classes, strength=0.5):
    """Translation by up to (1 + 6*strength) units along every axis (at least one voxel)."""
    unit = _unit(label.shape)
    amount = rng.integers(-(1 + int(6 * strength * unit)), 2 + int(6 * strength * unit), size=label.ndim)
    if not amount.any():
        amount[int(rng.integers(label.ndim))] = 1
    return ndimage.shift(label, amount, order=0, mode="nearest").astype(label.dtype)


def holes(label, rng, num_classes, strength=0.5):
    """Spherical holes (set to background) centred on random foreground voxels."""
    fg = np.argwhere(label > 0)
    if len(fg) == 0:
        return label.copy()
    out = label.copy()
    radius = (1 + 2 * strength) * _unit(label.shape)
    for _ in range(1 + int(round(3 * strength))):
        out[_sphere_mask(label.shape, fg[rng.integers(len(fg))], radius)] = 0
    return out


def islands(label, rng, num_classes, strength=0.5):
    """Spherical islands of a random foreground class centred on random background voxels."""
    bg = np.argwhere(label == 0)
    if len(bg) == 0:
        return label.copy()
    out = label.copy()
    radius = (1 + 2 * strength) * _unit(label.shape)
    for _ in range(1 + int(round(3 * strength))):
        sphere = _sphere_mask(label.shape, bg[rng.integers(len(bg))], radius) & (label == 0)
        out[sphere] = rng.integers(1, num_classes)
    return out


def drop_component(label, rng, num_classes, strength=0.5):
    """Removes one random connected component of one present class."""
    present = _present(label, num_classes)
    if not present:
        return label.copy()
    c = present[int(rng.integers(len(present)))]
    components, n = ndimage.label(label == c)
    out = label.copy()
    out[components == 1 + int(rng.integers(n))] = 0
    return out


def keep_largest(label, rng, num_classes, strength=0.5):
    """Keeps only the largest connected component of each class (loses the smaller ones)."""
    out = label.copy()
    for c in _present(label, num_classes):
        components, n = ndimage.label(label == c)
        if n > 1:
            sizes = np.bincount(components.ravel())[1:]
            out[(components > 0) & (components != 1 + int(sizes.argmax()))] = 0
    return out


def swap_labels(label, rng, num_classes, strength=0.5):
    """Swaps two foreground labels; with one foreground class, swaps it with the background (inversion)."""
    if num_classes >= 3:
        a, b = (int(x) for x in rng.choice(np.arange(1, num_classes), size=2, replace=False))
    else:
        a, b = 0, 1
    out = label.copy()
    out[label == a] = b
    out[label == b] = a
    return out


def rect_dropout(label, rng, num_classes, strength=0.5):
    """A random box spanning 10-30 % (more with strength) of each axis is set to background."""
    out = label.copy()
    fg = np.argwhere(label > 0)
    center = fg[rng.integers(len(fg))] if len(fg) else np.array(label.shape) // 2
    slices = []
    for axis, size in enumerate(label.shape):
        half = max(1, int(round(size * rng.uniform(0.1, 0.3 + 0.3 * strength) / 2)))
        slices.append(slice(max(0, center[axis] - half), center[axis] + half + 1))
    out[tuple(slices)] = 0
    return out


def bounding_box(label, rng, num_classes, strength=0.5):
    """Fills the bounding box of one present class with that class."""
    present = _present(label, num_classes)
    if not present:
        return label.copy()
    c = present[int(rng.integers(len(present)))]
    box = ndimage.find_objects((label == c).astype(np.int32))[0]
    out = label.copy()
    out[box] = c
    return out


def empty(label, rng, num_classes, strength=1.0):
    """All background."""
    return np.zeros_like(label)


def full(label, rng, num_classes, strength=1.0):
    """Every voxel one random foreground class."""
    return np.full_like(label, int(rng.integers(1, num_classes)))


def random_blobs(label, rng, num_classes, strength=1.0):
    """Random smooth blobs of random classes, unrelated to the image."""
    sigma = 2.0 * _unit(label.shape)
    noise = np.stack([ndimage.gaussian_filter(rng.standard_normal(label.shape), sigma) for _ in range(num_classes)])
    noise[0] += rng.uniform(0, 2) * noise[1:].std()  # background is usually the largest class
    return noise.argmax(0).astype(label.dtype)


#: corruptions for the single, chained and heavy categories
CORRUPTIONS: dict[str, Callable] = {
    "erode": erode,
    "dilate": dilate,
    "opening": opening,
    "closing": closing,
    "boundary_noise": boundary_noise,
    "smooth_boundary": smooth_boundary,
    "elastic": elastic,
    "affine": affine,
    "shift": shift,
    "holes": holes,
    "islands": islands,
    "drop_component": drop_component,
    "keep_largest": keep_largest,
    "swap_labels": swap_labels,
    "rect_dropout": rect_dropout,
    "bounding_box": bounding_box,
}
#: corruptions of the catastrophic category
CATASTROPHIC: dict[str, Callable] = {"empty": empty, "full": full, "random_blobs": random_blobs,
                                     "swap_labels": swap_labels}


def soften(mask: np.ndarray, rng: np.random.Generator, unit: int = 1) -> np.ndarray:
    """(K, *spatial) one-hot -> soft probabilities: Gaussian blur of every class channel (sigma 0.5-1.5 units),
    sharpened or flattened with a random temperature, renormalised."""
    sigma = rng.uniform(0.5, 1.5) * unit
    blurred = np.stack([ndimage.gaussian_filter(c, sigma) for c in mask]) + 1e-6
    blurred **= 1.0 / rng.uniform(0.5, 1.5)
    return (blurred / blurred.sum(0, keepdims=True)).astype(np.float32)


class MaskQualitySampler:
    """Draws masks of variable quality from a ground-truth label map (the official VQM categories, see the module
    docstring). ``sample`` returns (mask (K, *spatial) float32, description); the caller computes the target with
    ``dice_per_class``. The "weak" category is answered by the caller (``draw_category`` first, then ``sample`` for
    every other category), because weak-model predictions need the network and the image."""

    def __init__(self, num_classes: int, seed: int | None = None, category_probs: dict[str, float] | None = None,
                 weak_available: bool = False, soft_prob: float = 0.25) -> None:
        if num_classes < 2:
            raise ValueError("num_classes counts the background too and must be >= 2")
        self.num_classes = num_classes
        self.rng = np.random.default_rng(seed)
        probs = dict(category_probs or DEFAULT_CATEGORY_PROBS)
        if not weak_available:
            probs.pop("weak", None)
        unknown = set(probs) - set(DEFAULT_CATEGORY_PROBS)
        if unknown:
            raise ValueError(f"unknown mask categories {sorted(unknown)}")
        total = sum(probs.values())
        self.categories = list(probs)
        self.probs = np.array([probs[c] / total for c in self.categories])
        self.soft_prob = soft_prob

    def _clean(self, gt: np.ndarray) -> np.ndarray:
        """Padding (-1) and the ignore label (>= K) become background before corrupting."""
        return np.where((gt > 0) & (gt < self.num_classes), gt, 0).astype(np.int16)

    def draw_category(self) -> str:
        return self.categories[int(self.rng.choice(len(self.categories), p=self.probs))]

    def _apply(self, label: np.ndarray, names: Sequence[str], lo: float, hi: float,
               table: dict[str, Callable] = CORRUPTIONS) -> tuple[np.ndarray, str]:
        for name in names:
            label = table[name](label, self.rng, self.num_classes, float(self.rng.uniform(lo, hi)))
        return label, "+".join(names)

    def sample(self, gt: np.ndarray, category: str | None = None,
               others: Sequence[np.ndarray] = ()) -> tuple[np.ndarray, str]:
        """A mask for ``gt`` ((*spatial) labels; padding -1 and the ignore label are treated as background; the
        target excludes them through ``valid_voxels``). ``others``: label maps of
        patches from other cases, for the cross-case category (falls back to a single corruption without them)."""
        category = category or self.draw_category()
        if category == "weak":
            raise ValueError("the 'weak' category is produced by the caller; draw_category() told it so")
        label = self._clean(gt)
        names = list(CORRUPTIONS)
        if category == "identity":
            return one_hot(label, self.num_classes), "identity"
        if category == "cross_case" and len(others):
            other = others[int(self.rng.integers(len(others)))]
            label, desc = self._clean(other), "cross_case"
        elif category == "chained":
            k = int(self.rng.integers(2, 4))
            label, desc = self._apply(label, self.rng.choice(names, size=k, replace=False), 0.0, 0.5)
        elif category == "heavy":
            k = int(self.rng.integers(1, 3))
            label, desc = self._apply(label, self.rng.choice(names, size=k, replace=False), 0.6, 1.0)
        elif category == "catastrophic":
            label, desc = self._apply(label, [self.rng.choice(list(CATASTROPHIC))], 1.0, 1.0, CATASTROPHIC)
        else:  # single, or cross_case without other cases
            label, desc = self._apply(label, [self.rng.choice(names)], 0.0, 0.7)
        mask = one_hot(label, self.num_classes)
        if self.rng.random() < self.soft_prob:
            mask, desc = soften(mask, self.rng, _unit(label.shape)), desc + "+soft"
        return mask, f"{category}:{desc}"
