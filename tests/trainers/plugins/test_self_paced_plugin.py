"""The self-paced contrastive plug-in on Mean Teacher: nnU-Net's loaders with their crop boxes, meta-labels of a
constructed batch, the pre-training step against a recomputation from the network's bottleneck, the switch to
fine-tuning, the heads in the optimizer and the checkpoint, settings, presets, cost and a 2D step, and one short
training that resumes and predicts."""

from __future__ import annotations

import json
import math
import os
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
from helpers import budget_split, budgeted_trainer, make_trainer, predict_in_process, random_batch, state_copy
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from torch import distributed as dist

from nnunet_ssl.compat.loader_boxes import BoxRecordingDataLoader, loader_of, record_boxes
from nnunet_ssl.compat.trainer import feature_taps, stop_augmenter, unwrap
from nnunet_ssl.errors import SSLInputError
from nnunet_ssl.losses.self_paced import age_schedule, self_paced_supcon, stable_label
from nnunet_ssl.trainers.base import paper_settings_of
from nnunet_ssl.trainers.catalogue import nnUNetTrainerMeanTeacherSelfPacedContrastive as SPCLTrainer
from nnunet_ssl.trainers.hosts.mean_teacher import MeanTeacher
from nnunet_ssl.trainers.plugins.self_paced_contrastive import (
    OFFICIAL_PRETRAIN_FRACTION,
    PatchMeta,
    SelfPacedContrastive,
    pool_rows,
)

PATCH = (16, 32, 32)


def boxes(*rows: tuple[int, int, int]) -> torch.Tensor:
    """Crop boxes (B, 3, 3) for a volume of 20 x 32 x 32 whose box spans [lo, hi) on the first axis."""
    return torch.tensor([[[extent, 32, 32], [lo, 0, 0], [hi, 32, 32]] for extent, lo, hi in rows])


def test_loaders_add_their_crop_boxes_to_the_batch(copy_planned, monkeypatch):
    trainer = budgeted_trainer(SPCLTrainer, copy_planned, monkeypatch)
    train, val = trainer.get_dataloaders()
    try:
        dataset = loader_of(train)._data
        patch = loader_of(train).patch_size
        for batch in (next(train), next(trainer.dataloader_unlabeled)):
            box = batch["boxes"]
            assert box.shape == (len(batch["keys"]), 3, 3)
            for key, (shape, lo, hi) in zip(batch["keys"], box):
                volume = dataset.load_case(key)[0] if key in dataset.identifiers else \
                    loader_of(trainer.dataloader_unlabeled)._data.load_case(key)
                assert tuple(shape.tolist()) == tuple(volume.shape[1:])
                assert (hi - lo).tolist() == list(patch)  # nnU-Net's initial patch, before the spatial transform
        assert "boxes" not in next(val)
        # a background augmenter that already runs (nnU-Net's get_dataloaders draws a first batch) restarts with the
        # recording loader
        loader = nnUNetDataLoader(dataset, 2, PATCH, PATCH, trainer.label_manager)
        augmenter = NonDetMultiThreadedAugmenter(loader, None, 1, 2, seeds=[1])
        try:
            assert "boxes" not in next(augmenter)
            assert record_boxes(augmenter) is augmenter and type(loader) is BoxRecordingDataLoader
            assert next(augmenter)["boxes"].shape == (2, 3, 3)
        finally:
            stop_augmenter(augmenter)
        with pytest.raises(SSLInputError, match="cannot record crop boxes"):
            record_boxes(iter([]))
    finally:
        stop_augmenter(train)
        stop_augmenter(val)
        stop_augmenter(trainer.dataloader_unlabeled)


