"""Bidirectional displacement of image regions between two views: ABD's grid rules (Chi et al., CVPR 2024, official
code chy-upc/ABD ``code/utils/displacement.py``) and CAD's largest low-confidence region (Xiao et al., arXiv
2502.00536, code not released). Pure tensor functions for 2D and 3D patches (any number of spatial axes), batch
first: images (B, C, *spatial), labels (B, [1,] *spatial), softmax probabilities (B, K, *spatial), confidence maps
(B, *spatial).

The grid. Along each axis of n voxels with g cells, every cell has ``s = n // g`` voxels and the grid of ``g s``
voxels is centred in the patch: the ``n - g s < g`` voxels left over (nnU-Net's patch sizes need not divide) are
split between both ends, belong to no cell, and are never scored or displaced. Every cell therefore has the same
shape and a displacement is an exact copy, never a resize or a crop (the official code requires sizes that
divide). Cells are numbered in row-major order over the grid axes (the official ``(h w)`` order).

Displacement never reads what it has written: every copied region comes from the original views (the official code
writes view 1's cell before reading view 1's source cell for view 2, which only differs when they coincide). Each
function returns a :class:`Displacement` with the new images, the masks of the replaced voxels and the chosen
regions. Random draws (one per sample) come from the ``generator`` passed in (the global one when None).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

Slices = tuple[slice, ...]


@dataclass(frozen=True)
class Grid:
    """A centred grid of equal cells over a patch (see the module docstring)."""

    #: the patch's spatial shape
    spatial: tuple[int, ...]
    #: cells per axis
    cells: tuple[int, ...]
    #: voxels per cell along each axis (``n // g``)
    side: tuple[int, ...]
    #: first voxel of the grid along each axis (``(n - g s) // 2``)
    offset: tuple[int, ...]

    @property
    def count(self) -> int:
        return math.prod(self.cells)

    def slices(self, index: int) -> Slices:
        """The spatial slices of cell ``index`` (row-major over the grid axes)."""
        position = np.unravel_index(int(index), self.cells)
        return tuple(slice(o + int(p) * s, o + (int(p) + 1) * s)
                     for o, p, s in zip(self.offset, position, self.side))

    def cell_means(self, x: torch.Tensor) -> torch.Tensor:
        """Per-cell means of ``x`` (B, K, *spatial) -> (B, cells, K), over each cell's voxels."""
        b, k = x.shape[:2]
        inside = x[(slice(None), slice(None),
                    *(slice(o, o + g * s) for o, g, s in zip(self.offset, self.cells, self.side)))]
        split = [d for g, s in zip(self.cells, self.side) for d in (g, s)]
        blocks = inside.reshape(b, k, *split)
        means = blocks.mean(dim=tuple(3 + 2 * i for i in range(len(self.cells))))
        return means.reshape(b, k, self.count).transpose(1, 2)


