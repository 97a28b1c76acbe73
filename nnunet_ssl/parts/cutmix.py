"""CutMix for N-dimensional patches, the strong-view mixing of FixMatch (as in UniMatch's medical branch).

UniMatch (Yang et al., CVPR 2023) draws, with probability 0.5 per sample, one box covering 2-40 % of the image with
an aspect ratio in [0.3, 1/0.3] and pastes it from another unlabeled image; the pseudo-labels are mixed with the
same box. Here the box is N-dimensional: its volume fraction v ~ U(0.02, 0.4) and per-axis aspect ratios are
log-uniform in [0.3, 1/0.3] (normalised to keep the volume), and the source image is another sample of the same
unlabeled batch (a cyclic shift), not a second unlabeled batch, which saves a loader and a forward pass.
"""

from __future__ import annotations

import math

import torch


def cutmix_masks(batch_size: int, spatial: tuple[int, ...], p: float = 0.5,
                 size_range: tuple[float, float] = (0.02, 0.4), ratio_range: tuple[float, float] = (0.3, 1 / 0.3),
                 generator: torch.Generator | None = None,
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """Boolean masks (B, *spatial), True inside the pasted box; a sample is mixed with probability ``p``."""
    masks = torch.zeros((batch_size, *spatial), dtype=torch.bool, device=device)
    dims = len(spatial)
    for b in range(batch_size):
        if torch.rand(1, generator=generator).item() >= p:
            continue
        volume = size_range[0] + (size_range[1] - size_range[0]) * torch.rand(1, generator=generator).item()
        log_lo, log_hi = math.log(ratio_range[0]), math.log(ratio_range[1])
        ratios = torch.exp(log_lo + (log_hi - log_lo) * torch.rand(dims, generator=generator))
        ratios = ratios / ratios.prod() ** (1 / dims)
        sides = [max(1, min(n, round(n * volume ** (1 / dims) * float(r)))) for n, r in zip(spatial, ratios)]
        starts = [int(torch.randint(0, n - s + 1, (1,), generator=generator)) for n, s in zip(spatial, sides)]
        masks[(b, *[slice(st, st + s) for st, s in zip(starts, sides)])] = True
    return masks


def apply_cutmix(x: torch.Tensor, masks: torch.Tensor, shift: int = 1) -> torch.Tensor:
    """Pastes, inside each sample's box, the content of the sample ``shift`` places further in the batch.
    ``x`` is (B, C, *spatial) (images or logits); with a batch of one, the image is mixed with itself."""
    source = torch.roll(x, shifts=-shift, dims=0)
    return torch.where(masks[:, None], source, x)
