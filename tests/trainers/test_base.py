"""The SSL trainer base and Mean Teacher, built in-process on the synthetic dataset."""

from __future__ import annotations

import copy
import shutil

import numpy as np
import pytest
import torch
from helpers import budget_split, case_ids, make_trainer, state_copy, write_budget_splits

from nnunet_ssl.compat.trainer import unwrap
from nnunet_ssl.errors import SSLInputError
from nnunet_ssl.parts.ramps import sigmoid_rampup
from nnunet_ssl.trainers import nnUNetTrainerMeanTeacher


def test_mean_teacher_ema_lambda_and_checkpoint_roundtrip(copy_planned, monkeypatch, tmp_path):
    budget_split(copy_planned)
    trainer = make_trainer(nnUNetTrainerMeanTeacher, copy_planned["root"], copy_planned["dataset"], monkeypatch,
                           epochs=3, iterations=4)
    trainer.on_train_start()
    try:
        student = unwrap(trainer.network)
        # the teacher is not part of the network nnU-Net saves and predicts with
        assert not any(m is trainer.teacher for m in trainer.network.modules())
        assert set(student.state_dict()) == set(trainer.teacher.state_dict())
        trainer.on_train_epoch_start()

        trainer.train_step(next(trainer.dataloader_train))  # update 0: alpha = 0, teacher = student
        for k, v in student.state_dict().items():
            assert torch.equal(trainer.teacher.state_dict()[k], v), k
        before = state_copy(trainer.teacher)
        trainer.train_step(next(trainer.dataloader_train))  # update 1: alpha = 0.5
        after_student = state_copy(student)
        for name, p in trainer.teacher.named_parameters():
            assert torch.allclose(p, 0.5 * before[name] + 0.5 * after_student[name], atol=1e-6), name
        assert trainer.ssl_step == 2
        total = 3 * 4
        assert trainer.current_lambda() == pytest.approx(1.0 * sigmoid_rampup(2, 0.2 * total))  # lambda_max 1
        assert trainer.unlabeled_batch_size_per_rank == trainer.batch_size

        ckpt = tmp_path / "ckpt.pth"
        trainer.save_checkpoint(str(ckpt))
        saved = torch.load(ckpt, map_location="cpu", weights_only=False)
        assert saved["ssl_state"]["ssl_step"] == 2
        assert set(saved["network_weights"]) == set(student.state_dict())  # plain nnU-Net network

        resumed = make_trainer(nnUNetTrainerMeanTeacher, copy_planned["root"], copy_planned["dataset"],
                               monkeypatch, epochs=3, iterations=4, continue_training=True)
        resumed.load_checkpoint(str(ckpt))
        assert resumed.ssl_step == 2 and resumed.current_lambda() == trainer.current_lambda()
        for k, v in trainer.teacher.state_dict().items():
            assert torch.equal(resumed.teacher.state_dict()[k], v), k
        # a restored teacher is not overwritten by the student when training resumes
        resumed.on_train_start()
        for k, v in trainer.teacher.state_dict().items():
            assert torch.equal(resumed.teacher.state_dict()[k], v), k
        resumed.on_train_end()
    finally:
        trainer.on_train_end()
    assert (trainer.output_folder and (copy_planned["root"] / "results").exists())
    final_teacher = torch.load(f"{trainer.output_folder}/checkpoint_final_teacher.pth", weights_only=False)
    for k, v in trainer.teacher.state_dict().items():
        assert torch.equal(final_teacher["network_weights"][k].cpu(), v.cpu()), k


def _first_step(ds, monkeypatch):
    trainer = make_trainer(nnUNetTrainerMeanTeacher, ds["root"], ds["dataset"], monkeypatch, seed=123)
    trainer.on_train_start()
    trainer.on_train_epoch_start()
    out = trainer.train_step(next(trainer.dataloader_train))
    weights = state_copy(unwrap(trainer.network))
    trainer.on_train_end()
    return out["loss"], weights


