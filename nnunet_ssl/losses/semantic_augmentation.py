"""TransMedSeg's transferable semantic augmentation (Wang et al., arXiv 2505.14753) on ISDA's closed-form bound
(Wang et al., "Implicit Semantic Data Augmentation for Deep Networks", NeurIPS 2019 / TPAMI 2021): per-class feature
statistics and the upper bound of the expected cross-entropy of a linear classifier under Gaussian feature shifts.

**Bound.** A linear head ``z = W a + b`` (W: C x D, rows w_j) and a voxel of class y whose feature is drawn as
``a' ~ N(a + alpha dmu_y, alpha Sigma_y)``. With ``d_yj = w_j - w_y`` the logit difference is Gaussian,
``z'_j - z'_y ~ N(z_j - z_y + alpha d_yj^T dmu_y, alpha d_yj^T Sigma_y d_yj)``, so its moment generating function
gives ``E[exp(z'_j - z'_y)] = exp(z_j - z_y + A_yj)`` with

    A_yj = alpha d_yj^T dmu_y + (alpha / 2) d_yj^T Sigma_y d_yj        (A_yy = 0)

and, log being concave (Jensen),

    E[CE(z', y)] = E[log sum_j exp(z'_j - z'_y)] <= log sum_j exp(z_j + A_yj - z_y) = CE(z + A_y, y).

The bound is exact (equality) when Sigma_y = 0: the shifted feature is then deterministic. ``A`` is a C x C matrix
computed once per step (:func:`logit_adjustment`); per voxel the bound costs one gather of the row ``A_y`` and a
cross-entropy (:func:`semantic_augmentation_loss`). The gradient reaches W through ``A`` as in ISDA.

**Statistics** (:class:`ClassStatistics`): per class c a voxel-weighted, exponentially forgetting estimate of the
mean and (biased) covariance of the features. After k updates a voxel seen at update i has weight ``rho^(k - i)``
(rho = ``momentum``); mean and covariance are those of all voxels seen so far under these weights. rho = 1 is ISDA's
cumulative estimator (its ``EstimatorCV``), rho < 1 forgets features of an earlier network. Recursively, with the
batch's count n, mean m_b and covariance S_b of class c, and W the effective weight so far:

    W' = rho W + n,   f = n / W'
    mu' = mu + f (m_b - mu)
    Sigma' = (1 - f) Sigma + f S_b + f (1 - f) (m_b - mu)(m_b - mu)^T      (the two-component mixture)

A class absent from the batch keeps mu and Sigma (W still decays). The batch moments are taken about the current
mean (``delta = a - mu``), so the float32 sums do not lose the covariance to cancellation when the mean is large; the
state and the update are float64. The moments of a batch are one flat tensor, so a DDP trainer sums them over ranks
with one all-reduce before :meth:`ClassStatistics.update`, and every rank holds identical statistics.

**Transfer** (:func:`transfer_terms`): the features of one side (own statistics) are shifted toward the other side's
class means with the other side's covariance, ``dmu_y = mu^other_y - mu^own_y``, ``Sigma_y = Sigma^other_y`` (TSA,
Li et al., CVPR 2021: source features toward the target's statistics); classes that either side has seen fewer than
``min_count`` times get no adjustment (their rows of A are 0: the plain cross-entropy).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

STATE_KEYS = ("count", "weight", "mean", "covariance")


def logit_adjustment(weight: torch.Tensor, shift: torch.Tensor, covariance: torch.Tensor,
                     alpha: float) -> torch.Tensor:
    """``A[y, j] = alpha (w_j - w_y)^T shift_y + alpha/2 (w_j - w_y)^T covariance_y (w_j - w_y)``, (C, C).

    ``weight``: (C, D) rows of the linear head; ``shift``: (C, D); ``covariance``: (C, D, D). Differentiable in
    ``weight`` (the statistics are constants)."""
    num_classes, dim = weight.shape
    if shift.shape != (num_classes, dim) or covariance.shape != (num_classes, dim, dim):
        raise ValueError(f"shift {tuple(shift.shape)} and covariance {tuple(covariance.shape)} do not match the head "
                         f"({num_classes} classes x {dim} features)")
    diff = weight.unsqueeze(0) - weight.unsqueeze(1)  # [y, j] = w_j - w_y
    linear = torch.einsum("yjd,yd->yj", diff, shift)
    quadratic = torch.einsum("yjd,yde,yje->yj", diff, covariance, diff)
    return alpha * linear + (0.5 * alpha) * quadratic


def augmented_logits(logits: torch.Tensor, labels: torch.Tensor, adjustment: torch.Tensor) -> torch.Tensor:
    """``z + A[y]`` per voxel: logits (B, C, *spatial), labels (B, *spatial) in [0, C), adjustment (C, C)."""
    return logits + adjustment[labels].movedim(-1, 1)


def semantic_augmentation_loss(logits: torch.Tensor, labels: torch.Tensor, adjustment: torch.Tensor,
                               weights: torch.Tensor | None = None) -> torch.Tensor:
    """The ISDA bound ``CE(z + A_y, y)`` averaged over the voxels (weighted by ``weights`` (B, *spatial), a mask or
    per-voxel weights; a batch without weight gives 0), in float32."""
    ce = F.cross_entropy(augmented_logits(logits.float(), labels, adjustment.float()), labels, reduction="none")
    if weights is None:
        return ce.mean()
    weights = weights.float()
    return (ce * weights).sum() / weights.sum().clamp_min(1.0)


def transfer_terms(own: ClassStatistics, other: ClassStatistics, min_count: float
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(shift (C, D), covariance (C, D, D), active (C,) bool) for features of ``own`` moved toward ``other``:
    ``mu^other - mu^own`` and ``Sigma^other`` where both sides have seen at least ``min_count`` voxels of the class,
    0 elsewhere."""
    active = (own.count >= min_count) & (other.count >= min_count)
    keep = active.to(own.mean.dtype)
    shift = (other.mean - own.mean) * keep[:, None]
    covariance = other.covariance * keep[:, None, None]
    return shift, covariance, active


