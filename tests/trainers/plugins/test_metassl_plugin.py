"""FixMatch and CPS hosts, and the MetaSSL plug-in, on small tensors and in-process trainers."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import case_ids, make_trainer, write_budget_splits

from nnunet_ssl.hosts.mixing import apply_cutmix, cutmix_masks
from nnunet_ssl.losses.pseudo_label import hard_pseudo_labels, masked_cross_entropy, masked_soft_dice
from nnunet_ssl.trainers import (
    nnUNetTrainerCPS,
    nnUNetTrainerCPSMetaSSL,
    nnUNetTrainerFixMatch,
    nnUNetTrainerFixMatchMetaSSL,
    nnUNetTrainerMeanTeacherMetaSSL,
)
from nnunet_ssl.trainers.base import unwrap


def test_cutmix_masks_are_boxes_of_the_requested_size():
    g = torch.Generator().manual_seed(0)
    masks = cutmix_masks(200, (20, 24, 28), p=0.5, generator=g)
    mixed = masks.flatten(1).any(1)
    assert 60 < int(mixed.sum()) < 140  # about half the samples
    for m in masks[mixed]:
        idx = m.nonzero()
        lo, hi = idx.min(0).values, idx.max(0).values + 1
        assert int(m.sum()) == int((hi - lo).prod())  # one solid box
        assert 0.005 < float(m.float().mean()) < 0.6
    assert not cutmix_masks(4, (8, 8), p=0.0).any()


def test_cutmix_mixes_images_and_pseudo_labels_identically():
    x = torch.randn(3, 2, 6, 7)
    masks = torch.zeros(3, 6, 7, dtype=torch.bool)
    masks[0, 1:4, 2:5] = True
    mixed = apply_cutmix(x, masks)
    assert torch.equal(mixed[0][:, masks[0]], x[1][:, masks[0]])  # box of sample 0 comes from sample 1
    assert torch.equal(mixed[0][:, ~masks[0]], x[0][:, ~masks[0]])
    assert torch.equal(mixed[1], x[1]) and torch.equal(mixed[2], x[2])
    # mixing logits then taking argmax equals mixing the argmax labels
    labels, _ = hard_pseudo_labels(apply_cutmix(x, masks))
    assert torch.equal(labels, apply_cutmix(x.argmax(1, keepdim=True), masks)[:, 0])


def test_masked_cross_entropy_and_dice_hand_computed():
    logits = torch.tensor([[[math.log(3.0), 0.0], [0.0, 0.0]]]).permute(0, 2, 1)  # (1, 2 classes, 2 voxels)
    target = torch.tensor([[0, 1]])
    mask = torch.tensor([[True, False]])
    # voxel 0: p(class 0) = 0.75 -> CE = -log 0.75; voxel 1 masked; normalised by all 2 voxels
    assert masked_cross_entropy(logits, target, mask).item() == pytest.approx(-math.log(0.75) / 2)
    assert masked_cross_entropy(logits, target).item() == pytest.approx((-math.log(0.75) - math.log(0.5)) / 2)
    # foreground Dice with only voxel 1 (class 1) unmasked: p1 = 0.5 -> 2*0.5/(0.5+1)
    dice = masked_soft_dice(logits, target, torch.tensor([[False, True]]))
    assert dice.item() == pytest.approx(1 - (2 * 0.5 + 1e-5) / (0.5 + 1 + 1e-5), abs=1e-6)


def _budget(ds):
    pp = ds["root"] / "preprocessed" / ds["dataset"]
    ids = case_ids(pp)
    write_budget_splits(pp, ids[:2], ids[2:4], ids[4:])


class _Identity(torch.nn.Module):
    """Logits = the image repeated over the classes: lets a test see exactly what the host fed the network."""

    def __init__(self, classes: int):
        super().__init__()
        self.classes = classes

    def forward(self, x):
        return x[:, :1].repeat(1, self.classes, *([1] * (x.ndim - 2)))


def test_fixmatch_mixes_strong_view_and_pseudo_labels_with_the_same_boxes(copy_planned, monkeypatch):
    _budget(copy_planned)
    trainer = make_trainer(nnUNetTrainerFixMatch, copy_planned["root"], copy_planned["dataset"], monkeypatch)
    trainer.initialize()
    trainer.cutmix_probability = 1.0
    trainer.network = _Identity(3)
    weak = torch.randn(4, 1, 8, 8, 8)
    views = {"view0": weak, "view1": weak.clone()}
    student_in = trainer.student_input(views)
    reference = trainer.reference_logits(views)
    assert trainer._cutmix.flatten(1).any(1).all()
    assert torch.equal(reference[:, 0:1], student_in)  # same boxes for the image and its pseudo-label
    assert not torch.equal(student_in, weak)
    loss, _ = trainer.unsupervised_loss(torch.randn(4, 3, 8, 8, 8), torch.randn(4, 3, 8, 8, 8) * 10, views)
    assert loss.dtype == torch.float32 and loss.item() > 0


def test_fixmatch_confidence_mask(copy_planned, monkeypatch):
    _budget(copy_planned)
    trainer = make_trainer(nnUNetTrainerFixMatch, copy_planned["root"], copy_planned["dataset"], monkeypatch)
    trainer._cutmix = torch.zeros(1, 2, dtype=torch.bool)
    reference = torch.tensor([[[10.0, 0.0], [0.0, 0.0], [0.0, 0.0]]])  # voxel 0 confident class 0; voxel 1 not
    student = torch.zeros(1, 3, 2)
    loss, _ = trainer.unsupervised_loss(student, reference, {})
    assert loss.item() == pytest.approx(math.log(3.0) / 2)  # only voxel 0 counts, normalised by 2 voxels


def test_cps_cross_supervision_is_symmetric_and_trains_both_networks(copy_planned, monkeypatch, tmp_path):
    _budget(copy_planned)
    trainer = make_trainer(nnUNetTrainerCPS, copy_planned["root"], copy_planned["dataset"], monkeypatch)
    trainer.on_train_start()
    try:
        net1, net2 = unwrap(trainer.network), unwrap(trainer.network2)
        assert net1 is not net2
        assert not all(torch.equal(a, b) for a, b in zip(net1.parameters(), net2.parameters()))  # different init
        batch = next(trainer.dataloader_train)
        views = {"view0": next(trainer.dataloader_unlabeled)["view0"]}
        data, target = batch["data"], batch["target"]
        sup, unsup, _ = trainer.forward_losses(data, target, views)
        with torch.no_grad():
            u1 = net1(views["view0"])[0]
            u2 = net2(views["view0"])[0]
        expected = F.cross_entropy(u1, u2.argmax(1)) + F.cross_entropy(u2, u1.argmax(1))
        assert unsup.item() == pytest.approx(expected.item(), rel=1e-4)
        before1 = [p.detach().clone() for p in net1.parameters()]
        before2 = [p.detach().clone() for p in net2.parameters()]
        trainer.on_train_epoch_start()
        trainer.train_step(batch)
        assert any(not torch.equal(a, b) for a, b in zip(before1, net1.parameters()))
        assert any(not torch.equal(a, b) for a, b in zip(before2, net2.parameters()))
        ckpt = tmp_path / "cps.pth"
        trainer.save_checkpoint(str(ckpt))
        resumed = make_trainer(nnUNetTrainerCPS, copy_planned["root"], copy_planned["dataset"], monkeypatch,
                               continue_training=True)
        resumed.load_checkpoint(str(ckpt))
        for k, v in net2.state_dict().items():
            assert torch.equal(unwrap(resumed.network2).state_dict()[k], v), k
        assert resumed.optimizer2.state_dict()["state"].keys() == trainer.optimizer2.state_dict()["state"].keys()
    finally:
        trainer.on_train_end()
    net2_file = Path(trainer.output_folder) / "checkpoint_final_net2.pth"
    saved = torch.load(net2_file, map_location="cpu", weights_only=False)
    for k, v in unwrap(trainer.network2).state_dict().items():
        assert torch.equal(saved["network_weights"][k], v.cpu()), k


@pytest.mark.parametrize("cls", [nnUNetTrainerMeanTeacherMetaSSL, nnUNetTrainerFixMatchMetaSSL,
                                 nnUNetTrainerCPSMetaSSL])
def test_metassl_plugs_into_every_host_and_resumes_thresholds(cls, copy_planned, monkeypatch, tmp_path):
    _budget(copy_planned)
    trainer = make_trainer(cls, copy_planned["root"], copy_planned["dataset"], monkeypatch)
    trainer.on_train_start()
    try:
        seen: dict[str, list[float]] = {"labeled": [], "unlabeled": []}

        def recording(fn, key):
            def wrapped(*args):
                loss, stats = fn(*args)
                seen[key].append(float(loss))
                return loss, stats
            return wrapped

        monkeypatch.setattr(trainer, "labeled_loss", recording(trainer.labeled_loss, "labeled"))
        monkeypatch.setattr(trainer, "unsupervised_loss", recording(trainer.unsupervised_loss, "unlabeled"))
        trainer.on_train_epoch_start()
        out = trainer.train_step(next(trainer.dataloader_train))
        stats = trainer._epoch_stats[-1]
        # the lambda-weighted term is unlabeled + labeled branch; the branch is logged on its own (CPS: both directions)
        assert len(seen["labeled"]) == len(seen["unlabeled"]) == (2 if cls is nnUNetTrainerCPSMetaSSL else 1)
        assert stats["ssl_labeled_branch_loss"] == pytest.approx(sum(seen["labeled"]), rel=1e-5)
        assert stats["ssl_unsup_loss"] == pytest.approx(sum(seen["labeled"]) + sum(seen["unlabeled"]), rel=1e-5)
        assert stats["ssl_labeled_branch_loss"] > 0
        trainer.on_train_epoch_end([out])
        log = trainer.logger.local_logger.my_fantastic_logging
        assert log["ssl_labeled_branch_loss"][-1] == pytest.approx(stats["ssl_labeled_branch_loss"])
        for branch in "ul":
            fractions = [stats[f"ssl_{branch}_frac_{r}"] for r in ("uc", "us", "dc", "ds")]
            assert sum(fractions) == pytest.approx(1.0, abs=1e-6)
            assert all(0 < stats[f"ssl_{branch}_tau_{c}"] <= 0.9 for c in range(3))
        assert len(trainer.metassl_losses) == (2 if cls is nnUNetTrainerCPSMetaSSL else 1)
        ckpt = tmp_path / "m.pth"
        trainer.save_checkpoint(str(ckpt))
        resumed = make_trainer(cls, copy_planned["root"], copy_planned["dataset"], monkeypatch, continue_training=True)
        resumed.load_checkpoint(str(ckpt))
        for a, b in zip(trainer.metassl_losses, resumed.metassl_losses):
            for k, v in a.state_dict().items():
                assert torch.equal(b.state_dict()[k], v), k
        assert not torch.allclose(trainer.metassl_losses[0].reference_thresholds.tau, torch.full((3,), 0.9))
    finally:
        trainer.on_train_end()