def test_meta_labels_of_a_constructed_batch(copy_planned, monkeypatch, tmp_path):
    labels_file = tmp_path / "phase.json"
    labels_file.write_text(json.dumps({"a": "ED", "b": "ES", "c": "ED"}))
    monkeypatch.setenv("nnUNet_ssl_meta_labels", str(labels_file))
    monkeypatch.setenv("nnUNet_ssl_settings", "spcl_meta_labels=('position', 'case', 'user'), "
                                              "spcl_meta_label_weights=(1.0, 0.5, 0.1)")
    trainer = budgeted_trainer(SPCLTrainer, copy_planned, monkeypatch)
    # centres on the first axis of 20-slice volumes: 3 (bin 0), 17 (bin 2), 10 (bin 1)
    labeled = PatchMeta(["a", "b"], boxes((20, -5, 11), (20, 9, 25)))
    unlabeled = PatchMeta(["c"], boxes((20, 2, 18)))
    out = trainer.meta_labels([(labeled, 2), (unlabeled, 1), (unlabeled, 1)], None)
    assert out["position"].tolist() == [0, 2, 1, 1]
    assert out["case"].tolist() == [stable_label(k) for k in "abcc"]
    assert out["user"].tolist() == [stable_label(v) for v in ("ED", "ES", "ED", "ED")]
    # 4 bottleneck planes of a 16-slice patch centred at 3: plane centres -3, 1, 5, 9 of 20 slices (bins 0, 0, 0, 1)
    planes = trainer.meta_labels([(labeled, 1)], 4)
    assert planes["position"].tolist() == [0, 0, 0, 1] and len(set(planes["case"].tolist())) == 1
    with pytest.raises(SSLInputError, match="no label for"):
        trainer.meta_labels([(PatchMeta(["zz"], boxes((20, 0, 16))), 1)], None)
    with pytest.raises(SSLInputError, match=r"no label for \['case_001'\]"):  # checked when the loaders start
        trainer.check_user_labels(["a", "case_001"])
    # rows pooled per patch or per plane, sample-major
    f = torch.arange(2 * 3 * 4 * 2 * 2, dtype=torch.float32).reshape(2, 3, 4, 2, 2)
    assert torch.equal(pool_rows(f, None), f.flatten(2).mean(2))
    assert torch.equal(pool_rows(f, 4)[5], f[1, :, 1].mean((1, 2)))


def _batches(trainer, seed: int):
    data, target, views = random_batch(trainer, PATCH, seed=seed)
    labeled = {"data": data, "target": target, "keys": ["a", "b"], "boxes": boxes((20, -5, 11), (20, 9, 25))}
    unlabeled = {**views, "keys": ["b", "c"], "boxes": boxes((20, 2, 18), (20, 2, 18))}
    return labeled, unlabeled