def test_labels_of_unlabeled_cases_are_never_read(copy_planned, monkeypatch, tmp_path):
    _, _, unlabeled = budget_split(copy_planned)
    loss_a, weights_a = _first_step(copy_planned, monkeypatch)

    garbage = copy.copy(copy_planned)
    garbage["root"] = tmp_path / "garbage"
    for sub in ("raw", "preprocessed"):
        shutil.copytree(copy_planned["root"] / sub, garbage["root"] / sub)
    (garbage["root"] / "results").mkdir()
    pp = garbage["root"] / "preprocessed" / garbage["dataset"]
    rng = np.random.default_rng(0)
    for case in unlabeled:
        for f in [pp / "nnUNetPlans_3d_fullres" / f"{case}_seg.b2nd", pp / "nnUNetPlans_3d_fullres" / f"{case}.pkl",
                  pp / "gt_segmentations" / f"{case}.nii.gz",
                  garbage["root"] / "raw" / garbage["dataset"] / "labelsTr" / f"{case}.nii.gz"]:
            f.write_bytes(rng.bytes(f.stat().st_size))
    loss_b, weights_b = _first_step(garbage, monkeypatch)
    assert np.array_equal(loss_a, loss_b)
    for k in weights_a:
        assert torch.equal(weights_a[k], weights_b[k]), k


def test_refuses_to_start_without_unlabeled_data(copy_planned, monkeypatch):
    pp = copy_planned["root"] / "preprocessed" / copy_planned["dataset"]
    ids = case_ids(pp)
    write_budget_splits(pp, ids[:6], ids[6:], [])
    trainer = make_trainer(nnUNetTrainerMeanTeacher, copy_planned["root"], copy_planned["dataset"], monkeypatch)
    trainer.initialize()
    with pytest.raises(SSLInputError, match="no unlabeled data .*nnUNetv2_ssl_preprocess_unlabeled"):
        trainer.get_unlabeled_dataloader()


def test_refuses_unlabeled_ids_that_are_training_cases(copy_planned, monkeypatch):
    pp = copy_planned["root"] / "preprocessed" / copy_planned["dataset"]
    labeled, _, _ = budget_split(copy_planned)
    # a preprocessed "unlabeled" case that carries a labeled case's id
    unl = pp / "nnUNetPlans_3d_fullres_unlabeled"
    unl.mkdir()
    shutil.copy(pp / "nnUNetPlans_3d_fullres" / f"{labeled[0]}.b2nd", unl / f"{labeled[0]}.b2nd")
    trainer = make_trainer(nnUNetTrainerMeanTeacher, copy_planned["root"], copy_planned["dataset"], monkeypatch)
    trainer.initialize()
    with pytest.raises(SSLInputError, match=f"{labeled[0]}.*rename"):
        trainer.get_unlabeled_dataloader()


def test_bad_schedule_variable_is_one_clear_error(copy_planned, monkeypatch):
    from nnunet_ssl.trainers import nnUNetTrainerSupervised

    with pytest.raises(SSLInputError, match="nnUNet_ssl_epochs='ten' must be an integer"):
        make_trainer(nnUNetTrainerSupervised, copy_planned["root"], copy_planned["dataset"], monkeypatch,
                     epochs="ten")


def test_pretrained_weights_also_initialise_the_teacher(copy_planned, monkeypatch, tmp_path):
    from nnunetv2.run.load_pretrained_weights import load_pretrained_weights

    budget_split(copy_planned)
    trainer = make_trainer(nnUNetTrainerMeanTeacher, copy_planned["root"], copy_planned["dataset"], monkeypatch)
    trainer.initialize()  # what nnUNetv2_train -pretrained_weights does before loading
    pretrained = {k: v + 0.5 if v.is_floating_point() else v for k, v in unwrap(trainer.network).state_dict().items()}
    torch.save({"network_weights": pretrained}, tmp_path / "pretrained.pth")
    load_pretrained_weights(trainer.network, str(tmp_path / "pretrained.pth"), verbose=False)
    trainer.on_train_start()
    try:
        for k, v in unwrap(trainer.network).state_dict().items():
            assert torch.equal(trainer.teacher.state_dict()[k], v), k
        assert any(torch.equal(trainer.teacher.state_dict()[k], pretrained[k]) for k in pretrained
                   if ".seg_layers." not in k and pretrained[k].is_floating_point())
    finally:
        trainer.on_train_end()


