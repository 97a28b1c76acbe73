"""MetaSSL's spatially heterogeneous loss, as a host-agnostic PyTorch module (no nnU-Net imports).

Reference: "MetaSSL: A General Heterogeneous Loss for Semi-Supervised Medical Image Segmentation", IEEE Transactions
on Medical Imaging 2025, arXiv 2509.01144. Official code: https://github.com/HiLab-git/MetaSSL (read at 4c58a66,
mainly ``code_3D/train_MetaSSL_MT_3D.py`` and ``code_3D/utils/utils.py``). The paper body was not available, so
the semantics below follow the released 3D code wherever the abstract is silent.

What it computes
----------------
Two predictions of the same image: a *supervised* one ``p`` (gets the gradient) and a *reference* one ``p~``
(detached; the EMA teacher in Mean Teacher, the other network in CPS). With ``y = argmax p``, ``y~ = argmax p~``,
each voxel ``i`` falls into one region:

* Unanimous ``y_i == y~_i`` or Discrepant otherwise;
* Confident ``conf_i > tau(k_i)`` or Suspicious otherwise, where ``conf_i`` and ``k_i`` are the max probability
  and the argmax of the *confidence-defining* prediction: the reference on unlabeled data, the supervised
  prediction on labeled data (as in the code).

The adaptive class-wise thresholds (``AdaptiveClassThreshold``) follow an EMA of the class-mean confidence::

    cbar_t(c) = mean{conf_i : k_i == c}            over the whole (sub-)batch
    tau_t(c)  = alpha * cbar_t(c) + (1 - alpha) * tau_{t-1}(c),   tau_0 = 0.9, alpha = 0.5
    used threshold = min(tau_t(c), cap)                              cap = 0.9 as in the 3D code

Each region ``r`` contributes a region-normalised cross-entropy, and a branch loss is their sum::

    l_r = w_r * sum_{i in r} CE(p_i, t_i) / (|r| + 1)
    L_branch = l_UCfg + l_UCbg + l_US + l_DC + l_DS        (w_UCfg = w_UCbg = w_UC)

with target ``t = argmax p~`` on unlabeled data and the ground truth on labeled data. UC is split as in the 3D code
into foreground-UC (class != 0) and background-UC (class 0), each normalised on its own. ``|r|`` counts voxels
over the whole batch (not per sample), and the "+1" of the code is kept. The host adds ``L_sup`` (nnU-Net's
Dice+CE) and multiplies both branch losses by its ramp ``lambda(t)``; neither is part of this module.

Default weights are the official 3D Mean Teacher values from the reciprocal form with ``w``, ratio ``r`` and
factor ``rho`` (``RegionWeights.reciprocal_unlabeled`` / ``reciprocal_labeled``)::

    unlabeled (w=50, r=1.25, rho=5): UC = w, US = w/r, DS = w/(r^2 rho), DC = w/(r^3 rho^3) -> 50, 40, 6.4, 0.2048
    labeled   (w=50, r_l=1.5):       UC = w, US = w/r, DS = w/r^2,      DC = w/r^3         -> 50, 33.3, 22.2, 14.8

Deviations from the paper or the official code, and why
-------------------------------------------------------
1. No meta-learning. Despite the name, the official code learns nothing: the region weights are fixed
   hyperparameters. So are they here.
2. Weight order. The abstract says UC > US > DC > DS, but the MT/CCT scripts (and our defaults, ``order="code"``)
   use UC > US > DS > DC, i.e. a discrepant voxel where the reference is confident is almost ignored.
   ``order="paper"`` swaps the DC and DS default weights of both branches to follow the abstract. ``order`` only
   picks the defaults; weights passed explicitly are used as given.
3. Absent classes keep their threshold. The code divides by ``count + 1``, so a class absent from the batch pulls
   its threshold towards 0 (halving per step with alpha = 0.5), and when it reappears every voxel of it counts
   as confident. Here a class with no predicted voxel keeps its previous threshold, and a present class uses
   the exact mean (the "+1" only guarded the division by zero). With full-size patches the two means differ by
   about 1e-6.
4. Foreground/background UC follows the 3D code (``!= 0`` vs ``== 0``). The 2D code uses ``== 0`` for both
   terms, which drops foreground UC entirely and counts background UC twice; we treat that as a bug.
5. Cap. The 3D code clamps the threshold it *uses* to 0.9 and keeps the stored EMA unclamped; we do the same
   (``cap=0.9``). The 2D code's cap of 1.0 is a no-op: pass ``cap=None`` for it.
6. Only the two threshold sets the loss reads are kept: the reference's thresholds on unlabeled data (used by
   the unlabeled branch) and the supervised network's thresholds on labeled data (used by the labeled branch).
   The code also tracks the supervised network on unlabeled data, the reference on labeled data and pixel-wise
   EMA thresholds, all computed and never used. Like the code, the thresholds are updated from the current
   batch *before* its regions are assigned. Symmetric hosts (CPS) use one ``MetaSSLLoss`` per direction.
7. Any number of classes, one scalar threshold per class (the code hard-codes 2 classes in 3D and 4 in 2D, and
   stores each threshold replicated per sample).
8. Distributed training. The code is single-GPU. If ``torch.distributed`` is initialised (world size > 1), the
   per-class confidence sums and counts are all-reduced before the update, so the thresholds follow the global
   batch and stay identical on every rank. Every rank must then call ``update`` equally often.
9. Ignore label (nnU-Net's ``ignore_label``, not in the code): on the labeled branch, voxels whose target is the
   ignore label belong to no region, add no loss and do not enter the threshold update.
10. Region-based (sigmoid, BraTS-style) training is rejected with ``SSLInputError``: regions overlap, so there is
    no single argmax class per voxel and the unanimous/confident split is undefined.
11. Everything is computed in float32 whatever the input dtype, so the loss is safe under CUDA autocast.
12. ``normalise=True`` (off by default here, on in the trainers' default preset) divides each branch by the total
    voxel weight ``sum_r w_r |r| / (|r| + 1)``, so the voxel weights have mean 1: the region weights keep their
    ratios (what MetaSSL is about) but the branch is on a CE's scale. Unnormalised, the official weights make it
    60-260 on Hippocampus, so ``lambda = 0.1`` gives a term 7-25 times the supervised loss and gradient clipping
    rescales the whole gradient.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from nnunet_ssl.errors import SSLInputError
from nnunet_ssl.losses.consistency import channel_argmax

ReduceFn = Callable[[torch.Tensor], object]
ConfidenceFrom = Literal["reference", "supervised"]
Order = Literal["code", "paper"]

REGIONS_NOT_SUPPORTED = (
    "MetaSSL does not support region-based (sigmoid, BraTS-style) training: the regions overlap, so a voxel has no "
    "single argmax class and the unanimous/confident split is undefined. Train with plain labels instead."
)


def reject_regions(regions: bool) -> None:
    """Raise ``SSLInputError`` for region-based training, which this loss cannot handle (see module docstring)."""
    if regions:
        raise SSLInputError(REGIONS_NOT_SUPPORTED)


def _voxel_mask(mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    """Accept a (B, *spatial) or (B, 1, *spatial) mask for ``like`` of shape (B, C, *spatial)."""
    if mask is None:
        return None
    if mask.dim() == like.dim():
        if mask.shape[1] != 1:
            raise ValueError(f"mask must have one channel, got shape {tuple(mask.shape)}")
        mask = mask[:, 0]
    expected = (like.shape[0], *like.shape[2:])
    if tuple(mask.shape) != expected:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match the voxels {expected}")
    return mask.bool()


class AdaptiveClassThreshold(nn.Module):
    """Per-class EMA confidence thresholds of one prediction (MetaSSL's adaptive class-wise threshold).

    ``tau`` is a registered buffer (saved in ``state_dict``, so training resumes exactly). It holds the uncapped
    EMA; ``thresholds`` returns the values actually used, ``min(tau, cap)``. ``reduce_fn`` sums a tensor across
    ranks in place; when it is None, ``torch.distributed.all_reduce`` is used if a process group with more than
    one rank is initialised (tests inject a fake one).
    """

    tau: torch.Tensor

    def __init__(self, num_classes: int, alpha: float = 0.5, tau0: float = 0.9, cap: float | None = 0.9,
                 reduce_fn: ReduceFn | None = None) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2 (background + foreground), got {num_classes}")
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        if not 0.0 <= tau0 <= 1.0:
            raise ValueError(f"tau0 must be in [0, 1], got {tau0}")
        if cap is not None and not 0.0 < cap <= 1.0:
            raise ValueError(f"cap must be in (0, 1] or None, got {cap}")
        self.num_classes = num_classes
        self.alpha = float(alpha)
        self.tau0 = float(tau0)
        self.cap = None if cap is None else float(cap)
        self.reduce_fn = reduce_fn
        self.register_buffer("tau", torch.full((num_classes,), self.tau0, dtype=torch.float32))

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, alpha={self.alpha}, tau0={self.tau0}, cap={self.cap}"

    @property
    def thresholds(self) -> torch.Tensor:
        """The per-class thresholds in use, ``min(tau, cap)``, shape (C,), float32, detached."""
        tau = self.tau.detach()
        return tau.clamp(max=self.cap) if self.cap is not None else tau.clone()

    @staticmethod
    @torch.no_grad()
    def class_statistics(probabilities: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Per-class (sum of confidences, voxel count) over the voxels predicted as that class, shape (2, C),
        float64 (exact counts, and sums that add up the same in any order across ranks)."""
        probabilities = probabilities.detach().float()
        num_classes = probabilities.shape[1]
        conf, pred = probabilities.max(dim=1)
        m = _voxel_mask(mask, probabilities)
        weight = torch.ones_like(conf, dtype=torch.float64) if m is None else m.to(torch.float64)
        # a (voxels, C) class mask and plain sums: deterministic on CUDA, unlike bincount with weights, and fast,
        # unlike index_put_(accumulate=True), whose CUDA kernel serialises the many voxels sharing one of C indices
        # (H100, (7, 3, 40, 56, 40): 39 ms against 0.15 ms; see docs/throughput_h100.md)
        member = (pred.reshape(-1, 1) == torch.arange(num_classes, device=pred.device)).to(torch.float64)
        weight = weight.reshape(-1, 1)
        return torch.stack([(member * (conf.to(torch.float64).reshape(-1, 1) * weight)).sum(0),
                            (member * weight).sum(0)])

    def _reduce(self) -> ReduceFn | None:
        if self.reduce_fn is not None:
            return self.reduce_fn
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return dist.all_reduce
        return None

    @torch.no_grad()
    def update(self, probabilities: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """One EMA step from ``probabilities`` (B, C, *spatial) restricted to ``mask`` (B[, 1], *spatial);
        returns the new thresholds in use. Classes nobody predicted (on any rank) keep their threshold."""
        if probabilities.dim() < 3 or probabilities.shape[1] != self.num_classes:
            raise ValueError(f"expected probabilities (B, {self.num_classes}, *spatial), "
                             f"got shape {tuple(probabilities.shape)}")
        stats = self.class_statistics(probabilities, mask)
        reduce = self._reduce()
        if reduce is not None:
            reduce(stats)  # sum over ranks, in place
        stats = stats.to(self.tau.device)  # the buffer may live elsewhere if the module was not moved
        sums, counts = stats[0], stats[1]
        present = counts > 0
        mean = sums / counts.clamp(min=1.0)
        tau = self.tau.to(torch.float64)
        new = torch.where(present, self.alpha * mean + (1.0 - self.alpha) * tau, tau)
        self.tau.copy_(new.to(self.tau.dtype))
        return self.thresholds


#: the four regions in the order of the statistics
REGION_NAMES = ("uc", "us", "dc", "ds")


class Regions(NamedTuple):
    """Boolean voxel masks (B, *spatial) of the four MetaSSL regions, UC split into foreground and background."""

    uc_fg: torch.Tensor
    uc_bg: torch.Tensor
    us: torch.Tensor
    dc: torch.Tensor
    ds: torch.Tensor

    @property
    def uc(self) -> torch.Tensor:
        return self.uc_fg | self.uc_bg


@torch.no_grad()
def _regions_from_probabilities(p_sup: torch.Tensor, p_ref: torch.Tensor, thresholds: torch.Tensor,
                                confidence_from: ConfidenceFrom, valid: torch.Tensor | None) -> Regions:
    pred_sup = channel_argmax(p_sup)
    conf, pred = (p_ref if confidence_from == "reference" else p_sup).max(dim=1)
    pred_ref = pred if confidence_from == "reference" else channel_argmax(p_ref)
    # each voxel is compared with the threshold of its own predicted class; "<=" is suspicious, as in the code
    confident = conf > thresholds.to(conf.device, conf.dtype)[pred]
    unanimous = pred_sup == pred_ref
    if valid is not None:
        confident_v, suspicious_v = confident & valid, ~confident & valid
    else:
        confident_v, suspicious_v = confident, ~confident
    uc = unanimous & confident_v
    foreground = pred != 0  # class 0 is background (nnU-Net convention); in UC both predictions agree anyway
    return Regions(uc_fg=uc & foreground, uc_bg=uc & ~foreground, us=unanimous & suspicious_v,
                   dc=~unanimous & confident_v, ds=~unanimous & suspicious_v)


def _check_logits(supervised_logits: torch.Tensor, reference_logits: torch.Tensor) -> None:
    if supervised_logits.dim() < 3:
        raise ValueError(f"expected logits (B, C, *spatial), got shape {tuple(supervised_logits.shape)}")
    if supervised_logits.shape != reference_logits.shape:
        raise ValueError(f"supervised logits {tuple(supervised_logits.shape)} and reference logits "
                         f"{tuple(reference_logits.shape)} differ in shape")


def assign_regions(supervised_logits: torch.Tensor, reference_logits: torch.Tensor,
                   thresholds: torch.Tensor | AdaptiveClassThreshold, confidence_from: ConfidenceFrom = "reference",
                   valid: torch.Tensor | None = None) -> Regions:
    """Split the voxels into UC (foreground and background), US, DC, DS.

    Unanimous: the two argmaxes agree. Confident: the max probability of the prediction named by
    ``confidence_from`` is above the threshold of *its* predicted class. ``thresholds`` is a (C,) tensor or an
    ``AdaptiveClassThreshold`` (its capped thresholds are used; it is not updated here). Voxels outside ``valid``
    (B[, 1], *spatial) belong to no region. Pure: no gradient, no state change.
    """
    _check_logits(supervised_logits, reference_logits)
    if confidence_from not in ("reference", "supervised"):
        raise ValueError(f"confidence_from must be 'reference' or 'supervised', got {confidence_from!r}")
    if isinstance(thresholds, AdaptiveClassThreshold):
        thresholds = thresholds.thresholds
    if thresholds.shape != (supervised_logits.shape[1],):
        raise ValueError(f"expected {supervised_logits.shape[1]} thresholds, got shape {tuple(thresholds.shape)}")
    with torch.no_grad():
        p_sup = torch.softmax(supervised_logits.detach().float(), dim=1)
        p_ref = torch.softmax(reference_logits.detach().float(), dim=1)
    return _regions_from_probabilities(p_sup, p_ref, thresholds, confidence_from,
                                       _voxel_mask(valid, supervised_logits))


@dataclass(frozen=True)
class RegionWeights:
    """Weights of the four regions of one branch (both UC halves get ``uc``)."""

    uc: float
    us: float
    dc: float
    ds: float

    @classmethod
    def reciprocal_unlabeled(cls, w: float = 50.0, ratio: float = 1.25, rho: float = 5.0) -> RegionWeights:
        """The code's reciprocal form for unlabeled data; defaults give the 3D MT values 50, 40, 0.2048, 6.4."""
        return cls(uc=w, us=w / ratio, dc=w / (ratio**3 * rho**3), ds=w / (ratio**2 * rho))

    @classmethod
    def reciprocal_labeled(cls, w: float = 50.0, ratio: float = 1.5) -> RegionWeights:
        """The code's reciprocal form for labeled data; defaults give the 3D MT values 50, 33.3, 14.8, 22.2."""
        return cls(uc=w, us=w / ratio, dc=w / ratio**3, ds=w / ratio**2)

    def swap_discrepant(self) -> RegionWeights:
        """DC and DS weights exchanged (code order UC > US > DS > DC <-> paper order UC > US > DC > DS)."""
        return replace(self, dc=self.ds, ds=self.dc)


def region_normalised_ce(supervised_logits: torch.Tensor, target: torch.Tensor, regions: Regions,
                         weights: RegionWeights, voxel_weights: torch.Tensor | None = None,
                         normalise: bool = False) -> torch.Tensor:
    """``sum_r w_r * sum_{i in r} CE(p_i, t_i) / (|r| + 1)`` over UC-fg, UC-bg, US, DC, DS, in float32.

    ``target`` is (B, *spatial) with class indices in [0, C) (also outside the regions, where it is unused). With
    ``voxel_weights`` omega (B, *spatial, no gradient) each region's sum is weighted:
    ``sum_r w_r sum_{i in r} omega_i CE_i / (sum_{i in r} omega_i + 1)``; ``omega = 1`` is the plain form.

    ``normalise`` divides by ``sum_r w_r |r| / (|r| + 1)`` (with omega: ``sum_r w_r W_r / (W_r + 1)``,
    ``W_r = sum_{i in r} omega_i``): the voxel weights ``w_r / (|r| + 1)`` then have mean 1 over the voxels, and the
    loss is a weighted mean of region-mean CEs, on the scale of a plain CE whatever ``w`` is (the official weights
    make the unnormalised sum 60-260 on Hippocampus)."""
    ce = F.cross_entropy(supervised_logits.float(), target.long(), reduction="none")
    zero = ce.new_zeros(())
    loss = ce.new_zeros(())
    total = ce.new_zeros(())
    omega = None if voxel_weights is None else voxel_weights.float().detach()
    for mask, w in ((regions.uc_fg, weights.uc), (regions.uc_bg, weights.uc), (regions.us, weights.us),
                    (regions.dc, weights.dc), (regions.ds, weights.ds)):
        # where() rather than a product: a non-finite CE outside the region must not leak into the sum
        size = mask.sum() if omega is None else torch.where(mask, omega, zero).sum()
        summed = torch.where(mask, ce if omega is None else omega * ce, zero).sum()
        loss = loss + w * summed / (size + 1)
        total = total + w * size / (size + 1)
    if normalise:
        return torch.where(total > 0, loss / total.clamp(min=1e-8), loss)  # no host sync
    return loss


class MetaSSLLoss(nn.Module):
    """MetaSSL's heterogeneous loss for both branches of a semi-supervised batch.

    * ``unlabeled(p, p~)``: target ``argmax p~``; confidence from the reference, thresholds
      ``reference_thresholds`` updated from the reference's probabilities on the unlabeled batch.
    * ``labeled(p, p~, y)``: target ``y``; regions still from the agreement of ``p`` and ``p~`` (not with ``y``),
      confidence from the supervised prediction, thresholds ``supervised_thresholds`` updated from its
      probabilities on the labeled batch.

    Both return ``(loss, stats)``: stats has the fraction of (valid) voxels in each region (``frac_uc`` = fg +
    bg, ``frac_us``, ``frac_dc``, ``frac_ds``) and the thresholds in use (``tau_0`` ... ``tau_{C-1}``). Pass
    ``update_thresholds=False`` to reuse the thresholds without an EMA step (e.g. for extra deep-supervision
    outputs). See the module docstring for the equations and the deviations from the official code.
    """

    def __init__(self, num_classes: int, order: Order = "code", unlabeled_weights: RegionWeights | None = None,
                 labeled_weights: RegionWeights | None = None, alpha: float = 0.5, tau0: float = 0.9,
                 cap: float | None = 0.9, ignore_label: int | None = None, regions: bool = False,
                 reduce_fn: ReduceFn | None = None, normalise: bool = False) -> None:
        super().__init__()
        self.normalise = normalise
        reject_regions(regions)
        if order not in ("code", "paper"):
            raise SSLInputError(f"MetaSSL weight order must be 'code' or 'paper', got {order!r}")
        self.num_classes = num_classes
        self.order = order
        self.ignore_label = ignore_label
        if unlabeled_weights is None:
            unlabeled_weights = RegionWeights.reciprocal_unlabeled()
            if order == "paper":
                unlabeled_weights = unlabeled_weights.swap_discrepant()
        if labeled_weights is None:
            labeled_weights = RegionWeights.reciprocal_labeled()
            if order == "paper":
                labeled_weights = labeled_weights.swap_discrepant()
        self.unlabeled_weights = unlabeled_weights
        self.labeled_weights = labeled_weights
        self.reference_thresholds = AdaptiveClassThreshold(num_classes, alpha, tau0, cap, reduce_fn)
        self.supervised_thresholds = AdaptiveClassThreshold(num_classes, alpha, tau0, cap, reduce_fn)

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, order={self.order!r}, unlabeled_weights={self.unlabeled_weights},"
                f" labeled_weights={self.labeled_weights}, ignore_label={self.ignore_label},"
                f" normalise={self.normalise}")

    def _branch(self, supervised_logits: torch.Tensor, reference_logits: torch.Tensor, target: torch.Tensor | None,
                valid: torch.Tensor | None, threshold: AdaptiveClassThreshold, confidence_from: ConfidenceFrom,
                weights: RegionWeights, update_thresholds: bool,
                voxel_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        _check_logits(supervised_logits, reference_logits)
        if supervised_logits.shape[1] != self.num_classes:
            raise ValueError(f"expected {self.num_classes} channels, got {supervised_logits.shape[1]}")
        with torch.no_grad():
            p_sup = torch.softmax(supervised_logits.detach().float(), dim=1)
            p_ref = torch.softmax(reference_logits.detach().float(), dim=1)
            if update_thresholds:
                # as in the code: this batch's statistics move the thresholds before its regions are assigned
                threshold.update(p_ref if confidence_from == "reference" else p_sup, valid)
            regions = _regions_from_probabilities(p_sup, p_ref, threshold.thresholds, confidence_from, valid)
            if target is None:
                target = channel_argmax(p_ref)
        loss = region_normalised_ce(supervised_logits, target, regions, weights, voxel_weights, self.normalise)
        with torch.no_grad():
            counts = torch.stack([regions.uc.sum(), regions.us.sum(), regions.dc.sum(), regions.ds.sum()]).double()
            n = valid.sum().double() if valid is not None else counts.new_tensor(float(regions.us.numel()))
            # one host transfer for all stats
            values = torch.cat([counts / n.clamp(min=1.0), threshold.thresholds.to(counts)]).tolist()
        keys = [f"frac_{r}" for r in REGION_NAMES] + [f"tau_{c}" for c in range(self.num_classes)]
        return loss, dict(zip(keys, values))

    def unlabeled(self, supervised_logits: torch.Tensor, reference_logits: torch.Tensor,
                  update_thresholds: bool = True,
                  voxel_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """Unlabeled branch: pseudo-label ``argmax`` of the (detached) reference, reference confidence. Optional
        ``voxel_weights`` (B, *spatial) weight each voxel's CE within its region (see :func:`region_normalised_ce`),
        e.g. a pseudo-label's predicted quality."""
        return self._branch(supervised_logits, reference_logits, None, None, self.reference_thresholds,
                            "reference", self.unlabeled_weights, update_thresholds, voxel_weights)

    def labeled(self, supervised_logits: torch.Tensor, reference_logits: torch.Tensor, target: torch.Tensor,
                update_thresholds: bool = True) -> tuple[torch.Tensor, dict[str, float]]:
        """Labeled branch: ground truth ``target`` (B, 1, *spatial) or (B, *spatial), class indices (any dtype);
        voxels equal to ``ignore_label`` are left out."""
        spatial = (supervised_logits.shape[0], *supervised_logits.shape[2:])
        if target.dim() == supervised_logits.dim():
            if target.shape[1] != 1:
                # several target channels means region-based (or one-hot) training
                raise SSLInputError(REGIONS_NOT_SUPPORTED)
            target = target[:, 0]
        if tuple(target.shape) != spatial:
            raise ValueError(f"target shape {tuple(target.shape)} does not match the logits' voxels {spatial}")
        target = target.long()
        valid = None
        if self.ignore_label is not None:
            valid = target != self.ignore_label
            target = torch.where(valid, target, torch.zeros_like(target))  # any in-range class; masked out
        return self._branch(supervised_logits, reference_logits, target, valid, self.supervised_thresholds,
                            "supervised", self.labeled_weights, update_thresholds)

    def forward(self, supervised_logits: torch.Tensor, reference_logits: torch.Tensor,
                target: torch.Tensor | None = None,
                update_thresholds: bool = True) -> tuple[torch.Tensor, dict[str, float]]:
        """``labeled`` when a target is given, else ``unlabeled``."""
        if target is None:
            return self.unlabeled(supervised_logits, reference_logits, update_thresholds)
        return self.labeled(supervised_logits, reference_logits, target, update_thresholds)
