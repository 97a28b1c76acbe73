"""Quality-guided SSL losses (QAR and PL-QW) for any number of classes, as pure functions on tensors.

Paper: Abhishek & Hamarneh, "Quality-guided semi-supervised segmentation" (QG-SSL, MICCAI 2026, arXiv 2606.01753),
Phase 2. Official code: https://github.com/sfu-mial/QG-SSL (read at 8d47ebe: ``training/methods/ours.py``,
``training/losses.py``, ``train_SSL_methods.sh``). The paper body was not available beyond the abstract; the
equations below follow the released code and are what ``preset = "paper"`` trains. Our default's threshold is at
the end of this docstring; its loss weights and schedules are in :mod:`nnunet_ssl.trainers.plugins.quality`. ``g``
is the frozen quality predictor of Phase 1 (:mod:`nnunet_ssl.quality.predictor`): ``g(x, m)`` is the predicted Dice
of mask ``m`` on image ``x``, one value per foreground class, shape (B, K-1).

QAR, quality-aware regularisation (Eqs. 5-6)::

    L_QAR = 1 - mean_{b, k} g(x_u^b, softmax f_theta(x_u^b))_k          (gradient flows through g into f_theta)
    L     = L_sup + lambda_QAR(t) L_QAR,   lambda_QAR: 0 for 15 % of training, then linear to 0.01 over 20 %

PL-QW, quality-weighted pseudo-labels (Eqs. 7-8), with the teacher's hard pseudo-label ``y^ = argmax f_EMA(x_u)``::

    q_b = g(x_u^b, onehot(y^_b))                      no gradient, (B, K-1)
    w   = q^T * 1[q >= tau]                           T = 2, tau = 0.5
    l_b = 0.5 CE_b(f_theta(x_u^b), y^_b) + 0.5 (1 - Dice_b)            per sample
    L_u = sum_b w_b l_b / (sum_b w_b + 1e-8)
    L   = L_sup + lambda_QW(t) L_u,   lambda_QW: 0 for 7.5 % of training, then linear to 0.25 over 15 %

Multi-class generalisation (the official code is binary; these are our choices):

* ``per="sample"`` (default, the paper's per-image weight): ``q_b`` is the mean predicted Dice over the foreground
  classes, ``w_b = q_b^T 1[q_b >= tau]``; ``CE_b`` is the voxel mean of the multi-class cross-entropy and ``Dice_b``
  the mean over foreground classes of the per-sample soft Dice (nnU-Net's ``do_bg=False`` convention).
* ``per="class"``: every foreground class of every sample has its own weight ``w_bk = q_bk^T 1[q_bk >= tau]``. A
  voxel's CE is weighted by the weight of its pseudo-label class; background voxels (no predicted quality exists for
  class 0) take the per-sample weight above. The Dice term of class k of sample b is weighted by ``w_bk``::

      L_u = 0.5 sum_{b,i} omega_bi CE_bi / (sum omega + eps) + 0.5 sum_{b,k} w_bk (1 - D_bk) / (sum w + eps)

  For two classes (one foreground) this equals the per-sample loss up to the placement of eps (tested).

Deviations from the official code, and why:

1. Softmax over K classes and multi-class CE instead of one sigmoid channel and BCE; the predictor sees the K-channel
   probabilities (QAR) or the one-hot pseudo-label (PL-QW) instead of one binary channel (nnU-Net is multi-class).
2. The ramps are fractions of all training iterations instead of epochs (official 200 epochs: warm-up 30, ramp 40
   for QAR; 15 and 30 for PL-QW), evaluated per iteration rather than per epoch, so shortened nnU-Net schedules keep
   their shape.
3. All losses use the full-resolution output only (deep supervision applies to L_sup only), in float32.
4. When every weight is zero the official code returns a constant 0; here ``sum w l / (sum w + eps)`` is 0 as
   well, with a zero gradient (same value, no branch).

The threshold. ``preset = "paper"`` keeps the fixed ``tau = 0.5`` above. Our default (``preset = "default"``) gates
with a threshold that follows the predictor (:class:`QualityThreshold`)::

    m_t   = bias-corrected EMA (momentum 0.99) of mean_{b,k} q_bk, over the previous batches and this one
    tau_t = min(tau, m_t)                                         the same tau_t for ``per="sample"`` and ``"class"``
    w     = q^T * 1[q >= tau_t]

Why: ``g`` is trained on the few labeled cases and its absolute calibration on unlabeled data is weak, while its
ranking of pseudo-labels is what PL-QW needs. On Hippocampus the fixed 0.5 kept 0-3 % of the samples for half of a
run (``g`` rated every pseudo-label below 0.5), so PL-QW trained on almost nothing without any message. With
``tau_t`` the pseudo-labels rated at or above the running mean pass (about half while ``g`` is pessimistic; the
best sample of the first batch always does); once ``g`` rates them above tau on average, ``tau_t = tau`` and the
gate is the paper's. The mean runs over batches, not within one (nnU-Net's unlabeled batch is 2 patches, where a
batch quantile would keep one of two whatever their quality). The EMA is part of the checkpoint.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

Per = Literal["sample", "class"]

#: defaults of the official ``train_SSL_methods.sh``, ramps as fractions of its 200 epochs
QAR_WEIGHT = 0.01
QAR_DELAY_FRACTION = 30 / 200
QAR_RAMPUP_FRACTION = 40 / 200
QW_WEIGHT = 0.25
QW_DELAY_FRACTION = 15 / 200
QW_RAMPUP_FRACTION = 30 / 200
QW_THRESHOLD = 0.5
QW_TEMPERATURE = 2.0
#: momentum of the EMA of the predicted quality that the default threshold follows (:class:`QualityThreshold`)
QW_THRESHOLD_MOMENTUM = 0.99
#: the official per-sample Dice smoothing (``PerSampleBCEDiceLoss``) and weight-sum epsilon
DICE_SMOOTH = 1e-6
WEIGHT_EPS = 1e-8


def qar_loss(predicted_quality: torch.Tensor) -> torch.Tensor:
    """``1 - mean(q)`` over samples and foreground classes (Eq. 5; the binary code averages over samples). Every
    (sample, class) pair counts equally; float32."""
    return 1.0 - predicted_quality.float().mean()


def sample_quality(q: torch.Tensor) -> torch.Tensor:
    """Per-sample quality: the mean predicted Dice over foreground classes, (B, K-1) -> (B,)."""
    return q.float().mean(1)


def quality_weights(q: torch.Tensor, tau: float = QW_THRESHOLD, temperature: float = QW_TEMPERATURE,
                    per: Per = "sample") -> torch.Tensor:
    """PL-QW weights ``q^T * 1[q >= tau]`` (Eq. 7), without gradient.

    ``q`` is the predicted Dice (B, K-1). ``per="sample"`` returns (B,) from the per-sample mean quality;
    ``per="class"`` returns (B, K-1), one weight per foreground class. A quality equal to tau is kept."""
    if per not in ("sample", "class"):
        raise ValueError(f"per must be 'sample' or 'class', got {per!r}")
    if q.dim() != 2:
        raise ValueError(f"expected predicted quality of shape (B, K-1), got {tuple(q.shape)}")
    with torch.no_grad():
        q = q.detach().float()
        if per == "sample":
            q = sample_quality(q)
        return q.clamp(min=0.0) ** temperature * (q >= tau).float()


def kept_fraction(q: torch.Tensor, tau: float = QW_THRESHOLD, per: Per = "sample") -> float:
    """Share of samples (or of sample-class pairs for ``per="class"``) whose quality passes tau."""
    with torch.no_grad():
        q = q.detach().float()
        if per == "sample":
            q = sample_quality(q)
        return float((q >= tau).float().mean())


def voxel_weights(labels: torch.Tensor, class_weights: torch.Tensor, background_weights: torch.Tensor) -> torch.Tensor:
    """The weight of each voxel from the class of its pseudo-label: ``class_weights[b, c-1]`` for foreground class
    c >= 1, ``background_weights[b]`` for class 0. labels (B, *spatial) long, class_weights (B, K-1),
    background_weights (B,) -> (B, *spatial)."""
    table = torch.cat([background_weights[:, None], class_weights], 1)  # (B, K)
    flat = labels.reshape(labels.shape[0], -1).long()
    return torch.gather(table.to(flat.device), 1, flat).reshape(labels.shape)


def per_sample_soft_dice(probabilities: torch.Tensor, labels: torch.Tensor,
                         smooth: float = DICE_SMOOTH) -> torch.Tensor:
    """Soft Dice ``(2 sum p y + s) / (sum p + sum y + s)`` of each sample and foreground class, (B, K-1)."""
    one_hot = F.one_hot(labels.long(), probabilities.shape[1]).movedim(-1, 1).to(probabilities.dtype)
    axes = tuple(range(2, probabilities.dim()))
    intersection = (probabilities * one_hot).sum(axes)
    denominator = probabilities.sum(axes) + one_hot.sum(axes)
    return ((2 * intersection + smooth) / (denominator + smooth))[:, 1:]


def quality_weighted_pseudo_label_loss(student_logits: torch.Tensor, labels: torch.Tensor, q: torch.Tensor,
                                       tau: float = QW_THRESHOLD, temperature: float = QW_TEMPERATURE,
                                       per: Per = "sample", ce_weight: float = 0.5, dice_weight: float = 0.5,
                                       eps: float = WEIGHT_EPS) -> torch.Tensor:
    """PL-QW loss (Eq. 8, see the module docstring for both modes), float32.

    ``student_logits`` (B, K, *spatial) with gradient; ``labels`` (B, *spatial) the teacher's argmax; ``q`` (B, K-1)
    the predicted Dice of that pseudo-label (no gradient is taken through it)."""
    if student_logits.dim() < 3 or labels.shape != (student_logits.shape[0], *student_logits.shape[2:]):
        raise ValueError(f"logits {tuple(student_logits.shape)} and labels {tuple(labels.shape)} do not match")
    if q.shape != (student_logits.shape[0], student_logits.shape[1] - 1):
        raise ValueError(f"expected predicted quality of shape {(student_logits.shape[0], student_logits.shape[1] - 1)}"
                         f", got {tuple(q.shape)}")
    logits = student_logits.float()
    labels = labels.long()
    ce = F.cross_entropy(logits, labels, reduction="none")  # (B, *spatial)
    dice = per_sample_soft_dice(torch.softmax(logits, 1), labels)  # (B, K-1)
    if per == "sample":
        w = quality_weights(q, tau, temperature, "sample")  # (B,)
        per_sample = ce_weight * ce.flatten(1).mean(1) + dice_weight * (1.0 - dice).mean(1)
        return (w * per_sample).sum() / (w.sum() + eps)
    w_class = quality_weights(q, tau, temperature, "class")  # (B, K-1)
    omega = voxel_weights(labels, w_class, quality_weights(q, tau, temperature, "sample"))
    ce_term = (omega * ce).sum() / (omega.sum() + eps)
    dice_term = (w_class * (1.0 - dice)).sum() / (w_class.sum() + eps)
    return ce_weight * ce_term + dice_weight * dice_term


def pseudo_label_voxel_weights(labels: torch.Tensor, q: torch.Tensor, tau: float = QW_THRESHOLD,
                               temperature: float = QW_TEMPERATURE, per: Per = "sample") -> torch.Tensor:
    """Voxel weights (B, *spatial) for voxel-wise losses: the sample's weight everywhere (``per="sample"``) or the
    weight of each voxel's pseudo-label class, background voxels taking the sample weight (``per="class"``)."""
    w_sample = quality_weights(q, tau, temperature, "sample")
    if per == "sample":
        return w_sample.view(-1, *([1] * (labels.dim() - 1))).expand(labels.shape).clone()
    return voxel_weights(labels, quality_weights(q, tau, temperature, "class"), w_sample)


