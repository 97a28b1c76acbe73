"""Unit tests of MetaSSL's heterogeneous loss (nnunet_ssl.losses.metassl) on small hand-made tensors."""

from __future__ import annotations

import math
import threading

import pytest
import torch

from nnunet_ssl.errors import SSLInputError
from nnunet_ssl.losses.metassl import (
    AdaptiveClassThreshold,
    MetaSSLLoss,
    Regions,
    RegionWeights,
    assign_regions,
    region_normalised_ce,
)

NEG = -1e4  # a logit whose exp underflows to exactly 0 in float32


def logits_from_probs(probs: list[list[float]]) -> torch.Tensor:
    """(B=1, C, 1, N) logits whose softmax is ``probs`` (one row per voxel)."""
    p = torch.tensor(probs, dtype=torch.float64)
    return torch.log(p).T.reshape(1, p.shape[1], 1, p.shape[0]).float()


# ---------------------------------------------------------------- plain-Python reference, written independently

def _softmax(v: list[float]) -> list[float]:
    m = max(v)
    e = [math.exp(x - m) for x in v]
    return [x / sum(e) for x in e]


def _argmax(v: list[float]) -> int:
    return max(range(len(v)), key=lambda k: v[k])


def _voxels(t: torch.Tensor) -> list[list[float]]:
    b, c = t.shape[:2]
    flat = t.detach().double().reshape(b, c, -1)
    return [flat[i, :, j].tolist() for i in range(b) for j in range(flat.shape[2])]


def reference_branch(sup, ref, target, tau, weights, confidence_from, alpha=0.5, cap=0.9, update=True, valid=None):
    """Loop-per-voxel MetaSSL branch: returns (loss, new tau list, region counts)."""
    ps = [_softmax(v) for v in _voxels(sup)]
    pr = [_softmax(v) for v in _voxels(ref)]
    n = len(ps)
    tgt = [_argmax(p) for p in pr] if target is None else target.reshape(-1).tolist()
    ok = [True] * n if valid is None else valid.reshape(-1).tolist()
    pc = pr if confidence_from == "reference" else ps
    tau = list(tau)
    if update:
        for c in range(len(tau)):
            confs = [max(pc[i]) for i in range(n) if ok[i] and _argmax(pc[i]) == c]
            if confs:
                tau[c] = alpha * sum(confs) / len(confs) + (1 - alpha) * tau[c]
    used = [t if cap is None else min(t, cap) for t in tau]
    acc = {r: [0.0, 0] for r in ("ucfg", "ucbg", "us", "dc", "ds")}
    for i in range(n):
        if not ok[i]:
            continue
        k = _argmax(pc[i])
        confident = max(pc[i]) > used[k]
        if _argmax(ps[i]) == _argmax(pr[i]):
            r = ("ucfg" if k != 0 else "ucbg") if confident else "us"
        else:
            r = "dc" if confident else "ds"
        acc[r][0] += -math.log(ps[i][tgt[i]])
        acc[r][1] += 1
    w = {"ucfg": weights.uc, "ucbg": weights.uc, "us": weights.us, "dc": weights.dc, "ds": weights.ds}
    loss = sum(w[r] * s / (cnt + 1) for r, (s, cnt) in acc.items())
    return loss, tau, {r: cnt for r, (_, cnt) in acc.items()}


def random_pair(shape, seed=0, noise=1.0):
    g = torch.Generator().manual_seed(seed)
    sup = 2.0 * torch.randn(shape, generator=g)
    ref = sup + noise * torch.randn(shape, generator=g)
    return sup, ref


W = RegionWeights(uc=1.0, us=2.0, dc=3.0, ds=4.0)  # distinct weights catch mix-ups


# ---------------------------------------------------------------- region assignment

