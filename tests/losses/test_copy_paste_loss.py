"""BCP's region losses against a hand computation."""

from __future__ import annotations

import math

import pytest
import torch

from nnunet_ssl.losses.copy_paste import region_cross_entropy, region_dice, region_dice_ce


def test_region_terms_by_hand():
    # two classes, one sample of four voxels; logits favour class 1 on voxels 0, 1, class 0 on 2, 3
    logits = torch.tensor([[[0.0, 0.0, 2.0, 0.0], [2.0, 0.0, 0.0, 0.0]]])  # (1, 2, 4)
    target = torch.tensor([[1, 0, 0, 1]])
    region = torch.tensor([True, True, False, False])
    p1 = torch.softmax(logits, 1)[0, 1]  # probabilities of class 1
    ce = [-math.log(float(p1[0])), -math.log(1 - float(p1[1])), -math.log(1 - float(p1[2])), -math.log(float(p1[3]))]
    assert region_cross_entropy(logits, target, region).item() == pytest.approx((ce[0] + ce[1]) / 2, rel=1e-6)
    assert region_cross_entropy(logits, target, ~region).item() == pytest.approx((ce[2] + ce[3]) / 2, rel=1e-6)
    # Dice over both classes in the region {0, 1}: class 1 target (1, 0), class 0 target (0, 1)
    s = 1e-5
    q = [float(p1[0]), float(p1[1])]
    dice1 = (2 * q[0] + s) / (q[0] ** 2 + q[1] ** 2 + 1 + s)
    dice0 = (2 * (1 - q[1]) + s) / ((1 - q[0]) ** 2 + (1 - q[1]) ** 2 + 1 + s)
    assert region_dice(logits, target, region).item() == pytest.approx(1 - (dice0 + dice1) / 2, rel=1e-6)
    expected = 0.5 * (1 - (dice0 + dice1) / 2 + (ce[0] + ce[1]) / 2)
    assert region_dice_ce(logits, target, region).item() == pytest.approx(expected, rel=1e-6)


def test_regions_pool_the_group_and_ignore_other_voxels():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 4, 4, generator=g)
    target = torch.randint(0, 3, (2, 4, 4), generator=g)
    region = torch.zeros(4, 4, dtype=torch.bool)
    region[1:3, :] = True
    # CE: mean over the region's voxels of both samples
    ce = torch.nn.functional.cross_entropy(logits, target, reduction="none")
    assert region_cross_entropy(logits, target, region).item() == pytest.approx(float(ce[:, 1:3].mean()), rel=1e-6)
    # a per-sample region (B, *spatial) gives the same as the shared one
    assert region_dice(logits, target, region.expand(2, 4, 4)).item() == pytest.approx(
        region_dice(logits, target, region).item(), rel=1e-6)
    # voxels outside the region get no gradient; an empty region gives 0 CE
    logits.requires_grad_(True)
    region_dice_ce(logits, target, region).backward()
    assert logits.grad[:, :, 0].abs().sum() == 0 and logits.grad[:, :, 1].abs().sum() > 0
    assert float(region_cross_entropy(logits, target, torch.zeros(4, 4, dtype=torch.bool)).detach()) == 0.0
    # a perfect prediction of the region: CE and Dice near 0
    perfect = torch.nn.functional.one_hot(target, 3).movedim(-1, 1).float() * 50
    assert region_dice_ce(perfect, target, region).item() == pytest.approx(0.0, abs=1e-6)
