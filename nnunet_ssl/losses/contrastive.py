"""C3S3's losses (He et al., ICME 2025, arXiv 2506.07368; official code Y-TARL/C3S3): the competition that picks
the better of two networks, the loser's MSE to the winner's sharpened soft labels, the view consistency and the
outcome-driven contrastive loss (ODCL) between the two networks' voxel features, all in float32.

- ``sharpen(P) = P^{1/T} / sum_c P_c^{1/T}`` (the official ``sharpening``; the README's binary form
  ``P^{1/T} / (P^{1/T} + (1 - P)^{1/T})`` is the same for two classes). Computed as ``softmax(log P / T)``, which
  cannot underflow to 0/0 when every ``P_c^{1/T}`` does.
- ``competition = alpha CE + (1 - alpha) Dice`` on labeled images: CE over the voxels, Dice the official
  ``dice_loss`` (``1 - (2 sum p y + s) / (sum p^2 + sum y^2 + s)``, sums over the batch, ``s = 1e-5``) of each
  foreground class, averaged over the foreground classes (the official code has one, class 1). Voxels of an ignore
  label are left out of both.
- ``L_cp = mean((softmax z_loser - sharpen(softmax z_winner))^2)`` over samples, classes and voxels (the official
  ``softmax_mse_loss`` divided by ``b c w h d``), the winner detached.
- ``L_cos = mean(1 - cos(z^1, z^2))`` along the last spatial axis (the official ``cosine_similarity_loss`` with
  ``dim=-1`` on the logits of one network on the two views).
- ODCL on M voxels with projected features ``a_v`` (network A) and ``b_v`` (network B) at the same location,
  ``s_v = cos(a_v, b_v)``, predictions ``yA_v``, ``yB_v`` (argmax) and ``tau = 0.1``::

      I_v = [yA_v = yB_v != 0]        U_v = [yA_v != 0 or yB_v != 0]
      L1 = mean_v -log( e^{I_v s_v / tau} / (sum_u e^{(1 - I_u) s_u / tau} + e^{I_v s_v / tau}) )
      L2 = mean_v -log( e^{(1 - U_v) s_v / tau} / (sum_u e^{U_u s_u / tau} + e^{(1 - U_v) s_v / tau}) )
      ODCL = L1 + L2

  For two classes I and U are the official intersection and union of the two foreground masks, and the formula is
  the official ``ContrastiveLoss`` (its ``+ 1e-8`` in the denominator dropped: evaluated as a log-sum-exp, which
  stays finite in float32). With several classes the intersection is the voxels where both networks predict the
  *same* foreground class (two different foreground classes are a disagreement of outcomes, not an agreement) and
  the union the voxels either network calls foreground: each voxel keeps one role whatever the number of classes,
  the loss keeps the official scale, and one class per term (an average over classes) would make a voxel a
  positive of one class's term and a negative of another's.

Memory: the official loss compares each voxel with the other network's feature at the same place (one similarity
per voxel, a sum over all of them in the denominators: linear in the patch), but evaluates it on every voxel of
four full-resolution projector maps, under gradient checkpointing. Here :func:`draw_voxels` samples K locations per
image and :func:`gather_voxels` reads the features there, so the projector (a per-voxel MLP, :class:`VoxelProjector`)
and the loss see ``K`` voxels per image: memory and time linear in K and independent of the patch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

DICE_SMOOTH = 1e-5


def sharpen(probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """``P^{1/T} / sum_c P_c^{1/T}`` along the class axis 1, in float32."""
    return torch.softmax(torch.log(probs.float().clamp_min(1e-30)) / temperature, dim=1)


def sharpened_targets(reference_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """The detached soft labels ``sharpen(softmax z)`` (= ``softmax(z / T)``, computed from the probabilities)."""
    return sharpen(torch.softmax(reference_logits.detach().float(), dim=1), temperature)


def sharpened_mse(student_logits: torch.Tensor, reference_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``L_cp``: mean squared difference of the student's softmax and the reference's sharpened soft labels over
    every sample, class and voxel; no gradient to the reference."""
    if student_logits.shape != reference_logits.shape:
        raise ValueError(f"logits {tuple(student_logits.shape)} and {tuple(reference_logits.shape)} differ")
    target = sharpened_targets(reference_logits, temperature)
    return ((torch.softmax(student_logits.float(), dim=1) - target) ** 2).mean()


