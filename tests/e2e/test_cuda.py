"""The CUDA paths of every SSL trainer: mixed precision (nnU-Net's autocast + GradScaler), torch.compile, resume.

Skipped on machines without a GPU (CI); run them on one with ``pytest -m cuda``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import case_ids, make_trainer, save_untrained_quality_predictor, write_budget_splits
from torch._dynamo import OptimizedModule

import nnunet_ssl.trainers as trainers
from nnunet_ssl.compat.trainer import unwrap
from nnunet_ssl.losses import medl
from nnunet_ssl.trainers.base import nnUNetTrainerSSL

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

SSL_TRAINERS = [n for n in trainers.__all__ if issubclass(getattr(trainers, n), nnUNetTrainerSSL)
                and not getattr(getattr(trainers, n), "inference_only", False)]


def _prepare(ds: dict, name: str) -> Path:
    pp = ds["root"] / "preprocessed" / ds["dataset"]
    ids = case_ids(pp)
    write_budget_splits(pp, ids[:2], ids[2:4], ids[4:])
    if "Quality" in name or name.endswith(("QAR", "QW")):
        save_untrained_quality_predictor(pp, ds["root"] / "results")
    if getattr(getattr(trainers, name), "planar_only", False):
        # 2d preprocessing of these volumes writes the 3d_fullres arrays (in-plane spacing 1 x 1, no resampling)
        (pp / "nnUNetPlans_2d").symlink_to(pp / "nnUNetPlans_3d_fullres")
    return pp


def _second_network(trainer):
    return getattr(trainer, "network2", None)


def _recording_precision(loss_fn, seen: dict):
    """``loss_fn`` that also records whether autocast was on and the dtype of its first (prediction) argument."""
    def wrapper(prediction, *args, **kwargs):
        seen["autocast_in_unsup"].add(torch.is_autocast_enabled("cuda"))
        seen["student_dtypes"].add(prediction.dtype)
        return loss_fn(prediction, *args, **kwargs)
    return wrapper


@pytest.mark.parametrize("name", SSL_TRAINERS)
def test_amp_training_validation_and_resume_on_cuda(name, copy_planned, monkeypatch):
    _prepare(copy_planned, name)
    monkeypatch.setenv("nnUNet_compile", "f")
    monkeypatch.delenv("nnUNet_ssl_quality_checkpoint", raising=False)
    cls = getattr(trainers, name)
    configuration = "2d" if getattr(cls, "planar_only", False) else "3d_fullres"
    trainer = make_trainer(cls, copy_planned["root"], copy_planned["dataset"], monkeypatch, epochs=2, iterations=3,
                           device="cuda", configuration=configuration)
    assert trainer.grad_scaler is not None  # nnU-Net's AMP is on for CUDA

    seen = {"student_dtypes": set(), "unsup_dtypes": set(), "autocast_in_unsup": set()}
    forward_losses = trainer.forward_losses

    def recording_forward_losses(step):
        sup, unsup, stats = forward_losses(step)
        seen["unsup_dtypes"].add(unsup.dtype)
        return sup, unsup, stats

    monkeypatch.setattr(trainer, "forward_losses", recording_forward_losses)
    monkeypatch.setattr(trainer, "unsupervised_loss", _recording_precision(trainer.unsupervised_loss, seen))
    if name.startswith("nnUNetTrainerMEDL"):  # MEDL's step computes its evidential losses itself
        monkeypatch.setattr(medl, "fisher_evidential_loss", _recording_precision(medl.fisher_evidential_loss, seen))
    half_outputs = []
    trainer.initialize()
    hook = unwrap(trainer.network).register_forward_hook(
        lambda m, i, o: half_outputs.append((o[0] if isinstance(o, (list, tuple)) else o).dtype))
    trainer.run_training()
    hook.remove()

    # the network ran in half precision, the SSL terms in float32 outside autocast
    assert torch.float16 in half_outputs
    assert seen["unsup_dtypes"] == {torch.float32}
    assert seen["student_dtypes"] == {torch.float32} and seen["autocast_in_unsup"] == {False}
    log = trainer.logger.local_logger.my_fantastic_logging
    for key in ("ssl_sup_loss", "ssl_unsup_loss", "ssl_lambda"):
        assert len(log[key]) == 2 and all(math.isfinite(v) for v in log[key]), (key, log[key])
    assert all(math.isfinite(v) for v in log["train_losses"])
    assert next(unwrap(trainer.network).parameters()).is_cuda
    out = Path(trainer.output_folder)
    for f in ("checkpoint_final.pth", "progress.png", "progress_ssl.png"):
        assert (out / f).is_file(), f
    final = torch.load(out / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert final["ssl_state"]["ssl_step"] == 6
    assert final["grad_scaler_state"] is not None and final["grad_scaler_state"]["scale"] > 0
    for k, v in final["network_weights"].items():
        assert torch.isfinite(v).all(), k

    # nnU-Net's validation (sliding window on CUDA) with the trained student
    trainer.perform_actual_validation(False)
    summary = json.loads((out / "validation" / "summary.json").read_text())
    assert len(summary["metric_per_case"]) == 2  # the two validation cases

    # --c: the scaler, counters and reference models come back on CUDA and training continues
    resumed = make_trainer(cls, copy_planned["root"], copy_planned["dataset"], monkeypatch, epochs=3, iterations=3,
                           device="cuda", continue_training=True, configuration=configuration)
    resumed.initialize()
    resumed.load_checkpoint(str(out / "checkpoint_final.pth"))
    assert resumed.grad_scaler.get_scale() == pytest.approx(final["grad_scaler_state"]["scale"])
    assert resumed.ssl_step == 6
    ref = resumed.reference_network()
    if ref is not None:
        assert next(ref.parameters()).is_cuda
    resumed.run_training()
    assert resumed.ssl_step == 9 and resumed.current_epoch == 3


# + forward hooks on the compiled student (TransMedSeg) and torch.func on the module behind it (MLB-Seg)
@pytest.mark.parametrize("name", ["nnUNetTrainerMeanTeacher", "nnUNetTrainerCPS", "nnUNetTrainerMEDL",
                                  "nnUNetTrainerMeanTeacherTransMedSeg", "nnUNetTrainerMLBSeg"])
def test_compiled_training_on_cuda(name, copy_planned, monkeypatch):
    _prepare(copy_planned, name)
    monkeypatch.setenv("nnUNet_compile", "t")
    cls = getattr(trainers, name)
    trainer = make_trainer(cls, copy_planned["root"], copy_planned["dataset"], monkeypatch, epochs=1, iterations=3,
                           device="cuda")
    trainer.initialize()
    assert isinstance(trainer.network, OptimizedModule)
    second = _second_network(trainer)
    if second is not None:  # a second trained network is compiled like the student
        assert isinstance(second, OptimizedModule)
    student = unwrap(trainer.network)
    initial = {k: v.detach().clone() for k, v in student.state_dict().items()}
    trainer.run_training()
    changed = [k for k, v in student.state_dict().items() if not torch.equal(v, initial[k])]
    assert changed, "the compiled student was not updated"
    if hasattr(trainer, "teacher"):  # the EMA reads the compiled student's parameters
        for k, v in trainer.teacher.state_dict().items():
            if k in changed and v.dtype.is_floating_point:
                assert not torch.equal(v, initial[k]), k
    log = trainer.logger.local_logger.my_fantastic_logging
    assert all(math.isfinite(v) for v in log["ssl_sup_loss"] + log["ssl_unsup_loss"])
    out = Path(trainer.output_folder)
    # checkpoints hold plain module keys, loadable by nnUNetv2_predict without torch.compile
    for f in ["checkpoint_final.pth", *sorted(p.name for p in out.glob("checkpoint_final_*.pth"))]:
        weights = torch.load(out / f, map_location="cpu", weights_only=False)["network_weights"]
        assert not any("_orig_mod" in k for k in weights), f
    final = torch.load(out / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert set(final["network_weights"]) == set(initial)
    for key in ("network2_weights", "teacher_weights"):
        if key in final["ssl_state"]:
            assert not any("_orig_mod" in k for k in final["ssl_state"][key]), key
