"""Bidirectional copy-paste (BCP, Bai et al., CVPR 2023): the box mask, the pairing of a batch into halves, the
mixing of images and labels with one mask, and the largest connected component of each class of a pseudo-label.

Convention: the mask ``keep`` is BCP's ``M``, a boolean tensor of the spatial shape, False inside one box and True
elsewhere, shared by every sample of the batch. ``paste(outer, inner, keep)`` is ``outer * M + inner * (1 - M)``:
``outer`` outside the box, ``inner`` inside it.
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


def paste(outer: torch.Tensor, inner: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``outer * M + inner * (1 - M)``: ``outer`` where ``keep`` is True, ``inner`` inside the box. Images or logits
    (B, C, *spatial) and labels (B, *spatial) alike; ``keep`` has the spatial shape and is the same for every
    sample."""
    if outer.shape != inner.shape:
        raise ValueError(f"cannot paste {tuple(inner.shape)} into {tuple(outer.shape)}")
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