def make_grid(spatial: tuple[int, ...] | torch.Size, grid: int | tuple[int, ...]) -> Grid:
    """The grid of ``grid`` cells per axis (an int for every axis, or one per axis) over ``spatial``."""
    spatial = tuple(int(n) for n in spatial)
    cells = (int(grid),) * len(spatial) if isinstance(grid, int) else tuple(int(g) for g in grid)
    if len(cells) != len(spatial):
        raise ValueError(f"grid {grid} has {len(cells)} axes, the patch {spatial} has {len(spatial)}")
    if any(g < 1 or g > n for g, n in zip(cells, spatial)):
        raise ValueError(f"grid {cells} does not fit the patch {spatial}: 1 <= cells <= voxels on every axis")
    side = tuple(n // g for n, g in zip(spatial, cells))
    offset = tuple((n - g * s) // 2 for n, g, s in zip(spatial, cells, side))
    return Grid(spatial, cells, side, offset)


def confidence_map(probs: torch.Tensor) -> torch.Tensor:
    """``max_c p_c`` per voxel: (B, K, *spatial) -> (B, *spatial)."""
    return probs.max(1).values


def cell_confidence(confidence: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Mean confidence of each cell: (B, *spatial) -> (B, cells)."""
    return grid.cell_means(confidence[:, None].float())[..., 0]


def cell_distribution(probs: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Mean class distribution of each cell: (B, K, *spatial) -> (B, cells, K)."""
    return grid.cell_means(probs.float())


@dataclass
class Displacement:
    """Two displaced views and what was replaced in each."""

    #: view 1 and view 2 after the displacement (new tensors; the inputs are unchanged)
    images: tuple[torch.Tensor, torch.Tensor]
    #: (B, *spatial) booleans: True where view 1 / view 2 received content of the other view
    masks: tuple[torch.Tensor, torch.Tensor]
    #: per sample, the replaced region of view 1 / view 2 (None where nothing was replaced)
    replaced: tuple[list[Slices | None], list[Slices | None]]
    #: per sample, the region of the other view copied there (view 2's region for view 1, and vice versa)
    sources: tuple[list[Slices | None], list[Slices | None]]
    #: labels moved with exactly the same regions (ABD-I), else None
    labels: tuple[torch.Tensor, torch.Tensor] | None = None
    #: (B,) booleans: samples where ABD-R took its KL branch (ABD-R only)
    kl_branch: torch.Tensor | None = None

    @property
    def fraction(self) -> float:
        """Share of the voxels of both views that were replaced."""
        return float(torch.stack([m.float().mean() for m in self.masks]).mean())


def _draw(batch: int, probability: float, generator: torch.Generator | None) -> torch.Tensor:
    """(B,) booleans, True with ``probability`` each: one draw per sample, on the CPU generator."""
    return torch.rand(batch, generator=generator) < probability


def move_regions(destination: torch.Tensor, source: torch.Tensor, targets: list[Slices | None],
                 origins: list[Slices | None]) -> torch.Tensor:
    """A copy of ``destination`` whose region ``targets[i]`` of sample i holds ``source``'s region ``origins[i]``
    (same shape); samples with None are unchanged. Works on any leading dims before the spatial ones (images,
    labels with or without a channel)."""
    out = destination.clone()
    for i, (target, origin) in enumerate(zip(targets, origins)):
        if target is not None:
            out[i][(Ellipsis, *target)] = source[i][(Ellipsis, *origin)]
    return out


def region_mask(spatial: tuple[int, ...], regions: list[Slices | None], device: torch.device | str) -> torch.Tensor:
    """(B, *spatial) booleans, True inside each sample's region."""
    mask = torch.zeros((len(regions), *spatial), dtype=torch.bool, device=device)
    for i, region in enumerate(regions):
        if region is not None:
            mask[i][region] = True
    return mask


def _displace(image1: torch.Tensor, image2: torch.Tensor, replaced1: list[Slices | None],
              source2: list[Slices | None], replaced2: list[Slices | None], source1: list[Slices | None],
              labels: tuple[torch.Tensor, torch.Tensor] | None = None, kl_branch: torch.Tensor | None = None
              ) -> Displacement:
    """View 1's regions ``replaced1`` <- view 2's ``source2``; view 2's ``replaced2`` <- view 1's ``source1``, all
    read from the original views."""
    spatial = tuple(image1.shape[2:])
    moved = None
    if labels is not None:
        moved = (move_regions(labels[0], labels[1], replaced1, source2),
                 move_regions(labels[1], labels[0], replaced2, source1))
    return Displacement(images=(move_regions(image1, image2, replaced1, source2),
                                move_regions(image2, image1, replaced2, source1)),
                        masks=(region_mask(spatial, replaced1, image1.device),
                               region_mask(spatial, replaced2, image1.device)),
                        replaced=(replaced1, replaced2), sources=(source2, source1), labels=moved,
                        kl_branch=kl_branch)


def kl_divergence(p: torch.Tensor, q: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``KL(p || q) = sum_c p_c (log p_c - log q_c)`` over the last axis (probabilities floored at ``eps``)."""
    p, q = p.clamp_min(eps), q.clamp_min(eps)
    return (p * (p.log() - q.log())).sum(-1)


def abd_r(image1: torch.Tensor, image2: torch.Tensor, probs1: torch.Tensor, probs2: torch.Tensor,
          grid: int | tuple[int, ...], top_k: int = 4, kl_probability: float = 0.5,
          generator: torch.Generator | None = None) -> Displacement:
    """ABD-R on unlabeled views: per sample, view 1's least confident cell ``b`` gets a confident cell of view 2,
    and view 2's least confident cell ``d`` a confident cell of view 1.

    With probability ``kl_probability`` (one draw per sample, both directions) the source is, among the ``top_k``
    most confident cells of the other view, the one whose mean class distribution q is closest to the replaced
    cell's p, ``argmin KL(p || q)`` (the official ``kl_div(q.log(), p)``); otherwise it is the other view's most
    confident cell. ``probs1``/``probs2`` are the softmax predictions on view 1/view 2 (confidence: max softmax)."""
    g = make_grid(tuple(image1.shape[2:]), grid)
    conf1, conf2 = cell_confidence(confidence_map(probs1), g), cell_confidence(confidence_map(probs2), g)
    dist1, dist2 = cell_distribution(probs1, g), cell_distribution(probs2, g)
    k = max(1, min(int(top_k), g.count))
    rows = torch.arange(image1.shape[0], device=conf1.device)
    b, d = conf1.argmin(1), conf2.argmin(1)
    top1, top2 = conf1.topk(k, dim=1).indices, conf2.topk(k, dim=1).indices
    # candidates of view 2 for view 1's cell b, and of view 1 for view 2's cell d
    kl_for_1 = kl_divergence(dist1[rows, b][:, None], dist2[rows[:, None], top2])
    kl_for_2 = kl_divergence(dist2[rows, d][:, None], dist1[rows[:, None], top1])
    c_kl, a_kl = top2[rows, kl_for_1.argmin(1)], top1[rows, kl_for_2.argmin(1)]
    use_kl = _draw(image1.shape[0], kl_probability, generator).to(conf1.device)
    c = torch.where(use_kl, c_kl, conf2.argmax(1))
    a = torch.where(use_kl, a_kl, conf1.argmax(1))
    cells = [[g.slices(i) for i in x.tolist()] for x in (b, c, d, a)]
    return _displace(image1, image2, *cells, kl_branch=use_kl)


def abd_i(image1: torch.Tensor, image2: torch.Tensor, label1: torch.Tensor, label2: torch.Tensor,
          confidence1: torch.Tensor, confidence2: torch.Tensor, grid: int | tuple[int, ...],
          probability: float = 0.5, generator: torch.Generator | None = None) -> Displacement:
    """ABD-I on labeled views, with probability ``probability`` per sample: view 1's most confident cell gets view
    2's least confident cell, view 2's most confident cell gets view 1's least confident cell, and the labels move
    with exactly the same cells. ``confidence1``/``confidence2``: (B, *spatial) confidence maps of each view."""
    g = make_grid(tuple(image1.shape[2:]), grid)
    conf1, conf2 = cell_confidence(confidence1, g), cell_confidence(confidence2, g)
    apply = _draw(image1.shape[0], probability, generator).tolist()

    def cells(index: torch.Tensor) -> list[Slices | None]:
        return [g.slices(i) if on else None for i, on in zip(index.tolist(), apply)]

    return _displace(image1, image2, cells(conf1.argmax(1)), cells(conf2.argmin(1)), cells(conf2.argmax(1)),
                     cells(conf1.argmin(1)), labels=(label1, label2))


# ---------------------------------------------------------------------------------------------------- CAD
def box_means(confidence: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """Mean of ``confidence`` (*spatial) over every box of ``size`` that fits: (*[n - s + 1]); entry ``p`` is the
    box starting at ``p``. Summed-area differences along each axis in float64 (exact up to rounding, linear in the
    voxels, where an average pooling with a large kernel costs voxels x box volume)."""
    x = confidence.double()
    for axis, s in enumerate(size):
        c = torch.cumsum(x, axis)
        c = torch.cat([torch.zeros_like(c.narrow(axis, 0, 1)), c], axis)
        x = c.narrow(axis, s, c.shape[axis] - s) - c.narrow(axis, 0, c.shape[axis] - s)
    return x / math.prod(size)


def most_confident_box(confidence: torch.Tensor, size: tuple[int, ...]) -> Slices:
    """The box of ``size`` with the highest mean confidence in ``confidence`` (*spatial); the first in raster
    order on ties."""
    means = box_means(confidence, size)
    start = np.unravel_index(int(means.flatten().argmax()), tuple(means.shape))
    return tuple(slice(int(p), int(p) + s) for p, s in zip(start, size))


def largest_low_confidence_box(confidence: torch.Tensor, threshold: float, max_fraction: float) -> Slices | None:
    """CAD's LLCR region of one sample: the largest connected component (full connectivity, ``scipy.ndimage.label``
    on the CPU) of the voxels with confidence below ``threshold``, boxed by its bounding box, each side capped at
    ``max(1, floor(max_fraction n))`` voxels of its axis and centred on the bounding box. None when no voxel is below
    the threshold. On equal sizes the component found first in raster order wins."""
    low = (confidence < threshold).detach().cpu().numpy()
    if not low.any():
        return None
    structure = ndimage.generate_binary_structure(low.ndim, low.ndim)
    components, count = ndimage.label(low, structure=structure)
    largest = int(np.argmax(np.bincount(components.ravel())[1:])) + 1
    box = ndimage.find_objects((components == largest).astype(np.int32))[0]
    capped = []
    for region, n in zip(box, low.shape):
        extent = region.stop - region.start
        side = min(extent, max(1, int(math.floor(max_fraction * n))))
        start = region.start + (extent - side) // 2
        capped.append(slice(start, start + side))
    return tuple(capped)


def cad_llcr(image1: torch.Tensor, image2: torch.Tensor, confidence1: torch.Tensor, confidence2: torch.Tensor,
             threshold: float, max_fraction: float) -> Displacement:
    """CAD's displacement, both directions: each view's largest low-confidence box
    (:func:`largest_low_confidence_box`) gets the other view's equally sized box of the highest mean confidence
    (:func:`most_confident_box`), copied from the original views."""
    replaced1, source2, replaced2, source1 = [], [], [], []
    for i in range(image1.shape[0]):
        for own, other, replaced, source in ((confidence1, confidence2, replaced1, source2),
                                             (confidence2, confidence1, replaced2, source1)):
            box = largest_low_confidence_box(own[i], threshold, max_fraction)
            replaced.append(box)
            source.append(None if box is None else
                          most_confident_box(other[i], tuple(s.stop - s.start for s in box)))
    return _displace(image1, image2, replaced1, source2, replaced2, source1)


def linear_schedule(progress: float, start: float, end: float) -> float:
    """CAD's DTE as a linear ramp: ``start + (end - start) clip(progress, 0, 1)``."""
    return float(start + (end - start) * min(max(progress, 0.0), 1.0))
