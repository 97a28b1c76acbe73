"""QG-SSL losses (QAR, PL-QW weights and loss, the MetaSSL combination) against hand computations."""

from __future__ import annotations

import math

import pytest
import torch

from nnunet_ssl.losses import quality as qg
from nnunet_ssl.losses.metassl import RegionWeights, assign_regions, region_normalised_ce


def test_qar_loss_is_one_minus_mean_quality():
    q = torch.tensor([[0.2, 0.4], [0.6, 0.8]], dtype=torch.float16)
    loss = qg.qar_loss(q)
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(0.5, abs=1e-3)


def test_quality_weights_per_sample_and_per_class_by_hand():
    q = torch.tensor([[0.9, 0.7], [0.5, 0.3], [0.6, 0.4]])
    # per sample: means 0.8, 0.4, 0.5 -> 0.8^2, dropped (< 0.5), 0.5^2 (equal to tau is kept)
    assert torch.allclose(qg.quality_weights(q, 0.5, 2.0, "sample"), torch.tensor([0.64, 0.0, 0.25]))
    assert torch.allclose(qg.quality_weights(q, 0.5, 2.0, "class"),
                          torch.tensor([[0.81, 0.49], [0.25, 0.0], [0.36, 0.0]]))
    assert torch.allclose(qg.quality_weights(q, 0.0, 1.0, "sample"), torch.tensor([0.8, 0.4, 0.5]))
    assert torch.allclose(qg.quality_weights(q, 0.85, 3.0, "class"),
                          torch.tensor([[0.729, 0.0], [0.0, 0.0], [0.0, 0.0]]))
    assert qg.kept_fraction(q, 0.5, "sample") == pytest.approx(2 / 3)
    assert qg.kept_fraction(q, 0.5, "class") == pytest.approx(4 / 6)
    q.requires_grad_(True)
    assert not qg.quality_weights(q).requires_grad
    with pytest.raises(ValueError):
        qg.quality_weights(q, per="voxel")
    with pytest.raises(ValueError):
        qg.quality_weights(q[0])


def test_voxel_weights_follow_the_pseudo_label_class():
    labels = torch.tensor([[0, 1, 2, 2], [2, 0, 0, 1]])
    class_w = torch.tensor([[0.1, 0.2], [0.3, 0.4]])
    bg = torch.tensor([0.7, 0.9])
    assert torch.allclose(qg.voxel_weights(labels, class_w, bg),
                          torch.tensor([[0.7, 0.1, 0.2, 0.2], [0.4, 0.9, 0.9, 0.3]]))
    w = qg.pseudo_label_voxel_weights(labels, torch.tensor([[0.9, 0.7], [0.2, 0.4]]), per="sample")
    assert torch.allclose(w, torch.tensor([[0.64] * 4, [0.0] * 4]))


def _hand_pl_qw(logits: list, labels: list, weights: list, smooth: float = 1e-6) -> float:
    """Eq. 8 with plain Python loops: 0.5 mean CE + 0.5 (1 - mean_fg soft Dice) per sample, weighted mean."""
    num, den = 0.0, 0.0
    for b, sample in enumerate(logits):
        k, n = len(sample), len(sample[0])
        probs = []
        ce = 0.0
        for i in range(n):
            z = [sample[c][i] for c in range(k)]
            s = sum(math.exp(v) for v in z)
            p = [math.exp(v) / s for v in z]
            probs.append(p)
            ce -= math.log(p[labels[b][i]])
        ce /= n
        dices = []
        for c in range(1, k):
            inter = sum(probs[i][c] for i in range(n) if labels[b][i] == c)
            total = sum(probs[i][c] for i in range(n)) + sum(1 for i in range(n) if labels[b][i] == c)
            dices.append((2 * inter + smooth) / (total + smooth))
        loss = 0.5 * ce + 0.5 * (1 - sum(dices) / len(dices))
        num += weights[b] * loss
        den += weights[b]
    return num / (den + 1e-8)


