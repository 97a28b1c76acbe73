"""The nnUNetTrainer subclasses users select with ``nnUNetv2_train ... -tr NAME``."""

from nnunet_ssl.trainers.base import nnUNetTrainerSupervised
from nnunet_ssl.trainers.mean_teacher import nnUNetTrainerMeanTeacher

__all__ = ["nnUNetTrainerMeanTeacher", "nnUNetTrainerSupervised"]