def competition_loss(logits: torch.Tensor, labels: torch.Tensor, alpha: float,
                     ignore_label: int | None = None) -> torch.Tensor:
    """``alpha CE + (1 - alpha) Dice`` of logits (B, C, *spatial) against class indices (B, *spatial) or
    (B, 1, *spatial); Dice averaged over the foreground classes 1..C-1 (see the module docstring)."""
    logits = logits.float()
    labels = labels.long()
    if labels.dim() == logits.dim():
        labels = labels[:, 0]
    valid = torch.ones_like(labels, dtype=torch.bool) if ignore_label is None else labels != ignore_label
    labels = torch.where(valid, labels, torch.zeros_like(labels))
    weight = valid.float()
    ce = (F.cross_entropy(logits, labels, reduction="none") * weight).sum() / weight.sum().clamp_min(1.0)
    probs = torch.softmax(logits, dim=1)
    classes = logits.shape[1]
    dice = []
    for c in range(1, classes):
        p, y = probs[:, c] * weight, (labels == c).float() * weight
        dice.append(1.0 - (2 * (p * y).sum() + DICE_SMOOTH) / ((p * p).sum() + (y * y).sum() + DICE_SMOOTH))
    dice_term = torch.stack(dice).mean() if dice else ce.new_zeros(())
    return alpha * ce + (1.0 - alpha) * dice_term


def cosine_consistency(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """``L_cos``: ``mean(1 - cos)`` of two logit maps along their last (spatial) axis, in float32."""
    if first.shape != second.shape:
        raise ValueError(f"logits {tuple(first.shape)} and {tuple(second.shape)} differ in shape")
    return (1.0 - F.cosine_similarity(first.float(), second.float(), dim=-1)).mean()


def draw_voxels(rows: int, voxels: int, count: int, device: torch.device | str = "cpu",
                generator: torch.Generator | None = None) -> torch.Tensor:
    """(rows, min(count, voxels)) flat voxel indices, drawn uniformly without replacement per row (all voxels, in
    order, when ``count >= voxels``). Memory O(rows x voxels), as a uniform draw of the patch must be."""
    if count >= voxels:
        return torch.arange(voxels, device=device).expand(rows, voxels)
    keys = torch.rand(rows, voxels, device=device, generator=generator)
    return keys.topk(count, dim=1).indices


def gather_voxels(features: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Features (n, C, *spatial) at flat voxel indices (n, K) -> (n, K, C)."""
    flat = features.flatten(2)
    picked = torch.gather(flat, 2, index.unsqueeze(1).expand(-1, flat.shape[1], -1))
    return picked.transpose(1, 2)


class VoxelProjector(nn.Module):
    """The official projector head ``Conv 1x1 (C -> C), PReLU, Conv 1x1 (C -> D)``, applied to sampled voxels
    (..., C) -> (..., D): a 1x1 convolution is the same per-voxel map, evaluated only where the loss reads it."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_channels, in_channels), nn.PReLU(), nn.Linear(in_channels, out_channels))
        self.in_channels = in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def odcl_masks(labels_a: torch.Tensor, labels_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(I, U): both networks predict the same foreground class; either predicts foreground (class 0 = background)."""
    intersection = (labels_a == labels_b) & (labels_a != 0)
    union = (labels_a != 0) | (labels_b != 0)
    return intersection, union


def odcl_loss(features_a: torch.Tensor, features_b: torch.Tensor, labels_a: torch.Tensor, labels_b: torch.Tensor,
              temperature: float = 0.1) -> tuple[torch.Tensor, dict[str, float]]:
    """ODCL (module docstring) over all voxels given: features (..., D) of the two networks at the same locations,
    their argmax labels (...). Returns the loss and the fractions of voxels in I and U."""
    a = F.normalize(features_a.float().reshape(-1, features_a.shape[-1]), dim=-1)
    b = F.normalize(features_b.float().reshape(-1, features_b.shape[-1]), dim=-1)
    sim = (a * b).sum(-1) / temperature
    intersection, union = odcl_masks(labels_a.reshape(-1), labels_b.reshape(-1))
    i, u = intersection.float(), union.float()

    def term(positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
        # -log(e^p_v / (sum_u e^n_u + e^p_v)) = logsumexp(log sum_u e^n_u, p_v) - p_v
        log_negatives = torch.logsumexp(negative, dim=0).expand_as(positive)
        return (torch.logaddexp(log_negatives, positive) - positive).mean()

    loss = term(i * sim, (1 - i) * sim) + term((1 - u) * sim, u * sim)
    return loss, {"odcl_intersection": float(i.mean()), "odcl_union": float(u.mean())}

