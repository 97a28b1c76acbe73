"""Quality predictor of quality-guided SSL (Phase 1): the mask-quality generator, the predictor network, its
checkpoint, and the nnUNetv2_ssl_train_quality command end to end."""

from __future__ import annotations

import json
import pickle
import shutil

import numpy as np
import pytest
import torch
from conftest import HIPPOCAMPUS, lower_batch_size, nnunet_env, run_cli

from nnunet_ssl.errors import SSLInputError
from nnunet_ssl.quality import corruptions as qc
from nnunet_ssl.quality.predictor import (
    QualityPredictor,
    build_quality_predictor,
    load_quality_predictor,
    quality_checkpoint_path,
    save_quality_checkpoint,
)

# ------------------------------------------------------------------------------------------------ generator


def _ball(shape, center, radius):
    grid = np.ogrid[tuple(slice(0, s) for s in shape)]
    return sum((g - c) ** 2 for g, c in zip(grid, center)) <= radius ** 2


def _gt(dim: int) -> np.ndarray:
    """Class 1: a large ball and a small separate one (two components); class 2: two boxes with a 2-voxel gap
    (so closing bridges it)."""
    shape = (24, 48, 48) if dim == 3 else (48, 48)
    gt = np.zeros(shape, dtype=np.int16)
    c = (12, 16, 16) if dim == 3 else (16, 16)
    gt[_ball(shape, c, 7)] = 1
    gt[_ball(shape, (4, 40, 6) if dim == 3 else (40, 6), 3)] = 1
    box = (slice(6, 18),) if dim == 3 else ()
    gt[box + (slice(28, 40), slice(24, 32))] = 2
    gt[box + (slice(28, 40), slice(34, 42))] = 2
    return gt


@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("name", sorted(set(qc.CORRUPTIONS) | set(qc.CATASTROPHIC)))
def test_each_corruption_lowers_dice(name, dim):
    gt = _gt(dim)
    fn = qc.CORRUPTIONS.get(name) or qc.CATASTROPHIC[name]
    out = fn(gt, np.random.default_rng(0), 3, 0.5)
    assert out.shape == gt.shape and out.dtype == gt.dtype
    assert set(np.unique(out)) <= {0, 1, 2}
    dice = qc.dice_per_class(out, gt, 3)
    assert dice.min() < 0.999, (name, dice)
    if name in qc.CATASTROPHIC:
        assert dice.mean() < 0.3, (name, dice)


def test_dice_convention_by_hand():
    gt = np.zeros((10, 10), dtype=np.int16)
    gt[2:6, 2:6] = 1  # 16 voxels of class 1, class 2 absent
    assert np.allclose(qc.dice_per_class(gt, gt, 3), [1.0, 1.0])  # identity; absent in both -> 1
    assert np.allclose(qc.dice_per_class(np.zeros_like(gt), gt, 3), [1 / 17, 1.0])  # empty: 1/(n+1)
    pred = gt.copy()
    pred[0, :3] = 2  # 3 false voxels of the absent class
    assert np.allclose(qc.dice_per_class(pred, gt, 3), [1.0, 1 / 4])
    soft = qc.one_hot(gt, 3) * 0.5  # half confidence everywhere it is right
    assert np.allclose(qc.dice_per_class(soft, gt, 3)[0], (2 * 8 + 1) / (8 + 16 + 1))
    # padding (-1) and the ignore label are excluded from the sums
    gt_pad = gt.copy()
    gt_pad[8:, :] = -1
    gt_pad[7, :] = 3
    pred_pad = gt.copy()
    pred_pad[7:, :] = 1
    assert np.allclose(qc.dice_per_class(pred_pad, gt_pad, 3, qc.valid_voxels(gt_pad, ignore_label=3)), [1, 1])


def test_erosion_exact_and_monotonic():
    gt = np.zeros((30, 30), dtype=np.int16)
    gt[5:15, 5:15] = 1  # 10x10 square; radius-1 ball in 2D is the 4-neighbourhood -> 8x8 remains
    out = qc.erode(gt, np.random.default_rng(0), 2, strength=0.0)
    assert (out == 1).sum() == 64
    assert np.isclose(qc.dice_per_class(out, gt, 2)[0], (2 * 64 + 1) / (64 + 100 + 1))
    dice = [qc.dice_per_class(qc.dilate(gt, np.random.default_rng(0), 2, s), gt, 2)[0] for s in (0.0, 0.5, 1.0)]
    assert dice[0] > dice[1] > dice[2]