def test_pretraining_step_then_fine_tuning_and_resume(copy_planned, monkeypatch, tmp_path):
    monkeypatch.setenv("nnUNet_ssl_settings", "spcl_pretrain_fraction=0.5, spcl_meta_labels=('position', 'case'), "
                                              "spcl_meta_label_weights=(1.0, 0.5)")
    trainer = budgeted_trainer(SPCLTrainer, copy_planned, monkeypatch, epochs=1, iterations=2)
    assert trainer.spcl_pretrain_iterations == 1 and len(trainer.optimizer.param_groups) == 2
    assert {id(p) for p in trainer.optimizer.param_groups[1]["params"]} == \
        {id(p) for p in trainer.spcl_heads.parameters()}
    labeled, unlabeled = _batches(trainer, 0)
    # stage 0, recomputed: heads on the pooled bottleneck of cat(x_l, u^0, u^1), rows a, b | b, c | b, c
    x = torch.cat([labeled["data"], unlabeled["view0"], unlabeled["view1"]])
    with torch.no_grad(), feature_taps(trainer.network) as taps:
        trainer.network(x)
        projected = trainer.spcl_heads({"high": pool_rows(taps.read()[0], None)})
    position = torch.tensor([0, 2, 1, 1, 1, 1])
    case = torch.tensor([stable_label(k) for k in "abbcbc"])
    expected = sum(w * float(self_paced_supcon(projected[f"high_{name}"], labels, torch.arange(6), 0.07, 5.0,
                                               "soft")[0])
                   for name, labels, w in (("position", position, 1.0), ("case", case, 0.5)))
    teacher, student, heads = state_copy(trainer.teacher), state_copy(trainer.network), state_copy(trainer.spcl_heads)
    trainer.on_train_epoch_start()
    trainer.dataloader_unlabeled = iter([unlabeled])
    trainer.train_step(labeled)
    stats = trainer._epoch_stats[-1]
    assert stats["ssl_stage"] == 0.0 and stats["ssl_spcl_age"] == 5.0
    assert stats["ssl_spcl_loss"] == pytest.approx(expected, rel=1e-4)
    assert stats["ssl_sup_loss"] == 0.0 and stats["ssl_lambda"] == 0.0
    assert stats["ssl_other_share"] == pytest.approx(expected, rel=1e-4)  # the term beside L_sup + 1
    # positive pairs of 30: position 4 x 3 among the unlabeled rows, case 3 x 2 (b) + 2 (c)
    assert 0 < stats["ssl_spcl_kept"] < 1 and stats["ssl_spcl_positives"] == pytest.approx((12 / 30 + 8 / 30) / 2)
    # the encoder and the heads learned, the teacher waited (no EMA step in stage 0)
    assert all(torch.equal(v, trainer.teacher.state_dict()[k]) for k, v in teacher.items())
    assert any(not torch.equal(v, trainer.spcl_heads.state_dict()[k]) for k, v in heads.items())
    changed = {k for k, v in student.items() if not torch.equal(v, unwrap(trainer.network).state_dict()[k])}
    assert any(k.startswith("encoder.stages.3") for k in changed)

    # stage 1 from the first step after T_0: the teacher restarts from the student, lambda ramps from the switch
    synced = []
    monkeypatch.setattr(trainer, "sync_reference_from_student",
                        lambda: synced.append(state_copy(trainer.network)) or MeanTeacher.sync_reference_from_student(
                            trainer))
    labeled, unlabeled = _batches(trainer, 1)
    trainer.dataloader_unlabeled = iter([unlabeled])
    trainer.train_step(labeled)
    stats = trainer._epoch_stats[-1]
    assert len(synced) == 1 and stats["ssl_stage"] == 1.0 and stats["ssl_spcl_age"] == 60.0
    assert stats["ssl_ramp"] == pytest.approx(math.exp(-5.0))  # sigmoid ramp at step 0 of stage 1
    assert stats["ssl_sup_loss"] > 0 and math.isfinite(stats["ssl_unsup_loss"])
    # beta L_SPCL on the student's own rows x_l and u^0 (a, b | b, c), beside L_sup + 1
    assert stats["ssl_other_share"] == pytest.approx(0.1 * stats["ssl_spcl_loss"] / (stats["ssl_sup_loss"] + 1),
                                                     rel=1e-4)
    assert stats["ssl_spcl_positives"] == pytest.approx((2 / 12 + 2 / 12) / 2)

    # --c: heads, their momentum and the age come back
    ckpt = tmp_path / "spcl.pth"
    trainer.save_checkpoint(str(ckpt))
    resumed = budgeted_trainer(SPCLTrainer, copy_planned, monkeypatch, epochs=1, iterations=2,
                               continue_training=True)
    resumed.load_checkpoint(str(ckpt))
    assert resumed.ssl_step == 2 and resumed.spcl_age() == trainer.spcl_age() and not resumed.in_pretraining()
    for k, v in trainer.spcl_heads.state_dict().items():
        assert torch.equal(resumed.spcl_heads.state_dict()[k], v), k
    a, b = trainer.optimizer.state_dict(), resumed.optimizer.state_dict()
    assert len(b["param_groups"]) == 2 and a["state"].keys() == b["state"].keys()
    for k in a["state"]:
        assert torch.equal(a["state"][k]["momentum_buffer"], b["state"][k]["momentum_buffer"])
    resumed.lr_scheduler.step(1)  # nnU-Net's poly schedule sets group 0 only
    resumed.sync_head_lr()
    assert resumed.optimizer.param_groups[1]["lr"] == resumed.optimizer.param_groups[0]["lr"] < resumed.initial_lr
    assert not any("heads" in k for k in unwrap(resumed.network).state_dict())  # the inference network has none


