"""The multi-view unlabeled loader: nnU-Net's pipeline split into geometry and intensity, aligned views."""

from __future__ import annotations

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

from nnunet_ssl.data.unlabeled_loader import StrongIntensity, UnlabeledMultiViewLoader, split_transforms
from nnunet_ssl.errors import SSLInputError


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


def _nnunet_pipeline(mirror_axes=(0, 1, 2)):
    return nnUNetTrainer.get_training_transforms(
        (16, 16, 16), (-0.5, 0.5), [[1, 1, 1], [0.5, 0.5, 0.5]], mirror_axes, False, use_mask_for_norm=[True],
        foreground_labels=[1, 2])


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


def test_strong_view_always_differs_from_the_weak_view_where_nnunets_often_does_not():
    _, intensity = split_transforms(_nnunet_pipeline())
    torch.manual_seed(0)
    patches = [torch.rand(1, 8, 8, 8) + 1 for _ in range(300)]
    plain = sum(torch.equal(intensity(image=p.clone())["image"], p) for p in patches)
    strong = StrongIntensity(intensity)
    unchanged = sum(torch.equal(strong(image=p)["image"], p) for p in patches)
    assert plain > 50  # nnU-Net's own draw leaves about a third of the images as they were
    assert unchanged == 0
    # every nnU-Net transform fires at least half of the time; the input is not modified in place
    probabilities = [t.apply_probability for t in strong.transforms]
    assert min(probabilities) >= 0.5 and len(strong.transforms) == len(intensity.transforms) + 2
    assert [t.apply_probability for t in intensity.transforms] != probabilities[:len(intensity.transforms)]
    p = patches[0].clone()
    strong(image=p)
    assert torch.equal(p, patches[0])


def test_loader_gives_a_strong_view_on_request_and_refuses_unknown_kinds():
    _, intensity = split_transforms(_nnunet_pipeline())
    loader = _loader(intensity, view_intensity=(False, "strong"), batch_size=4)
    torch.manual_seed(2)
    np.random.seed(2)
    for _ in range(3):
        batch = loader.generate_train_batch()
        for j in range(4):
            assert not torch.equal(batch["view0"][j], batch["view1"][j])
    with pytest.raises(SSLInputError, match="view_intensity"):
        _loader(intensity, view_intensity=(False, "stronger"))
