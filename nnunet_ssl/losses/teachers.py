"""AD-MT's pseudo-labels from two teachers and the student (Zhao et al., ECCV 2024; code ZhenZHAO/AD-MT).

Pure tensor functions in float32, without nnU-Net: the entropy-weighted fusion of the two teachers' softmax, the
teacher-student compromise ("pixel_confidence" mode of ``get_compromise_pseudo_btw_tea_stu``) and the official
normalisation of the confidence-gated cross-entropy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: added inside the logarithm of the entropy, as in the official code
ENTROPY_EPS = 1e-10


def entropy_bits(probs: torch.Tensor) -> torch.Tensor:
    """``H = -sum_c p_c log2(p_c + 1e-10)`` over the channel axis of (B, C, *spatial) probabilities, in bits."""
    probs = probs.float()
    return -(probs * torch.log2(probs + ENTROPY_EPS)).sum(1)


def sharpen(probs: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``p^(1/T) / sum_c p_c^(1/T)``; T = 1 (the official setting) returns ``p`` unchanged."""
    if temperature == 1.0:
        return probs
    powered = probs.float() ** (1.0 / temperature)
    return powered / powered.sum(1, keepdim=True)


def entropy_weighted_fusion(prob_a: torch.Tensor, prob_b: torch.Tensor,
                            temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(fused probabilities (B, C, *spatial), teacher A's weight (B, *spatial)) of two teachers' softmax.

    ``w_A = exp(-H_A) / (exp(-H_A) + exp(-H_B))`` per voxel, ``w_B = 1 - w_A``, ``p = w_A p_A + w_B p_B``, then
    :func:`sharpen` with ``temperature``. The entropies are in bits as in the official code while the weights use
    ``exp``, not ``2^``: the weight is ``sigmoid(H_B - H_A)`` with the difference in bits, i.e.
    ``sigmoid(1.4427 (H_B - H_A))`` in nats, a slightly sharper preference for the more certain teacher than natural
    logarithms would give. Computed as that sigmoid, which is the same ratio without overflow."""
    prob_a, prob_b = prob_a.float(), prob_b.float()
    weight_a = torch.sigmoid(entropy_bits(prob_b) - entropy_bits(prob_a))
    fused = weight_a[:, None] * prob_a + (1.0 - weight_a[:, None]) * prob_b
    return sharpen(fused, temperature), weight_a


def prefer_confident_student(labels: torch.Tensor, confidence: torch.Tensor, student_labels: torch.Tensor,
                             student_confidence: torch.Tensor,
                             teachers_conflict: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """AD-MT's teacher-student compromise: (labels, confidence, replaced mask), all (B, *spatial).

    A voxel takes the student's label and confidence where the fused teachers and the student disagree, the two
    teachers disagree with each other (``teachers_conflict``) and the student is more confident than the fused
    teachers (strictly); everywhere else the fused teachers' label and confidence stay."""
    replaced = (labels != student_labels) & teachers_conflict.bool() & (student_confidence > confidence)
    return (torch.where(replaced, student_labels, labels), torch.where(replaced, student_confidence, confidence),
            replaced)


def cross_entropy_over_confident(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``sum_i m_i CE(p_i, t_i) / sum_i m_i``: the official AD-MT loss (``F.cross_entropy`` with the unconfident
    voxels set to the ignore index, ``reduction="mean"``), which averages over the confident voxels only. With no
    confident voxel it returns 0 (the official code gets NaN there)."""
    ce = F.cross_entropy(logits.float(), target.long(), reduction="none")
    mask = mask.float()
    return (ce * mask).sum() / mask.sum().clamp_min(1.0)
