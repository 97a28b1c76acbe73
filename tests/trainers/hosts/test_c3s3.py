"""The C3S3 host: the step's winner, soft labels, view consistency and ODCL against hand computations from both
networks, gradients (L_cp to the loser only), MetaSSL replacing L_cp in the loser's direction, projectors trained
by their network's optimizer and restored by --c, presets and cost, a 2D step, and one short training predicted
with network 2."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from helpers import (
    budget_split,
    budgeted_trainer,
    make_trainer,
    predict_in_process,
    random_batch,
    record_unsupervised_calls,
    state_copy,
)

from nnunet_ssl.compat.trainer import unwrap
from nnunet_ssl.errors import SSLInputError
from nnunet_ssl.losses import contrastive
from nnunet_ssl.losses.contrastive import competition_loss, cosine_consistency, sharpened_mse
from nnunet_ssl.trainers.base import full_resolution, paper_settings_of
from nnunet_ssl.trainers.hosts.c3s3 import OFFICIAL_RAMPUP_FRACTION, ComplementaryCompetition
from nnunet_ssl.trainers.plugins.metassl import MetaSSL
from nnunet_ssl.trainers.step import SSLStep

PATCH = (16, 32, 32)


class C3S3MetaSSL(MetaSSL, ComplementaryCompetition):
    """MetaSSL on C3S3, as the catalogue composes it."""


def _logits(trainer, x):
    with torch.no_grad():
        return [full_resolution(unwrap(n)(x)) for n in (trainer.network, trainer.network2)]


def test_step_is_the_hand_computed_loss_with_the_winner_teaching_the_loser(copy_planned, monkeypatch):
    trainer = budgeted_trainer(ComplementaryCompetition, copy_planned, monkeypatch)
    data, target, views = random_batch(trainer, PATCH)
    x = torch.cat([data, views["view0"], views["view1"]])
    z1, z2 = _logits(trainer, x)
    labels = full_resolution(target)[:, 0].long()
    c1, c2 = (float(competition_loss(z[:2], labels, 0.8)) for z in (z1, z2))
    winner, loser = (z1, z2) if c1 < c2 else (z2, z1)
    seen = {}

    def recording(fa, fb, la, lb, temperature=0.1):
        seen.setdefault("shapes", []).append((tuple(fa.shape), tuple(la.shape)))
        return original(fa, fb, la, lb, temperature)

    original = contrastive.odcl_loss
    monkeypatch.setattr("nnunet_ssl.trainers.hosts.c3s3.odcl_loss", recording)
    trainer.contrastive_voxels = 100
    step = SSLStep(data=data, target=target, views=views, lam=0.5)
    sup, unsup, stats = trainer.forward_losses(step)
    assert stats["net1_won"] == float(c1 < c2)
    assert stats["competition_net1"] == pytest.approx(c1, rel=1e-5)
    assert stats["competition_net2"] == pytest.approx(c2, rel=1e-5)
    # L_cp: the loser's MSE to the winner's sharpened soft labels, summed over the two views
    u = slice(2, 6)
    expected = sum(float(sharpened_mse(loser[s], winner[s], 0.1)) for s in (slice(2, 4), slice(4, 6)))
    assert float(unsup.detach()) == pytest.approx(expected, rel=1e-4)
    assert float(unsup.detach()) == pytest.approx(2 * float(sharpened_mse(loser[u], winner[u], 0.1)), rel=1e-4)
    # L_cos of both networks on the two unlabeled views, a constant term with weight 1
    cosine = sum(float(cosine_consistency(z[2:4], z[4:6])) for z in (z1, z2))
    assert float(step.constant_losses[0].detach()) == pytest.approx(cosine, rel=1e-4)
    # ODCL: four view pairs, each over (B + U) images x 100 sampled voxels, ramped with the common ramp
    assert seen["shapes"] == [((4, 100, 64), (4, 100))] * 4
    odcl = 0.05 * trainer.ramp() * stats["odcl_loss"]
    assert float(step.scheduled_losses[0].detach()) == pytest.approx(odcl, rel=1e-5)
    assert math.isfinite(float(sup.detach())) and 0 <= stats["odcl_intersection"] <= stats["odcl_union"] <= 1


def _grads(module):
    return [p.grad for p in unwrap(module).parameters()]


def test_l_cp_reaches_the_loser_only_and_metassl_takes_the_losers_direction(copy_planned, monkeypatch):
    trainer = budgeted_trainer(C3S3MetaSSL, copy_planned, monkeypatch)
    data, target, views = random_batch(trainer, PATCH, seed=1)
    calls = record_unsupervised_calls(monkeypatch, MetaSSL)
    for forced in (0, 1):  # each network as the winner in turn
        # the ranks' mean decides: make network `forced` the lower one
        monkeypatch.setattr(trainer, "mean_over_ranks", lambda v, w=forced: torch.stack(
            [v.min(), v.max() + 1] if w == 0 else [v.max() + 1, v.min()]))
        step = SSLStep(data=data, target=target, views=views, lam=0.1)
        _, unsup, stats = trainer.forward_losses(step)
        loser = 1 - forced
        assert stats["net1_won"] == float(forced == 0) and calls[-1] == (loser, 4)  # both views of the loser
        assert "u_frac_uc" in stats and math.isfinite(stats["labeled_branch_loss"])
        for _, optimizer in trainer.trainable():
            optimizer.zero_grad(set_to_none=True)
        unsup.backward(retain_graph=True)
        nets = (trainer.network, trainer.network2)
        assert all(g is None for g in _grads(nets[forced]))  # the winner's soft labels are detached
        assert any(g is not None and g.abs().sum() > 0 for g in _grads(nets[loser]))
        assert all(g is None for p in trainer.projectors for g in _grads(p))
        # ODCL trains both networks and both projectors
        step.scheduled_losses[0].backward()
        for module in (*nets, *trainer.projectors):
            assert any(g is not None and g.abs().sum() > 0 for g in _grads(module))
    assert C3S3MetaSSL.compute_units(2, 2) == ComplementaryCompetition.compute_units(2, 2) == 2 * 3 * (2 + 4)


def test_projectors_train_with_their_network_and_resume(copy_planned, monkeypatch, tmp_path):
    trainer = budgeted_trainer(ComplementaryCompetition, copy_planned, monkeypatch, epochs=4, iterations=1)
    for optimizer, projector in zip((trainer.optimizer, trainer.optimizer2), trainer.projectors):
        assert len(optimizer.param_groups) == 2
        assert {id(p) for p in optimizer.param_groups[1]["params"]} == {id(p) for p in projector.parameters()}
    trainer.lr_scheduler.step(2)  # nnU-Net's poly schedule sets group 0 only
    trainer.lr_scheduler2.step(2)
    trainer.sync_projector_lr()
    for optimizer in (trainer.optimizer, trainer.optimizer2):
        assert optimizer.param_groups[1]["lr"] == optimizer.param_groups[0]["lr"] < trainer.initial_lr
    before = [state_copy(p) for p in trainer.projectors]
    data, target, views = random_batch(trainer, PATCH, seed=2)
    trainer.dataloader_unlabeled = iter([views])
    trainer.train_step({"data": data, "target": target})
    for old, projector in zip(before, trainer.projectors):
        assert any(not torch.equal(v, projector.state_dict()[k]) for k, v in old.items())
    ckpt = tmp_path / "c3s3.pth"
    trainer.save_checkpoint(str(ckpt))
    resumed = budgeted_trainer(ComplementaryCompetition, copy_planned, monkeypatch, epochs=4, iterations=1,
                       continue_training=True)
    resumed.load_checkpoint(str(ckpt))
    assert resumed.ssl_step == 1
    for saved, loaded in zip(trainer.projectors, resumed.projectors):
        for k, v in saved.state_dict().items():
            assert torch.equal(loaded.state_dict()[k], v), k
    for saved, loaded in ((trainer.optimizer, resumed.optimizer), (trainer.optimizer2, resumed.optimizer2)):
        a, b = saved.state_dict(), loaded.state_dict()
        assert a["state"].keys() == b["state"].keys() and len(b["param_groups"]) == 2
        for k in a["state"]:  # projector momentum included
            assert torch.equal(a["state"][k]["momentum_buffer"], b["state"][k]["momentum_buffer"])
    # the inference networks hold no projector weights
    assert not any("net." in k for k in unwrap(resumed.network).state_dict())


def test_presets_settings_and_a_2d_step(copy_planned, monkeypatch):
    budget_split(copy_planned)
    root, name = copy_planned["root"], copy_planned["dataset"]
    default = make_trainer(ComplementaryCompetition, root, name, monkeypatch)
    assert default.unsupervised_weight == 1.0 and default.rampup_fraction == 0.2 and default.contrastive_ramp
    assert default.contrastive_weight == 0.05 and default.view_intensity == (True, True)
    assert default.second_network == "other_unet" and default.net2_inference_trainer == "nnUNetTrainerC3S3Net2"
    monkeypatch.setenv("nnUNet_ssl_preset", "paper")
    paper = make_trainer(ComplementaryCompetition, root, name, monkeypatch)
    for key, value in paper_settings_of(ComplementaryCompetition).items():
        assert getattr(paper, key) == value, key
    assert paper.rampup_fraction == pytest.approx(2.4) == OFFICIAL_RAMPUP_FRACTION
    paper.ssl_step = 2500 * paper.total_iterations // 2500  # the official ramp never reaches its weight
    assert paper.current_lambda() == pytest.approx(0.1 * math.exp(-5 * (1 - 1 / 2.4) ** 2))
    assert paper.contrastive_weight == 2.0 and not paper.contrastive_ramp and paper.competition_alpha == 0.8
    assert paper_settings_of(C3S3MetaSSL)["rampup_fraction"] == 0.2  # MetaSSL's schedule wins
    monkeypatch.delenv("nnUNet_ssl_preset")
    for bad, match in (("competition_alpha=1.5", "competition_alpha"), ("contrastive_voxels=0", "contrastive_voxels"),
                       ("sharpen_temperature=0", "sharpen_temperature"), ("view_intensity=(True,)", "two views"),
                       ("contrastive_weight=-1", "contrastive_weight"), ("projector_dim=2.5", "projector_dim")):
        monkeypatch.setenv("nnUNet_ssl_settings", bad)
        with pytest.raises(SSLInputError, match=match):
            make_trainer(ComplementaryCompetition, root, name, monkeypatch)
    # 2d: the same plans' 2d configuration; the step runs on tensors, nnU-Net only needs the data folder
    monkeypatch.setenv("nnUNet_ssl_settings", "contrastive_voxels=50")
    pp = root / "preprocessed" / name
    (pp / "nnUNetPlans_2d").symlink_to(pp / "nnUNetPlans_3d_fullres")
    planar = budgeted_trainer(ComplementaryCompetition, copy_planned, monkeypatch, configuration="2d")
    data, target, views = random_batch(planar, (32, 32), seed=3, labeled=3, unlabeled=2)
    step = SSLStep(data=data, target=target, views=views, lam=1.0)
    sup, unsup, stats = planar.forward_losses(step)
    assert math.isfinite(float(sup.detach())) and math.isfinite(float(unsup.detach()))
    assert stats["odcl_loss"] > 0 and stats["cosine_loss"] > 0 and stats["net1_won"] in (0.0, 1.0)
    # without the contrastive term no projector exists (under DDP an unused parameter is an error)
    monkeypatch.setenv("nnUNet_ssl_settings", "contrastive_weight=0")
    plain = budgeted_trainer(ComplementaryCompetition, copy_planned, monkeypatch, configuration="2d")
    assert plain.projectors == [] and [len(o.param_groups) for _, o in plain.trainable()] == [1, 1]
    assert "odcl_loss" not in plain.forward_losses(SSLStep(data=data, target=target, views=views, lam=1.0))[2]


def test_short_training_resumes_and_predicts_with_network_2(copy_planned, monkeypatch):
    from nnunet_ssl.trainers.catalogue import nnUNetTrainerC3S3

    monkeypatch.setenv("nnUNet_ssl_settings", "contrastive_voxels=256")
    trainer = budgeted_trainer(nnUNetTrainerC3S3, copy_planned, monkeypatch, epochs=1, iterations=1)
    trainer.run_training()
    out = Path(trainer.output_folder)
    resumed = budgeted_trainer(nnUNetTrainerC3S3, copy_planned, monkeypatch, epochs=2, iterations=1,
                       continue_training=True)
    resumed.load_checkpoint(str(out / "checkpoint_final.pth"))
    for saved, loaded in zip(trainer.projectors, resumed.projectors):
        assert all(torch.equal(loaded.state_dict()[k], v) for k, v in saved.state_dict().items())
    resumed.run_training()
    assert resumed.ssl_step == 2 and resumed.current_epoch == 2
    saved = torch.load(out / "checkpoint_final_net2.pth", map_location="cpu", weights_only=False)
    assert saved["trainer_name"] == "nnUNetTrainerC3S3Net2"
    for k, v in unwrap(resumed.network2).state_dict().items():
        assert torch.equal(saved["network_weights"][k], v.cpu()), k
    log = resumed.logger.local_logger.my_fantastic_logging
    for key in ("ssl_net1_won", "ssl_competition_net1", "ssl_odcl_loss", "ssl_cosine_loss", "ssl_unsup_loss"):
        assert len(log[key]) == 2 and all(math.isfinite(v) for v in log[key]), (key, log[key])
    assert (out / "progress_ssl.png").is_file()
    # nnUNetv2_predict -chk checkpoint_final_net2.pth, in-process (the CLI's start-up alone takes 25 s on 2 cores):
    # the predictor resolves the checkpoint's trainer_name among the catalogue's trainers to build network 2
    predictor = predict_in_process(copy_planned, out, "checkpoint_final_net2.pth", monkeypatch)
    assert type(predictor.network).__name__ == "ResidualEncoderUNet"
    for k, v in predictor.network.state_dict().items():
        assert torch.equal(v.cpu(), saved["network_weights"][k]), k
