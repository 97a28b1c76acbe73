"""The FixMatch host: weak/strong views, CutMix boxes shared by image and pseudo-label, confidence mask."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import budget_split, make_trainer

from nnunet_ssl.trainers import (
    nnUNetTrainerFixMatch,
)
from nnunet_ssl.trainers.step import SSLStep


class _Identity(torch.nn.Module):
    """Logits = the image repeated over the classes: lets a test see exactly what the host fed the network."""

    def __init__(self, classes: int):
        super().__init__()
        self.classes = classes

    def forward(self, x):
        return x[:, :1].repeat(1, self.classes, *([1] * (x.ndim - 2)))


def test_fixmatch_mixes_strong_view_and_pseudo_labels_with_the_same_boxes(copy_planned, monkeypatch):
    budget_split(copy_planned)
    trainer = make_trainer(nnUNetTrainerFixMatch, copy_planned["root"], copy_planned["dataset"], monkeypatch)
    trainer.initialize()
    assert trainer.cutmix_probability == 1.0  # the default preset mixes every sample
    trainer.network = _Identity(3)
    weak = torch.randn(4, 1, 8, 8, 8)
    step = SSLStep(data=torch.zeros(0, 1, 8, 8, 8), target=torch.zeros(0), views={"view0": weak, "view1": weak.clone()},
                   lam=1.0)
    student_in = trainer.student_input(step)
    reference = trainer.reference_logits(step)
    assert step.mix is not None and step.mix.flatten(1).any(1).all()  # the boxes travel on the step, not the trainer
    assert torch.equal(reference[:, 0:1], student_in)  # same boxes for the image and its pseudo-label
    assert not torch.equal(student_in, weak)
    loss, _ = trainer.unsupervised_loss(torch.randn(4, 3, 8, 8, 8), torch.randn(4, 3, 8, 8, 8) * 10, step)
    assert loss.dtype == torch.float32 and loss.item() > 0


def test_fixmatch_confidence_mask(copy_planned, monkeypatch):
    budget_split(copy_planned)
    trainer = make_trainer(nnUNetTrainerFixMatch, copy_planned["root"], copy_planned["dataset"], monkeypatch)
    step = SSLStep(data=torch.zeros(0), target=torch.zeros(0), views={}, lam=1.0,
                   mix=torch.zeros(1, 2, dtype=torch.bool))
    reference = torch.tensor([[[10.0, 0.0], [0.0, 0.0], [0.0, 0.0]]])  # voxel 0 confident class 0; voxel 1 not
    student = torch.zeros(1, 3, 2)
    loss, _ = trainer.unsupervised_loss(student, reference, step)
    assert loss.item() == pytest.approx(math.log(3.0) / 2)  # only voxel 0 counts, normalised by 2 voxels
