"""Bidirectional copy-paste (BCP, Bai et al., CVPR 2023): the box mask, the pairing of a batch into halves, the
mixing of images and labels with one mask, and the largest connected component of each class of a pseudo-label;
M3HL's (Liu et al., MICCAI 2025) per-sample block masks on a regular grid.

Convention: the mask ``keep`` is BCP's ``M``, a boolean tensor of the spatial shape, False inside one box and True
elsewhere, shared by every sample of the batch. ``paste(outer, inner, keep)`` is ``outer * M + inner * (1 - M)``:
``outer`` outside the box, ``inner`` inside it. With ``per_sample=True`` the mask is (B, *spatial), one per sample
(M3HL's block masks).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage


def box_mask(spatial: tuple[int, ...], ratio: float = 2 / 3, generator: torch.Generator | None = None,
             device: torch.device | str = "cpu") -> torch.Tensor:
    """BCP's ``M`` (boolean, ``spatial``): False in one box whose side along each axis is ``int(n * ratio)`` voxels
    (the official ``int(img_x * 2 / 3)``, at least 1), True elsewhere. The box lies inside the patch; its start is
    uniform over every position that fits (the official ``randint(0, n - side)`` leaves out the last one and fails
    when the box fills an axis)."""
    keep = torch.ones(spatial, dtype=torch.bool, device=device)
    box = []
    for n in spatial:
        side = min(n, max(1, int(n * ratio)))
        start = int(torch.randint(0, n - side + 1, (1,), generator=generator))
        box.append(slice(start, start + side))
    keep[tuple(box)] = False
    return keep


def block_edges(size: int, cells: int) -> list[int]:
    """The ``min(cells, size) + 1`` boundaries ``k * size // cells`` of a regular grid along one axis: every voxel in
    exactly one cell, the cells ``size // cells`` or one more voxel wide (all equal when ``cells`` divides
    ``size``, as the official 256 / 64 and 112 x 112 x 80 / 28 x 28 x 20)."""
    cells = min(cells, size)
    return [k * size // cells for k in range(cells + 1)]


def block_mask(samples: int, spatial: tuple[int, ...], grid: int | tuple[int, ...] = 4, ratio: float = 0.5,
               generator: torch.Generator | None = None, device: torch.device | str = "cpu") -> torch.Tensor:
    """M3HL's ``M`` (boolean, (samples, *spatial)): per sample, the patch cut into a regular grid of ``grid`` cells
    per axis (an int for every axis, or one per axis; at most one cell per voxel), and ``int(G * ratio)`` of the
    G cells, drawn uniformly without replacement for each sample independently, False (the official
    ``random.sample`` of ``num_masked`` blocks); True elsewhere.

    Cells follow :func:`block_edges`, so any patch size works: the official masks are fixed blocks of 64 px on
    256^2 (4 x 4) and 28 x 28 x 20 on 112 x 112 x 80 (4 x 4 x 4), i.e. 4 cells per axis, which is this rule on
    those sizes; on other sizes the cells differ by at most one voxel and the masked share of voxels is
    ``ratio`` up to that rounding."""
    grid = (grid,) * len(spatial) if isinstance(grid, int) else tuple(grid)
    if len(grid) != len(spatial) or any(int(g) < 1 for g in grid):
        raise ValueError(f"grid {grid} must give a positive number of cells for each of the {len(spatial)} axes")
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio {ratio} must be in [0, 1]")
    edges = [block_edges(n, int(g)) for n, g in zip(spatial, grid)]
    cells = tuple(len(e) - 1 for e in edges)
    total = math.prod(cells)
    masked = int(total * ratio)
    keep = torch.ones(samples, total, dtype=torch.bool)
    for b in range(samples):
        keep[b, torch.randperm(total, generator=generator)[:masked]] = False
    keep = keep.view(samples, *cells)
    for axis, e in enumerate(edges):  # each cell repeated over its voxels along each axis
        widths = torch.tensor([hi - lo for lo, hi in zip(e[:-1], e[1:])])
        keep = keep.repeat_interleave(widths, dim=axis + 1)
    return keep.to(device)


def number_of_pairs(labeled: int, unlabeled: int) -> int:
    """Mixed images per direction: half of the larger batch, rounded up (1 for nnU-Net's batch of 2)."""
    return max(1, math.ceil(max(labeled, unlabeled) / 2))


def halves(x: torch.Tensor, pairs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(first half, second half) of a batch, ``pairs`` samples each: sample i of the first half is ``x[i mod B]``, of
    the second ``x[(i + pairs) mod B]``. For an even B = 2 pairs this is the official split ``x[:B/2], x[B/2:]``;
    with an odd B the last sample is paired with the first; with B = 1 both halves are that one sample."""
    n = x.shape[0]
    if n == 0:
        raise ValueError("cannot split an empty batch into halves")
    first = torch.arange(pairs, device=x.device) % n
    second = (torch.arange(pairs, device=x.device) + pairs) % n
    return x[first], x[second]


def paste(outer: torch.Tensor, inner: torch.Tensor, keep: torch.Tensor, per_sample: bool = False) -> torch.Tensor:
    """``outer * M + inner * (1 - M)``: ``outer`` where ``keep`` is True, ``inner`` inside the box. Images or logits
    (B, C, *spatial) and labels (B, *spatial) alike; ``keep`` has the spatial shape and is the same for every
    sample, or, with ``per_sample``, is (B, *spatial): sample b pasted with ``keep[b]`` (an explicit flag, since a
    (B, *spatial) mask and a shared one can have the same trailing shape)."""
    if outer.shape != inner.shape:
        raise ValueError(f"cannot paste {tuple(inner.shape)} into {tuple(outer.shape)}")
    if per_sample:
        if keep.shape[0] != outer.shape[0] or outer.ndim not in (keep.ndim, keep.ndim + 1) \
                or tuple(outer.shape[outer.ndim - keep.ndim + 1:]) != tuple(keep.shape[1:]):
            raise ValueError(f"per-sample mask {tuple(keep.shape)} does not match {tuple(outer.shape)}")
        keep = keep.to(outer.device)
        return torch.where(keep if outer.ndim == keep.ndim else keep[:, None], outer, inner)
    if tuple(outer.shape[outer.ndim - keep.ndim:]) != tuple(keep.shape):
        raise ValueError(f"mask {tuple(keep.shape)} does not match the spatial shape of {tuple(outer.shape)}")
    return torch.where(keep.to(outer.device), outer, inner)


def resize_mask(keep: torch.Tensor, spatial: tuple[int, ...]) -> torch.Tensor:
    """``keep`` at another resolution (a deep-supervision scale), by nearest-neighbour sampling."""
    if tuple(keep.shape) == tuple(spatial):
        return keep
    resized = F.interpolate(keep[None, None].float(), size=tuple(spatial), mode="nearest")
    return resized[0, 0] > 0.5


def largest_component_per_class(labels: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, float]:
    """BCP's "nms" of a pseudo-label: per sample and foreground class, only the largest connected component (full
    connectivity, as skimage's ``label`` default) keeps the class; its other voxels become background (0), as in the
    official ``get_ACDC_2DLargestCC``. A class absent from a sample stays absent. ``labels`` is (B, *spatial) of
    class indices, on any device; the work is done on the CPU with ``scipy.ndimage.label``.

    Returns the filtered labels (same device and dtype) and the fraction of foreground voxels that became
    background."""
    array = labels.detach().cpu().numpy()
    out = np.zeros_like(array)
    structure = ndimage.generate_binary_structure(array.ndim - 1, array.ndim - 1)
    for b in range(array.shape[0]):
        for c in range(1, num_classes):
            present = array[b] == c
            if not present.any():
                continue
            components, count = ndimage.label(present, structure=structure)
            if count > 1:
                sizes = np.bincount(components.ravel())[1:]
                present = components == int(np.argmax(sizes)) + 1
            out[b][present] = c
    foreground = int((array > 0).sum())
    removed = (foreground - int((out > 0).sum())) / foreground if foreground else 0.0
    return torch.from_numpy(out).to(labels.device), removed