def test_region_assignment_hand_made():
    # 3 classes; thresholds: class 0 and 1 at 0.9, class 2 at 0.6
    sup = logits_from_probs([
        [0.1, 0.8, 0.1],    # 0: agree on 1, reference conf 0.95 > 0.9          -> UC fg
        [0.7, 0.2, 0.1],    # 1: agree on 0, reference conf 0.95                -> UC bg
        [0.2, 0.2, 0.6],    # 2: agree on 2, reference conf 0.5 <= 0.6          -> US
        [0.6, 0.3, 0.1],    # 3: 0 vs 1, reference conf 0.95                    -> DC
        [0.5, 0.3, 0.2],    # 4: 0 vs 1, reference conf 0.5                     -> DS
        [0.3, 0.3, 0.4],    # 5: agree on 2, reference conf 0.7 > 0.6 (class 2) -> UC fg
        [0.45, 0.35, 0.2],  # 6: agree on 0, reference conf 0.7 <= 0.9          -> US
    ])
    ref = logits_from_probs([
        [0.025, 0.95, 0.025],
        [0.95, 0.025, 0.025],
        [0.25, 0.25, 0.5],
        [0.025, 0.95, 0.025],
        [0.3, 0.5, 0.2],
        [0.15, 0.15, 0.7],
        [0.7, 0.2, 0.1],
    ])
    tau = torch.tensor([0.9, 0.9, 0.6])
    r = assign_regions(sup, ref, tau, "reference")
    got = {name: getattr(r, name)[0, 0].tolist() for name in ("uc_fg", "uc_bg", "us", "dc", "ds")}
    assert got["uc_fg"] == [True, False, False, False, False, True, False]
    assert got["uc_bg"] == [False, True, False, False, False, False, False]
    assert got["us"] == [False, False, True, False, False, False, True]
    assert got["dc"] == [False, False, False, True, False, False, False]
    assert got["ds"] == [False, False, False, False, True, False, False]
    assert r.uc[0, 0].tolist() == [True, True, False, False, False, True, False]
    # the regions partition the voxels
    total = sum(m.long() for m in r)
    assert torch.equal(total, torch.ones_like(total))

    # confidence from the supervised prediction (labeled branch): no supervised confidence beats its class's
    # threshold (0.8, 0.7 <= 0.9; 0.6, 0.4 <= 0.6 for class 2), so agreeing voxels are US and the others DS
    r = assign_regions(sup, ref, tau, "supervised")
    assert r.us[0, 0].tolist() == [True, True, True, False, False, True, True]
    assert r.ds[0, 0].tolist() == [False, False, False, True, True, False, False]
    assert not r.uc.any() and not r.dc.any()
    # with class 1's threshold at 0.75, voxel 0's supervised confidence 0.8 is confident: UC fg
    r = assign_regions(sup, ref, torch.tensor([0.9, 0.75, 0.6]), "supervised")
    assert r.uc_fg[0, 0].tolist() == [True, False, False, False, False, False, False]
    assert r.dc[0, 0].tolist() == [False] * 7

    # voxels outside the valid mask belong to no region; a threshold module gives its capped thresholds
    valid = torch.tensor([[[False, True, True, True, True, True, False]]])
    module = AdaptiveClassThreshold(3, tau0=0.95, cap=0.9)
    r = assign_regions(sup, ref, module, "reference", valid=valid)
    assert not any(m[0, 0, 0] or m[0, 0, 6] for m in r)
    assert r.dc[0, 0, 3] and r.uc_bg[0, 0, 1]


def test_confidence_equal_to_threshold_is_suspicious():
    # two classes with exactly 0.5 probability (third class at exp(-1e4) = 0): 0.5 > 0.5 is false
    sup = torch.tensor([0.0, 0.0, NEG]).reshape(1, 3, 1)
    r = assign_regions(sup, sup, torch.tensor([0.5, 0.5, 0.5]))
    assert r.us.all()
    r = assign_regions(sup, sup, torch.tensor([0.4999, 0.5, 0.5]))
    assert r.uc_bg.all()


# ---------------------------------------------------------------- adaptive class threshold

def test_threshold_ema_update_hand_computed():
    th = AdaptiveClassThreshold(3, alpha=0.5, tau0=0.9, cap=None)
    probs = torch.tensor([
        [0.8, 0.1, 0.1],  # class 0, 0.8
        [0.6, 0.3, 0.1],  # class 0, 0.6
        [0.3, 0.5, 0.2],  # class 1, 0.5
        [0.1, 0.2, 0.7],  # class 2, 0.7 (masked out below)
    ]).T.reshape(1, 3, 2, 2)
    mask = torch.tensor([[[True, True], [True, False]]])
    th.update(probs, mask)
    # class 0: 0.5 * 0.7 + 0.5 * 0.9; class 1: 0.5 * 0.5 + 0.5 * 0.9; class 2 has no (valid) voxel: unchanged
    assert th.tau.tolist() == pytest.approx([0.8, 0.7, 0.9])
    th.update(probs, mask)
    assert th.tau.tolist() == pytest.approx([0.75, 0.6, 0.9])
    # without the mask, class 2 is present and moves
    th.update(probs)
    assert th.tau.tolist() == pytest.approx([0.725, 0.55, 0.8])
    # a mask with a channel axis is accepted too
    th.update(probs, mask[:, None])
    assert th.tau.tolist() == pytest.approx([0.7125, 0.525, 0.8])