class ClassStatistics:
    """Per-class feature mean and covariance, exponentially forgetting and voxel-weighted (module docstring).

    ``count``: voxels seen per class (never decays; the gate of :func:`transfer_terms`), ``weight``: their decayed
    total W, ``mean`` (C, D), ``covariance`` (C, D, D); all float64 on ``device``."""

    def __init__(self, num_classes: int, dim: int, device: torch.device | str = "cpu"):
        self.num_classes, self.dim = num_classes, dim
        self.count = torch.zeros(num_classes, dtype=torch.float64, device=device)
        self.weight = torch.zeros(num_classes, dtype=torch.float64, device=device)
        self.mean = torch.zeros(num_classes, dim, dtype=torch.float64, device=device)
        self.covariance = torch.zeros(num_classes, dim, dim, dtype=torch.float64, device=device)

    @property
    def moment_size(self) -> int:
        """Length of the flat tensor :meth:`moments` returns: C counts, C x D first and C x D x D second moments."""
        return self.num_classes * (1 + self.dim + self.dim * self.dim)

    def moments(self, features: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None = None
                ) -> torch.Tensor:
        """One batch's sums per class, flat float64: counts n_c, ``sum delta`` and ``sum delta delta^T`` over the
        voxels of class c (``delta = a - mean_c``, about the current mean), computed in float32 without gradient.

        ``features`` (B, D, *spatial), ``labels`` (B, *spatial) (values outside [0, C), e.g. an ignore label, count
        for no class), ``mask`` (B, *spatial) bool or None: voxels left out of every class."""
        if features.shape[1] != self.dim or features.shape[:1] + features.shape[2:] != labels.shape:
            raise ValueError(f"features {tuple(features.shape)} and labels {tuple(labels.shape)} do not match "
                             f"statistics of {self.dim} features")
        with torch.no_grad():
            a = features.detach().float().movedim(1, -1).reshape(-1, self.dim)
            flat_labels = labels.reshape(-1)
            keep = mask.reshape(-1) if mask is not None else None
            center = self.mean.float()
            counts, firsts, seconds = [], [], []
            # one class at a time: one N x D temporary, no scatter with accumulation (slow on GPUs), no host sync
            for c in range(self.num_classes):
                member = flat_labels == c
                if keep is not None:
                    member = member & keep
                w = member.float()
                delta = (a - center[c]).mul_(w[:, None])  # w is 0 or 1: sum w d d^T = (w d)^T (w d)
                counts.append(w.sum())
                firsts.append(delta.sum(0))
                seconds.append(delta.T @ delta)
            return torch.cat([torch.stack(counts), torch.stack(firsts).flatten(),
                              torch.stack(seconds).flatten()]).double()

    def update(self, moments: torch.Tensor, momentum: float) -> None:
        """The recursive update of the module docstring from :meth:`moments` (summed over DDP ranks, if any)."""
        c, d = self.num_classes, self.dim
        if moments.numel() != self.moment_size:
            raise ValueError(f"moments of {moments.numel()} values, expected {self.moment_size}")
        moments = moments.to(self.mean.device, torch.float64)
        n = moments[:c]
        first = moments[c:c + c * d].view(c, d)
        second = moments[c + c * d:].view(c, d, d)
        self.weight = momentum * self.weight + n
        seen = n > 0
        f = torch.where(seen, n / self.weight.clamp_min(1e-300), torch.zeros_like(n))
        delta = torch.where(seen[:, None], first / n.clamp_min(1.0)[:, None], torch.zeros_like(first))
        scatter = torch.where(seen[:, None, None], second / n.clamp_min(1.0)[:, None, None], torch.zeros_like(second))
        outer = delta[:, :, None] * delta[:, None, :]
        self.mean = self.mean + f[:, None] * delta
        covariance = ((1 - f)[:, None, None] * self.covariance + f[:, None, None] * scatter
                      - (f * f)[:, None, None] * outer)
        self.covariance = 0.5 * (covariance + covariance.transpose(1, 2))
        self.count = self.count + n

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k).clone() for k in STATE_KEYS}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        expected = {"count": (self.num_classes,), "weight": (self.num_classes,), "mean": (self.num_classes, self.dim),
                    "covariance": (self.num_classes, self.dim, self.dim)}
        missing = [k for k in STATE_KEYS if k not in state]
        if missing:
            raise ValueError(f"class statistics without {', '.join(missing)}")
        for k in STATE_KEYS:
            if tuple(state[k].shape) != expected[k]:
                raise ValueError(f"class statistics '{k}' of shape {tuple(state[k].shape)}, expected {expected[k]} "
                                 f"({self.num_classes} classes x {self.dim} features)")
        device = self.mean.device
        for k in STATE_KEYS:
            setattr(self, k, state[k].detach().to(device, torch.float64).clone())
