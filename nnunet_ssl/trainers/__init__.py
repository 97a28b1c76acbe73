"""The nnUNetTrainer subclasses users select with ``nnUNetv2_train ... -tr NAME``: hosts x losses."""

from nnunet_ssl.trainers.base import nnUNetTrainerSupervised, nnUNetTrainerSupervisedReseeded
from nnunet_ssl.trainers.cps import nnUNetTrainerCPS
from nnunet_ssl.trainers.fixmatch import nnUNetTrainerFixMatch
from nnunet_ssl.trainers.mean_teacher import nnUNetTrainerMeanTeacher
from nnunet_ssl.trainers.medl import nnUNetTrainerMEDL, nnUNetTrainerMEDLNet2
from nnunet_ssl.trainers.metassl import (
    nnUNetTrainerCPSMetaSSL,
    nnUNetTrainerFixMatchMetaSSL,
    nnUNetTrainerMeanTeacherMetaSSL,
)
from nnunet_ssl.trainers.quality import (
    nnUNetTrainerMeanTeacherQAR,
    nnUNetTrainerMeanTeacherQualityGuided,
    nnUNetTrainerMeanTeacherQualityGuidedMetaSSL,
    nnUNetTrainerMeanTeacherQW,
)

__all__ = [
    "nnUNetTrainerCPS",
    "nnUNetTrainerCPSMetaSSL",
    "nnUNetTrainerFixMatch",
    "nnUNetTrainerFixMatchMetaSSL",
    "nnUNetTrainerMEDL",
    "nnUNetTrainerMEDLNet2",
    "nnUNetTrainerMeanTeacher",
    "nnUNetTrainerMeanTeacherMetaSSL",
    "nnUNetTrainerMeanTeacherQAR",
    "nnUNetTrainerMeanTeacherQW",
    "nnUNetTrainerMeanTeacherQualityGuided",
    "nnUNetTrainerMeanTeacherQualityGuidedMetaSSL",
    "nnUNetTrainerSupervised",
    "nnUNetTrainerSupervisedReseeded",
]
