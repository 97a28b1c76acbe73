"""Plain consistency between a student prediction and a reference prediction, plus the statistics every host
logs. All functions compute in float32 whatever the input dtype, so they are safe under CUDA autocast."""

from __future__ import annotations

import math

import torch


def probabilities(logits: torch.Tensor, regions: bool = False) -> torch.Tensor:
    """Softmax over the channel axis (label training) or per-channel sigmoid (region training), in float32."""
    logits = logits.float()
    return torch.sigmoid(logits) if regions else torch.softmax(logits, dim=1)


def channel_argmax(x: torch.Tensor) -> torch.Tensor:
    """``x.argmax(1)``, computed as ``x.max(1).indices`` (same result, ties to the first maximum): on the CPU,
    torch's argmax over the channel axis of a (B, C, *spatial) tensor is about 10 times slower (21 ms against 2 ms
    for a Hippocampus batch (2, 3, 40, 56, 40)), and MetaSSL and MEDL take several per step."""
    return x.max(1).indices


def mse_consistency(student_logits: torch.Tensor, reference_logits: torch.Tensor,
                    regions: bool = False) -> torch.Tensor:
    """Mean squared difference of the two probability maps, averaged over batch, channels and voxels:
    ``mean((p_s - p_t)^2)``, the Mean Teacher consistency as in the official code and SSL4MIS. The reference
    is detached: no gradient flows into the teacher."""
    p_s = probabilities(student_logits, regions)
    p_t = probabilities(reference_logits.detach(), regions)
    return torch.mean((p_s - p_t) ** 2)


@torch.no_grad()
def confidence_stats(reference_logits: torch.Tensor, threshold: float, regions: bool = False) -> dict[str, float]:
    """Mean pseudo-label confidence and coverage (fraction of voxels whose confidence is >= ``threshold``).

    Confidence is ``max_c p_c`` for softmax outputs; for region (sigmoid) outputs it is ``max(p, 1 - p)`` per
    region, averaged over regions."""
    p = probabilities(reference_logits, regions)
    conf = torch.maximum(p, 1 - p).mean(1) if regions else p.max(1).values
    return {"confidence": float(conf.mean()), "coverage": float((conf >= threshold).float().mean())}


def masked_mse_consistency(student_logits: torch.Tensor, reference_logits: torch.Tensor, mask: torch.Tensor,
                           regions: bool = False) -> torch.Tensor:
    """``sum_i m_i sum_c (p_s - p_t)_ic^2 / (C sum_i m_i)``: the Mean Teacher MSE averaged over the voxels with
    ``m_i = 1`` only (UA-MT's certain voxels; ``mask`` (B, *spatial), 0/1 or weights). 0 when the mask is empty."""
    p_s = probabilities(student_logits, regions)
    p_t = probabilities(reference_logits.detach(), regions)
    m = mask.detach().float().unsqueeze(1)
    return torch.sum(m * (p_s - p_t) ** 2) / (p_s.shape[1] * m.sum()).clamp(min=1e-8)


def predictive_entropy(probs: torch.Tensor, regions: bool = False) -> torch.Tensor:
    """Per-voxel entropy in nats of a (mean) probability map (B, C, *spatial) -> (B, *spatial):
    ``-sum_c p_c ln p_c`` for softmax outputs; for region (sigmoid) outputs the binary entropy, averaged over
    the regions. ``0 ln 0 = 0``."""
    p = probs.float()
    if regions:
        return -(torch.xlogy(p, p) + torch.xlogy(1 - p, 1 - p)).mean(1)
    return -torch.xlogy(p, p).sum(1)


def uncertainty_threshold(progress: float, num_classes: int, regions: bool = False) -> float:
    """UA-MT's entropy threshold ``(0.75 + 0.25 r) H_max``, with ``r`` the ramp in [0, 1] and ``H_max = ln C``
    the largest entropy of C classes (``ln 2`` per region for sigmoid outputs): from 3/4 of the maximum to the
    maximum, for any number of classes (the official 2D script keeps ``ln 2`` for four classes)."""
    h_max = math.log(2) if regions else math.log(num_classes)
    return (0.75 + 0.25 * progress) * h_max
