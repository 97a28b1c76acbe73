"""The supervised baselines: nnU-Net's own trainer with the package's schedule and seed overrides."""

from __future__ import annotations

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_ssl.trainers.checkpoints import AtomicCheckpoints
from nnunet_ssl.trainers.environment import ScheduleFromEnvironment


class SupervisedBaseline(AtomicCheckpoints, ScheduleFromEnvironment, nnUNetTrainer):
    """Supervised nnUNetTrainer (the baseline at the same label budget), with the package's schedule overrides."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.apply_environment()


class Reseeded:
    """Mixin: training seed ``nnUNet_ssl_seed + 1000``, a control for training noise.

    In ``nnUNetv2_ssl_benchmark`` the reseeded baseline trains on the same labeled cases as the baseline (the
    benchmark's seed draws those) with a different initialisation, patch sampling and augmentation. Its paired
    difference to the baseline is what two trainings of the same method differ by; an SSL trainer's difference to
    the baseline means little unless it exceeds that."""

    training_seed_offset = 1000