def test_pl_qw_per_sample_loss_by_hand():
    torch.manual_seed(0)
    logits = torch.randn(3, 3, 5)
    labels = torch.tensor([[0, 1, 2, 1, 0], [2, 2, 0, 0, 1], [0, 0, 0, 0, 1]])
    q = torch.tensor([[0.9, 0.7], [0.5, 0.3], [0.6, 0.4]])  # weights 0.64, 0, 0.25
    loss = qg.quality_weighted_pseudo_label_loss(logits, labels, q, tau=0.5, temperature=2.0, per="sample")
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(_hand_pl_qw(logits.tolist(), labels.tolist(), [0.64, 0.0, 0.25]), rel=1e-5)
    # tau = 0 and T = 0: every weight is 1, the plain per-sample mean
    plain = qg.quality_weighted_pseudo_label_loss(logits, labels, q, tau=0.0, temperature=0.0)
    assert plain.item() == pytest.approx(_hand_pl_qw(logits.tolist(), labels.tolist(), [1, 1, 1]), rel=1e-5)


def test_rejected_samples_get_no_gradient_and_do_not_change_the_loss():
    torch.manual_seed(1)
    logits = torch.randn(3, 3, 4, 4, requires_grad=True)
    labels = torch.randint(0, 3, (3, 4, 4))
    q = torch.tensor([[0.9, 0.8], [0.2, 0.3], [0.7, 0.6]])  # sample 1 below tau
    for per in ("sample", "class"):
        loss = qg.quality_weighted_pseudo_label_loss(logits, labels, q, per=per)
        (grad,) = torch.autograd.grad(loss, logits)
        assert torch.all(grad[1] == 0) and grad[0].abs().sum() > 0 and grad[2].abs().sum() > 0
        changed = logits.detach().clone()
        changed[1] = torch.randn(3, 4, 4) * 10
        assert qg.quality_weighted_pseudo_label_loss(changed, labels, q, per=per).item() == \
            pytest.approx(loss.item(), rel=1e-6)
    # all below tau: loss 0 with a zero (finite) gradient, as the official code's constant 0
    loss = qg.quality_weighted_pseudo_label_loss(logits, labels, torch.full((3, 2), 0.1))
    (grad,) = torch.autograd.grad(loss, logits)
    assert loss.item() == 0.0 and torch.all(grad == 0)


def test_per_class_mode_by_hand_and_binary_equals_per_sample():
    torch.manual_seed(2)
    logits = torch.randn(2, 3, 6)
    labels = torch.tensor([[0, 1, 1, 2, 2, 0], [1, 2, 0, 0, 0, 2]])
    q = torch.tensor([[0.9, 0.6], [0.4, 0.8]])
    w_class = torch.tensor([[0.81, 0.36], [0.0, 0.64]])
    w_sample = torch.tensor([0.75**2, 0.6**2])
    ce = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    omega = torch.tensor([[w_sample[0], 0.81, 0.81, 0.36, 0.36, w_sample[0]],
                          [0.0, 0.64, w_sample[1], w_sample[1], w_sample[1], 0.64]])
    dice = qg.per_sample_soft_dice(torch.softmax(logits, 1), labels)
    expected = 0.5 * (omega * ce).sum() / omega.sum() + 0.5 * (w_class * (1 - dice)).sum() / w_class.sum()
    loss = qg.quality_weighted_pseudo_label_loss(logits, labels, q, per="class")
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)

    binary_logits, binary_labels = torch.randn(4, 2, 3, 5), torch.randint(0, 2, (4, 3, 5))
    bq = torch.tensor([[0.9], [0.3], [0.55], [0.7]])
    assert qg.quality_weighted_pseudo_label_loss(binary_logits, binary_labels, bq, per="class").item() == \
        pytest.approx(qg.quality_weighted_pseudo_label_loss(binary_logits, binary_labels, bq).item(), rel=1e-5)


