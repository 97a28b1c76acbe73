"""MLB-Seg host (scaffold: filled in by issue #37)."""

from __future__ import annotations

from nnunet_ssl.trainers.hosts.mean_teacher import MeanTeacher


class MetaLearnedBootstrapping(MeanTeacher):
    """MLB-Seg (MICCAI 2023): scaffold."""
