"""ERSR's losses on the shape-prior classes (Zhou et al., arXiv 2508.19815): the teacher's prediction of each named
class scored, gated and replaced by its fitted ellipse, and the two consistency terms. Float32, as everything in
losses/; the per-sample geometry is :mod:`nnunet_ssl.parts.ellipse`.

For a named class ``c`` and an unlabeled sample ``b``, with ``p = softmax z`` the student's prediction and ``R`` the
largest component of the teacher's argmax == c (:func:`assess_batch`):

- scores ``S_b``, ``S_r`` of ``R`` and its least-squares ellipse ``E`` (:func:`~nnunet_ssl.parts.ellipse.assess`);
  kept iff the ellipse exists and ``S_b >= tau_b`` and ``S_r >= tau_r`` (:func:`gate`, thresholds per class);
- refined label ``y_i = 1[rho_E(i) <= 1]`` and weight ``w_i = w(rho_E(i))``, the refinement profile, for a kept
  (b, c); weight 0 for a dropped one (:func:`refined_targets`);
- refined-label loss, per kept (b, c), averaged over them (0 when none is kept) (:func:`refined_label_loss`)::

      CE_bc   = sum_i w_i BCE(p_ic, y_i) / sum_i w_i,      BCE(p, y) = -y ln p - (1 - y) ln(1 - p)
      Dice_bc = 1 - (2 sum_i w_i p_ic y_i + s) / (sum_i w_i p_ic + sum_i w_i y_i + s),   s = 1e-5
      L_PL    = mean_{kept (b, c)} (CE_bc + Dice_bc) / 2

  one class against the rest of the softmax (``ln(1 - p_c)`` as the log-sum of the other classes' probabilities);
- mirror consistency between the student's prediction ``p`` on the image and ``p~`` on its mirrored copy, mirrored
  back: ``L_sym = mean_{b, c named, i} (p_ic - p~_ic)^2`` (:func:`mirror_consistency`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from nnunet_ssl.parts.ellipse import Assessment, assess, radius_map, refinement_profile

DICE_SMOOTH = 1e-5


def assess_batch(labels: np.ndarray, classes: Sequence[int], **settings) -> list[list[Assessment]]:
    """``[b][k]``: :func:`~nnunet_ssl.parts.ellipse.assess` of ``labels[b] == classes[k]`` for a (B, H, W) array of
    class indices; ``settings`` are assess's keywords."""
    return [[assess(sample == c, **settings) for c in classes] for sample in labels]


def gate(assessments: list[list[Assessment]], boundary_threshold: float | Sequence[float],
         regularity_threshold: float | Sequence[float]) -> torch.Tensor:
    """(B, K) bool: fitted, ``S_b >= tau_b`` and ``S_r >= tau_r``; a threshold is one number or one per class."""
    k = len(assessments[0]) if assessments else 0
    tau_b = [boundary_threshold] * k if isinstance(boundary_threshold, (int, float)) else list(boundary_threshold)
    tau_r = [regularity_threshold] * k if isinstance(regularity_threshold, (int, float)) \
        else list(regularity_threshold)
    return torch.tensor([[a.ellipse is not None and a.boundary >= tau_b[j] and a.regularity >= tau_r[j]
                          for j, a in enumerate(row)] for row in assessments], dtype=torch.bool).reshape(-1, k)