def test_absent_class_keeps_threshold_over_many_steps():
    th = AdaptiveClassThreshold(2, cap=None)
    only_background = torch.tensor([[0.9], [0.1]]).reshape(1, 2, 1)
    for _ in range(20):
        th.update(only_background)
    # the official code's "/(count + 1)" would have halved class 1's threshold 20 times
    assert th.tau[1].item() == pytest.approx(0.9)
    assert th.tau[0].item() == pytest.approx(0.9)


def test_threshold_cap_applies_to_the_used_value_only():
    th = AdaptiveClassThreshold(2, alpha=0.5, tau0=0.9, cap=0.85)
    assert th.thresholds.tolist() == pytest.approx([0.85, 0.85])
    confident = torch.tensor([[0.99, 0.01], [0.01, 0.99]]).T.reshape(1, 2, 2)
    new = th.update(confident)
    assert th.tau.tolist() == pytest.approx([0.945, 0.945])  # stored EMA is not clipped (as in the 3D code)
    assert new.tolist() == pytest.approx([0.85, 0.85])
    low = torch.tensor([[0.6, 0.4], [0.4, 0.6]]).T.reshape(1, 2, 2)
    th.update(low)
    assert th.thresholds.tolist() == pytest.approx([0.7725, 0.7725])
    assert AdaptiveClassThreshold(2, tau0=0.95, cap=None).thresholds.tolist() == pytest.approx([0.95, 0.95])


class FakeWorld:
    """In-process stand-in for torch.distributed.all_reduce(SUM) between threads acting as ranks."""

    def __init__(self, world_size: int) -> None:
        self.barrier = threading.Barrier(world_size)
        self.lock = threading.Lock()
        self.buffer: list[torch.Tensor] = []
        self.calls = 0

    def all_reduce(self, t: torch.Tensor) -> None:
        with self.lock:
            self.buffer.append(t.clone())
            self.calls += 1
        self.barrier.wait()
        t.copy_(torch.stack(self.buffer).sum(0))
        if self.barrier.wait() == 0:
            self.buffer.clear()
        self.barrier.wait()