def test_settings_presets_cost_warnings_and_a_2d_step(copy_planned, monkeypatch):
    budget_split(copy_planned)
    root, name = copy_planned["root"], copy_planned["dataset"]
    for bad, match in (("spcl_meta_labels=('slice',)", "spcl_meta_labels"),
                       ("spcl_meta_label_weights=(1.0, 2.0)", "one number"),
                       ("spcl_pretrain_fraction=1.0", "spcl_pretrain_fraction"),
                       ("spcl_weighting='linear'", "spcl_weighting"), ("spcl_age_end=1.0", "spcl_age_end"),
                       ("spcl_temperature=0", "spcl_temperature"), ("spcl_position_bins=0", "spcl_position_bins"),
                       ("spcl_meta_labels=('user',), spcl_meta_label_weights=(1.0,)", "JSON file")):
        monkeypatch.setenv("nnUNet_ssl_settings", bad)
        with pytest.raises(SSLInputError, match=match):
            make_trainer(SPCLTrainer, root, name, monkeypatch)
    monkeypatch.delenv("nnUNet_ssl_settings")
    monkeypatch.setenv("nnUNet_ssl_preset", "paper")
    paper = make_trainer(SPCLTrainer, root, name, monkeypatch)
    for key, value in paper_settings_of(SPCLTrainer).items():
        assert getattr(paper, key) == value, key
    assert paper.spcl_pretrain_fraction == OFFICIAL_PRETRAIN_FRACTION == 80 / 140 and paper.spcl_weight == 0
    assert paper.spcl_meta_labels == ("position", "case") and paper.unsupervised_weight == 0.1  # Mean Teacher's
    monkeypatch.delenv("nnUNet_ssl_preset")
    # cost: f 3 (B + 2U) + (1 - f) (3 (B + U) + U)
    assert SPCLTrainer.compute_units(2, 2) == pytest.approx(0.1 * 18 + 0.9 * 14)
    default = make_trainer(SPCLTrainer, root, name, monkeypatch)
    warnings = default.mechanism_warnings({"ssl_spcl_kept": 0.001, "ssl_spcl_positives": 1.0, "ssl_stage": 1.0,
                                           "ssl_ramp": 1.0, "ssl_other_share": 0.001, "ssl_spcl_age": 5.0})
    assert any("keep 0.1%" in w for w in warnings) and any("share their meta-label" in w for w in warnings)
    assert any("regulariser is negligible" in w for w in warnings)
    assert any("no two rows" in w for w in default.mechanism_warnings({"ssl_spcl_positives": 0.0}))
    # 2D: one row per slice, positioned by the slice index; the same plans' 2d configuration on the 3D data
    pp = root / "preprocessed" / name
    (pp / "nnUNetPlans_2d").symlink_to(pp / "nnUNetPlans_3d_fullres")
    monkeypatch.setenv("nnUNet_ssl_settings", "spcl_feature_pool='plane'")
    with pytest.raises(SSLInputError, match="needs 3D patches"):
        make_trainer(SPCLTrainer, root, name, monkeypatch, configuration="2d")
    monkeypatch.setenv("nnUNet_ssl_settings", "spcl_pretrain_fraction=0.5")
    planar = budgeted_trainer(SPCLTrainer, copy_planned, monkeypatch, configuration="2d", epochs=1, iterations=2)
    slices = PatchMeta(["a", "b", "c"], torch.tensor([[[16, 32, 32], [s, 0, 0], [s + 1, 32, 32]] for s in (1, 8, 15)]))
    assert planar.meta_labels([(slices, 3)], None)["position"].tolist() == [0, 1, 2]
    data, target, views = random_batch(planar, (32, 32), seed=3, labeled=2, unlabeled=1)
    planar.dataloader_unlabeled = iter([{**views, "keys": ["c"], "boxes": slices.boxes[2:]}])
    planar.on_train_epoch_start()
    planar.train_step({"data": data, "target": target, "keys": ["a", "b"], "boxes": slices.boxes[:2]})
    stats = planar._epoch_stats[-1]
    assert stats["ssl_stage"] == 0.0 and stats["ssl_spcl_positives"] == pytest.approx(2 / 12)  # the two views of c
    assert math.isfinite(stats["ssl_spcl_loss"]) and stats["ssl_spcl_loss"] > 0


