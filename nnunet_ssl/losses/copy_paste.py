"""BCP's loss on one group of mixed images, split by region (Bai et al., CVPR 2023; official ``mix_loss``).

For logits ``z`` of a group of mixed images, a target ``t`` (the labels and pseudo-labels pasted with the images'
mask) and a region ``R`` (the same voxels in every sample of the group), in float32:

- ``CE_R = sum_{b, i in R} CE(z_bi, t_bi) / |R|``, the cross-entropy averaged over the region's own voxels of the
  whole group (0 for an empty region, as the official ``/ (mask.sum() + 1e-16)``);
- ``Dice_R = 1 - mean_c (2 sum_R p_c y_c + s) / (sum_R p_c^2 + sum_R y_c^2 + s)``, ``p = softmax z``, ``y`` the
  one-hot target, sums over the region's voxels of the whole group, every class including background, ``s = 1e-5``:
  SSL4MIS's masked ``DiceLoss`` that the official code uses;
- ``L_R = (Dice_R + CE_R) / 2``.

BCP weighs each mixed image's labeled region by 1 and its pseudo-labeled region by ``u_weight = 0.5``; the host
(:class:`~nnunet_ssl.trainers.hosts.bcp.BidirectionalCopyPaste`) adds the terms of both groups.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DICE_SMOOTH = 1e-5


def region_cross_entropy(logits: torch.Tensor, target: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """Cross-entropy averaged over the voxels of ``region`` (spatial shape, or (B, *spatial)) of the whole batch."""
    ce = F.cross_entropy(logits.float(), target.long(), reduction="none")
    weight = region.to(ce.device).float().expand_as(ce)
    return (ce * weight).sum() / weight.sum().clamp(min=1.0)


def region_dice(logits: torch.Tensor, target: torch.Tensor, region: torch.Tensor,
                smooth: float = DICE_SMOOTH) -> torch.Tensor:
    """``1 -`` the soft Dice over all classes (background included), restricted to ``region``, sums over the batch."""
    p = torch.softmax(logits.float(), 1)
    y = F.one_hot(target.long(), p.shape[1]).movedim(-1, 1).float()
    weight = region.to(p.device).float().expand(p.shape[0], *p.shape[2:])[:, None]
    dims = [0, *range(2, p.ndim)]
    intersect = (p * y * weight).sum(dims)
    denominator = (p * p * weight).sum(dims) + (y * y * weight).sum(dims)
    return 1.0 - ((2 * intersect + smooth) / (denominator + smooth)).mean()


def region_dice_ce(logits: torch.Tensor, target: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """``(Dice_R + CE_R) / 2`` of one group of mixed images on one region, in float32."""
    return 0.5 * (region_dice(logits, target, region) + region_cross_entropy(logits, target, region))

