"""The ABD and CAD hosts: the step's loss against a hand computation from both networks, gradients into both,
MetaSSL replacing every cross term, resuming network 2 and the schedule, presets, cost, and a short training."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from helpers import (
    budget_split,
    budgeted_trainer,
    make_trainer,
    random_batch,
    record_unsupervised_calls,
    state_copy,
)

from nnunet_ssl.compat.trainer import unwrap
from nnunet_ssl.errors import SSLInputError
from nnunet_ssl.losses.copy_paste import region_dice, region_dice_ce
from nnunet_ssl.parts.displacement import abd_i, abd_r, cad_llcr, confidence_map
from nnunet_ssl.trainers.base import full_resolution, paper_settings_of
from nnunet_ssl.trainers.hosts.abd import (
    OFFICIAL_ABD_I_FRACTION,
    AdaptiveBidirectionalDisplacement,
    ConfidenceAwareDisplacement,
)
from nnunet_ssl.trainers.plugins.metassl import MetaSSL
from nnunet_ssl.trainers.step import SSLStep

PATCH = (16, 32, 32)


class ABDMetaSSL(MetaSSL, AdaptiveBidirectionalDisplacement):
    """MetaSSL on ABD, as the catalogue composes it."""


def _dice_cps(a, b):
    return region_dice(a, b.argmax(1), torch.ones(a.shape[2:], dtype=torch.bool))


def test_abd_step_is_the_hand_computed_loss_and_trains_both_networks(copy_planned, monkeypatch):
    trainer = budgeted_trainer(AdaptiveBidirectionalDisplacement, copy_planned, monkeypatch, epochs=3, iterations=1)
    trainer.abd_strong_labeled = False  # network 2's labeled images = the batch, for the hand computation
    trainer.abd_kl_probability, trainer.abd_i_probability = 1.0, 1.0  # deterministic branches
    assert trainer.displacement_grid() == 3 and trainer.abd_i_active()  # 3D default; ABD-I in the first 2/3
    data, target, views = random_batch(trainer, PATCH)
    step = SSLStep(data=data, target=target, views=views, lam=0.1)
    sup, unsup, stats = trainer.forward_losses(step)
    net1, net2 = unwrap(trainer.network), unwrap(trainer.network2)
    with torch.no_grad():
        o1 = full_resolution(net1(torch.cat([data, views["view0"]])))
        o2 = full_resolution(net2(torch.cat([data, views["view1"]])))
        p1, p2 = torch.softmax(o1, 1), torch.softmax(o2, 1)
        y = target[0]
        i = abd_i(data, data, y, y, confidence_map(p1[:2]), confidence_map(p2[:2]), 3, probability=1.0)
        r = abd_r(views["view0"], views["view1"], p1[2:], p2[2:], 3, top_k=4, kl_probability=1.0)
        x = torch.cat([*i.images, *r.images])
        d1, d2 = full_resolution(net1(x)), full_resolution(net2(x))
        plain = _dice_cps(o1[2:], o2[2:]) + _dice_cps(o2[2:], o1[2:])
        displaced = _dice_cps(d1[4:], d2[4:]) + _dice_cps(d2[4:], d1[4:])
        yi = torch.cat(i.labels)[:, 0].long()
        abd_i_term = region_dice_ce(d1[:4], yi, torch.ones_like(yi, dtype=torch.bool)) + region_dice_ce(
            d2[:4], yi, torch.ones_like(yi, dtype=torch.bool))
    assert float(unsup.detach()) == pytest.approx(float(plain + displaced), rel=1e-4)
    assert stats["cps_displaced_loss"] == pytest.approx(float(displaced), rel=1e-4)
    assert len(step.constant_losses) == 1 and step.direction == 0
    assert float(step.constant_losses[0].detach()) == pytest.approx(2.0 * float(abd_i_term), rel=1e-4)
    cell = 5 * 10 * 10 / math.prod(PATCH)  # 3 cells of 16 // 3, 32 // 3, 32 // 3 voxels
    assert stats["abd_i_fraction"] == pytest.approx(cell) and stats["kl_branch"] == 1.0
    assert stats["displaced_fraction"] == pytest.approx(r.fraction) and r.fraction == pytest.approx(cell)

    # ABD-I stops after 2/3 of training: no constant term, the displaced batch holds the unlabeled images only
    trainer.ssl_step = 2
    step = SSLStep(data=data, target=target, views=views, lam=0.1)
    _, unsup_late, stats = trainer.forward_losses(step)
    assert not step.constant_losses and stats["abd_i_active"] == 0.0
    assert float(unsup_late.detach()) == pytest.approx(float(plain + displaced), rel=1e-4)

    # a training step with the strong labeled copy moves both networks
    trainer.abd_strong_labeled = True
    assert not torch.equal(trainer.strong_labeled(data), data)
    before1, before2 = state_copy(net1), state_copy(net2)
    trainer.dataloader_unlabeled = iter([views])
    trainer.train_step({"data": data, "target": target})
    assert any(not torch.equal(v, net1.state_dict()[k]) for k, v in before1.items())
    assert any(not torch.equal(v, net2.state_dict()[k]) for k, v in before2.items())


def test_cad_displaces_by_its_schedule_and_resumes_it_with_network_2(copy_planned, monkeypatch, tmp_path):
    trainer = budgeted_trainer(ConfidenceAwareDisplacement, copy_planned, monkeypatch, epochs=2, iterations=2)
    trainer.abd_strong_labeled = False
    trainer.ssl_step = 2  # half of the 4 iterations
    assert trainer.cad_schedule() == pytest.approx((0.85, 0.375))
    data, target, views = random_batch(trainer, PATCH, seed=1)
    step = SSLStep(data=data, target=target, views=views, lam=0.1)
    _, unsup, stats = trainer.forward_losses(step)
    net1, net2 = unwrap(trainer.network), unwrap(trainer.network2)
    with torch.no_grad():
        p1 = torch.softmax(full_resolution(net1(torch.cat([data, views["view0"]]))), 1)[2:]
        p2 = torch.softmax(full_resolution(net2(torch.cat([data, views["view1"]]))), 1)[2:]
        r = cad_llcr(views["view0"], views["view1"], confidence_map(p1), confidence_map(p2), 0.85, 0.375)
    assert stats["cad_threshold"] == pytest.approx(0.85) and stats["cad_max_fraction"] == pytest.approx(0.375)
    assert stats["displaced_fraction"] == pytest.approx(r.fraction) and r.fraction > 0
    for box in r.replaced[0]:  # capped at floor(0.375 n) per axis
        assert all(s.stop - s.start <= math.floor(0.375 * n) for s, n in zip(box, PATCH))
    assert math.isfinite(float(unsup.detach()))

    trainer.dataloader_unlabeled = iter([views])
    trainer.train_step({"data": data, "target": target})
    ckpt = tmp_path / "cad.pth"
    trainer.save_checkpoint(str(ckpt))
    resumed = make_trainer(ConfidenceAwareDisplacement, copy_planned["root"], copy_planned["dataset"], monkeypatch,
                           epochs=2, iterations=2, continue_training=True)
    resumed.initialize()
    resumed.load_checkpoint(str(ckpt))
    assert resumed.ssl_step == 3 and resumed.cad_schedule() == trainer.cad_schedule()
    for k, v in net2.state_dict().items():
        assert torch.equal(unwrap(resumed.network2).state_dict()[k], v), k
    saved, loaded = trainer.optimizer2.state_dict(), resumed.optimizer2.state_dict()
    assert saved["state"].keys() == loaded["state"].keys() and saved["state"]
    for k in saved["state"]:
        assert torch.equal(saved["state"][k]["momentum_buffer"], loaded["state"][k]["momentum_buffer"])


def test_metassl_replaces_every_cross_term_plain_and_displaced(copy_planned, monkeypatch):
    trainer = budgeted_trainer(ABDMetaSSL, copy_planned, monkeypatch)
    calls = record_unsupervised_calls(monkeypatch, MetaSSL)
    data, target, views = random_batch(trainer, PATCH, seed=2)
    step = SSLStep(data=data, target=target, views=views, lam=0.1)
    _, unsup, stats = trainer.forward_losses(step)
    # plain views (2 images per direction), then the 4 displaced images (2 per view) per direction
    assert calls == [(0, 2), (1, 2), (0, 4), (1, 4)]
    assert math.isfinite(float(unsup.detach())) and math.isfinite(stats["labeled_branch_loss"])
    assert "u_frac_uc" in stats


def test_presets_settings_and_compute_units(copy_planned, monkeypatch):
    budget_split(copy_planned)
    default = make_trainer(ConfidenceAwareDisplacement, copy_planned["root"], copy_planned["dataset"], monkeypatch)
    assert default.view_intensity == (True, "strong") and default.abd_kl_probability == 0.5
    assert default.unsupervised_weight == 0.1 and default.rampup_fraction == 0.2 and default.abd_grid is None
    monkeypatch.setenv("nnUNet_ssl_preset", "paper")
    paper = make_trainer(ConfidenceAwareDisplacement, copy_planned["root"], copy_planned["dataset"], monkeypatch)
    for name, value in paper_settings_of(ConfidenceAwareDisplacement).items():
        assert getattr(paper, name) == value, name
    assert paper.rampup_fraction == 1.0 and paper.abd_kl_probability == 1.0 and paper.displacement_grid() == 4
    assert paper.view_intensity == (False, "strong") and paper.abd_i_fraction == pytest.approx(2 / 3)
    assert paper_settings_of(ABDMetaSSL)["rampup_fraction"] == 0.2  # MetaSSL's schedule wins
    monkeypatch.delenv("nnUNet_ssl_preset")
    for bad, match in (("abd_grid=40", "abd_grid"), ("abd_kl_probability=2", "abd_kl_probability"),
                       ("view_intensity=(True,)", "view_intensity"),
                       ("cad_threshold_end=0.5", "must not fall")):
        monkeypatch.setenv("nnUNet_ssl_settings", bad)
        with pytest.raises(SSLInputError, match=match):
            make_trainer(ConfidenceAwareDisplacement, copy_planned["root"], copy_planned["dataset"], monkeypatch)
    # 2 networks x (3 (B + U) plain + 6 U ABD-R + 6 f B ABD-I)
    f = OFFICIAL_ABD_I_FRACTION
    assert AdaptiveBidirectionalDisplacement.compute_units(2, 2) == pytest.approx(2 * (12 + 12 + 12 * f))
    assert ABDMetaSSL.compute_units(2, 4) == pytest.approx(2 * (18 + 24 + 12 * f))


def test_short_training_writes_network_2_for_prediction(copy_planned, monkeypatch):
    trainer = budgeted_trainer(ConfidenceAwareDisplacement, copy_planned, monkeypatch, epochs=1, iterations=2)
    trainer.run_training()
    out = Path(trainer.output_folder)
    saved = torch.load(out / "checkpoint_final_net2.pth", map_location="cpu", weights_only=False)
    for k, v in unwrap(trainer.network2).state_dict().items():
        assert torch.equal(saved["network_weights"][k], v.cpu()), k
    log = trainer.logger.local_logger.my_fantastic_logging
    for key in ("ssl_displaced_fraction", "ssl_cad_threshold", "ssl_abd_i_active", "ssl_cps_displaced_loss"):
        assert len(log[key]) == 1 and math.isfinite(log[key][0]), (key, log[key])
    assert log["ssl_cad_threshold"][0] == pytest.approx((0.75 + 0.85) / 2)  # steps 0 and 1 of 2
    assert (out / "progress_ssl.png").is_file()