def test_fake_ddp_reduction_equals_one_big_batch():
    g = torch.Generator().manual_seed(1)
    logits = 3.0 * torch.randn(4, 4, 5, 6, generator=g)
    logits[:2, 3] = -50.0  # class 3 is absent on rank 0 but present on rank 1
    probs = torch.softmax(logits, 1)
    masks = torch.rand(4, 5, 6, generator=g) > 0.2
    single = AdaptiveClassThreshold(4, cap=None)
    for _ in range(2):
        single.update(probs, masks)

    world = FakeWorld(2)
    ranks = [AdaptiveClassThreshold(4, cap=None, reduce_fn=world.all_reduce) for _ in range(2)]
    errors: list[BaseException] = []

    def run(rank: int) -> None:
        try:
            part = slice(2 * rank, 2 * rank + 2)
            for _ in range(2):
                ranks[rank].update(probs[part], masks[part])
        except BaseException as e:  # surface thread failures in the test
            errors.append(e)
            world.barrier.abort()

    threads = [threading.Thread(target=run, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors
    assert world.calls == 4
    assert torch.equal(ranks[0].tau, ranks[1].tau)  # identical on every rank
    assert torch.allclose(ranks[0].tau, single.tau, atol=1e-6)
    # without the reduction, rank 0 would not have moved class 3
    alone = AdaptiveClassThreshold(4, cap=None)
    alone.update(probs[:2], masks[:2])
    assert alone.tau[3].item() == pytest.approx(0.9)
    assert ranks[0].tau[3].item() != pytest.approx(0.9)


def test_reduce_fn_receives_sums_and_counts():
    seen = []
    th = AdaptiveClassThreshold(2, cap=None, reduce_fn=lambda t: seen.append(t.clone()))
    probs = torch.tensor([[0.8, 0.2], [0.3, 0.7], [0.6, 0.4]]).T.reshape(1, 2, 3)
    th.update(probs)
    assert seen[0].shape == (2, 2) and seen[0].dtype == torch.float64
    assert seen[0][0].tolist() == pytest.approx([1.4, 0.7])
    assert seen[0][1].tolist() == [2.0, 1.0]


# ---------------------------------------------------------------- loss values

def test_region_normalised_ce_hand_computed():
    # 2 classes, 4 voxels; CE by hand: -log softmax(l)[t]
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.5, -0.5]]).T.reshape(1, 2, 4)
    target = torch.tensor([[0, 1, 1, 0]])

    def ce(a, b, t):
        return -((a if t == 0 else b) - math.log(math.exp(a) + math.exp(b)))

    ces = [ce(2, 0, 0), ce(0, 1, 1), ce(1, 1, 1), ce(0.5, -0.5, 0)]
    def mask(*idx):
        return torch.tensor([[i in idx for i in range(4)]])

    regions = Regions(uc_fg=mask(1), uc_bg=mask(0, 3), us=mask(), dc=mask(2), ds=mask())
    loss = region_normalised_ce(logits, target, regions, W)
    expected = 1.0 * ces[1] / 2 + 1.0 * (ces[0] + ces[3]) / 3 + 0 + 3.0 * ces[2] / 2 + 0
    assert loss.item() == pytest.approx(expected, rel=1e-6)

    # normalised: divided by the total voxel weight sum_r w_r |r| / (|r| + 1) (W: uc 1, dc 3)
    total = 1.0 * 1 / 2 + 1.0 * 2 / 3 + 3.0 * 1 / 2
    normalised = region_normalised_ce(logits, target, regions, W, normalise=True)
    assert normalised.item() == pytest.approx(expected / total, rel=1e-6)
    # mean-1 voxel weights: scaling every region weight leaves the normalised loss unchanged
    scaled = RegionWeights(uc=50 * W.uc, us=50 * W.us, dc=50 * W.dc, ds=50 * W.ds)
    assert region_normalised_ce(logits, target, regions, scaled, normalise=True).item() == pytest.approx(
        normalised.item(), rel=1e-6)
    # and a uniform CE of c per voxel gives exactly c, as a plain mean would
    flat = torch.zeros(1, 2, 4)
    assert region_normalised_ce(flat, target, regions, W, normalise=True).item() == pytest.approx(math.log(2))


def test_unlabeled_loss_against_python_reference_without_update():
    sup, ref = random_pair((2, 3, 4, 5), seed=3)
    loss_fn = MetaSSLLoss(3, unlabeled_weights=W, tau0=0.7, cap=None)
    loss, stats = loss_fn.unlabeled(sup, ref, update_thresholds=False)
    expected, tau, counts = reference_branch(sup, ref, None, [0.7] * 3, W, "reference", cap=None, update=False)
    assert all(counts[r] > 0 for r in ("ucfg", "ucbg", "us", "dc", "ds")), counts  # every region is exercised
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert loss_fn.reference_thresholds.tau.tolist() == pytest.approx([0.7] * 3)
    assert stats["frac_uc"] == pytest.approx((counts["ucfg"] + counts["ucbg"]) / 40)
    assert stats["frac_dc"] == pytest.approx(counts["dc"] / 40)
    assert stats["tau_2"] == pytest.approx(0.7)


@pytest.mark.parametrize("shape", [(2, 4, 5, 6), (2, 4, 3, 4, 5)], ids=["2d", "3d"])
def test_unlabeled_loss_with_update_2d_3d_four_classes(shape):
    sup, ref = random_pair(shape, seed=5)
    loss_fn = MetaSSLLoss(4)
    tau = [0.9] * 4
    for step in range(3):
        s, r = sup + 0.3 * step, ref - 0.2 * step
        loss, stats = loss_fn.unlabeled(s, r)
        expected, tau, counts = reference_branch(s, r, None, tau, loss_fn.unlabeled_weights, "reference")
        assert loss.item() == pytest.approx(expected, rel=1e-5)
        assert loss_fn.reference_thresholds.tau.tolist() == pytest.approx(tau, abs=1e-6)
        assert loss_fn.supervised_thresholds.tau.tolist() == pytest.approx([0.9] * 4)  # other set untouched
        assert [stats[f"tau_{c}"] for c in range(4)] == pytest.approx([min(t, 0.9) for t in tau], abs=1e-6)
        assert sum(stats[k] for k in ("frac_uc", "frac_us", "frac_dc", "frac_ds")) == pytest.approx(1.0)