def scores(assessments: list[list[Assessment]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(fitted, S_b, S_r), each (B, K) (bool, float64, float64), on the CPU."""
    fitted = torch.tensor([[a.ellipse is not None for a in row] for row in assessments], dtype=torch.bool)
    boundary = torch.tensor([[a.boundary for a in row] for row in assessments], dtype=torch.float64)
    regularity = torch.tensor([[a.regularity for a in row] for row in assessments], dtype=torch.float64)
    k = len(assessments[0]) if assessments else 0
    return fitted.reshape(-1, k), boundary.reshape(-1, k), regularity.reshape(-1, k)


def ground_truth_pass_counts(label_maps: Sequence[np.ndarray], classes: Sequence[int],
                             boundary_threshold: float, regularity_threshold: float,
                             **settings) -> dict[int, tuple[int, int]]:
    """Per class: (maps holding it, maps whose mask passes the gate), the gate applied to ground truth as if it were
    the teacher's prediction. A map is 2D or 3D (class indices); of a 3D map the slice along the first axis with
    the most pixels of the class is scored, as a 2d configuration sees it. "Holding" means at least
    ``settings['min_pixels']`` (default 16) pixels in that slice; ``settings`` are assess's keywords."""
    min_pixels = settings.get("min_pixels", 16)
    counts = {c: [0, 0] for c in classes}
    for label_map in label_maps:
        volume = np.asarray(label_map)
        volume = volume[None] if volume.ndim == 2 else volume
        for c in classes:
            areas = (volume == c).reshape(volume.shape[0], -1).sum(1)
            if int(areas.max(initial=0)) < min_pixels:
                continue
            mask = volume[int(areas.argmax())] == c
            counts[c][0] += 1
            counts[c][1] += int(bool(gate([[assess(mask, **settings)]], boundary_threshold, regularity_threshold)))
    return {c: (held, passed) for c, (held, passed) in counts.items()}


@dataclass
class RefinedTargets:
    """Refined labels and weights (B, K, H, W) float32 for the named classes, and which (b, k) are kept (B, K)."""

    labels: torch.Tensor
    weights: torch.Tensor
    kept: torch.Tensor


def refined_targets(assessments: list[list[Assessment]], kept: torch.Tensor, shape: tuple[int, int],
                    device: torch.device | str = "cpu", sigma: float = 0.5, floor: float = 0.2,
                    outside_sigma: float = 0.25) -> RefinedTargets:
    """The ellipse's interior as the label and the refinement profile as the weight of each kept (b, k), zeros for
    the others; computed on ``device`` from the ellipses' parameters."""
    b, k = kept.shape
    labels = torch.zeros(b, k, *shape, device=device)
    weights = torch.zeros(b, k, *shape, device=device)
    for i, j in kept.nonzero().tolist():
        rho = radius_map(assessments[i][j].ellipse, shape, device)
        labels[i, j] = (rho <= 1.0).float()
        weights[i, j] = refinement_profile(rho, sigma, floor, outside_sigma)
    return RefinedTargets(labels, weights, kept.to(device))


def class_log_probabilities(logits: torch.Tensor, c: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ln p_c, ln(1 - p_c)), (B, *spatial), of softmax ``logits`` (B, C, *spatial), without cancellation."""
    log_p = torch.log_softmax(logits.float(), 1)
    others = [k for k in range(logits.shape[1]) if k != c]
    return log_p[:, c], torch.logsumexp(log_p[:, others], 1)


def refined_label_loss(logits: torch.Tensor, classes: Sequence[int], targets: RefinedTargets,
                       smooth: float = DICE_SMOOTH) -> torch.Tensor:
    """``L_PL`` of the module docstring: weighted BCE + soft Dice of each kept (sample, named class) against its
    refined label, averaged over the kept pairs; a zero (connected to ``logits``) when none is kept."""
    kept = targets.kept
    if not bool(kept.any()):
        return logits.float().sum() * 0.0
    dims = tuple(range(1, logits.ndim - 1))
    terms = []
    for k, c in enumerate(classes):
        rows = kept[:, k]
        if not bool(rows.any()):
            continue
        log_p, log_not = class_log_probabilities(logits[rows], c)
        y, w = targets.labels[rows, k], targets.weights[rows, k]
        bce = -(y * log_p + (1 - y) * log_not)
        ce = (w * bce).sum(dims) / w.sum(dims).clamp(min=1e-8)
        p = log_p.exp()
        dice = 1 - (2 * (w * p * y).sum(dims) + smooth) / ((w * p).sum(dims) + (w * y).sum(dims) + smooth)
        terms.append(0.5 * (ce + dice))
    return torch.cat(terms).mean()


def mirror_consistency(logits: torch.Tensor, mirrored_back_logits: torch.Tensor,
                       classes: Sequence[int]) -> torch.Tensor:
    """``L_sym``: mean squared difference of the named classes' softmax probabilities of the two predictions (the
    second already mirrored back onto the first); gradients reach both."""
    p = torch.softmax(logits.float(), 1)[:, list(classes)]
    q = torch.softmax(mirrored_back_logits.float(), 1)[:, list(classes)]
    return torch.mean((p - q) ** 2)
