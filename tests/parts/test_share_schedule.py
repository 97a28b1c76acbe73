"""M&N's share of pseudo-labeled samples and its learning-rate schedules against hand computations, nnU-Net's own
PolyLRScheduler and the official chain of torch schedulers."""

from __future__ import annotations

import math

import pytest
import torch
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler

from nnunet_ssl.parts.share_schedule import (
    poly_restart_factor,
    pseudo_label_count,
    pseudo_label_progress,
    transition_epoch,
    warmup_cosine_restart_factor,
)


def test_official_pseudo_label_count_by_hand():
    # official LA run: E_tr 500, E_max 4000, batch 5: n_p = floor((e - 500) / 3500 * 5)
    expected = {0: 0, 499: 0, 500: 0, 1199: 0, 1200: 1, 1900: 2, 2599: 2, 2600: 3, 3300: 4, 3999: 4}
    for epoch, n_p in expected.items():
        assert pseudo_label_count(epoch, 500, 4000, 5) == n_p, epoch
    # nnU-Net's 3D batch of 2: one jump halfway through the second phase
    assert [pseudo_label_count(e, 125, 1000, 2) for e in (124, 562, 563, 999)] == [0, 0, 1, 1]
    assert pseudo_label_progress(100, 125, 1000) == 0.0
    assert pseudo_label_progress(125, 125, 1000) == 0.0
    assert pseudo_label_progress(562, 125, 1000) == pytest.approx(437 / 875)


def test_transition_epoch_is_the_fraction_rounded_half_up():
    assert transition_epoch(4000, 500 / 4000) == 500
    assert transition_epoch(1000, 0.125) == 125
    assert transition_epoch(4, 0.125) == 1  # 0.5 rounds up
    assert transition_epoch(2, 0.125) == 0
    assert transition_epoch(1, 0.5) == 0  # never past the last epoch
    with pytest.raises(ValueError, match="transition fraction"):
        transition_epoch(10, 1.0)


def _poly_lrs(length: int) -> list[float]:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = PolyLRScheduler(optimizer, 1.0, length)
    out = []
    for epoch in range(length):
        scheduler.step(epoch)
        out.append(optimizer.param_groups[0]["lr"])
    return out


def test_poly_restart_is_nnunets_poly_twice():
    # without a transition: nnU-Net's own schedule
    assert [poly_restart_factor(e, 0, 12) for e in range(12)] == pytest.approx(_poly_lrs(12))
    # E_tr = 4 of 12: nnU-Net's poly over 4 epochs, then over the remaining 8
    assert [poly_restart_factor(e, 4, 12) for e in range(12)] == pytest.approx(_poly_lrs(4) + _poly_lrs(8))
    assert poly_restart_factor(3, 4, 12) == pytest.approx(0.25 ** 0.9)
    assert poly_restart_factor(4, 4, 12) == 1.0
    assert poly_restart_factor(8, 4, 12) == pytest.approx(0.5 ** 0.9)


def test_warmup_cosine_restart_matches_the_official_torch_chain():
    warmup, transition, epochs = 3, 10, 30
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([parameter], lr=1.0)
    chain = torch.optim.lr_scheduler.SequentialLR(optimizer, schedulers=[
        torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.01, total_iters=warmup),
        torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(optimizer, T_0=transition - warmup, eta_min=0),
        torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(optimizer, T_0=epochs - transition, eta_min=0)],
        milestones=[warmup, transition])
    official = []
    for _ in range(epochs):  # the official loop: train an epoch at the current rate, then step
        official.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        chain.step()
    ours = [warmup_cosine_restart_factor(e, warmup, transition, epochs) for e in range(epochs)]
    assert ours == pytest.approx(official, abs=1e-9)
    # by hand: 0.01 + 0.99 e / 3 during the warm-up, 1 at each cycle's start, the restart at E_tr
    assert ours[1] == pytest.approx(0.01 + 0.99 / 3)
    assert ours[warmup] == ours[transition] == 1.0
    assert ours[transition - 1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 6 / 7)))
    assert ours[20] == pytest.approx(0.5)