def test_short_training_resumes_and_predicts(copy_planned, monkeypatch):
    # epoch 0 pre-trains, epoch 1 (after --c) fine-tunes: T_0 = round(0.6 T) = 1 for T = 1 and T = 2
    monkeypatch.setenv("nnUNet_ssl_settings", "spcl_pretrain_fraction=0.6, spcl_meta_labels=('case',)")
    trainer = budgeted_trainer(SPCLTrainer, copy_planned, monkeypatch, epochs=1, iterations=1)
    trainer.run_training()
    out = Path(trainer.output_folder)
    resumed = budgeted_trainer(SPCLTrainer, copy_planned, monkeypatch, epochs=2, iterations=1, continue_training=True)
    resumed.load_checkpoint(str(out / "checkpoint_final.pth"))
    assert resumed.ssl_step == 1 and resumed.spcl_pretrain_iterations == 1
    resumed.run_training()
    assert resumed.ssl_step == 2 and resumed.current_epoch == 2
    log = resumed.logger.local_logger.my_fantastic_logging
    assert log["ssl_stage"] == [0.0, 1.0] and log["ssl_spcl_age"] == [5.0, 60.0]
    assert all(math.isfinite(v) for v in log["ssl_spcl_loss"]) and log["ssl_sup_loss"][0] == 0.0
    assert age_schedule(1.0, 5.0, 60.0, 0.5) == log["ssl_spcl_age"][1]
    assert (out / "progress_ssl.png").is_file() and (out / "checkpoint_final_teacher.pth").is_file()
    saved = torch.load(out / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert saved["ssl_state"]["spcl_heads"].keys() == unwrap(resumed.spcl_heads).state_dict().keys()
    # nnUNetv2_predict with the final checkpoint, in-process: the student alone, without the heads
    predictor = predict_in_process(copy_planned, out, "checkpoint_final.pth", monkeypatch)
    for k, v in unwrap(resumed.network).state_dict().items():
        assert torch.equal(predictor.network.state_dict()[k].cpu(), v.cpu()), k


def _global_rows() -> tuple[torch.Tensor, torch.Tensor, list[slice]]:
    """Five projections, their labels and the rows each of two ranks holds (3 and 2: uneven batches)."""
    z = F.normalize(torch.randn(5, 4, generator=torch.Generator().manual_seed(7)), dim=1)
    return z, torch.tensor([0, 1, 1, 0, 1]), [slice(0, 3), slice(3, 5)]


def _gather_rank(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        z_all, labels, rows = _global_rows()
        z = z_all[rows[rank]].clone().requires_grad_(True)
        host = SimpleNamespace(is_ddp=True, spcl_gather=True)
        gathered, gathered_labels, anchors = SelfPacedContrastive.gather(host, z, {"case": labels[rows[rank]]})
        loss, _ = self_paced_supcon(gathered, gathered_labels["case"], anchors, 0.5, 3.0, "soft")
        loss.backward()
        torch.save({"grad": z.grad, "anchors": anchors, "labels": gathered_labels["case"],
                    "rows": gathered.detach(), "loss": float(loss.detach())}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_negatives_gathered_over_ranks_carry_the_gradient_back(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_gather_rank, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    z_all, labels, rows = _global_rows()
    # one process: each rank's anchors against all five rows; the gradient of the sum (DDP then averages)
    z = z_all.clone().requires_grad_(True)
    losses = [self_paced_supcon(z, labels, torch.arange(5)[r], 0.5, 3.0, "soft")[0] for r in rows]
    sum(losses).backward()
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert torch.allclose(got["rows"], z_all) and torch.equal(got["labels"], labels)
        assert got["anchors"].tolist() == list(range(5))[rows[rank]]
        assert got["loss"] == pytest.approx(float(losses[rank].detach()), rel=1e-5)
        # the gradient of the other rank's loss reached this rank's rows through the gather
        assert torch.allclose(got["grad"], z.grad[rows[rank]], atol=1e-6)
