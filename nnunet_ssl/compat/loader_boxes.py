"""Where each training patch was cropped: nnU-Net's data loaders with their crop boxes in the batch.

nnU-Net's ``nnUNetDataLoader.generate_train_batch`` (nnunetv2 2.8.x, ``training/dataloading/data_loader.py``)
draws one box per sample with ``self.get_bbox(data.shape[1:], ...)`` and returns only ``data``, ``target`` and
``keys``. The loaders here are subclasses whose ``get_bbox`` records each box (nnU-Net's own choice, unchanged) and
whose ``generate_train_batch`` adds them to the batch as ``boxes``: an int64 tensor (B, 3, D) holding, per sample,
the spatial shape of the preprocessed volume, the box's lower and its upper corner (upper exclusive; the corners may
lie outside the volume, where nnU-Net pads). The dict is what the background workers pickle, so the boxes travel
with the batch. For 2D configurations nnU-Net's loader crops a pseudo-3D box of one slice (its ``patch_size_was_2d``
path): the first coordinate of the box is the slice index.

The box is the crop before nnU-Net's spatial augmentation (``SpatialTransform`` with ``random_crop=False`` keeps the
patch centred on the box's centre; rotation, scaling and mirroring act about that centre).

:func:`record_boxes` switches the loader inside one of batchgenerators' augmenters to the recording subclass and,
if the augmenter's workers already run (nnU-Net's ``get_dataloaders`` draws a first batch), restarts them so that
they work with the switched loader. Depends on: ``nnUNetDataLoader.get_bbox`` and ``generate_train_batch`` (names and
the one ``get_bbox`` call per sample), the augmenters' loader attributes (``SingleThreadedAugmenter.data_loader``,
``(NonDet)MultiThreadedAugmenter.generator``) and their restart on the next batch after ``_finish``
(:func:`~nnunet_ssl.compat.trainer.stop_augmenter`); ``tests/trainers/plugins/test_self_paced_plugin.py`` checks
them against the installed versions.
"""

from __future__ import annotations

import numpy as np
import torch
from batchgenerators.dataloading.multi_threaded_augmenter import MultiThreadedAugmenter
from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader

from nnunet_ssl.compat.trainer import stop_augmenter
from nnunet_ssl.data.unlabeled_loader import UnlabeledMultiViewLoader
from nnunet_ssl.errors import SSLInputError

#: the batch key of the crop boxes
BOXES_KEY = "boxes"


class RecordBoxes:
    """Mixin for an ``nnUNetDataLoader``: the boxes of one batch, in the order of its samples, as ``boxes``."""

    def get_bbox(self, data_shape, *args, **kwargs):
        lbs, ubs = super().get_bbox(data_shape, *args, **kwargs)
        self.__dict__.setdefault("_recorded_boxes", []).append(
            (tuple(int(s) for s in data_shape), [int(v) for v in lbs], [int(v) for v in ubs]))
        return lbs, ubs

    def generate_train_batch(self) -> dict:
        self._recorded_boxes = []
        batch = super().generate_train_batch()
        boxes = self._recorded_boxes
        if len(boxes) != len(batch["keys"]):
            raise RuntimeError(f"{type(self).__name__}: {len(boxes)} crop boxes recorded for {len(batch['keys'])} "
                               "samples; nnU-Net's loader no longer calls get_bbox once per sample")
        batch[BOXES_KEY] = torch.from_numpy(np.array([[shape, lo, hi] for shape, lo, hi in boxes], dtype=np.int64))
        return batch


class BoxRecordingDataLoader(RecordBoxes, nnUNetDataLoader):
    """nnU-Net's training loader, with the crop boxes in the batch."""


class BoxRecordingMultiViewLoader(RecordBoxes, UnlabeledMultiViewLoader):
    """The unlabeled multi-view loader, with the crop boxes in the batch."""


_RECORDING = {nnUNetDataLoader: BoxRecordingDataLoader, UnlabeledMultiViewLoader: BoxRecordingMultiViewLoader}


def _loader_attribute(augmenter: object) -> str:
    if isinstance(augmenter, SingleThreadedAugmenter):
        return "data_loader"
    if isinstance(augmenter, (NonDetMultiThreadedAugmenter, MultiThreadedAugmenter)):
        return "generator"
    raise SSLInputError(f"cannot record crop boxes through a {type(augmenter).__name__}: the meta-labels need "
                        "nnU-Net's own augmenters (SingleThreadedAugmenter, NonDetMultiThreadedAugmenter)")


def record_boxes(augmenter: object) -> object:
    """Makes ``augmenter``'s loader add ``boxes`` to every batch (in place; returns the augmenter). Workers that
    already run are stopped and start again, with the switched loader, at the next batch."""
    attribute = _loader_attribute(augmenter)
    loader = getattr(augmenter, attribute)
    if isinstance(loader, RecordBoxes):
        return augmenter
    recording = _RECORDING.get(type(loader))
    if recording is None:
        raise SSLInputError(f"cannot record crop boxes of the data loader {type(loader).__name__}: the meta-labels "
                            "know nnU-Net's nnUNetDataLoader and the unlabeled multi-view loader; add a subclass "
                            "(RecordBoxes, YourLoader) to nnunet_ssl.compat.loader_boxes")
    # same instance, same state: only get_bbox and generate_train_batch gain the recording
    loader.__class__ = recording
    if attribute == "generator":
        stop_augmenter(augmenter)  # the next batch starts the workers again, each with the switched loader
    return augmenter


def loader_of(augmenter: object) -> object:
    """The data loader inside one of batchgenerators' augmenters."""
    return getattr(augmenter, _loader_attribute(augmenter))
