"""The UA-MT host: T noisy teacher passes, the entropy gate by hand, and the gate reaching MetaSSL's loss."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import budget_split, make_trainer

from nnunet_ssl.losses.consistency import masked_mse_consistency
from nnunet_ssl.parts.ramps import sigmoid_rampup
from nnunet_ssl.trainers import nnUNetTrainerUAMT, nnUNetTrainerUAMTMetaSSL
from nnunet_ssl.trainers.step import SSLStep


class _FixedLogits(torch.nn.Module):
    """Returns the same logits for every input and records the inputs it was given."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits
        self.inputs: list[torch.Tensor] = []

    def forward(self, x):
        self.inputs.append(x.clone())
        return self.logits.repeat(x.shape[0] // self.logits.shape[0], *([1] * (x.ndim - 1)))


def _uamt(cls, ds, monkeypatch):
    budget_split(ds)
    trainer = make_trainer(cls, ds["root"], ds["dataset"], monkeypatch, epochs=10, iterations=10)
    trainer.initialize()
    return trainer


def test_gate_keeps_the_voxels_below_the_entropy_threshold(copy_planned, monkeypatch):
    trainer = _uamt(nnUNetTrainerUAMT, copy_planned, monkeypatch)
    assert trainer.label_manager.num_segmentation_heads == 3
    # three voxels of one sample: certain, nearly uniform (H = 0.98 nats), between (H = 0.48)
    logits = torch.tensor([[[8.0, 1.0, 3.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]])
    trainer.teacher = _FixedLogits(logits)
    trainer.uncertainty_passes = 3  # 2 + 1: the last forward is a partial one
    image = torch.randn(1, 1, 3)
    step = SSLStep(data=torch.zeros(0), target=torch.zeros(0), views={"view0": image, "view1": image + 1}, lam=1.0)
    trainer.ssl_step = 0
    reference = trainer.reference_logits(step)
    assert torch.equal(reference, logits)
    # the teacher saw view 1 once, then 3 noisy copies of it in forwards of 2 and 1
    assert [x.shape[0] for x in trainer.teacher.inputs] == [1, 2, 1]
    assert torch.equal(trainer.teacher.inputs[0], image + 1)
    noisy = torch.cat(trainer.teacher.inputs[1:])
    assert (noisy - (image + 1)).abs().max() <= 0.2 + 1e-6 and not torch.equal(noisy[0], noisy[1])
    p = torch.softmax(logits, 1)[0]
    entropy = -(p * p.log()).sum(0)
    threshold = (0.75 + 0.25 * sigmoid_rampup(0, trainer.total_iterations)) * math.log(3)
    expected = entropy < threshold
    assert expected.tolist() == [True, False, True]  # the constructed case separates the voxels
    assert torch.equal(step.reference_weights[0], expected)
    student = torch.randn(1, 3, 3)
    loss, stats = trainer.unsupervised_loss(student, reference, step)
    assert loss.item() == pytest.approx(masked_mse_consistency(student, reference, expected[None]).item())
    assert stats["certain_fraction"] == pytest.approx(2 / 3)
    # at the end of the threshold ramp the gate is ln 3 = 1.10: the nearly uniform voxel passes too
    trainer.ssl_step = trainer.total_iterations
    assert trainer.current_uncertainty_threshold() == pytest.approx(math.log(3))
    trainer.reference_logits(step)
    assert step.reference_weights.all()


def test_metassl_on_uamt_counts_only_the_certain_voxels(copy_planned, monkeypatch):
    trainer = _uamt(nnUNetTrainerUAMTMetaSSL, copy_planned, monkeypatch)
    g = torch.Generator().manual_seed(0)
    student, reference = torch.randn(2, 3, 4, 4, 4, generator=g), torch.randn(2, 3, 4, 4, 4, generator=g) * 3
    state = {k: v.clone() for k, v in trainer.metassl_losses[0].state_dict().items()}
    step = SSLStep(data=torch.zeros(0), target=torch.zeros(0), views={}, lam=1.0)
    free, _ = trainer.unsupervised_loss(student, reference, step)
    trainer.metassl_losses[0].load_state_dict(state)
    step.reference_weights = torch.zeros(2, 4, 4, 4, dtype=torch.bool)
    gated, _ = trainer.unsupervised_loss(student, reference, step)
    assert free.item() > 0 and gated.item() == 0.0
    trainer.metassl_losses[0].load_state_dict(state)
    step.reference_weights = torch.ones(2, 4, 4, 4, dtype=torch.bool)
    assert trainer.unsupervised_loss(student, reference, step)[0].item() == pytest.approx(free.item())


def test_uamt_costs_t_teacher_passes_and_warns_when_the_gate_drops_everything(copy_planned, monkeypatch):
    assert nnUNetTrainerUAMT.compute_units(2, 2) == 3 * 4 + 2 + 8 * 2
    trainer = _uamt(nnUNetTrainerUAMT, copy_planned, monkeypatch)
    warnings = trainer.mechanism_warnings({"ssl_certain_fraction": 0.004})
    assert any("certainty gate drops nearly everything" in w for w in warnings)
    assert not trainer.mechanism_warnings({"ssl_certain_fraction": 0.5})


def test_uamt_refuses_zero_passes_with_one_line(copy_planned, monkeypatch):
    from nnunet_ssl.errors import SSLInputError

    budget_split(copy_planned)
    monkeypatch.setenv("nnUNet_ssl_settings", "uncertainty_passes=0")
    with pytest.raises(SSLInputError, match="uncertainty_passes=0 must be a whole number >= 1"):
        make_trainer(nnUNetTrainerUAMT, copy_planned["root"], copy_planned["dataset"], monkeypatch)
