"""Geometric views of a patch and their inverses, in 2D and 3D: identity, zoom-in, zoom-out and flip (MLB-Seg's
augmentation set, Wei et al., MICCAI 2023), each an invertible pair ``forward`` (original frame -> view) and
``inverse`` (view -> original frame) on tensors (N, C, *spatial), with the coverage that tells which voxels of the
target frame a mapped tensor actually covers.

- zoom-in by ``p`` voxels per side (``p_d`` per axis): ``forward`` resizes the patch to ``n + 2p`` and keeps the
  centre ``n``; ``inverse`` pads the view with ``p`` on each side and resizes to ``n``, so it covers only the
  central ``n^2 / (n + 2p)`` voxels of the original frame.
- zoom-out by ``p``: ``forward`` resizes to ``n - 2p`` and pads ``p`` on each side (the view's border is padding,
  not image); ``inverse`` crops the centre ``n - 2p`` and resizes to ``n``.
- flip along a set of spatial axes: its own inverse, exact.

Resizing is ``torch.nn.functional.interpolate`` (bilinear / trilinear, ``align_corners=False``): an affine
intensity ramp survives a round trip exactly away from the outermost voxels, so the transforms are each other's
inverse up to interpolation. Padding takes ``fill``: 0 for images and coverage masks, or one value per channel
(MLB-Seg maps class probabilities with the background's one-hot vector, nnU-Net's meaning of padding).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

#: the kinds of view :func:`draw_views` knows
VIEW_KINDS = ("identity", "zoom_in", "zoom_out", "flip")
#: MLB-Seg's five views: identity, one zoom-in, two zoom-outs, one flip
MLB_VIEWS = ("identity", "zoom_in", "zoom_out", "zoom_out", "flip")
#: the official zoom margins, 4 to 30 pixels per side of a 144-pixel slice, as fractions of the axis
MLB_ZOOM_RANGE = (4 / 144, 30 / 144)
#: a mapped coverage mask counts a voxel as covered from this value on (linear interpolation blends the border)
COVERED = 1.0 - 1e-4

Fill = float | Sequence[float] | torch.Tensor


def _resize(x: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    if tuple(x.shape[2:]) == tuple(size):
        return x
    mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[len(size)]
    return F.interpolate(x, size=tuple(size), mode=mode, align_corners=False)


def _filled(x: torch.Tensor, spatial: tuple[int, ...], fill: Fill) -> torch.Tensor:
    """A tensor (N, C, *spatial) holding ``fill`` (a number, or one value per channel)."""
    value = torch.as_tensor(fill, dtype=x.dtype, device=x.device)
    shape = (1, -1) + (1,) * len(spatial) if value.ndim == 1 else ()
    return value.reshape(shape).expand(x.shape[0], x.shape[1], *spatial).clone()


def _centre(margins: tuple[int, ...], spatial: tuple[int, ...]) -> tuple[slice, ...]:
    return (slice(None), slice(None), *(slice(p, n - p) for p, n in zip(margins, spatial)))


@dataclass(frozen=True)
class View:
    """One geometric view: ``kind`` and, for zooms, the margin ``p_d`` per spatial axis, for flips the flipped
    spatial axes (0 = the first spatial axis)."""

    kind: str
    margins: tuple[int, ...] = ()
    axes: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in VIEW_KINDS:
            raise ValueError(f"unknown view kind {self.kind!r}; use one of {', '.join(VIEW_KINDS)}")

    def forward(self, x: torch.Tensor, fill: Fill = 0.0) -> torch.Tensor:
        """``x`` (N, C, *spatial) in the original frame -> the view's frame (same shape)."""
        spatial = tuple(x.shape[2:])
        if self.kind == "flip":
            return torch.flip(x, [2 + a for a in self.axes])
        if self.kind == "zoom_in":
            big = _resize(x, tuple(n + 2 * p for n, p in zip(spatial, self.margins)))
            return big[_centre(self.margins, tuple(big.shape[2:]))]
        if self.kind == "zoom_out":
            out = _filled(x, spatial, fill)
            out[_centre(self.margins, spatial)] = _resize(x, tuple(n - 2 * p for n, p in zip(spatial, self.margins)))
            return out
        return x

    def inverse(self, x: torch.Tensor, fill: Fill = 0.0) -> torch.Tensor:
        """``x`` (N, C, *spatial) in the view's frame -> the original frame; voxels the view does not show (the
        border of a zoom-in) get ``fill``, blended over one voxel by the interpolation."""
        spatial = tuple(x.shape[2:])
        if self.kind == "flip":
            return torch.flip(x, [2 + a for a in self.axes])
        if self.kind == "zoom_in":
            big = _filled(x, tuple(n + 2 * p for n, p in zip(spatial, self.margins)), fill)
            big[_centre(self.margins, tuple(big.shape[2:]))] = x
            return _resize(big, spatial)
        if self.kind == "zoom_out":
            return _resize(x[_centre(self.margins, spatial)], spatial)
        return x

    def coverage(self, spatial: tuple[int, ...], device: torch.device | str = "cpu") -> torch.Tensor:
        """Boolean (1, 1, *spatial): the voxels of the original frame the view shows (all but a zoom-in's border)."""
        return self.inverse(torch.ones(1, 1, *spatial, device=device)) >= COVERED


def map_between(x: torch.Tensor, source: View, target: View, fill: Fill = 0.0) -> torch.Tensor:
    """``x`` in ``source``'s frame -> ``target``'s frame (through the original frame)."""
    return target.forward(source.inverse(x, fill), fill)


def covered_between(source: View, target: View, spatial: tuple[int, ...],
                    device: torch.device | str = "cpu") -> torch.Tensor:
    """Boolean (1, 1, *spatial): the voxels of ``target``'s frame that ``source``'s frame shows too."""
    return map_between(torch.ones(1, 1, *spatial, device=device), source, target) >= COVERED


def draw_views(kinds: Sequence[str], spatial: Sequence[int], zoom_range: tuple[float, float] = MLB_ZOOM_RANGE,
               generator: torch.Generator | None = None) -> list[View]:
    """One :class:`View` per entry of ``kinds``. A zoom draws a fraction ``r`` uniformly from ``zoom_range`` and
    takes ``p_d = round(r n_d)`` voxels per side on every axis (the official draws ``p`` from 4, 6, ..., 30 of 144
    pixels); a zoom-out keeps at least one voxel per axis. A flip draws a non-empty set of the spatial axes longer
    than one voxel, uniformly (the official: horizontal, vertical or both)."""
    spatial = tuple(int(n) for n in spatial)
    low, high = float(zoom_range[0]), float(zoom_range[1])
    if not 0.0 <= low <= high < 0.5:
        raise ValueError(f"zoom_range {zoom_range} must satisfy 0 <= low <= high < 0.5 (a fraction of each axis)")
    views = []
    for kind in kinds:
        if kind in ("zoom_in", "zoom_out"):
            r = low + (high - low) * float(torch.rand((), generator=generator))
            margins = tuple(int(round(r * n)) for n in spatial)
            if kind == "zoom_out":
                margins = tuple(min(p, (n - 1) // 2) for p, n in zip(margins, spatial))
            views.append(View(kind, margins=margins))
        elif kind == "flip":
            axes = [d for d, n in enumerate(spatial) if n > 1]
            if not axes:
                views.append(View("identity"))
                continue
            subset = int(torch.randint(1, 2 ** len(axes), (), generator=generator))
            views.append(View("flip", axes=tuple(a for k, a in enumerate(axes) if subset >> k & 1)))
        else:
            views.append(View(kind))
    return views