def test_unlabeled_loader_in_background_workers_shuts_down(copy_planned, monkeypatch):
    from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter

    budget_split(copy_planned)
    trainer = make_trainer(nnUNetTrainerMeanTeacher, copy_planned["root"], copy_planned["dataset"], monkeypatch)
    monkeypatch.setenv("nnUNet_n_proc_DA", "2")  # honoured like nnU-Net's own loaders
    trainer.on_train_start()
    loader = trainer.dataloader_unlabeled
    try:
        assert isinstance(loader, NonDetMultiThreadedAugmenter) and loader.num_processes == 1
        trainer.on_train_epoch_start()
        trainer.train_step(next(trainer.dataloader_train))
        workers = list(loader._processes)
        assert workers and all(p.is_alive() for p in workers)
    finally:
        trainer.on_train_end()
    for p in workers:
        p.join(timeout=10)
    assert not any(p.is_alive() for p in workers)
    assert trainer.dataloader_unlabeled is None


def test_reseeded_baseline_is_the_baseline_with_seed_plus_1000(copy_planned, monkeypatch):
    from nnunet_ssl.trainers import nnUNetTrainerSupervised, nnUNetTrainerSupervisedReseeded

    def initial_weights(cls, seed):
        trainer = make_trainer(cls, copy_planned["root"], copy_planned["dataset"], monkeypatch, seed=seed)
        trainer.initialize()
        return trainer.ssl_seed, unwrap(trainer.network).state_dict()

    seed, reseeded = initial_weights(nnUNetTrainerSupervisedReseeded, 0)
    assert seed == 1000
    _, same_seed = initial_weights(nnUNetTrainerSupervised, 1000)
    _, baseline = initial_weights(nnUNetTrainerSupervised, 0)
    assert all(torch.equal(v, same_seed[k]) for k, v in reseeded.items())
    assert not all(torch.equal(v, baseline[k]) for k, v in reseeded.items())


def test_snapshots_after_each_nth_of_training():
    from nnunet_ssl.trainers.environment import snapshot_epochs

    # 20 epochs in thirds: after epochs 7 and 13 (round(20/3), round(40/3)); the last third is checkpoint_final
    assert snapshot_epochs(20, 3) == {7: "checkpoint_snapshot_1of3.pth", 13: "checkpoint_snapshot_2of3.pth"}
    assert snapshot_epochs(10, 2) == {5: "checkpoint_snapshot_1of2.pth"}
    # too short a training for every snapshot: the earlier one keeps the epoch
    assert snapshot_epochs(2, 3) == {1: "checkpoint_snapshot_1of3.pth"}


def test_bad_snapshot_variable_is_one_clear_error(copy_planned, monkeypatch):
    from nnunet_ssl.trainers import nnUNetTrainerSupervised

    monkeypatch.setenv("nnUNet_ssl_snapshots", "1")
    with pytest.raises(SSLInputError, match="nnUNet_ssl_snapshots='1' must be an integer >= 2"):
        make_trainer(nnUNetTrainerSupervised, copy_planned["root"], copy_planned["dataset"], monkeypatch)


def test_unlabeled_cases_missing_from_the_manifest_are_left_out(copy_planned, monkeypatch):
    """A preprocessed unlabeled case that its manifest does not record (its re-processing failed or never finished)
    is not trained on; a folder of an older version without manifest is listed as before."""
    import json

    from nnunet_ssl.data.preprocess_unlabeled import preprocess_unlabeled

    budget_split(copy_planned)
    for name in ("raw", "preprocessed", "results"):
        monkeypatch.setenv(f"nnUNet_{name}", str(copy_planned["root"] / name))
    preprocess_unlabeled(990, ["3d_fullres"], num_processes=1, verbose=False)
    folder = copy_planned["root"] / "preprocessed" / copy_planned["dataset"] / "nnUNetPlans_3d_fullres_unlabeled"
    manifest_file = folder / ".nnunet_ssl" / "manifest.json"
    manifest = json.loads(manifest_file.read_text())
    real = sorted(manifest["cases"])
    del manifest["cases"][real[0]]
    manifest_file.write_text(json.dumps(manifest))
    trainer = make_trainer(nnUNetTrainerMeanTeacher, copy_planned["root"], copy_planned["dataset"], monkeypatch)
    trainer.initialize()
    assert trainer.unlabeled_sources()[0] == (str(folder), real[1:])
    shutil.rmtree(folder / ".nnunet_ssl")
    assert trainer.unlabeled_sources()[0] == (str(folder), real)
