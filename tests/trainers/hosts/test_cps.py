"""The CPS host on the two-network host: symmetric cross supervision, both networks trained, checkpointed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import budget_split, make_trainer

from nnunet_ssl.compat.trainer import unwrap
from nnunet_ssl.trainers import (
    nnUNetTrainerCPS,
)
from nnunet_ssl.trainers.step import SSLStep


def test_cps_cross_supervision_is_symmetric_and_trains_both_networks(copy_planned, monkeypatch, tmp_path):
    budget_split(copy_planned)
    trainer = make_trainer(nnUNetTrainerCPS, copy_planned["root"], copy_planned["dataset"], monkeypatch)
    trainer.on_train_start()
    try:
        net1, net2 = unwrap(trainer.network), unwrap(trainer.network2)
        assert net1 is not net2
        assert not all(torch.equal(a, b) for a, b in zip(net1.parameters(), net2.parameters()))  # different init
        batch = next(trainer.dataloader_train)
        views = {"view0": next(trainer.dataloader_unlabeled)["view0"]}
        step = SSLStep(data=batch["data"], target=batch["target"], views=views, lam=0.1)
        sup, unsup, _ = trainer.forward_losses(step)
        assert step.direction == 0 and not step.constant_losses and not step.scheduled_losses
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
