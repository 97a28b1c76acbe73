"""nnUNetTrainerMEDL in-process (two architectures, losses, checkpoints) and end to end with
nnUNetv2_ssl_predict_uncertainty (synthetic data and a few Hippocampus cases)."""

from __future__ import annotations

import copy
import csv
import math
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import HIPPOCAMPUS, lower_batch_size, nnunet_env, run_cli
from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet
from helpers import (
    budget_split,
    copy_hippocampus,
    make_trainer,
    planned_plans,
    read_image,
    state_copy,
    write_budget_splits,
)
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunet_ssl.compat.trainer import unwrap
from nnunet_ssl.errors import SSLInputError
from nnunet_ssl.parts.balance import LossBalance
from nnunet_ssl.trainers import nnUNetTrainerMEDL, nnUNetTrainerMEDLNet2
from nnunet_ssl.trainers.base import ENV_PRESET, nnUNetTrainerSSL
from nnunet_ssl.trainers.hosts.architectures import RESENC_BLOCKS_PER_STAGE, build_other_unet, other_unet_architecture
from nnunet_ssl.trainers.hosts.two_networks import TwoNetworks
from nnunet_ssl.trainers.step import SSLStep

#: what ``preset = "paper"`` must restore: MEDL's configuration before the presets existed
PAPER = {"unsupervised_share": None, "unsupervised_weight": 0.1, "rampup_fraction": 1.0,
         "medl_reliability_quantile": None, "medl_pseudo_label_warmup": False}


class _PaperMEDL(nnUNetTrainerMEDL):
    preset = "paper"


def _bare_medl(monkeypatch, cls=nnUNetTrainerMEDL, step: int = 0):
    """A MEDL trainer object without nnU-Net's __init__ (no plans, no networks): its class attributes after
    ``apply_preset``, the schedule of 10 x 10 iterations at ``step`` and the loss module."""
    monkeypatch.setattr(TwoNetworks, "build_ssl_modules", lambda self: None)
    trainer = cls.__new__(cls)
    trainer.apply_preset()
    trainer.num_epochs, trainer.num_iterations_per_epoch, trainer.ssl_step = 10, 10, step
    trainer.loss_balance = LossBalance(initial_weight=trainer.unsupervised_weight)
    trainer.label_manager = SimpleNamespace(ignore_label=None)
    trainer.build_ssl_modules()
    return trainer


def _medl_attributes(trainer) -> dict:
    return {k: getattr(trainer, k) for k in dir(type(trainer)) if k.startswith("medl_") and
            not callable(getattr(trainer, k))}


def test_medl_default_preset_acts_and_paper_preset_restores_the_published_configuration(monkeypatch):
    monkeypatch.delenv(ENV_PRESET, raising=False)
    default = _bare_medl(monkeypatch)
    assert default.preset == "default"
    # lambda_GWU follows the common convention of the base class; L_u is masked by R and warmed up
    assert default.unsupervised_share is None and nnUNetTrainerSSL.unsupervised_share is None
    assert default.rampup_fraction == nnUNetTrainerSSL.rampup_fraction == 0.2
    assert default.medl_reliability_quantile == 0.2 and default.medl_pseudo_label_warmup
    assert default.medl_loss.reliability_quantile == 0.2
    for paper in (_bare_medl(monkeypatch, _PaperMEDL), None):
        if paper is None:  # the environment variable does the same for the catalogue class
            monkeypatch.setenv(ENV_PRESET, "paper")
            paper = _bare_medl(monkeypatch)
        assert paper.preset == "paper"
        assert {k: getattr(paper, k) for k in PAPER} == PAPER
        assert paper.medl_loss.reliability_quantile is None
        # nothing else changes, and the class keeps its defaults
        others = {k: v for k, v in _medl_attributes(paper).items() if k not in PAPER}
        assert others == {k: v for k, v in _medl_attributes(default).items() if k not in PAPER}
        assert others["medl_pseudo_label_weight"] == others["medl_weighted_labeled_weight"] == 1.0
        assert others["medl_fisher_coefficient"] == 0.05 and others["medl_curriculum_direction"] == "easy_to_hard"
    assert nnUNetTrainerMEDL.medl_reliability_quantile == 0.2 and nnUNetTrainerMEDL.unsupervised_share is None


