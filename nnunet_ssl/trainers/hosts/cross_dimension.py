"""M&N host: a 2D and a 3D network co-trained (scaffold: filled in by issue #38)."""

from __future__ import annotations

from nnunet_ssl.trainers.base import nnUNetTrainerSSL


class CrossDimensionCoTraining(nnUNetTrainerSSL):
    """M&N (MLMI 2025): scaffold."""
