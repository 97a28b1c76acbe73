"""C3S3's losses against hand computations: sharpening, the competition that picks the winner, the loser's MSE, the
view cosine, ODCL on a hand-made feature map (two and several classes), the voxel sample and its memory."""

from __future__ import annotations

import math

import pytest
import torch

from nnunet_ssl.losses.contrastive import (
    VoxelProjector,
    competition_loss,
    cosine_consistency,
    draw_voxels,
    gather_voxels,
    odcl_loss,
    odcl_masks,
    sharpen,
    sharpened_mse,
)


def _odcl_by_hand(sim: list[float], inter: list[int], union: list[int], tau: float) -> float:
    """The official ContrastiveLoss written out voxel by voxel."""
    n = len(sim)
    s1 = sum(math.exp((1 - inter[u]) * sim[u] / tau) for u in range(n))
    s2 = sum(math.exp(union[u] * sim[u] / tau) for u in range(n))
    l1 = sum(-math.log(math.exp(inter[v] * sim[v] / tau) / (s1 + math.exp(inter[v] * sim[v] / tau)))
             for v in range(n)) / n
    l2 = sum(-math.log(math.exp((1 - union[v]) * sim[v] / tau) / (s2 + math.exp((1 - union[v]) * sim[v] / tau)))
             for v in range(n)) / n
    return l1 + l2


def test_sharpening_by_hand():
    probs = torch.tensor([0.6, 0.3, 0.1]).view(1, 3, 1)
    raised = [0.6 ** 10, 0.3 ** 10, 0.1 ** 10]  # T = 0.1
    expected = [r / sum(raised) for r in raised]
    assert sharpen(probs, 0.1)[0, :, 0].tolist() == pytest.approx(expected, rel=1e-5)
    # the README's binary form P^(1/T) / (P^(1/T) + (1 - P)^(1/T)) for two classes; T = 1 changes nothing
    two = torch.tensor([0.7, 0.3]).view(1, 2, 1)
    assert float(sharpen(two, 0.5)[0, 0, 0]) == pytest.approx(0.49 / (0.49 + 0.09), rel=1e-6)
    assert torch.allclose(sharpen(probs, 1.0), probs)
    # far beyond float32's range of P^(1/T): still a distribution
    tiny = torch.tensor([1e-6, 2e-6, 1 - 3e-6]).view(1, 3, 1)
    assert float(sharpen(tiny, 0.01).sum()) == pytest.approx(1.0)


def test_loser_mse_to_the_sharpened_winner_by_hand():
    student = torch.log(torch.tensor([0.5, 0.5])).view(1, 2, 1, 1).requires_grad_()
    reference = torch.log(torch.tensor([0.75, 0.25])).view(1, 2, 1, 1).requires_grad_()
    p = 0.75 ** 2 / (0.75 ** 2 + 0.25 ** 2)  # T = 0.5: 0.9
    loss = sharpened_mse(student, reference, 0.5)
    assert float(loss.detach()) == pytest.approx(((0.5 - p) ** 2 + (0.5 - (1 - p)) ** 2) / 2, rel=1e-5)
    loss.backward()
    assert student.grad.abs().sum() > 0 and reference.grad is None  # the winner's labels are detached


def test_competition_picks_the_network_with_the_lower_alpha_ce_plus_dice():
    labels = torch.tensor([[0, 1, 1, 2]])
    probs_a = torch.tensor([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.3, 0.6, 0.1], [0.1, 0.1, 0.8]]).T[None]
    probs_b = torch.tensor([[0.4, 0.3, 0.3], [0.4, 0.4, 0.2], [0.5, 0.3, 0.2], [0.2, 0.2, 0.6]]).T[None]

    def by_hand(probs, alpha):
        ce = -sum(math.log(float(probs[0, c, v])) for v, c in enumerate(labels[0].tolist())) / 4
        dice = []
        for c in (1, 2):
            p = probs[0, c]
            y = (labels[0] == c).float()
            dice.append(1 - (2 * float((p * y).sum()) + 1e-5) / (float((p * p).sum() + (y * y).sum()) + 1e-5))
        return alpha * ce + (1 - alpha) * sum(dice) / 2

    for alpha in (0.8, 0.5):
        a = float(competition_loss(probs_a.log(), labels, alpha))
        b = float(competition_loss(probs_b.log(), labels, alpha))
        assert a == pytest.approx(by_hand(probs_a, alpha), rel=1e-5)
        assert b == pytest.approx(by_hand(probs_b, alpha), rel=1e-5)
        assert a < b  # A is the winner
    # voxels of the ignore label count nowhere: ignoring the last voxel equals dropping it
    ignored = competition_loss(probs_a.log(), torch.tensor([[0, 1, 1, 9]]), 0.8, ignore_label=9)
    dropped = competition_loss(probs_a.log()[..., :3], labels[:, :3], 0.8)
    assert float(ignored) == pytest.approx(float(dropped), rel=1e-5)