@pytest.mark.parametrize("shape", [(2, 4, 5, 6), (2, 4, 3, 4, 5)], ids=["2d", "3d"])
def test_labeled_branch_with_ground_truth(shape):
    sup, ref = random_pair(shape, seed=7)
    g = torch.Generator().manual_seed(8)
    target = torch.randint(0, 4, (shape[0], 1, *shape[2:]), generator=g, dtype=torch.int16)  # nnU-Net layout
    loss_fn = MetaSSLLoss(4)
    loss, stats = loss_fn.labeled(sup, ref, target)
    expected, tau, _ = reference_branch(sup, ref, target.long(), [0.9] * 4, loss_fn.labeled_weights, "supervised")
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert loss_fn.supervised_thresholds.tau.tolist() == pytest.approx(tau, abs=1e-6)
    assert loss_fn.reference_thresholds.tau.tolist() == pytest.approx([0.9] * 4)
    # target without the channel axis and as float gives the same value (thresholds frozen for the comparison)
    loss2, _ = loss_fn.labeled(sup, ref, target[:, 0].float(), update_thresholds=False)
    expected2, _, _ = reference_branch(sup, ref, target.long(), tau, loss_fn.labeled_weights, "supervised",
                                       update=False)
    assert loss2.item() == pytest.approx(expected2, rel=1e-5)
    # forward dispatches on the target
    fresh = MetaSSLLoss(4)
    assert fresh(sup, ref, target)[0].item() == pytest.approx(loss.item(), rel=1e-6)
    assert MetaSSLLoss(4)(sup, ref)[0].item() == pytest.approx(MetaSSLLoss(4).unlabeled(sup, ref)[0].item())


def test_labeled_ignore_label_excludes_voxels():
    sup, ref = random_pair((2, 3, 4, 5), seed=9)
    g = torch.Generator().manual_seed(10)
    target = torch.randint(0, 4, (2, 1, 4, 5), generator=g)  # 3 is the ignore label
    valid = target[:, 0] != 3
    assert (~valid).any() and valid.any()
    loss_fn = MetaSSLLoss(3, ignore_label=3)
    loss, stats = loss_fn.labeled(sup, ref, target)
    expected, tau, counts = reference_branch(sup, ref, target.clamp(max=2), [0.9] * 3, loss_fn.labeled_weights,
                                             "supervised", valid=valid)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert loss_fn.supervised_thresholds.tau.tolist() == pytest.approx(tau, abs=1e-6)
    assert stats["frac_us"] == pytest.approx(counts["us"] / valid.sum().item())
    # everything ignored: zero loss that still backpropagates
    s = sup.clone().requires_grad_(True)
    loss, stats = MetaSSLLoss(3, ignore_label=3).labeled(s, ref, torch.full_like(target, 3))
    loss.backward()
    assert loss.item() == 0.0 and stats["frac_uc"] == 0.0 and s.grad is not None
    # without an ignore label, out-of-range targets are an error
    with pytest.raises((IndexError, RuntimeError)):
        MetaSSLLoss(3).labeled(sup, ref, target)


# ---------------------------------------------------------------- dtype, gradients, state

def test_half_precision_input_gives_float32_loss():
    sup, ref = random_pair((2, 4, 4, 4), seed=11)
    loss_fn = MetaSSLLoss(4)
    loss, _ = loss_fn.unlabeled(sup.half(), ref.half())
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert loss_fn.reference_thresholds.tau.dtype == torch.float32
    target = torch.randint(0, 4, (2, 1, 4, 4))
    loss, _ = loss_fn.labeled(sup.bfloat16(), ref.bfloat16(), target)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_gradient_flows_to_supervised_logits_only():
    sup, ref = random_pair((2, 3, 4, 5), seed=12)
    sup.requires_grad_(True)
    ref.requires_grad_(True)  # e.g. CPS, where the reference network is trained too
    loss_fn = MetaSSLLoss(3)
    loss_u, _ = loss_fn.unlabeled(sup, ref)
    loss_l, _ = loss_fn.labeled(sup, ref, torch.randint(0, 3, (2, 1, 4, 5)))
    (loss_u + loss_l).backward()
    assert sup.grad is not None and sup.grad.abs().sum() > 0
    assert ref.grad is None
    assert not loss_fn.reference_thresholds.tau.requires_grad


