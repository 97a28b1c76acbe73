"""The self-paced SupCon loss of the meta-label contrastive plug-in against hand computations: the self-paced
weights (hard and soft), the age schedule, positives from meta-labels, the loss on hand-made features, and the
meta-label encodings."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from nnunet_ssl.losses.self_paced import (
    age_schedule,
    pair_losses,
    position_bins,
    positive_mask,
    self_paced_supcon,
    self_paced_weights,
    stable_label,
)


def test_self_paced_weights_hard_and_soft_by_hand():
    losses = torch.tensor([[0.5, 2.0, 6.0], [1.0, 1.9999, 2.0001]])
    assert self_paced_weights(losses, 2.0, "hard").tolist() == [[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]]
    soft = self_paced_weights(losses, 2.0, "soft")
    assert torch.allclose(soft, torch.tensor([[0.75, 0.0, 0.0], [0.5, 0.00005, 0.0]]), atol=1e-6)
    assert self_paced_weights(losses, 2.0, "none").tolist() == [[1.0] * 3] * 2
    # a larger age keeps more: the curriculum
    assert self_paced_weights(losses, 7.0, "hard").tolist() == [[1.0] * 3] * 2
    assert self_paced_weights(losses, 8.0, "soft")[0].tolist() == pytest.approx([1 - 0.5 / 8, 0.75, 0.25])
    with pytest.raises(ValueError, match="mode"):
        self_paced_weights(losses, 1.0, "linear")


def test_age_grows_with_the_official_power_schedule():
    assert age_schedule(0.0, 5.0, 60.0, 0.5) == 5.0
    assert age_schedule(0.25, 5.0, 60.0, 0.5) == pytest.approx(5 + 55 * 0.5)
    assert age_schedule(0.25, 5.0, 60.0, 1.0) == pytest.approx(5 + 55 * 0.25)
    assert age_schedule(1.0, 5.0, 60.0, 0.5) == age_schedule(3.0, 5.0, 60.0, 0.5) == 60.0
    assert age_schedule(-1.0, 5.0, 60.0, 0.5) == 5.0


def test_positives_and_negatives_from_meta_labels_on_a_constructed_batch():
    # rows: labeled case a (bin 0), labeled case b (bin 2), both views of unlabeled case c (bin 1), labeled case c
    # (bin 0)
    position = torch.tensor([0, 2, 1, 1, 0])
    case = torch.tensor([stable_label(k) for k in ("a", "b", "c", "c", "c")])
    anchors = torch.arange(5)
    assert positive_mask(position[anchors], position, anchors).int().tolist() == [
        [0, 0, 0, 0, 1], [0, 0, 0, 0, 0], [0, 0, 0, 1, 0], [0, 0, 1, 0, 0], [1, 0, 0, 0, 0]]
    assert positive_mask(case[anchors], case, anchors).int().tolist() == [
        [0, 0, 0, 0, 0], [0, 0, 0, 0, 0], [0, 0, 0, 1, 1], [0, 0, 1, 0, 1], [0, 0, 1, 1, 0]]
    # anchors of one rank (rows 2 and 3 of the gathered batch): the anchor itself is never its own positive
    rows = torch.tensor([2, 3])
    assert positive_mask(case[rows], case, rows).int().tolist() == [[0, 0, 0, 1, 1], [0, 0, 1, 0, 1]]


# hand-made features: z0 = z1 = (1, 0), z2 = (0, 1), z3 = (-1, 0); labels 0, 0, 1, 1; tau = 1
FEATURES = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
LABELS = torch.tensor([0, 0, 1, 1])
E = math.e
L01 = math.log(E + 1 + 1 / E) - 1  # anchor 0 (and 1): similarities 1, 0, -1 to the others, positive the first
L23 = math.log(3.0)  # anchor 2: similarities 0, 0, 0
L32 = math.log(2 / E + 1)  # anchor 3: similarities -1, -1, 0, positive the last


def test_pair_losses_on_a_hand_made_feature_map():
    losses = pair_losses(FEATURES, torch.arange(4), 1.0)
    assert losses[0, 1] == pytest.approx(L01) and losses[1, 0] == pytest.approx(L01)
    assert losses[2, 3] == pytest.approx(L23) and losses[3, 2] == pytest.approx(L32)
    assert losses[0, 3] == pytest.approx(math.log(E + 1 + 1 / E) + 1)
    assert torch.isinf(torch.diagonal(losses)).all()
    # tau scales the similarities
    half = pair_losses(FEATURES, torch.arange(4), 0.5)
    assert half[0, 1] == pytest.approx(math.log(E**2 + 1 + E**-2) - 2)


def test_supcon_and_its_self_paced_weighting_by_hand():
    anchors = torch.arange(4)
    loss, stats = self_paced_supcon(FEATURES, LABELS, anchors, 1.0, 100.0, "none")
    assert float(loss) == pytest.approx((2 * L01 + L23 + L32) / 4)
    assert stats["kept"] == 1.0 and stats["positives"] == pytest.approx(4 / 12) and stats["anchors"] == 1.0
    # soft, gamma 1.5: w = 1 - l / 1.5 per positive pair, renormalised by their mean
    w = [1 - L01 / 1.5, 1 - L01 / 1.5, 1 - L23 / 1.5, 1 - L32 / 1.5]
    weighted = (w[0] * L01 + w[1] * L01 + w[2] * L23 + w[3] * L32) / 4
    loss, stats = self_paced_supcon(FEATURES, LABELS, anchors, 1.0, 1.5, "soft", renormalise=False)
    assert float(loss) == pytest.approx(weighted) and stats["kept"] == pytest.approx(sum(w) / 4)
    loss, _ = self_paced_supcon(FEATURES, LABELS, anchors, 1.0, 1.5, "soft")
    assert float(loss) == pytest.approx(weighted / (sum(w) / 4))
    # hard, gamma 1: the pair (2, 3) with l = log 3 > 1 is dropped, (3, 2) with l = 0.55 kept
    loss, stats = self_paced_supcon(FEATURES, LABELS, anchors, 1.0, 1.0, "hard", renormalise=False)
    assert float(loss) == pytest.approx((2 * L01 + L32) / 4) and stats["kept"] == 0.75
    # an anchor without positives leaves the mean; the denominators still hold every row
    loss, stats = self_paced_supcon(FEATURES, torch.tensor([0, 0, 1, 2]), anchors, 1.0, 100.0, "none")
    assert float(loss) == pytest.approx(L01) and stats["anchors"] == 0.5
    # this rank's anchors only
    loss, _ = self_paced_supcon(FEATURES, LABELS, torch.tensor([2, 3]), 1.0, 100.0, "none")
    assert float(loss) == pytest.approx((L23 + L32) / 2)


def test_weights_are_constants_of_the_gradient_and_no_positive_is_a_zero_with_a_graph():
    g = torch.Generator().manual_seed(0)
    raw = torch.randn(6, 8, generator=g, requires_grad=True)
    labels = torch.tensor([0, 1, 0, 1, 2, 2])
    loss, _ = self_paced_supcon(F.normalize(raw, dim=1), labels, torch.arange(6), 0.07, 12.0, "soft",
                                renormalise=False)
    loss.backward()
    # the same loss with the weights computed first and held fixed: an independent loop over the anchors
    z = F.normalize(raw.detach(), dim=1).requires_grad_(True)
    s = z @ z.t() / 0.07
    total = 0.0
    for i in range(6):
        others = [k for k in range(6) if k != i]
        log_den = torch.logsumexp(s[i, others], 0)
        terms = []
        for j in others:
            if labels[j] == labels[i]:
                pair = log_den - s[i, j]
                terms.append(max(0.0, 1 - float(pair.detach()) / 12.0) * pair)
        total = total + sum(terms) / len(terms)
    (total / 6).backward()
    expected = torch.autograd.grad(F.normalize(raw, dim=1), raw, z.grad)[0]
    assert torch.allclose(raw.grad, expected, atol=1e-5)
    # no positive pair anywhere: zero, but every input stays in the graph (DDP needs a gradient for each)
    raw.grad = None
    loss, stats = self_paced_supcon(F.normalize(raw, dim=1), torch.arange(6), torch.arange(6), 0.07, 5.0, "hard")
    assert float(loss.detach()) == 0.0 and loss.requires_grad and math.isnan(stats["kept"]) and stats["positives"] == 0
    loss.backward()
    assert torch.equal(raw.grad, torch.zeros_like(raw))


def test_meta_label_encodings():
    assert stable_label("case_001") == stable_label("case_001") != stable_label("case_002")
    assert stable_label(1) != stable_label("1") and 0 <= stable_label("x") < 2**63
    centres = torch.tensor([0.0, 5.0, 9.99, 10.0, -3.0, 25.0])
    assert position_bins(centres, torch.full((6,), 20.0), 4).tolist() == [0, 1, 1, 2, 0, 3]
    assert position_bins(torch.tensor([3.5]), torch.tensor([8.0]), 1).tolist() == [0]
