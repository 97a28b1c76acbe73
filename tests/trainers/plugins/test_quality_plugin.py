"""Quality-guided trainers (QAR, PL-QW, both, with MetaSSL) on the Mean Teacher host: in-process on the synthetic
dataset with an untrained saved predictor, and from the command line after nnUNetv2_ssl_train_quality."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from helpers import budget_split, make_trainer, save_untrained_quality_predictor, state_copy

from nnunet_ssl.compat.trainer import unwrap
from nnunet_ssl.errors import SSLInputError
from nnunet_ssl.losses.metassl import MetaSSLLoss
from nnunet_ssl.parts.ramps import sigmoid_rampup
from nnunet_ssl.trainers import (
    nnUNetTrainerMeanTeacherQAR,
    nnUNetTrainerMeanTeacherQualityGuided,
    nnUNetTrainerMeanTeacherQualityGuidedMetaSSL,
    nnUNetTrainerMeanTeacherQW,
)
from nnunet_ssl.trainers.plugins.quality import ENV_QUALITY_CHECKPOINT, file_sha256
from nnunet_ssl.trainers.step import SSLStep


class _AllActive(nnUNetTrainerMeanTeacherQualityGuided):
    """Both mechanisms at full weight from the first step, every pseudo-label kept."""

    qar_delay_fraction = qar_rampup_fraction = 0.0
    qw_delay_fraction = qw_rampup_fraction = 0.0
    qw_threshold = 0.0


def _save_untrained_predictor(trainer, seed: int = 0) -> Path:
    return save_untrained_quality_predictor(Path(trainer.preprocessed_dataset_folder_base), seed=seed,
                                            configuration=trainer.configuration_name, fold=trainer.fold)[0]


def test_refuses_to_start_without_a_predictor(copy_planned, monkeypatch, tmp_path):
    budget_split(copy_planned)
    monkeypatch.delenv(ENV_QUALITY_CHECKPOINT, raising=False)
    trainer = make_trainer(nnUNetTrainerMeanTeacherQW, copy_planned["root"], copy_planned["dataset"], monkeypatch)
    with pytest.raises(SSLInputError) as info:
        trainer.initialize()
    message = str(info.value)
    assert "\n" not in message and "no quality predictor for Dataset990_SSLSynthetic (3d_fullres, fold 0)" in message
    assert message.endswith("train it first with nnUNetv2_ssl_train_quality -d Dataset990_SSLSynthetic "
                            "-c 3d_fullres -f 0")
    assert info.value.code == f"nnunet-ssl: error: {message}"  # what the interpreter prints on exit

    monkeypatch.setenv(ENV_QUALITY_CHECKPOINT, str(tmp_path / "missing.pth"))
    trainer = make_trainer(nnUNetTrainerMeanTeacherQAR, copy_planned["root"], copy_planned["dataset"], monkeypatch)
    with pytest.raises(SSLInputError, match=f"{ENV_QUALITY_CHECKPOINT}=.*missing.pth is not a file.*"
                                            "nnUNetv2_ssl_train_quality -d Dataset990_SSLSynthetic"):
        trainer.initialize()


def test_steps_gradient_through_frozen_predictor_and_checkpoint_roundtrip(copy_planned, monkeypatch, tmp_path,
                                                                            capsys):
    budget_split(copy_planned)
    monkeypatch.delenv(ENV_QUALITY_CHECKPOINT, raising=False)
    trainer = make_trainer(_AllActive, copy_planned["root"], copy_planned["dataset"], monkeypatch, epochs=2,
                           iterations=2)
    path = _save_untrained_predictor(trainer)
    trainer.on_train_start()
    try:
        predictor = trainer.quality_predictor
        before = state_copy(predictor)
        student = unwrap(trainer.network)
        # the predictor is neither part of the saved/predicted network nor optimised
        assert not any(m is predictor for m in trainer.network.modules())
        optimised = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
        assert not any(id(p) in optimised for p in predictor.parameters())
        assert next(predictor.parameters()).device == trainer.device

        # QAR reaches the student's weights through the frozen predictor
        captured = []
        original = SSLStep.add_scheduled_loss

        def capture(step, term):
            probe = student.encoder.stages[0][0].convs[0].conv.weight
            (grad,) = torch.autograd.grad(term, probe, retain_graph=True)
            captured.append((float(term.detach()), float(grad.abs().sum())))
            original(step, term)

        monkeypatch.setattr(SSLStep, "add_scheduled_loss", capture)
        trainer.on_train_epoch_start()
        for _ in range(2):
            trainer.train_step(next(trainer.dataloader_train))
        assert len(captured) == 2
        for term, grad_norm in captured:
            assert 0.0 <= term <= 0.01 and grad_norm > 0  # 0.01 * (1 - q)

        stats = trainer._epoch_stats[-1]
        assert stats["ssl_qar_weight"] == pytest.approx(0.01) and stats["ssl_lambda"] == pytest.approx(0.25)
        assert stats["ssl_quality_kept"] == 1.0
        assert 0.0 <= stats["ssl_quality_student"] <= 1.0 and 0.0 <= stats["ssl_quality_reference"] <= 1.0
        assert captured[-1][0] == pytest.approx(0.01 * (1 - trainer._epoch_stats[-1]["ssl_quality_student"]),
                                                abs=1e-6)
        # frozen: unchanged, eval mode, no parameter gradients
        assert not predictor.training and all(p.grad is None for p in predictor.parameters())
        for k, v in predictor.state_dict().items():
            assert torch.equal(v, before[k]), k

        ckpt = tmp_path / "ckpt.pth"
        trainer.save_checkpoint(str(ckpt))
        saved = torch.load(ckpt, map_location="cpu", weights_only=False)
        assert set(saved["network_weights"]) == set(student.state_dict())
        assert saved["ssl_state"]["quality_predictor"] == {"path": str(path.resolve()), "sha256": file_sha256(path)}
        assert saved["ssl_state"]["ssl_step"] == 2

        # --c: counters and teacher come back; a replaced predictor file is reported
        _save_untrained_predictor(trainer, seed=1)
        capsys.readouterr()
        resumed = make_trainer(_AllActive, copy_planned["root"], copy_planned["dataset"], monkeypatch, epochs=2,
                               iterations=2, continue_training=True)
        resumed.load_checkpoint(str(ckpt))
        assert resumed.ssl_step == 2
        for k, v in trainer.teacher.state_dict().items():
            assert torch.equal(resumed.teacher.state_dict()[k], v), k
        assert "warning: this training started with the quality predictor" in capsys.readouterr().out
    finally:
        trainer.on_train_end()
    assert (trainer.output_folder and (copy_planned["root"] / "results").exists())


def test_schedules_of_each_trainer(copy_planned, monkeypatch):
    budget_split(copy_planned)
    roots = (copy_planned["root"], copy_planned["dataset"])
    qar = make_trainer(nnUNetTrainerMeanTeacherQAR, *roots, monkeypatch, epochs=10, iterations=10)
    qw = make_trainer(nnUNetTrainerMeanTeacherQW, *roots, monkeypatch, epochs=10, iterations=10)
    meta = make_trainer(nnUNetTrainerMeanTeacherQualityGuidedMetaSSL, *roots, monkeypatch, epochs=10, iterations=10)
    for step, qar_w, qw_lam in ((0, 0.0, 0.0), (7, 0.0, 0.0), (15, 0.0, 0.25 * 0.5), (25, 0.01 * 0.5, 0.25),
                                (40, 0.01, 0.25)):
        for t in (qar, qw, meta):
            t.ssl_step = step
        # QAR keeps the Mean Teacher's lambda and adds its own ramp; PL-QW brings its own lambda
        assert qar.current_qar_weight() == pytest.approx(qar_w)
        assert qar.current_lambda() == pytest.approx(0.1 * sigmoid_rampup(step, 20))
        assert qw.current_qar_weight() == 0.0 and qw.current_lambda() == pytest.approx(qw_lam)
        # MetaSSL keeps its own lambda (0.1, sigmoid over 20 %); QAR its own ramp
        assert meta.current_qar_weight() == pytest.approx(qar_w)
        assert meta.current_lambda() == pytest.approx(0.1 * sigmoid_rampup(step, 20))


def test_metassl_combination_with_unit_weights_is_metassl(copy_planned, monkeypatch):
    budget_split(copy_planned)
    monkeypatch.delenv(ENV_QUALITY_CHECKPOINT, raising=False)
    trainer = make_trainer(nnUNetTrainerMeanTeacherQualityGuidedMetaSSL, copy_planned["root"],
                           copy_planned["dataset"], monkeypatch)
    _save_untrained_predictor(trainer)
    trainer.initialize()
    torch.manual_seed(0)
    shape = (2, 3, *trainer.configuration_manager.patch_size)
    student, reference = torch.randn(shape), torch.randn(shape)
    image = torch.randn(2, 1, *shape[2:])
    step = SSLStep(data=torch.zeros(0), target=torch.zeros(0), views={"view0": image, "view1": image}, lam=0.1,
                   student_image=image)
    plain: MetaSSLLoss = copy.deepcopy(trainer.metassl_losses[0])
    expected, expected_stats = plain.unlabeled(student, reference)
    trainer.qw_threshold, trainer.qw_temperature = 0.0, 0.0  # every voxel weight 1
    loss, stats = trainer.unsupervised_loss(student, reference, step)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert {f"u_{k}": v for k, v in expected_stats.items()} == pytest.approx({k: v for k, v in stats.items()
                                                                              if k.startswith("u_")})
    # a sample whose pseudo-label is predicted bad drops out of MetaSSL's loss
    trainer.qw_threshold, trainer.qw_temperature = 0.5, 2.0
    trainer.quality_predictor = lambda image, mask: torch.tensor([[0.9, 0.8], [0.1, 0.2]])
    student.requires_grad_(True)
    loss, stats = trainer.unsupervised_loss(student, reference, step)
    (grad,) = torch.autograd.grad(loss, student)
    assert torch.all(grad[1] == 0) and grad[0].abs().sum() > 0
    assert stats["quality_kept"] == 0.5 and not step.scheduled_losses  # QAR is still in its delay


@pytest.mark.parametrize("cls", [nnUNetTrainerMeanTeacherQAR, nnUNetTrainerMeanTeacherQW,
                                 nnUNetTrainerMeanTeacherQualityGuidedMetaSSL])
def test_one_step_of_each_trainer_logs_quality(cls, copy_planned, monkeypatch):
    budget_split(copy_planned)
    monkeypatch.delenv(ENV_QUALITY_CHECKPOINT, raising=False)
    trainer = make_trainer(cls, copy_planned["root"], copy_planned["dataset"], monkeypatch, epochs=1, iterations=1)
    _save_untrained_predictor(trainer)
    trainer.on_train_start()
    try:
        trainer.on_train_epoch_start()
        out = trainer.train_step(next(trainer.dataloader_train))
        assert torch.isfinite(torch.as_tensor(out["loss"]))
        trainer.on_train_epoch_end([out])
        logged = trainer.logger.local_logger.my_fantastic_logging
        for key in ("ssl_quality_student", "ssl_quality_reference", "ssl_quality_kept", "ssl_qar_weight"):
            assert len(logged[key]) == 1 and 0.0 <= logged[key][0] <= 1.0, key
        if cls is nnUNetTrainerMeanTeacherQualityGuidedMetaSSL:
            assert sum(logged[f"ssl_u_frac_{r}"][0] for r in ("uc", "us", "dc", "ds")) == pytest.approx(1.0)
        panels = dict(trainer.ssl_plot_panels())
        assert "predicted quality (Dice)" in panels and ("QAR weight" in panels) == trainer.quality_qar
    finally:
        trainer.on_train_end()


# ---------------------------------------------------------------------- command line (slow)
QUALITY_CLI_FAST = ["--iterations", "2", "--batch-size", "2", "--weak-epochs", "1", "--weak-iterations-per-epoch",
                    "1", "--val-samples", "4", "--max-features", "8", "-device", "cpu"]


def _train_quality_train_predict(root, dataset_id: int, dataset: str, trainer: str, predict_input) -> None:
    """nnUNetv2_ssl_train_quality for 2 iterations, then nnUNetv2_train for 1 epoch of 2 iterations (the in-process
    tests cover --c), then nnUNetv2_predict with the final checkpoint."""
    import SimpleITK as sitk
    from conftest import nnunet_env, run_cli

    (root / "results").mkdir(exist_ok=True)
    env = nnunet_env(root, training=True)
    env.pop(ENV_QUALITY_CHECKPOINT, None)
    env.update(nnUNet_ssl_epochs="1", nnUNet_ssl_iterations_per_epoch="2", nnUNet_ssl_val_iterations="1",
               nnUNet_ssl_seed="0")
    run_cli(["nnUNetv2_ssl_train_quality", "-d", str(dataset_id), "-c", "3d_fullres", "-f", "0", *QUALITY_CLI_FAST],
            env=env)
    predictor_file = root / "results" / dataset / "nnUNetSSLQuality__nnUNetPlans__3d_fullres" / "fold_0" / \
        "checkpoint_quality.pth"
    digest = file_sha256(predictor_file)

    train = run_cli(["nnUNetv2_train", str(dataset_id), "3d_fullres", "0", "-tr", trainer, "-device", "cpu"], env=env)
    assert f"quality predictor: {predictor_file}" in train.stdout
    out = root / "results" / dataset / f"{trainer}__nnUNetPlans__3d_fullres" / "fold_0"
    for f in ("checkpoint_final.pth", "checkpoint_final_teacher.pth", "progress_ssl.png", "validation/summary.json"):
        assert (out / f).is_file(), f
    final = torch.load(out / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    # the predictor file is recorded, unchanged by training, and not part of the network weights
    assert final["ssl_state"]["quality_predictor"]["sha256"] == digest == file_sha256(predictor_file)
    assert final["ssl_state"]["ssl_step"] == 2
    assert not any(k.startswith("head.") for k in final["network_weights"])
    for key in ("ssl_quality_student", "ssl_quality_reference", "ssl_quality_kept", "ssl_qar_weight"):
        assert len(final["logging"][key]) == 1 and 0.0 <= final["logging"][key][0] <= 1.0, key

    pred = root / "pred"
    run_cli(["nnUNetv2_predict", "-i", str(predict_input), "-o", str(pred), "-d", str(dataset_id), "-c", "3d_fullres",
             "-f", "0", "-tr", trainer, "-device", "cpu", "-npp", "1", "-nps", "1", "--disable_tta"], env=env)
    images = sorted(predict_input.glob("*_0000.nii.gz"))
    assert images
    for img in images:
        seg = sitk.ReadImage(str(pred / img.name.replace("_0000.nii.gz", ".nii.gz")))
        assert seg.GetSize() == sitk.ReadImage(str(img)).GetSize()


@pytest.mark.slow
def test_train_quality_then_qw_from_the_command_line(synthetic_planned, tmp_path):
    import shutil

    from conftest import nnunet_env, run_cli

    for sub in ("raw", "preprocessed"):
        shutil.copytree(synthetic_planned["root"] / sub, tmp_path / sub)
    ds = synthetic_planned["dataset"]
    run_cli(["nnUNetv2_ssl_make_splits", "-d", "990", "--num-labeled", "3", "--seed", "0"],
            env=nnunet_env(tmp_path, training=False))
    _train_quality_train_predict(tmp_path, 990, ds, "nnUNetTrainerMeanTeacherQW", tmp_path / "raw" / ds / "imagesTs")


@pytest.mark.slow
@pytest.mark.realdata
def test_train_quality_then_quality_guided_on_hippocampus(tmp_path):
    """5 training cases of the MSD Hippocampus copy (3 labeled, the rest unlabeled by the budget split) and one
    more training case to predict; the held-out test cases are never used."""
    import json
    import shutil

    from conftest import HIPPOCAMPUS, lower_batch_size, nnunet_env, run_cli

    if not HIPPOCAMPUS.is_dir():
        pytest.skip("../shared/data/Dataset004_Hippocampus not found")
    cases = sorted(p.name[: -len("_0000.nii.gz")] for p in (HIPPOCAMPUS / "imagesTr").glob("*_0000.nii.gz"))
    ds = "Dataset004_Hippocampus"
    raw = tmp_path / "raw" / ds
    for sub in ("imagesTr", "labelsTr", "predict"):
        (raw / sub).mkdir(parents=True)
    for case in cases[:5]:
        shutil.copy(HIPPOCAMPUS / "imagesTr" / f"{case}_0000.nii.gz", raw / "imagesTr")
        shutil.copy(HIPPOCAMPUS / "labelsTr" / f"{case}.nii.gz", raw / "labelsTr")
    shutil.copy(HIPPOCAMPUS / "imagesTr" / f"{cases[5]}_0000.nii.gz", raw / "predict")
    meta = json.loads((HIPPOCAMPUS / "dataset.json").read_text())
    meta["numTraining"] = 5
    (raw / "dataset.json").write_text(json.dumps(meta))
    env = nnunet_env(tmp_path, training=False)
    run_cli(["nnUNetv2_plan_and_preprocess", "-d", "4", "-c", "3d_fullres", "-np", "2", "-npfp", "2"], env=env)
    run_cli(["nnUNetv2_ssl_make_splits", "-d", "4", "--num-labeled", "3"], env=env)
    lower_batch_size(tmp_path / "preprocessed" / ds)
    _train_quality_train_predict(tmp_path, 4, ds, "nnUNetTrainerMeanTeacherQualityGuided", raw / "predict")