def test_soft_dice_by_hand():
    probs = torch.tensor([[[0.9, 0.2, 0.1], [0.1, 0.8, 0.9]]])  # (1, 2, 3)
    labels = torch.tensor([[0, 1, 1]])
    # class 1: intersection 1.7, sum p 1.8, sum y 2
    assert qg.per_sample_soft_dice(probs, labels, smooth=0).item() == pytest.approx(3.4 / 3.8)


def test_gradient_flows_through_frozen_predictor_into_logits_only(tmp_path):
    from nnunet_ssl.quality.predictor import QualityPredictor, load_quality_predictor, save_quality_checkpoint

    torch.manual_seed(3)
    net = QualityPredictor(1, 3, "torch.nn.Conv2d", [4, 8], [[3, 3], [3, 3]], [[1, 1], [2, 2]], [1, 1],
                           norm_op="torch.nn.InstanceNorm2d", norm_op_kwargs={"affine": True})
    save_quality_checkpoint(tmp_path / "q.pth", net, {})
    predictor = load_quality_predictor(tmp_path / "q.pth")
    before = {k: v.clone() for k, v in predictor.state_dict().items()}
    assert not predictor.training and not any(p.requires_grad for p in predictor.parameters())
    image = torch.randn(2, 1, 8, 8)
    logits = torch.randn(2, 3, 8, 8, requires_grad=True)
    q = predictor(image, torch.softmax(logits, 1))
    assert q.shape == (2, 2)
    loss = qg.qar_loss(q)
    assert loss.item() == pytest.approx(1 - q.mean().item())
    loss.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    assert all(p.grad is None for p in predictor.parameters())
    torch.optim.SGD([logits], lr=1.0).step()  # a step on the student side leaves the predictor as it was
    for k, v in predictor.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_region_ce_with_voxel_weights_reduces_to_metassl_and_by_hand():
    torch.manual_seed(4)
    sup, ref = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5)
    regions = assign_regions(sup, ref, torch.tensor([0.5, 0.5, 0.5]))
    weights = RegionWeights(uc=50.0, us=40.0, dc=0.2, ds=6.4)
    target = ref.argmax(1)
    ones = torch.ones(2, 4, 5)
    assert region_normalised_ce(sup, target, regions, weights, ones).item() == \
        pytest.approx(region_normalised_ce(sup, target, regions, weights).item(), rel=1e-6)
    omega = torch.rand(2, 4, 5)
    ce = torch.nn.functional.cross_entropy(sup, target, reduction="none")
    expected = sum(w * (omega * ce)[m].sum() / (omega[m].sum() + 1)
                   for m, w in ((regions.uc_fg, 50.0), (regions.uc_bg, 50.0), (regions.us, 40.0),
                                (regions.dc, 0.2), (regions.ds, 6.4)))
    assert region_normalised_ce(sup, target, regions, weights, omega).item() == \
        pytest.approx(float(expected), rel=1e-5)
    # a sample with weight 0 gets no gradient
    sup.requires_grad_(True)
    omega[1] = 0
    (grad,) = torch.autograd.grad(region_normalised_ce(sup, target, regions, weights, omega), sup)
    assert torch.all(grad[1] == 0) and grad[0].abs().sum() > 0


def test_metassl_unlabeled_branch_with_voxel_weights():
    from nnunet_ssl.losses.metassl import MetaSSLLoss

    torch.manual_seed(5)
    sup, ref = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5)
    plain, ones, weighted = MetaSSLLoss(3), MetaSSLLoss(3), MetaSSLLoss(3)
    loss, stats = plain.unlabeled(sup, ref)
    loss_ones, stats_ones = ones.unlabeled(sup, ref, voxel_weights=torch.ones(2, 4, 5))
    assert loss_ones.item() == pytest.approx(loss.item(), rel=1e-6) and stats_ones == stats
    omega = torch.rand(2, 4, 5)
    loss_w, _ = weighted.unlabeled(sup, ref, voxel_weights=omega)
    # same thresholds and regions as the plain call, then the weighted form by hand
    regions = assign_regions(sup, ref, weighted.reference_thresholds)
    expected = region_normalised_ce(sup, ref.argmax(1), regions, weighted.unlabeled_weights, omega)
    assert loss_w.item() == pytest.approx(expected.item(), rel=1e-6) and loss_w.item() != pytest.approx(loss.item())


