"""M3HL's feature consistency (Liu et al., MICCAI 2025; official ``ACDC_M3HL_train.py``): a student's features on a
mixed image against the EMA teacher's features on an unlabeled original, in float32.

- ``L_low(a, b) = mean |a - b|`` over every sample, channel and voxel: the official ``F.l1_loss`` (mean reduction).
  The paper writes an L1 norm; the mean is what the code trains with, and it keeps the term's size independent of
  the feature map's size (nnU-Net's full-resolution decoder stage has 32 channels over up to 128^3 voxels, against
  16 channels over 256^2 pixels in the paper's 2D U-Net), so the official weight 0.5 keeps its meaning. A sum
  would be 10^4-10^7 times larger and swamp every other term.
- ``L_high(a, b) = mean_b (1 - cos(vec a_b, vec b_b))``: one cosine per sample over its flattened bottleneck
  (channels x voxels, ``flatten(1)`` as the official code), averaged over the samples; ``F.cosine_similarity`` with
  its ``eps = 1e-8`` on the norms.

The host (:class:`~nnunet_ssl.trainers.hosts.m3hl.MutualMaskMixFeatures`) averages each over its (mixed image,
original) pairs and weighs ``L_low + L_high`` by 0.5.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _check(student: torch.Tensor, teacher: torch.Tensor) -> None:
    if student.shape != teacher.shape:
        raise ValueError(f"features {tuple(student.shape)} and {tuple(teacher.shape)} differ in shape")


def low_level_l1(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """``mean |student - teacher|`` over all elements, in float32 (gradient to ``student`` only if ``teacher`` is
    detached, as the teacher's features of a no-grad forward are)."""
    _check(student, teacher)
    return (student.float() - teacher.float()).abs().mean()


def high_level_cosine(student: torch.Tensor, teacher: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``mean over samples of 1 - cos(flatten(student_b), flatten(teacher_b))``, in float32."""
    _check(student, teacher)
    cos = F.cosine_similarity(student.float().flatten(1), teacher.float().flatten(1), dim=1, eps=eps)
    return (1.0 - cos).mean()