def test_sampler_identity_categories_and_ranges():
    gt = _gt(3)
    sampler = qc.MaskQualitySampler(3, seed=0)
    mask, desc = sampler.sample(gt, "identity")
    assert desc == "identity" and np.array_equal(qc.dice_per_class(mask, gt, 3), [1.0, 1.0])
    assert "weak" not in sampler.categories
    with pytest.raises(ValueError):
        sampler.sample(gt, "weak")
    drawn = [sampler.draw_category() for _ in range(4000)]
    for cat, p in zip(sampler.categories, sampler.probs):
        assert abs(drawn.count(cat) / len(drawn) - p) < 0.03
    targets, soft = [], 0
    for _ in range(60):
        mask, desc = sampler.sample(gt, others=[np.roll(gt, 7, axis=1)])
        assert mask.shape == (3, *gt.shape) and mask.dtype == np.float32
        assert np.allclose(mask.sum(0), 1, atol=1e-4)
        soft += desc.endswith("+soft")
        targets.append(qc.dice_per_class(mask, gt, 3))
    targets = np.array(targets)
    assert targets.min() >= 0 and targets.max() <= 1
    assert targets.min() < 0.2 and targets.max() == 1.0 and targets.std() > 0.2  # a wide range of qualities
    assert 3 <= soft <= 30
    with_weak = qc.MaskQualitySampler(3, seed=0, weak_available=True)
    assert "weak" in with_weak.categories and np.isclose(with_weak.probs.sum(), 1)


# ------------------------------------------------------------------------------------------------ predictor


def _configuration(dim: int, residual: bool = False):
    from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager

    conv = "torch.nn.modules.conv.Conv3d" if dim == 3 else "torch.nn.modules.conv.Conv2d"
    norm = f"torch.nn.modules.instancenorm.InstanceNorm{dim}d"
    arch = {"n_stages": 3, "features_per_stage": [8, 16, 256], "conv_op": conv,
            "kernel_sizes": [[3] * dim] * 3, "strides": [[1] * dim, [2] * dim, [2] * dim],
            "conv_bias": True, "norm_op": norm, "norm_op_kwargs": {"eps": 1e-5, "affine": True},
            "dropout_op": None, "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
            "nonlin_kwargs": {"inplace": True}}
    if residual:
        arch["n_blocks_per_stage"] = [1, 1, 1]
        name = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"
    else:
        arch["n_conv_per_stage"] = [2, 2, 2]
        name = "dynamic_network_architectures.architectures.unet.PlainConvUNet"
    return ConfigurationManager({"patch_size": [16] * dim, "architecture": {
        "network_class_name": name, "arch_kwargs": arch, "_kw_requires_import": ["conv_op", "norm_op", "nonlin"]}})


@pytest.mark.parametrize("dim,channels,classes,residual", [(2, 1, 2, False), (3, 1, 3, False), (3, 2, 4, True),
                                                           (2, 3, 5, True)])
def test_predictor_shapes_and_gradients(dim, channels, classes, residual):
    torch.manual_seed(0)
    cm = _configuration(dim, residual)
    net = build_quality_predictor(None, cm, channels, classes, max_features=32)
    assert net.num_input_channels == channels and net.num_classes == classes
    assert net.init_kwargs["features_per_stage"] == [8, 16, 32]  # capped at max_features
    assert net.init_kwargs["encoder"] == ("residual" if residual else "plain")
    image = torch.randn(2, channels, *([16] * dim))
    logits = torch.randn(2, classes, *([16] * dim), requires_grad=True)
    out = net(image, torch.softmax(logits, 1))
    assert out.shape == (2, classes - 1)
    assert ((out > 0) & (out < 1)).all()
    out.sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0  # QAR backpropagates through the mask
    assert all(p.grad is not None for p in net.parameters())
    with pytest.raises(ValueError):
        net(image, torch.zeros(2, classes + 1, *([16] * dim)))