def test_half_precision_and_shape_errors():
    logits = torch.randn(2, 3, 4, 4).half()
    labels = torch.randint(0, 3, (2, 4, 4))
    q = torch.rand(2, 2).half()
    assert qg.quality_weighted_pseudo_label_loss(logits, labels, q, tau=0).dtype == torch.float32
    with pytest.raises(ValueError):
        qg.quality_weighted_pseudo_label_loss(logits, labels, torch.rand(2, 3))
    with pytest.raises(ValueError):
        qg.quality_weighted_pseudo_label_loss(logits, labels[:, :2], q)


def test_quality_threshold_follows_the_ema_of_the_batch_mean_below_tau():
    gate = qg.QualityThreshold(momentum=0.99)
    assert gate.threshold(0.5) == 0.5 and math.isnan(gate.mean())  # nothing seen yet: the paper's tau
    gate.update(0.2)
    assert gate.mean() == pytest.approx(0.2) and gate.threshold(0.5) == pytest.approx(0.2)  # bias-corrected
    gate.update(0.4)
    # (0.01 * 0.99 * 0.2 + 0.01 * 0.4) / (1 - 0.99^2) = (0.99 * 0.2 + 0.4) / 1.99
    assert gate.mean() == pytest.approx(0.598 / 1.99)
    assert gate.threshold(0.5) == pytest.approx(0.598 / 1.99) and gate.threshold(0.25) == 0.25  # min, not max
    gate.update(float("nan"))
    assert gate.steps == 2
    halves = qg.QualityThreshold(momentum=0.5)
    halves.update(0.2)
    halves.update(0.8)
    # ema = 0.5 (0.5 * 0.2) + 0.5 * 0.8 = 0.45, corrected by 1 - 0.25
    assert halves.mean() == pytest.approx(0.6) and halves.threshold(0.5) == 0.5 and halves.threshold(0.7) == \
        pytest.approx(0.6)
    restored = qg.QualityThreshold(momentum=0.5)
    restored.load_state_dict(halves.state_dict())
    assert restored.mean() == pytest.approx(0.6) and restored.steps == 2
    with pytest.raises(ValueError):
        qg.QualityThreshold(momentum=1.0)


def test_adaptive_gate_keeps_what_the_fixed_threshold_drops_by_hand():
    # per-sample qualities 0.25, 0.15, 0.4, batch mean 0.8 / 3: the paper's tau = 0.5 keeps nothing
    q = torch.tensor([[0.3, 0.2], [0.1, 0.2], [0.4, 0.4]])
    assert torch.equal(qg.quality_weights(q, 0.5, 2.0), torch.zeros(3)) and qg.kept_fraction(q, 0.5) == 0.0
    gate = qg.QualityThreshold()
    gate.update(float(q.mean()))
    tau = gate.threshold(0.5)
    assert tau == pytest.approx(0.8 / 3)
    assert torch.allclose(qg.quality_weights(q, tau, 2.0), torch.tensor([0.0, 0.0, 0.16]))
    assert qg.kept_fraction(q, tau) == pytest.approx(1 / 3)
    # per class, the same tau_t for every class: 0.3 and 0.4, 0.4 pass
    assert torch.allclose(qg.quality_weights(q, tau, 2.0, "class"),
                          torch.tensor([[0.09, 0.0], [0.0, 0.0], [0.16, 0.16]]))
