"""TransMedSeg's transferable semantic augmentation as a plug-in (scaffold: filled in by issue #38)."""

from __future__ import annotations


class TransferableSemanticAugmentation:
    """TransMedSeg (arXiv 2505.14753): scaffold."""