def _logits(seed: int):
    g = torch.Generator().manual_seed(seed)
    unlabeled = [torch.randn(2, 3, 4, 4, 4, generator=g) * 2 for _ in range(2)]
    labeled = [torch.randn(2, 3, 4, 4, 4, generator=g) * 2 for _ in range(2)]
    return unlabeled, labeled, torch.randint(0, 3, (2, 4, 4, 4), generator=g)


@pytest.mark.parametrize("preset", ["default", "paper"])
def test_medl_step_weights_lambda_only_the_fisher_term_and_warms_up_the_pseudo_labels(monkeypatch, preset):
    monkeypatch.setenv(ENV_PRESET, preset)
    trainer = _bare_medl(monkeypatch, step=10)  # iteration 10 of 100
    unlabeled, labeled, labels = _logits(0)
    if preset == "default":  # the common ramp over 20 iterations, lambda = 0.1 ramp
        ramp = math.exp(-5 * (1 - 10 / 20) ** 2)
        w_u, lam = ramp, 0.1 * ramp
    else:  # L_u at weight 1, lambda_GWU = 0.1 exp(-5 (1 - t / T)^2) over all 100 iterations
        w_u, lam = 1.0, 0.1 * math.exp(-5 * (1 - 10 / 100) ** 2)
    assert trainer.ramp() == pytest.approx(ramp if preset == "default" else lam / 0.1)
    assert trainer.current_lambda() == pytest.approx(lam)
    step = SSLStep(data=torch.zeros(2, 1, 4, 4, 4), target=[labels[:, None].float()], views={},
                   lam=trainer.current_lambda())
    fisher, stats = trainer.mutual_loss(unlabeled, labeled, step)
    terms = trainer.medl_loss(unlabeled, labeled, labels, 0.1)  # progress q / Q = 10 / 100
    assert float(fisher) == pytest.approx(float(terms.fisher), rel=1e-6)
    sup = torch.tensor(1.5)
    expected = 1.5 + w_u * float(terms.pseudo_label) + float(terms.weighted_labeled) + lam * float(terms.fisher)
    assert float(step.total(sup, fisher)) == pytest.approx(expected, rel=1e-6)
    assert stats["medl_pseudo_weight"] == pytest.approx(w_u)
    # paper: weight-1 constant terms; default: the warmed-up L_u is a scheduled term beside the constant L_wl
    assert len(step.constant_losses) == (2 if preset == "paper" else 1) and \
        len(step.scheduled_losses) == (0 if preset == "paper" else 1)
    # the reliability acts as a mask (at least 1 - q of the voxels kept) or as R itself
    if preset == "default":
        assert 0.8 <= stats["medl_kept"] < 1.0
    else:
        assert stats["medl_kept"] == pytest.approx(stats["medl_reliability"])
    assert {"ssl_medl_kept", "ssl_medl_pseudo_weight"} <= set(trainer.ssl_log_keys())


def test_medl_warns_when_the_reliability_keeps_nearly_nothing_or_a_soft_weight_barely_acts(monkeypatch):
    monkeypatch.delenv(ENV_PRESET, raising=False)
    default, paper = _bare_medl(monkeypatch), _bare_medl(monkeypatch, _PaperMEDL)
    assert any("keeps only 0.5%" in w for w in default.mechanism_warnings({"ssl_medl_kept": 0.005}))
    assert not any("MEDL" in w for w in default.mechanism_warnings({"ssl_medl_kept": 0.8}))
    assert any("barely changes L_u" in w for w in paper.mechanism_warnings({"ssl_medl_kept": 0.995}))
    assert not any("MEDL" in w for w in paper.mechanism_warnings({"ssl_medl_kept": 0.9}))
    assert any("keeps only" in w for w in paper.mechanism_warnings({"ssl_medl_kept": 0.001}))
    # the base class's warnings are kept
    assert any("negligible" in w for w in default.mechanism_warnings({"ssl_ramp": 1.0, "ssl_unsup_share": 1e-4,
                                                                      "ssl_medl_kept": 0.8}))


