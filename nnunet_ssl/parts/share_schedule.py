"""M&N's learning-rate-guided share of pseudo-labeled samples and its learning-rate schedules, in epochs.

Yeung et al., "Semi-Supervised 3D Medical Segmentation from 2D Natural Images Pretrained Model", MLMI 2025; official
code pakheiyeung/M-N (``train.py``: ``create_loaders`` and ``create_model``). With E_tr the transition epoch and
E_max the last epoch, a batch of B samples holds ``n_p = floor((e - E_tr) / (E_max - E_tr) * B)`` pseudo-labeled
samples from epoch E_tr on (0 before) and ``B - n_p`` labeled ones; the learning rate warms up linearly, follows a
cosine cycle down to E_tr and restarts for a second cosine cycle down to E_max, so the pseudo-labeled share starts to
rise exactly when the learning rate restarts. Pure functions of the epoch: a resumed run recomputes them.
"""

from __future__ import annotations

import math


def transition_epoch(num_epochs: int, fraction: float) -> int:
    """E_tr: the epoch at which pseudo-labels start, ``fraction`` of the run rounded half up (official 500 of 4000,
    a fraction of 0.125), at most the last epoch."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"the transition fraction must be in [0, 1), got {fraction}")
    return min(int(math.floor(fraction * num_epochs + 0.5)), max(num_epochs - 1, 0))


def pseudo_label_progress(epoch: int, transition: int, max_epochs: int) -> float:
    """``(e - E_tr) / (E_max - E_tr)`` for ``e >= E_tr``, 0 before; in [0, 1)."""
    if epoch < transition or max_epochs <= transition:
        return 0.0
    return min((epoch - transition) / (max_epochs - transition), 1.0)


def pseudo_label_count(epoch: int, transition: int, max_epochs: int, batch_size: int) -> int:
    """The official ``n_p``: pseudo-labeled samples in a batch of ``batch_size`` at epoch ``epoch`` (0 before E_tr;
    B - 1 at most, as e < E_max)."""
    return int(math.floor(pseudo_label_progress(epoch, transition, max_epochs) * batch_size))


def poly_factor(epoch: int, length: int, exponent: float = 0.9) -> float:
    """nnU-Net's poly schedule ``(1 - e / length)^0.9`` (``PolyLRScheduler``), as a factor of the initial rate."""
    if length <= 0:
        return 1.0
    return float(max(1.0 - epoch / length, 0.0) ** exponent)


def poly_restart_factor(epoch: int, transition: int, max_epochs: int, exponent: float = 0.9) -> float:
    """nnU-Net's poly schedule over [0, E_tr), restarted at E_tr for a second poly cycle over [E_tr, E_max): M&N's
    restart with nnU-Net's own decay shape. Without a transition (E_tr = 0) it is nnU-Net's schedule."""
    if epoch < transition:
        return poly_factor(epoch, transition, exponent)
    return poly_factor(epoch - transition, max_epochs - transition, exponent)


def warmup_cosine_restart_factor(epoch: int, warmup: int, transition: int, max_epochs: int,
                                 start_factor: float = 0.01) -> float:
    """The official schedule as a factor of the initial rate: linear warm-up from ``start_factor`` over ``warmup``
    epochs (torch's LinearLR), a cosine cycle to 0 over [warmup, E_tr) and a second one over [E_tr, E_max)
    (CosineAnnealingWarmRestarts, eta_min 0, chained by SequentialLR at the milestones warmup and E_tr)."""
    if epoch < warmup:
        return start_factor + (1.0 - start_factor) * epoch / warmup
    if epoch < transition:
        return 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup) / (transition - warmup)))
    length = max_epochs - transition
    return 0.5 * (1.0 + math.cos(math.pi * (epoch - transition) / length)) if length > 0 else 1.0
