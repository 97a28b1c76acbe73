"""Self-paced contrastive learning with meta-labels as a plug-in (scaffold: filled in by issue #37)."""

from __future__ import annotations


class SelfPacedContrastive:
    """Self-paced contrastive learning with meta-labels (NeurIPS 2021): scaffold."""