def test_second_network_is_the_other_unet_with_the_same_pooling(synthetic_planned):
    plans = planned_plans(synthetic_planned)
    cm = PlansManager(plans).get_configuration("3d_fullres")
    name, kwargs = other_unet_architecture(cm)
    assert name.endswith("ResidualEncoderUNet")
    n = cm.network_arch_init_kwargs["n_stages"]
    assert kwargs["n_blocks_per_stage"] == list(RESENC_BLOCKS_PER_STAGE[:n])
    for key in ("strides", "kernel_sizes", "features_per_stage", "n_stages", "norm_op", "conv_op"):
        assert kwargs[key] == cm.network_arch_init_kwargs[key], key
    pm = PlansManager(plans)
    net1 = nnUNetTrainerMEDL.build_network_architecture(pm, cm, 1, 3, True)
    net2 = nnUNetTrainerMEDLNet2.build_network_architecture(pm, cm, 1, 3, True)
    assert type(net1) is PlainConvUNet and type(net2) is ResidualEncoderUNet
    x = torch.randn(1, 1, *cm.patch_size)
    with torch.no_grad():
        out1, out2 = net1(x), net2(x)
    assert [o.shape for o in out1] == [o.shape for o in out2]  # same deep-supervision scales for nnU-Net's loss
    # ResEnc plans give a PlainConvUNet; other architectures are refused
    resenc = copy.deepcopy(plans)
    arch = resenc["configurations"]["3d_fullres"]["architecture"]
    arch["network_class_name"], arch["arch_kwargs"] = name, kwargs
    cm_resenc = PlansManager(resenc).get_configuration("3d_fullres")
    assert other_unet_architecture(cm_resenc)[0].endswith("PlainConvUNet")
    assert type(build_other_unet(PlansManager(resenc), cm_resenc, 1, 3, False)) is PlainConvUNet
    arch["network_class_name"] = "my.own.Net"
    with pytest.raises(SSLInputError, match="PlainConvUNet and ResidualEncoderUNet"):
        other_unet_architecture(PlansManager(resenc).get_configuration("3d_fullres"))