def test_state_dict_round_trip_of_thresholds():
    sup, ref = random_pair((2, 3, 4, 5), seed=13)
    target = torch.randint(0, 3, (2, 1, 4, 5))
    a = MetaSSLLoss(3)
    for _ in range(3):
        a.unlabeled(sup, ref)
        a.labeled(sup, ref, target)
    sd = a.state_dict()
    assert set(sd) == {"reference_thresholds.tau", "supervised_thresholds.tau"}
    assert not torch.allclose(sd["reference_thresholds.tau"], torch.full((3,), 0.9))
    b = MetaSSLLoss(3)
    b.load_state_dict(sd)
    assert torch.equal(a.reference_thresholds.tau, b.reference_thresholds.tau)
    assert torch.equal(a.supervised_thresholds.tau, b.supervised_thresholds.tau)
    # resumes exactly: the next step gives the same loss and thresholds
    assert a.unlabeled(sup, ref)[0].item() == b.unlabeled(sup, ref)[0].item()
    assert a.labeled(sup, ref, target)[0].item() == b.labeled(sup, ref, target)[0].item()
    assert torch.equal(a.reference_thresholds.tau, b.reference_thresholds.tau)


# ---------------------------------------------------------------- configuration

def test_default_weights_code_and_paper_order():
    code = MetaSSLLoss(2)
    assert code.order == "code"
    u, lab = code.unlabeled_weights, code.labeled_weights
    assert (u.uc, u.us, u.dc, u.ds) == pytest.approx((50.0, 40.0, 0.2048, 6.4))
    assert (lab.uc, lab.us, lab.dc, lab.ds) == pytest.approx((50.0, 100 / 3, 400 / 27, 200 / 9))
    assert u.uc > u.us > u.ds > u.dc and lab.uc > lab.us > lab.ds > lab.dc
    paper = MetaSSLLoss(2, order="paper")
    pu, pl = paper.unlabeled_weights, paper.labeled_weights
    assert (pu.uc, pu.us, pu.dc, pu.ds) == pytest.approx((50.0, 40.0, 6.4, 0.2048))
    assert (pl.dc, pl.ds) == pytest.approx((lab.ds, lab.dc))
    assert pu.uc > pu.us > pu.dc > pu.ds and pl.uc > pl.us > pl.dc > pl.ds
    # explicit weights are used as given; order only picks defaults
    assert MetaSSLLoss(2, order="paper", unlabeled_weights=W).unlabeled_weights == W
    # the order changes the loss
    sup, ref = random_pair((2, 2, 6, 6), seed=14)
    a = MetaSSLLoss(2, tau0=0.6).unlabeled(sup, ref)[0].item()
    b = MetaSSLLoss(2, tau0=0.6, order="paper").unlabeled(sup, ref)[0].item()
    assert a != pytest.approx(b)
    with pytest.raises(SSLInputError):
        MetaSSLLoss(2, order="abstract")


def test_region_based_training_is_rejected():
    with pytest.raises(SSLInputError, match="region-based"):
        MetaSSLLoss(3, regions=True)
    sup, ref = random_pair((2, 3, 4, 5), seed=15)
    with pytest.raises(SSLInputError, match="overlap"):
        MetaSSLLoss(3).labeled(sup, ref, torch.zeros(2, 3, 4, 5))


def test_invalid_inputs():
    with pytest.raises(ValueError):
        AdaptiveClassThreshold(1)
    with pytest.raises(ValueError):
        AdaptiveClassThreshold(3, alpha=0.0)
    with pytest.raises(ValueError):
        AdaptiveClassThreshold(3).update(torch.rand(1, 2, 4))
    sup, ref = random_pair((2, 3, 4, 5))
    with pytest.raises(ValueError):
        MetaSSLLoss(3).unlabeled(sup, ref[:, :2])
    with pytest.raises(ValueError):
        MetaSSLLoss(4).unlabeled(sup, ref)
    with pytest.raises(ValueError):
        MetaSSLLoss(3).labeled(sup, ref, torch.zeros(2, 1, 4, 4))
    with pytest.raises(ValueError):
        assign_regions(sup, ref, torch.tensor([0.9, 0.9]))
