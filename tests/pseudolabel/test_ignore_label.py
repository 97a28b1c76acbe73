"""The ignore label the pseudo-labels use: nnU-Net's supervised loss gives its voxels no gradient."""

from __future__ import annotations

import json

import torch
from helpers import make_trainer


def test_ignored_voxels_give_zero_supervised_gradient(copy_planned, monkeypatch):
    from nnunet_ssl.pseudolabel.derived import ignore_label_value
    from nnunet_ssl.trainers import nnUNetTrainerSupervised

    root, ds = copy_planned["root"], copy_planned["dataset"]
    dataset_json_file = root / "preprocessed" / ds / "dataset.json"
    dataset_json = json.loads(dataset_json_file.read_text())
    ignore = ignore_label_value(dataset_json)
    assert ignore == 3
    dataset_json["labels"]["ignore"] = ignore  # as the derived dataset's dataset.json has it
    dataset_json_file.write_text(json.dumps(dataset_json))
    trainer = make_trainer(nnUNetTrainerSupervised, root, ds, monkeypatch)
    trainer.initialize()
    assert trainer.label_manager.ignore_label == 3
    torch.manual_seed(0)
    shape = (2, 8, 8, 8)
    target = torch.randint(0, 3, (shape[0], 1, *shape[1:]))
    target[:, :, :4] = ignore  # half of every volume is ignored
    scales = trainer._get_deep_supervision_scales()
    logits, targets = [], []
    for scale in scales:
        size = [max(1, round(n * f)) for n, f in zip(shape[1:], scale)]
        logits.append(torch.randn(shape[0], 3, *size, requires_grad=True))
        targets.append(torch.nn.functional.interpolate(target.float(), size=size, mode="nearest").long())
    loss = trainer.loss(logits, targets)
    loss.backward()
    grad = logits[0].grad.abs().sum(1)  # per voxel, full resolution
    assert torch.all(grad[:, :4] == 0)
    assert torch.all(grad[:, 4:] > 0)
