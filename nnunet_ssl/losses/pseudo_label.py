"""Hard pseudo-label losses (FixMatch, Cross Pseudo Supervision). Float32, as everything in losses/."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
from nnunetv2.utilities.helpers import softmax_helper_dim1


def hard_pseudo_labels(reference_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(argmax class (B, *spatial) long, confidence max_c p_c (B, *spatial)) of the reference, without gradient."""
    with torch.no_grad():
        p = torch.softmax(reference_logits.detach().float(), 1)
        confidence, labels = p.max(1)
    return labels, confidence


def masked_cross_entropy(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``sum_i m_i CE(p_i, t_i) / N`` over all N voxels, as UniMatch/FixMatch normalise (masked voxels count in N,
    so a low coverage lowers the loss rather than re-weighting the few confident voxels)."""
    ce = F.cross_entropy(logits.float(), target.long(), reduction="none")
    if mask is not None:
        ce = ce * mask.float()
    return ce.mean()


_dice = MemoryEfficientSoftDiceLoss(apply_nonlin=softmax_helper_dim1, batch_dice=False, do_bg=False, smooth=1e-5,
                                    ddp=False)


def masked_soft_dice(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """nnU-Net's soft Dice loss (foreground classes, per sample) with the confidence mask as loss mask; returns
    ``1 - Dice`` so that it is non-negative like the CE term."""
    loss_mask = None if mask is None else mask[:, None].float()
    return 1.0 + _dice(logits.float(), target[:, None].long(), loss_mask=loss_mask)