def test_view_cosine_along_the_last_axis_by_hand():
    first = torch.tensor([[[1.0, 0.0], [1.0, 1.0]]])  # (1, 2, 2): two vectors along the last axis
    second = torch.tensor([[[0.0, 1.0], [2.0, 2.0]]])
    assert float(cosine_consistency(first, second)) == pytest.approx((1.0 + 0.0) / 2)


def test_odcl_on_a_hand_made_feature_map_two_classes():
    # 2-D features of network A and B at 4 voxels: similarities 1, 0, -1, 0.6
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    b = torch.tensor([[2.0, 0.0], [0.0, 3.0], [-1.0, 0.0], [0.6, 0.8]])
    ya, yb = torch.tensor([1, 1, 0, 0]), torch.tensor([1, 0, 0, 1])
    loss, stats = odcl_loss(a, b, ya, yb, temperature=0.1)
    # I = both foreground, U = either: the official masks
    assert float(loss) == pytest.approx(_odcl_by_hand([1.0, 0.0, -1.0, 0.6], [1, 0, 0, 0], [1, 1, 0, 1], 0.1),
                                        rel=1e-5)
    assert stats == {"odcl_intersection": 0.25, "odcl_union": 0.75}
    # features of (n, K, D) with labels (n, K) are the same voxels
    reshaped, _ = odcl_loss(a.view(2, 2, 2), b.view(2, 2, 2), ya.view(2, 2), yb.view(2, 2), temperature=0.1)
    assert float(reshaped) == pytest.approx(float(loss), rel=1e-6)
    # the similarity is the cosine: scaling a feature changes nothing
    scaled, _ = odcl_loss(a * 5, b, ya, yb, temperature=0.1)
    assert float(scaled) == pytest.approx(float(loss), rel=1e-5)


def test_odcl_several_classes_same_foreground_class_is_the_intersection():
    ya, yb = torch.tensor([2, 1, 0, 2, 3]), torch.tensor([2, 2, 0, 0, 3])
    inter, union = odcl_masks(ya, yb)
    assert inter.tolist() == [True, False, False, False, True]  # 1 vs 2 is a disagreement
    assert union.tolist() == [True, True, False, True, True]
    angles = torch.tensor([0.0, 1.0, 2.0, 0.5, 3.0])
    a = torch.stack([torch.ones(5), torch.zeros(5)], 1)
    b = torch.stack([angles.cos(), angles.sin()], 1)
    loss, stats = odcl_loss(a, b, ya, yb, temperature=0.1)
    assert float(loss) == pytest.approx(_odcl_by_hand(angles.cos().tolist(), [1, 0, 0, 0, 1], [1, 1, 0, 1, 1], 0.1),
                                        rel=1e-5)
    assert stats["odcl_intersection"] == pytest.approx(0.4) and stats["odcl_union"] == pytest.approx(0.8)
    # finite in float32 where the official exp(s / tau) overflows (tau = 0.001)
    assert math.isfinite(float(odcl_loss(a, b, ya, yb, temperature=0.001)[0]))


def test_the_sample_size_is_honoured_and_gathered_at_the_drawn_voxels():
    g = torch.Generator().manual_seed(0)
    index = draw_voxels(3, 1000, 64, generator=g)
    assert index.shape == (3, 64) and all(len(set(row.tolist())) == 64 for row in index)  # without replacement
    assert int(index.min()) >= 0 and int(index.max()) < 1000
    assert torch.equal(draw_voxels(2, 10, 50), torch.arange(10).expand(2, 10))  # more than the patch: all voxels
    features = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).view(2, 3, 4, 5)  # (n, C, H, W)
    picked = gather_voxels(features, torch.tensor([[0, 7], [19, 3]]))
    assert picked.shape == (2, 2, 3)
    assert picked[0, 1].tolist() == features[0, :, 1, 2].tolist()  # flat 7 = (1, 2) of 4 x 5
    assert picked[1, 0].tolist() == features[1, :, 3, 4].tolist()
    # the projector is a per-voxel map: on gathered voxels it equals a 1x1 convolution read there
    projector = VoxelProjector(3, 8)
    conv = projector(features.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(2, 8, 4, 5)
    assert torch.allclose(projector(picked), gather_voxels(conv, torch.tensor([[0, 7], [19, 3]])), atol=1e-6)


def _saved_elements(m: int, dim: int = 16) -> int:
    """Elements autograd keeps for ODCL's backward on m voxels."""
    a = torch.randn(m, dim, requires_grad=True)
    b = torch.randn(m, dim, requires_grad=True)
    labels = torch.randint(0, 3, (m,))
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = odcl_loss(a, b, labels, labels.roll(1), 0.1)
    loss.backward()
    assert a.grad is not None and b.grad is not None
    return total


def test_memory_is_linear_in_the_sample():
    small, large = _saved_elements(500), _saved_elements(2000)
    # four times the voxels, four times the memory (a voxel-pair matrix would be sixteen times)
    assert 3.5 * small <= large <= 4.5 * small
    assert large < 10 * 16 * 2000  # under ten copies of the (voxels x 16) features
