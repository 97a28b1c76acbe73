"""Unit tests of the pure pieces: schedules, EMA, consistency loss, transform split, two-view loader."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform
from batchgeneratorsv2.transforms.intensity.brightness import MultiplicativeBrightnessTransform
from batchgeneratorsv2.transforms.intensity.contrast import BGContrast
from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from batchgeneratorsv2.transforms.utils.random import RandomTransform
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.label_handling.label_handling import LabelManager
from torch import nn

from nnunet_ssl.data.unlabeled_loader import UnlabeledMultiViewLoader, split_transforms
from nnunet_ssl.demo.run_demo import Clock, TrainingReporter
from nnunet_ssl.errors import SSLInputError
from nnunet_ssl.hosts.ema import ema_decay, ema_update, make_teacher
from nnunet_ssl.losses.consistency import confidence_stats, mse_consistency
from nnunet_ssl.utils.schedules import sigmoid_rampup


def test_sigmoid_rampup_values():
    assert sigmoid_rampup(0, 100) == pytest.approx(math.exp(-5))
    assert sigmoid_rampup(50, 100) == pytest.approx(math.exp(-5 * 0.25))
    assert sigmoid_rampup(100, 100) == 1.0
    assert sigmoid_rampup(250, 100) == 1.0
    assert sigmoid_rampup(3, 0) == 1.0
    values = [sigmoid_rampup(t, 10) for t in range(11)]
    assert all(a < b for a, b in zip(values, values[1:]))


def test_ema_decay_warmup():
    assert ema_decay(0) == 0.0
    assert ema_decay(1) == 0.5
    assert ema_decay(3) == 0.75
    assert ema_decay(99) == pytest.approx(0.99)
    assert ema_decay(10_000) == 0.99
    assert ema_decay(10_000, 0.999) == pytest.approx(0.999)


def test_ema_update_matches_hand_computation_and_copies_buffers():
    student = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    teacher = make_teacher(student)
    assert all(not p.requires_grad for p in teacher.parameters())
    with torch.no_grad():
        for p in teacher.parameters():
            p.fill_(1.0)
        for p in student.parameters():
            p.fill_(3.0)
        student[1].running_mean.fill_(7.0)
    ema_update(teacher, student, decay=0.75)
    for p in teacher.parameters():
        assert torch.allclose(p, torch.full_like(p, 0.75 * 1.0 + 0.25 * 3.0))
    assert torch.equal(teacher[1].running_mean, torch.full((2,), 7.0))
    # decay 0 copies the student
    ema_update(teacher, student, decay=0.0)
    for pt, ps in zip(teacher.parameters(), student.parameters()):
        assert torch.equal(pt, ps)


def test_mse_consistency_hand_computed():
    # two classes, one voxel: logits (0, 0) -> p = (0.5, 0.5); logits (log 3, 0) -> p = (0.75, 0.25)
    s = torch.tensor([[[0.0], [0.0]]], requires_grad=True)
    t = torch.tensor([[[math.log(3.0)], [0.0]]])
    loss = mse_consistency(s, t)
    assert loss.item() == pytest.approx(((0.5 - 0.75) ** 2 + (0.5 - 0.25) ** 2) / 2)
    loss.backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    # half-precision input is computed in float32
    assert mse_consistency(s.detach().half(), t.half()).dtype == torch.float32
    # sigmoid (region) variant: sigmoid(0) = 0.5, sigmoid(log 3) = 0.75 per channel
    assert mse_consistency(s.detach(), t, regions=True).item() == pytest.approx(((0.5 - 0.75) ** 2 + 0) / 2)


def test_confidence_stats_hand_computed():
    # three voxels with max probabilities 0.75, 0.5, ~0.982
    logits = torch.tensor([[[math.log(3.0), 0.0, 4.0], [0.0, 0.0, 0.0]]])
    stats = confidence_stats(logits, threshold=0.9)
    p3 = 1 / (1 + math.exp(-4.0))
    assert stats["confidence"] == pytest.approx((0.75 + 0.5 + p3) / 3)
    assert stats["coverage"] == pytest.approx(1 / 3)


def _nnunet_pipeline(mirror_axes=(0, 1, 2)):
    return nnUNetTrainer.get_training_transforms(
        (16, 16, 16), (-0.5, 0.5), [[1, 1, 1], [0.5, 0.5, 0.5]], mirror_axes, False, use_mask_for_norm=[True],
        foreground_labels=[1, 2])


def test_split_transforms_of_nnunet_pipeline():
    geometric, intensity = split_transforms(_nnunet_pipeline())
    assert [type(t) for t in geometric.transforms] == [SpatialTransform, MirrorTransform]
    assert len(intensity.transforms) == 7 and all(isinstance(t, RandomTransform) for t in intensity.transforms)


def test_split_transforms_rejects_unknown_transform():
    class Mystery(BasicTransform):
        def apply(self, data_dict, **params):
            return data_dict

    with pytest.raises(SSLInputError, match="Mystery"):
        split_transforms(ComposeTransforms([Mystery()]))


class _ArrayPool:
    def __init__(self, arrays: dict[str, np.ndarray]):
        self.arrays = arrays
        self.identifiers = sorted(arrays)

    def load_case(self, identifier):
        return self.arrays[identifier]


def _loader(intensity, view_intensity=(True, True), batch_size=4):
    rng = np.random.default_rng(0)
    pool = _ArrayPool({f"c{i}": rng.uniform(1, 2, (1, 20, 24, 24)).astype(np.float32) for i in range(3)})
    geometric, _ = split_transforms(_nnunet_pipeline())
    # raise the probabilities so that rotation and scaling happen in most samples
    geometric.transforms[0].p_rotation = 0.8
    geometric.transforms[0].p_scaling = 0.8
    lm = LabelManager({"background": 0, "a": 1}, None)
    return UnlabeledMultiViewLoader(pool, batch_size, (22, 22, 22), (16, 16, 16), lm, geometric, intensity,
                                    view_intensity)


def test_two_views_are_aligned_voxel_for_voxel():
    # a voxel-wise multiplicative brightness per view: aligned views have a constant ratio in every sample
    brightness = MultiplicativeBrightnessTransform(BGContrast((0.5, 2.0)), synchronize_channels=True)
    loader = _loader(ComposeTransforms([brightness]))
    torch.manual_seed(0)
    np.random.seed(0)
    for _ in range(5):
        batch = loader.generate_train_batch()
        a, b = batch["view0"], batch["view1"]
        assert a.shape == b.shape == (4, 1, 16, 16, 16)
        for j in range(4):
            mask = a[j].abs() > 1e-3
            ratio = b[j][mask] / a[j][mask]
            assert ratio.std() < 1e-4 * ratio.mean(), "views are not aligned"
            assert not torch.allclose(ratio, torch.ones_like(ratio)), "views share their intensity draw"


def test_views_share_geometry_and_differ_in_nnunet_intensity_augmentation():
    _, intensity = split_transforms(_nnunet_pipeline())
    for t in intensity.transforms:
        t.apply_probability = 1.0
    seen = []

    class Recorder(BasicTransform):
        def apply(self, data_dict, **params):
            seen.append(data_dict["image"].clone())
            return intensity(**data_dict)

    loader = _loader(Recorder(), view_intensity=(False, True, True), batch_size=2)
    torch.manual_seed(1)
    np.random.seed(1)
    batch = loader.generate_train_batch()
    assert set(batch) == {"view0", "view1", "view2", "keys"}
    # per sample, both augmented views received exactly the un-augmented (weak) view's geometry
    assert len(seen) == 4
    for j in range(2):
        assert torch.equal(seen[2 * j], batch["view0"][j]) and torch.equal(seen[2 * j + 1], batch["view0"][j])
        assert not torch.allclose(batch["view1"][j], batch["view2"][j])


def test_unwrap_and_deep_supervision_helpers():
    from nnunet_ssl.trainers.base import full_resolution, split_batch, unwrap

    net = nn.Linear(2, 2)
    assert unwrap(torch.compile(net)) is net  # compile is lazy: no compilation happens here
    outputs = [torch.arange(6.0).reshape(3, 2), torch.arange(3.0).reshape(3, 1)]
    head, tail = split_batch(outputs, 2)
    assert [t.shape[0] for t in head] == [2, 2] and [t.shape[0] for t in tail] == [1, 1]
    assert full_resolution(outputs) is outputs[0] and full_resolution(outputs[1]) is outputs[1]


def test_log_panels_fall_back_to_symlog_for_non_positive_values(tmp_path):
    from nnunet_ssl.utils.plotting import log_axis_scale, plot_ssl_progress

    assert log_axis_scale(np.array([0.5, 1e-3, np.nan])) == ("log", {})
    assert log_axis_scale(np.array([0.2, 0.0, -0.05, 0.01])) == ("symlog", {"linthresh": 0.01})
    assert log_axis_scale(np.array([0.0, 0.0])) == ("symlog", {"linthresh": 1e-3})
    # nnU-Net's supervised loss is negative; every panel is drawn and the file is a PNG
    log = {"ssl_sup_loss": [0.2, -0.4, -0.8], "ssl_unsup_loss": [0.01, 0.0, 0.002], "ssl_lambda": [0.0, 0.05, 0.1]}
    out = tmp_path / "progress_ssl.png"
    plot_ssl_progress(log, [("supervised loss", {"sup": "ssl_sup_loss"}), ("unsupervised loss (log)",
                                                                          {"unsup": "ssl_unsup_loss"})], str(out))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("branch", ["", " (labeled branch 0.3000)"])
def test_training_progress_line_reads_nnunet_log_lines(branch, capsys):
    reporter = TrainingReporter("MT", epochs=20, clock=Clock())
    for line in ["2026-01-01 12:00:00.000000: Epoch 2", "2026-01-01 12:00:01.000000: train_loss -0.1234",
                 "2026-01-01 12:00:01.000000: val_loss -0.5",
                 "2026-01-01 12:00:01.000000: Pseudo dice [np.float32(0.8123), np.float32(0.7)]",
                 f"2026-01-01 12:00:01.000000: ssl: sup -0.4 unsup 1.2500{branch} lambda 0.0500 confidence 0.9 "
                 "coverage 0.8", "2026-01-01 12:00:02.000000: Epoch time: 12.34 s"]:
        reporter(line)
    out = capsys.readouterr().out.strip()
    assert out.endswith(f"MT epoch   3/20  loss -0.123 (val -0.500)  pseudo Dice 0.81 0.70  unsup 1.2500{branch} "
                        "lambda 0.050  12.3 s")
