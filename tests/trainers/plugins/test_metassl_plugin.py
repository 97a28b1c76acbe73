"""FixMatch and CPS hosts, and the MetaSSL plug-in, on small tensors and in-process trainers."""

from __future__ import annotations

import pytest
import torch
from helpers import budget_split, make_trainer

from nnunet_ssl.trainers import (
    nnUNetTrainerCPSMetaSSL,
    nnUNetTrainerFixMatchMetaSSL,
    nnUNetTrainerMeanTeacherMetaSSL,
)


@pytest.mark.parametrize("cls", [nnUNetTrainerMeanTeacherMetaSSL, nnUNetTrainerFixMatchMetaSSL,
                                 nnUNetTrainerCPSMetaSSL])
def test_metassl_plugs_into_every_host_and_resumes_thresholds(cls, copy_planned, monkeypatch, tmp_path):
    budget_split(copy_planned)
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
            assert all(0 < stats[f"ssl_{branch}_tau_{c}"] <= 1.0 for c in range(3))  # no cap in the default preset
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