def test_medl_trains_both_networks_and_checkpoints_them(copy_planned, monkeypatch, tmp_path):
    budget_split(copy_planned)
    trainer = make_trainer(nnUNetTrainerMEDL, copy_planned["root"], copy_planned["dataset"], monkeypatch,
                           epochs=2, iterations=2)
    trainer.on_train_start()
    try:
        assert type(unwrap(trainer.network)) is PlainConvUNet
        assert type(unwrap(trainer.network2)) is ResidualEncoderUNet
        assert trainer.optimizer2 is not trainer.optimizer
        before1, before2 = state_copy(unwrap(trainer.network)), state_copy(unwrap(trainer.network2))
        trainer.on_train_epoch_start()
        trainer.train_step(next(trainer.dataloader_train))
        out = trainer.train_step(next(trainer.dataloader_train))
        for before, net in ((before1, trainer.network), (before2, trainer.network2)):
            after = unwrap(net).state_dict()
            assert any(not torch.equal(before[k], after[k]) for k in before)
        stats = trainer._epoch_stats[-1]
        for key in ("ssl_sup_loss", "ssl_medl_pseudo", "ssl_medl_weighted_ce", "ssl_medl_fisher",
                    "ssl_medl_reliability", "ssl_medl_uncertainty", "ssl_medl_agreement", "ssl_confidence"):
            assert math.isfinite(stats[key]), key
        assert 0 < stats["ssl_medl_reliability"] <= 1 and 0 < stats["ssl_medl_uncertainty"] < 1
        # L = L_l + r(t) L_u + L_wl + lambda L_I: the supervised loss is nnU-Net's Dice + CE (L_l) alone, L_u (warmed
        # up by the common ramp) and L_wl have their own log keys, L_I (FIE) is scaled by lambda
        assert stats["ssl_medl_pseudo_weight"] == pytest.approx(stats["ssl_ramp"]) and stats["ssl_ramp"] > 0.9
        assert float(out["loss"]) == pytest.approx(stats["ssl_sup_loss"]
                                                   + stats["ssl_medl_pseudo_weight"] * stats["ssl_medl_pseudo"]
                                                   + stats["ssl_medl_weighted_ce"]
                                                   + stats["ssl_lambda"] * stats["ssl_medl_fisher"], rel=1e-5)
        assert stats["ssl_unsup_loss"] == pytest.approx(stats["ssl_medl_fisher"], rel=1e-5)
        assert 0.8 <= stats["ssl_medl_kept"] <= 1.0  # the reliability mask keeps >= 1 - q of each pseudo-class
        panels = dict(trainer.ssl_plot_panels())
        assert panels["MEDL losses (both networks)"]["L_l (Dice+CE)"] == "ssl_sup_loss"
        assert trainer.training_progress() == pytest.approx(2 / 4)
        assert trainer.rampup_fraction == 0.2 and trainer.medl_curriculum_direction == "easy_to_hard"

        ckpt = tmp_path / "medl.pth"
        trainer.save_checkpoint(str(ckpt))
        saved = torch.load(ckpt, map_location="cpu", weights_only=False)
        assert set(saved["network_weights"]) == set(unwrap(trainer.network).state_dict())
        assert set(saved["ssl_state"]["network2_weights"]) == set(unwrap(trainer.network2).state_dict())
        resumed = make_trainer(nnUNetTrainerMEDL, copy_planned["root"], copy_planned["dataset"], monkeypatch,
                               epochs=2, iterations=2, continue_training=True)
        resumed.load_checkpoint(str(ckpt))
        assert resumed.ssl_step == 2
        for k, v in unwrap(trainer.network2).state_dict().items():
            assert torch.equal(unwrap(resumed.network2).state_dict()[k], v), k
        assert resumed.optimizer2.state_dict()["state"].keys() == trainer.optimizer2.state_dict()["state"].keys()
        momentum = next(iter(trainer.optimizer2.state_dict()["state"].values()))["momentum_buffer"]
        assert torch.equal(next(iter(resumed.optimizer2.state_dict()["state"].values()))["momentum_buffer"],
                           momentum)
    finally:
        trainer.on_train_end()
    # network 2's final checkpoint names the class that builds its architecture, and loads strictly into it
    final2 = torch.load(f"{trainer.output_folder}/checkpoint_final_net2.pth", map_location="cpu", weights_only=False)
    assert final2["trainer_name"] == "nnUNetTrainerMEDLNet2"
    assert final2["network_class_name"].endswith("ResidualEncoderUNet")
    net = nnUNetTrainerMEDLNet2.build_network_architecture(trainer.plans_manager, trainer.configuration_manager,
                                                           trainer.num_input_channels, 3, False)
    net.load_state_dict(final2["network_weights"])
    final1 = torch.load(f"{trainer.output_folder}/checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert final1["trainer_name"] == "nnUNetTrainerMEDL"
    with pytest.raises(SSLInputError, match="train with -tr nnUNetTrainerMEDL"):
        make_trainer(nnUNetTrainerMEDLNet2, copy_planned["root"], copy_planned["dataset"], monkeypatch)


def test_medl_paper_preset_on_a_built_trainer(copy_planned, monkeypatch):
    budget_split(copy_planned)
    monkeypatch.setenv(ENV_PRESET, "paper")
    trainer = make_trainer(nnUNetTrainerMEDL, copy_planned["root"], copy_planned["dataset"], monkeypatch)
    assert trainer.preset == "paper" and {k: getattr(trainer, k) for k in PAPER} == PAPER
    trainer.initialize()
    assert trainer.medl_loss.reliability_quantile is None and trainer.pseudo_label_schedule() == 1.0


# ---------------------------------------------------------------------------------------------- end to end
def _same_geometry(a: sitk.Image, b: sitk.Image) -> bool:
    return a.GetSize() == b.GetSize() and np.allclose(a.GetSpacing(), b.GetSpacing()) and \
        np.allclose(a.GetOrigin(), b.GetOrigin()) and np.allclose(a.GetDirection(), b.GetDirection())


def _train_in_process(root, dataset: str, steps: int, resume_steps: int, tmp) -> str:
    """MEDL trained ``steps`` iterations, checkpointed, resumed in a new trainer for ``resume_steps`` more, then
    finished as nnUNetv2_train finishes (checkpoint_final.pth and checkpoint_final_net2.pth). Returns the fold
    folder."""
    # two epochs of max(steps, resume_steps) iterations: the resumed trainer continues at epoch 1 (LR > 0)
    total, per_epoch = steps + resume_steps, max(steps, resume_steps)
    with pytest.MonkeyPatch.context() as mp:
        first = make_trainer(nnUNetTrainerMEDL, root, dataset, mp, epochs=2, iterations=per_epoch)
        first.on_train_start()
        first.on_train_epoch_start()
        for _ in range(steps):
            first.train_step(next(first.dataloader_train))
        first.save_checkpoint(str(tmp / "mid.pth"))
        first.on_train_end()
        second = make_trainer(nnUNetTrainerMEDL, root, dataset, mp, epochs=2, iterations=per_epoch,
                              continue_training=True)
        second.load_checkpoint(str(tmp / "mid.pth"))
        second.on_train_start()
        second.on_train_epoch_start()
        for _ in range(resume_steps):
            second.train_step(next(second.dataloader_train))
        assert second.ssl_step == total and second.current_epoch == 1
        second.on_train_end()
        return second.output_folder


@pytest.mark.slow
def test_medl_end_to_end_predict_and_uncertainty(copy_planned, tmp_path):
    """Train (4 steps), resume (4 more), predict both networks with nnUNetv2_predict, and
    nnUNetv2_ssl_predict_uncertainty on clean and corrupted (voxel-shuffled) test images."""
    root, ds = copy_planned["root"], copy_planned["dataset"]
    budget_split(copy_planned)
    fold = _train_in_process(root, ds, 4, 4, tmp_path)
    env = nnunet_env(root, training=False)
    images = root / "raw" / ds / "imagesTs"
    mixed = tmp_path / "mixed"  # clean images and their voxel-shuffled copies, same geometry
    mixed.mkdir()
    rng = np.random.default_rng(0)
    cases = sorted(p.name[: -len("_0000.nii.gz")] for p in images.glob("*_0000.nii.gz"))
    for case in cases:
        array, img = read_image(images / f"{case}_0000.nii.gz")
        shutil.copy(images / f"{case}_0000.nii.gz", mixed)
        shuffled = sitk.GetImageFromArray(rng.permutation(array.ravel()).reshape(array.shape).astype(np.float32))
        shuffled.CopyInformation(img)
        sitk.WriteImage(shuffled, str(mixed / f"corrupt{case}_0000.nii.gz"))

    predictions = {}
    for chk in ("checkpoint_final.pth", "checkpoint_final_net2.pth"):  # network 2 loads with plain nnUNetv2_predict
        predictions[chk] = tmp_path / chk.removesuffix(".pth")
        run_cli(["nnUNetv2_predict", "-i", str(images), "-o", str(predictions[chk]), "-d", "990", "-c", "3d_fullres",
                 "-f", "0", "-tr", "nnUNetTrainerMEDL", "-chk", chk, "-device", "cpu", "-npp", "1", "-nps", "1"],
                env=env)
    out = tmp_path / "uncertainty"
    env_no_ext = {k: v for k, v in env.items() if k != "nnUNet_extTrainer"}  # the command finds our trainers itself
    proc = run_cli(["nnUNetv2_ssl_predict_uncertainty", "-i", str(mixed), "-o", str(out), "-d", "990", "-c",
                    "3d_fullres", "-f", "0", "-tr", "nnUNetTrainerMEDL", "-device", "cpu", "-npp", "1"],
                   env=env_no_ext)
    assert "predicting with uncertainty" in proc.stderr  # tqdm progress
    rows = list(csv.DictReader((out / "uncertainty.csv").open()))
    assert len(rows) == 2 * len(cases) and {r["measure"] for r in rows} == {"dirichlet_total_uncertainty"}
    means = [float(r["mean"]) for r in rows]
    assert means == sorted(means, reverse=True)
    mean = {r["case"]: float(r["mean"]) for r in rows}
    for case in cases:
        seg, seg_img = read_image(out / f"{case}.nii.gz")
        ref, ref_img = read_image(predictions["checkpoint_final.pth"] / f"{case}.nii.gz")
        assert np.array_equal(seg, ref) and _same_geometry(seg_img, ref_img)  # exactly what nnUNetv2_predict writes
        for prefix in ("", "corrupt"):
            u, u_img = read_image(out / f"{prefix}{case}_uncertainty.nii.gz")
            _, img = read_image(mixed / f"{prefix}{case}_0000.nii.gz")
            assert _same_geometry(u_img, img) and u.dtype == np.float32
            assert 0 < u.min() and u.max() < 1  # K/S of finite evidence; the synthetic images are not cropped
            assert float(u.mean()) == pytest.approx(mean[f"{prefix}{case}"], rel=1e-4)
        # corrupted input: less evidence, higher uncertainty (measured margin about 0.01 after 8 steps)
        assert mean[f"corrupt{case}"] > mean[case] + 0.004, (mean[f"corrupt{case}"], mean[case])
        net2, net2_img = read_image(predictions["checkpoint_final_net2.pth"] / f"{case}.nii.gz")
        assert _same_geometry(net2_img, seg_img) and set(np.unique(net2)) <= {0, 1, 2}
    final2 = torch.load(f"{fold}/checkpoint_final_net2.pth", map_location="cpu", weights_only=False)
    assert final2["trainer_name"] == "nnUNetTrainerMEDLNet2"


@pytest.fixture(scope="module")
def hippocampus_medl(tmp_path_factory) -> dict:
    """4 labeled Hippocampus training cases (3 train, 1 val) and 2 unlabeled ones, planned for 3d_fullres with the
    batch size lowered to 2 for CPU."""
    if not HIPPOCAMPUS.is_dir():
        pytest.skip("../shared/data/Dataset004_Hippocampus not found")
    root = tmp_path_factory.mktemp("hippocampus_medl")
    source = sorted(p.name[: -len("_0000.nii.gz")] for p in (HIPPOCAMPUS / "imagesTr").glob("*_0000.nii.gz"))
    labeled, unlabeled = source[:4], source[4:6]
    ds = "Dataset004_Hippocampus"
    raw = root / "raw" / ds
    copy_hippocampus(raw, HIPPOCAMPUS, labeled, unlabeled)  # training cases only; imagesTs is never used
    env = nnunet_env(root, training=False)
    run_cli(["nnUNetv2_plan_and_preprocess", "-d", "4", "-c", "3d_fullres", "-np", "2", "-npfp", "2"], env=env)
    run_cli(["nnUNetv2_ssl_preprocess_unlabeled", "-d", "4", "-c", "3d_fullres", "-np", "2"], env=env)
    pp = root / "preprocessed" / ds
    write_budget_splits(pp, labeled[:3], labeled[3:], [])
    lower_batch_size(pp)
    return {"root": root, "dataset": ds, "raw": raw}


@pytest.mark.slow
@pytest.mark.realdata
def test_medl_on_hippocampus_train_resume_and_uncertainty_of_both_networks(hippocampus_medl, tmp_path):
    root, ds, raw = hippocampus_medl["root"], hippocampus_medl["dataset"], hippocampus_medl["raw"]
    _train_in_process(root, ds, 1, 1, tmp_path)
    out = tmp_path / "uncertainty"
    run_cli(["nnUNetv2_ssl_predict_uncertainty", "-i", str(raw / "imagesUnlabeled"), "-o", str(out), "-d", "4",
             "-c", "3d_fullres", "-f", "0", "-tr", "nnUNetTrainerMEDL", "-chk", "checkpoint_final.pth",
             "checkpoint_final_net2.pth", "-device", "cpu", "-npp", "1", "--disable_tta"],
            env=nnunet_env(root, training=False))
    rows = list(csv.DictReader((out / "uncertainty.csv").open()))
    images = sorted((raw / "imagesUnlabeled").glob("*_0000.nii.gz"))
    assert sorted(r["case"] for r in rows) == sorted(p.name[: -len("_0000.nii.gz")] for p in images)
    for image in images:
        case = image.name[: -len("_0000.nii.gz")]
        _, img = read_image(image)
        u, u_img = read_image(out / f"{case}_uncertainty.nii.gz")
        seg, seg_img = read_image(out / f"{case}.nii.gz")
        assert _same_geometry(u_img, img) and _same_geometry(seg_img, img)  # real spacing, origin and direction
        assert u.dtype == np.float32 and 0 <= u.min() and u.max() < 1 and u.max() > 0
        row = next(r for r in rows if r["case"] == case)
        assert float(row["mean"]) == pytest.approx(float(u.mean()), rel=1e-4)
        assert float(row["max"]) == pytest.approx(float(u.max()), rel=1e-4)
        assert int(row["foreground_voxels"]) == int((seg > 0).sum())