class QualityThreshold:
    """Our PL-QW threshold ``tau_t = min(tau, m_t)``, ``m_t`` the bias-corrected EMA of the batch mean predicted
    Dice of the pseudo-labels (module docstring).

    ``update`` takes this batch's mean before ``threshold`` is read, so the first step's threshold is at most its own
    mean."""

    def __init__(self, momentum: float = QW_THRESHOLD_MOMENTUM) -> None:
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.momentum = momentum
        self.ema = 0.0
        self.steps = 0

    def update(self, batch_mean: float) -> None:
        """One batch's mean predicted Dice ``mean_{b,k} q_bk``; non-finite values are skipped."""
        if not math.isfinite(batch_mean):
            return
        self.ema = self.momentum * self.ema + (1 - self.momentum) * batch_mean
        self.steps += 1

    def mean(self) -> float:
        """The bias-corrected EMA ``m_t``; nan before the first update."""
        if self.steps == 0:
            return float("nan")
        return self.ema / (1.0 - self.momentum ** self.steps)

    def threshold(self, tau: float = QW_THRESHOLD) -> float:
        """``tau_t = min(tau, m_t)``; ``tau`` before the first update."""
        if self.steps == 0:
            return tau
        return min(tau, self.mean())

    def state_dict(self) -> dict:
        return {"ema": self.ema, "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.ema, self.steps = float(state["ema"]), int(state["steps"])
