"""Example user trainer: Mean Teacher with a stronger, longer unsupervised term and a larger unlabeled batch.

nnU-Net finds it by class name (``nnUNetv2_train DATASET CONFIG FOLD -tr nnUNetTrainerMeanTeacherStrong``) once
this folder is listed in ``nnUNet_extTrainer`` after the package's own folder; see README.md beside this file.
"""

from nnunet_ssl.trainers import nnUNetTrainerMeanTeacher


class nnUNetTrainerMeanTeacherStrong(nnUNetTrainerMeanTeacher):
    """Mean Teacher with λ_max 3.0 ramped over 40 % of training, 4 unlabeled patches per step, EMA decay 0.999."""

    unsupervised_weight = 3.0  # λ_max (default 1.0)
    rampup_fraction = 0.4  # ramp length as a fraction of all iterations (default 0.2)
    unlabeled_batch_size = 4  # global, split over GPUs; default: the labeled batch size
    ema_max_decay = 0.999  # default 0.99
