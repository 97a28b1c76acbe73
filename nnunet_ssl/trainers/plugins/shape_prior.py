"""ERSR's ellipse shape prior as a plug-in (scaffold: filled in by issue #38)."""

from __future__ import annotations


class EllipseShapePrior:
    """ERSR (arXiv 2508.19815): scaffold."""
