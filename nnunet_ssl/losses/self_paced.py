"""Self-paced supervised contrastive loss with meta-labels (Peng, Wang, Pedersoli, Desrosiers, "Self-Paced Contrastive
Learning for Semi-supervised Medical Image Segmentation with Meta-labels", NeurIPS 2021, arXiv 2107.13741; official
code jizongFox/Self-paced-Contrastive-Learning, ``contrastyou/losses/contrast_loss3.py``), all in float32.

With L2-normalised projections ``z_1 .. z_N`` (every row of every DDP rank), meta-labels ``y_1 .. y_N``, anchors
``A`` (the rows of this rank) and temperature ``tau``::

    s_ik = z_i . z_k / tau
    l_ij = -log( exp(s_ij) / sum_{k != i} exp(s_ik) )          the per-pair loss (positives and negatives in the sum)
    P(i) = { j != i : y_j = y_i }                               positives; every other row is a negative (weight 1)
    w_ij = 1[l_ij <= gamma]            (hard)                   self-paced weight of a positive pair, detached
    w_ij = max(0, 1 - l_ij / gamma)    (soft)
    L    = 1/|A+| sum_{i in A+} 1/|P(i)| sum_{j in P(i)} w_ij l_ij     A+ = anchors with at least one positive
    L    = L / mean_{i in A+, j in P(i)} w_ij                       with ``renormalise`` (the official correct_grad)

``gamma`` (the model's "age") grows over training: :func:`age_schedule`. Without self-paced weights (``mode =
"none"``) this is SupCon's ``L_out`` (Khosla et al., NeurIPS 2020), the official ``SupConLoss1``.

Differences from the official loss, and why: anchors without any positive are left out of the mean (the official
batches always hold the other view of each image, so it divides by zero counts never; a labeled patch whose
meta-label nobody else in the batch shares has none here); the denominators are evaluated as a log-sum-exp over
``k != i`` rather than ``exp`` of max-shifted logits plus ``1e-16`` (the same value, finite for any ``tau``); the
mean weight of the renormalisation is over this rank's anchors.
"""

from __future__ import annotations

import hashlib

import torch

MODES = ("hard", "soft", "none")


def self_paced_weights(pair_losses: torch.Tensor, age: float, mode: str) -> torch.Tensor:
    """``w_ij`` for per-pair losses ``l_ij`` (any shape, detached): hard ``1[l <= gamma]``, soft
    ``max(0, 1 - l / gamma)``, none 1."""
    losses = pair_losses.detach().float()
    if mode == "hard":
        return (losses <= age).float()
    if mode == "soft":
        return (1.0 - losses / age).clamp_min(0.0)
    if mode == "none":
        return torch.ones_like(losses)
    raise ValueError(f"self-paced mode {mode!r} is not one of {MODES}")


def age_schedule(progress: float, begin: float, end: float, power: float) -> float:
    """``gamma(t) = gamma_0 + (gamma_1 - gamma_0) p^power`` with ``p = clip(progress, 0, 1)`` (the official
    ``PScheduler``, ``p = epoch / max_epoch``)."""
    p = min(max(float(progress), 0.0), 1.0)
    return float(begin) + (float(end) - float(begin)) * p ** float(power)


def positive_mask(anchor_labels: torch.Tensor, labels: torch.Tensor, anchor_rows: torch.Tensor) -> torch.Tensor:
    """(A, N) True where row j shares anchor i's meta-label, the anchor itself (row ``anchor_rows[i]``) excluded."""
    same = anchor_labels[:, None] == labels[None, :]
    self_pair = torch.zeros_like(same)
    self_pair[torch.arange(len(anchor_rows), device=same.device), anchor_rows] = True
    return same & ~self_pair


def pair_losses(features: torch.Tensor, anchor_rows: torch.Tensor, temperature: float) -> torch.Tensor:
    """(A, N) ``l_ij`` of the anchors ``features[anchor_rows]`` against every row; ``+inf`` at the anchor itself."""
    z = features.float()
    logits = z[anchor_rows] @ z.t() / temperature
    self_pair = torch.zeros_like(logits, dtype=torch.bool)
    self_pair[torch.arange(len(anchor_rows), device=z.device), anchor_rows] = True
    logits = logits.masked_fill(self_pair, float("-inf"))
    return -torch.log_softmax(logits, dim=1)


def self_paced_supcon(features: torch.Tensor, labels: torch.Tensor, anchor_rows: torch.Tensor, temperature: float,
                      age: float, mode: str, renormalise: bool = True) -> tuple[torch.Tensor, dict[str, float]]:
    """The self-paced SupCon loss of the module docstring.

    ``features`` (N, D) L2-normalised projections of every row (gathered from all ranks, with gradient),
    ``labels`` (N,) integer meta-labels, ``anchor_rows`` (A,) the rows this rank averages over. Returns the loss and
    statistics: ``kept`` (mean ``w_ij`` over positive pairs, NaN without any), ``positives`` (share of the
    anchor pairs that are positive), ``anchors`` (share of anchors with a positive)."""
    if features.dim() != 2 or labels.shape != features.shape[:1]:
        raise ValueError(f"features (N, D) and labels (N,) expected, got {tuple(features.shape)} and "
                         f"{tuple(labels.shape)}")
    anchor_rows = anchor_rows.to(features.device).long()
    labels = labels.to(features.device)
    losses = pair_losses(features, anchor_rows, temperature)
    positive = positive_mask(labels[anchor_rows], labels, anchor_rows)
    counts = positive.sum(1)
    has_positive = counts > 0
    weights = torch.where(positive, self_paced_weights(losses, age, mode), torch.zeros_like(losses))
    # where() rather than a product: l is +inf at the anchor itself
    weighted = torch.where(positive, weights * losses, torch.zeros_like(losses)).sum(1)
    n_pairs = max(len(anchor_rows) * (features.shape[0] - 1), 1)
    stats = {"positives": float(positive.sum()) / n_pairs,
             "anchors": float(has_positive.float().mean()) if len(anchor_rows) else 0.0}
    if not bool(has_positive.any()):
        # no positive pair: a zero that keeps the graph (every DDP parameter gets its gradient, zero)
        return features.float().sum() * 0.0, {**stats, "kept": float("nan")}
    loss = (weighted[has_positive] / counts[has_positive]).mean()
    kept = weights[positive].mean()
    if renormalise and float(kept) > 0:
        loss = loss / kept
    return loss, {**stats, "kept": float(kept)}


def stable_label(value: object) -> int:
    """A 63-bit integer for a meta-label value (case id, user label), the same in every process and on every rank
    (Python's ``hash`` of a string is salted per process)."""
    digest = hashlib.blake2b(repr(value).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def position_bins(centres: torch.Tensor, extents: torch.Tensor, bins: int) -> torch.Tensor:
    """Bin of the normalised position ``centre / extent`` in ``bins`` equal parts of [0, 1] (positions outside, from
    nnU-Net's padding at the volume's border, go to the first or last bin)."""
    position = centres.double() / extents.double().clamp_min(1.0)
    return (position * bins).floor().clamp(0, bins - 1).long()