def test_checkpoint_round_trip_weights_only(tmp_path, monkeypatch):
    monkeypatch.setenv("nnUNet_results", str(tmp_path))
    path = quality_checkpoint_path("Dataset990_X", "nnUNetPlans", "3d_fullres", 0)
    assert path == tmp_path / "Dataset990_X" / "nnUNetSSLQuality__nnUNetPlans__3d_fullres" / "fold_0" / \
        "checkpoint_quality.pth"
    with pytest.raises(SSLInputError, match="nnUNetv2_ssl_train_quality -d Dataset990_X -c 3d_fullres -f 0"):
        load_quality_predictor(path)
    torch.manual_seed(0)
    net = build_quality_predictor(None, _configuration(3), 1, 3, max_features=16)
    meta = {"dataset": "Dataset990_X", "mae": np.float32(0.25), "r": np.float64(0.5), "ids": [np.str_("a")],
            "cases": np.array([1, 2]), "path": tmp_path}
    save_quality_checkpoint(path, net, meta)
    assert [p.name for p in path.parent.iterdir()] == ["checkpoint_quality.pth"]  # no temporary file left
    raw = torch.load(path, weights_only=True)
    assert raw["meta"]["mae"] == pytest.approx(0.25) and raw["meta"]["cases"] == [1, 2]
    assert raw["meta"]["r"] == 0.5 and raw["meta"]["ids"] == ["a"] and raw["meta"]["path"] == str(tmp_path)
    assert raw["init_kwargs"]["num_classes"] == 3
    loaded = load_quality_predictor(path)
    assert isinstance(loaded, QualityPredictor) and not loaded.training
    assert not any(p.requires_grad for p in loaded.parameters())
    net.eval()
    image, mask = torch.randn(2, 1, 16, 16, 16), torch.softmax(torch.randn(2, 3, 16, 16, 16), 1)
    assert torch.equal(net(image, mask), loaded(image, mask))
    mask.requires_grad_(True)
    loaded(image, mask).sum().backward()  # frozen, but still differentiable w.r.t. its input
    assert mask.grad.abs().sum() > 0
    # damaged files: one line naming the retrain command, never torch's advice to retry with weights_only=False
    good = path.read_bytes()
    for damaged in (good[: len(good) // 2], b"garbage", pickle.dumps({"format": "x"})):
        path.write_bytes(damaged)
        with pytest.raises(SSLInputError, match="retrain it with nnUNetv2_ssl_train_quality") as e:
            load_quality_predictor(path)
        assert "weights_only" not in str(e.value)
    # a pickle that would run code is refused, not executed
    path.write_bytes(pickle.dumps(_Evil()))
    with pytest.raises(SSLInputError, match="cannot be read as a quality predictor"):
        load_quality_predictor(path)
    assert not (tmp_path / "pwned").exists()


class _Evil:
    def __reduce__(self):
        import os

        return os.system, (f"touch {os.environ['nnUNet_results']}/pwned",)


# ------------------------------------------------------------------------------------------------ command


def _quality_folder(root, dataset, fold="0"):
    return root / "results" / dataset / "nnUNetSSLQuality__nnUNetPlans__3d_fullres" / f"fold_{fold}"


def _check_outputs(folder, train_cases, val_cases, class_names):
    report = json.loads((folder / "quality_report.json").read_text())
    assert report["val_cases"] == sorted(val_cases) or report["val_cases"] == list(val_cases)
    assert sorted(report["per_class"]) == sorted(class_names)
    for stats in report["per_class"].values():
        assert 0 <= stats["mae"] <= 1
    png = (folder / "quality_scatter.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    ckpt = torch.load(folder / "checkpoint_quality.pth", weights_only=True)
    assert ckpt["meta"]["train_cases"] == list(train_cases)
    assert ckpt["meta"]["heldout"]["mae"] == pytest.approx(report["mae"])
    assert not set(ckpt["meta"]["train_cases"]) & set(ckpt["meta"]["val_cases"])
    net = load_quality_predictor(folder / "checkpoint_quality.pth")
    assert net.num_classes == len(class_names) + 1
    return report


@pytest.mark.slow
def test_train_quality_cli_synthetic(copy_planned):
    root, ds = copy_planned["root"], copy_planned["dataset"]
    env = nnunet_env(root)
    args = ["nnUNetv2_ssl_train_quality", "-d", str(copy_planned["id"]), "-c", "3d_fullres", "-f", "0",
            "--iterations", "4", "--weak-epochs", "1", "2", "--weak-iterations-per-epoch", "2", "--val-samples", "8",
            "-device", "cpu"]
    proc = run_cli(args, env=env)
    assert "held-out (8 masks" in proc.stdout and "Pearson r" in proc.stdout
    splits = json.loads((root / "preprocessed" / ds / "splits_final.json").read_text())
    folder = _quality_folder(root, ds)
    report = _check_outputs(folder, splits[0]["train"], splits[0]["val"], ["part1", "part2"])
    assert report["num_samples"] == 8 and report["weak_models"] == ["weak_epoch1", "weak_epoch2"]
    before = (folder / "checkpoint_quality.pth").read_bytes()
    again = run_cli(args, env=env, check=False)  # never replaces a trained predictor silently
    assert again.returncode == 2 and "--overwrite" in again.stderr
    assert (folder / "checkpoint_quality.pth").read_bytes() == before
    bad = run_cli(["nnUNetv2_ssl_train_quality", "-d", str(copy_planned["id"]), "-c", "3d_fullres", "-f", "7"],
                  env=env, check=False)
    assert bad.returncode == 2 and "fold 7" in bad.stderr


def test_weak_checkpoint_from_nnunet(synthetic_planned, monkeypatch, tmp_path):
    """An nnU-Net training checkpoint (network_weights + init_args) is loaded as a weak model and predicts."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    from nnunet_ssl.quality.training_setup import TrainingSetup
    from nnunet_ssl.quality.weak_models import load_weak_checkpoint

    root = synthetic_planned["root"]
    monkeypatch.setenv("nnUNet_raw", str(root / "raw"))
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "pp"))
    shutil.copytree(root / "preprocessed", tmp_path / "pp")
    setup = TrainingSetup(synthetic_planned["dataset"], "3d_fullres", 0, "nnUNetPlans")
    cm = setup.cm
    net = get_network_from_plans(cm.network_arch_class_name, cm.network_arch_init_kwargs,
                                 cm.network_arch_init_kwargs_req_import, 1, 3, deep_supervision=True)
    weights = {f"_orig_mod.{k}": v for k, v in net.state_dict().items()}  # as saved from a compiled network
    torch.save({"network_weights": weights, "init_args": {"plans": setup.pm.plans, "configuration": "3d_fullres",
                                                          "fold": 0, "dataset_json": setup.dataset_json}},
               tmp_path / "checkpoint_best.pth")
    weak = load_weak_checkpoint(str(tmp_path / "checkpoint_best.pth"), setup)
    x = torch.randn(1, 1, *cm.patch_size)
    net.eval()
    net.decoder.deep_supervision = False
    with torch.no_grad():
        assert torch.allclose(weak(x), net(x))
    with pytest.raises(SSLInputError, match="does not exist"):
        load_weak_checkpoint(str(tmp_path / "missing.pth"), setup)


@pytest.mark.slow
@pytest.mark.realdata
@pytest.mark.skipif(not HIPPOCAMPUS.is_dir(), reason="../shared/data/Dataset004_Hippocampus not found")
def test_train_quality_cli_hippocampus(tmp_path):
    """5 Hippocampus training cases with a 3-case label budget: the predictor trains on the budget's labeled cases
    only and reports on the fold's val cases."""
    ds = "Dataset004_Hippocampus"
    raw = tmp_path / "raw" / ds
    for sub in ("imagesTr", "labelsTr"):
        (raw / sub).mkdir(parents=True)
    cases = sorted(p.name[: -len("_0000.nii.gz")] for p in (HIPPOCAMPUS / "imagesTr").glob("*_0000.nii.gz"))[:5]
    for case in cases:
        shutil.copy(HIPPOCAMPUS / "imagesTr" / f"{case}_0000.nii.gz", raw / "imagesTr")
        shutil.copy(HIPPOCAMPUS / "labelsTr" / f"{case}.nii.gz", raw / "labelsTr")
    meta = json.loads((HIPPOCAMPUS / "dataset.json").read_text())
    meta["numTraining"] = len(cases)
    (raw / "dataset.json").write_text(json.dumps(meta))
    (tmp_path / "results").mkdir()
    env = nnunet_env(tmp_path, training=False)
    run_cli(["nnUNetv2_plan_and_preprocess", "-d", "4", "-c", "3d_fullres", "-np", "2", "-npfp", "2"], env=env)
    run_cli(["nnUNetv2_ssl_make_splits", "-d", "4", "--num-labeled", "3"], env=env)
    lower_batch_size(tmp_path / "preprocessed" / ds)
    proc = run_cli(["nnUNetv2_ssl_train_quality", "-d", "4", "-c", "3d_fullres", "-f", "0", "--iterations", "3",
                    "--weak-epochs", "1", "--weak-iterations-per-epoch", "2", "--val-samples", "4", "-device", "cpu"],
                   env=nnunet_env(tmp_path))
    assert "held-out (4 masks from 1 val cases)" in proc.stdout
    split = json.loads((tmp_path / "preprocessed" / ds / "splits_final.json").read_text())[0]
    assert len(split["train"]) == 3 and split["unlabeled"]
    _check_outputs(_quality_folder(tmp_path, ds), split["train"], split["val"], ["anterior", "posterior"])
