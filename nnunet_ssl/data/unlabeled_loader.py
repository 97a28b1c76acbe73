"""Unlabeled patches as aligned views, built from nnU-Net's own training augmentation.

nnU-Net's ``get_training_transforms`` pipeline is split into its geometric part (spatial transform, mirroring,
pseudo-2D conversion) and its intensity part (noise, blur, brightness, contrast, low resolution, gamma). Each
patch gets the geometric part once, so all views stay aligned voxel for voxel, and then each view gets its own
independent draw of the intensity part. Label-only transforms are dropped: unlabeled cases have no label.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence

import blosc2
import numpy as np
import torch
from acvl_utils.cropping_and_padding.bounding_boxes import crop_and_pad_nd
from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter
from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform, ImageOnlyTransform, SegOnlyTransform
from batchgeneratorsv2.transforms.intensity.brightness import MultiplicativeBrightnessTransform
from batchgeneratorsv2.transforms.intensity.contrast import BGContrast, ContrastTransform
from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
from batchgeneratorsv2.transforms.spatial.rot90 import Rot90Transform
from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
from batchgeneratorsv2.transforms.spatial.transpose import TransposeAxesTransform
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from batchgeneratorsv2.transforms.utils.nnunet_masking import MaskImageTransform
from batchgeneratorsv2.transforms.utils.pseudo2d import Convert2DTo3DTransform, Convert3DTo2DTransform
from batchgeneratorsv2.transforms.utils.random import OneOfTransform, RandomTransform
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from nnunetv2.utilities.label_handling.label_handling import LabelManager
from threadpoolctl import threadpool_limits

from nnunet_ssl.errors import SSLInputError

_GEOMETRIC = (SpatialTransform, MirrorTransform, Convert3DTo2DTransform, Convert2DTo3DTransform, Rot90Transform,
              TransposeAxesTransform)


def _kind(t: BasicTransform) -> str:
    """'geometric', 'intensity' or 'label' for one transform of an nnU-Net training pipeline."""
    if isinstance(t, _GEOMETRIC):
        return "geometric"
    if isinstance(t, RandomTransform):
        return _kind(t.transform)
    if isinstance(t, OneOfTransform):
        kinds = {_kind(x) for x in t.list_of_transforms}
        if len(kinds) == 1:
            return kinds.pop()
    elif isinstance(t, ComposeTransforms):
        kinds = {_kind(x) for x in t.transforms}
        if len(kinds) == 1:
            return kinds.pop()
    elif isinstance(t, (SegOnlyTransform, MaskImageTransform)):
        # MaskImageTransform needs the nonzero mask, which unlabeled patches of the label-budget splits do not
        # have without reading the label file; the preprocessed image is already zero outside that mask.
        return "label"
    elif isinstance(t, ImageOnlyTransform):
        return "intensity"
    raise SSLInputError(
        f"cannot tell whether {type(t).__name__} in the trainer's get_training_transforms is geometric or "
        "intensity augmentation; override split_transforms in the trainer to place it"
    )


def split_transforms(pipeline: BasicTransform) -> tuple[ComposeTransforms, ComposeTransforms]:
    """Splits nnU-Net's training pipeline into (geometric, intensity) parts, keeping each part's order.

    nnU-Net mirrors after the intensity transforms; here mirroring runs first. Every intensity transform of the
    default pipeline acts voxel-wise or with symmetric kernels, so it commutes with flips and the distribution
    of the augmented patches is unchanged."""
    transforms = pipeline.transforms if isinstance(pipeline, ComposeTransforms) else [pipeline]
    geometric, intensity = [], []
    for t in transforms:
        kind = _kind(t)
        if kind == "geometric":
            geometric.append(t)
        elif kind == "intensity":
            intensity.append(t)
    return ComposeTransforms(geometric), ComposeTransforms(intensity)


#: the strong view's extra brightness and contrast: UniMatch's ColorJitter(brightness=0.5, contrast=0.5) at p = 0.8
STRONG_JITTER_RANGE = (0.5, 1.5)
STRONG_JITTER_PROBABILITY = 0.8


class StrongIntensity:
    """FixMatch's strong view from nnU-Net's intensity transforms: never the unchanged image.

    nnU-Net draws each intensity transform with its own probability (0.1-0.3), so about a third of the views it
    makes are bit-identical to the input (measured on 2,000 draws). Here each of them fires with probability at
    least ``min_probability``, a brightness and contrast jitter of UniMatch's strength (factors in [0.5, 1.5], both
    at p = 0.8, as its ColorJitter(0.5, 0.5)) is added, and when a draw still leaves the image unchanged (a
    transform that fired on no channel, or none fired) one transform, chosen at random, is applied until the image
    changes (at most ``retries`` draws). Called like a batchgeneratorsv2 transform: ``t(image=x)["image"]``."""

    def __init__(self, intensity: ComposeTransforms, min_probability: float = 0.5, retries: int = 8) -> None:
        self.transforms: list[BasicTransform] = []
        for t in copy.deepcopy(intensity.transforms):
            if isinstance(t, RandomTransform):
                t.apply_probability = max(t.apply_probability, min_probability)
            self.transforms.append(t)
        for jitter in (MultiplicativeBrightnessTransform(BGContrast(STRONG_JITTER_RANGE), False, 1),
                       ContrastTransform(BGContrast(STRONG_JITTER_RANGE), True, False, 1)):
            self.transforms.append(RandomTransform(jitter, STRONG_JITTER_PROBABILITY))
        self.retries = retries

    def __call__(self, **data: torch.Tensor) -> dict:
        original = data["image"]
        out = {"image": original.clone()}
        for t in self.transforms:
            out = t(**out)
        for _ in range(self.retries):
            if not torch.equal(out["image"], original):
                break
            t = self.transforms[int(torch.randint(len(self.transforms), (1,)))]
            out = (t.transform if isinstance(t, RandomTransform) else t)(image=out["image"])
        return out


class UnlabeledPool:
    """Image-only access to preprocessed cases from several folders. It never opens a segmentation or
    properties file, so the labels of label-budget 'unlabeled' cases are never read."""

    def __init__(self, sources: Sequence[tuple[str, Sequence[str]]]) -> None:
        self._folder: dict[str, str] = {}
        for folder, ids in sources:
            for i in ids:
                if i in self._folder:
                    raise SSLInputError(
                        f"unlabeled case '{i}' exists both in {self._folder[i]} and in {folder}; rename the image in "
                        "imagesUnlabeled and rerun nnUNetv2_ssl_preprocess_unlabeled"
                    )
                self._folder[i] = folder
        self.identifiers = sorted(self._folder)

    def __len__(self) -> int:
        return len(self.identifiers)

    def folder_of(self, identifier: str) -> str:
        return self._folder[identifier]

    def load_case(self, identifier: str):
        path = os.path.join(self._folder[identifier], identifier + ".b2nd")
        kwargs = {} if os.name == "nt" else {"mmap_mode": "r"}
        return blosc2.open(urlpath=path, mode="r", dparams={"nthreads": 1}, **kwargs)


class UnlabeledMultiViewLoader(nnUNetDataLoader):
    """Random patches (no foreground oversampling: there are no labels) from an :class:`UnlabeledPool`,
    each returned as ``len(view_intensity)`` aligned views.

    ``view_intensity[i]`` says whether view i gets its own draw of the intensity augmentation (True), a strong
    one that always changes the image (``"strong"``, :class:`StrongIntensity`), or only the shared geometric
    augmentation (False, e.g. FixMatch's weak view). A batch is ``{'view0': (B, C, *patch), 'view1': ..., 'keys':
    ids}``."""

    def __init__(self, pool: UnlabeledPool, batch_size: int, patch_size: Sequence[int],
                 final_patch_size: Sequence[int], label_manager: LabelManager, geometric: BasicTransform,
                 intensity: BasicTransform, view_intensity: Sequence[bool | str] = (True, True)) -> None:
        super().__init__(pool, batch_size, patch_size, final_patch_size, label_manager,
                         oversample_foreground_percent=0.0, transforms=None)
        self.has_ignore = False  # random crops only; never consult class_locations
        self.geometric = geometric
        self.intensity = intensity
        for v in view_intensity:
            if not isinstance(v, bool) and v != "strong":
                raise SSLInputError(f"view_intensity entries are True, False or 'strong', got {v!r}")
        self.view_intensity = tuple(view_intensity)
        self.strong = StrongIntensity(intensity) if "strong" in self.view_intensity else None

    def generate_train_batch(self) -> dict:
        keys = self.get_indices()
        views: list[torch.Tensor] | None = None
        with torch.no_grad(), threadpool_limits(limits=1, user_api=None):
            for j, key in enumerate(keys):
                data = self._data.load_case(key)
                bbox_lbs, bbox_ubs = self.get_bbox(data.shape[1:], False, None)
                bbox = [[lo, hi] for lo, hi in zip(bbox_lbs, bbox_ubs)]
                patch = torch.from_numpy(crop_and_pad_nd(data, bbox, 0)).float()
                if self.patch_size_was_2d:
                    patch = patch[:, 0]
                patch = self.geometric(image=patch)["image"]
                samples = [self.strong(image=patch)["image"] if aug == "strong"
                           else self.intensity(image=patch.clone())["image"] if aug else patch.clone()
                           for aug in self.view_intensity]
                if views is None:
                    views = [torch.empty((self.batch_size, *s.shape), dtype=torch.float32) for s in samples]
                for v, s in zip(views, samples):
                    v[j] = s
        out = {f"view{i}": v for i, v in enumerate(views)}
        out["keys"] = keys
        return out


def make_augmenter(loader: UnlabeledMultiViewLoader, num_processes: int, pin_memory: bool):
    """Single-process when ``num_processes == 0`` (nnUNet_n_proc_DA=0), else nnU-Net's background augmenter.

    Worker seeds come from the main process's numpy generator: seeded runs stay reproducible and, unlike
    ``seeds=None``, the workers' torch generators (used by RandomTransform) differ from each other."""
    if num_processes == 0:
        return SingleThreadedAugmenter(loader, None)
    seeds = [int(s) for s in np.random.randint(0, 2**31 - 1, num_processes)]
    return NonDetMultiThreadedAugmenter(loader, None, num_processes, num_cached=max(2, num_processes),
                                        seeds=seeds, pin_memory=pin_memory, wait_time=0.002)
