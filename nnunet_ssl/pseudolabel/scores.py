"""Per-case reliability scores of pseudo-labels, and the voxels to ignore (pure numpy, no nnU-Net).

Every score is computed on the image's voxel grid from the label maps and probabilities of the source models
(a source is one model folder, fold and checkpoint):

* ``agreement``: mean pairwise Dice between models (different folds or model folders, same checkpoint name),
  DIAGNijmegen's FLARE22 rule (keep a case when the five folds' pairwise Dice exceeds 0.85);
* ``stability``: mean pairwise Dice between checkpoints of the same model (snapshots at fractions of one training),
  ToothFairy 2023's rule (keep a case when its snapshots' mean Dice exceeds 0.9);
* ``confidence``: mean maximum probability of the ensemble over the voxels any source calls foreground;
* ``uncertainty``: mean normalised entropy of the ensemble (``H / log K`` in [0, 1]) over the same voxels; when
  every source is evidential (``nnUNetTrainerMEDL``), the sources' mean Dirichlet total uncertainty ``K / S``
  instead, the measure of ``nnUNetv2_ssl_predict_uncertainty``.

Dice is per foreground class, ``2|A∩B| / (|A| + |B|)``, 1 when both are empty, averaged over classes. A score that
cannot be computed (one model only, one checkpoint only) is NaN.
"""

from __future__ import annotations

import itertools
from collections.abc import Hashable, Mapping, Sequence

import numpy as np


def class_dice(a: np.ndarray, b: np.ndarray, labels: Sequence[int]) -> list[float]:
    """Dice of label maps ``a`` and ``b`` for each label of ``labels`` (1.0 when both lack it)."""
    out = []
    for label in labels:
        in_a, in_b = a == label, b == label
        size = int(in_a.sum()) + int(in_b.sum())
        out.append(1.0 if size == 0 else 2.0 * int(np.logical_and(in_a, in_b).sum()) / size)
    return out


def mean_pairwise_dice(maps: Sequence[np.ndarray], labels: Sequence[int]) -> float:
    """Mean over all pairs of maps of their mean class Dice; NaN for fewer than two maps."""
    if len(maps) < 2:
        return float("nan")
    pairs = [float(np.mean(class_dice(a, b, labels))) for a, b in itertools.combinations(maps, 2)]
    return float(np.mean(pairs))


def grouped_pairwise_dice(maps: Mapping[tuple[Hashable, Hashable], np.ndarray], labels: Sequence[int],
                          across: int) -> float:
    """Mean pairwise Dice between the maps that differ in key element ``across`` and share the other one.

    Keys are ``(model, checkpoint)``. ``across=0`` compares models at each checkpoint (agreement), ``across=1`` the
    checkpoints of each model (stability). The groups' values are averaged; NaN when no group has two maps."""
    groups: dict[Hashable, list[np.ndarray]] = {}
    for key, seg in maps.items():
        groups.setdefault(key[1 - across], []).append(seg)
    values = [mean_pairwise_dice(g, labels) for g in groups.values() if len(g) >= 2]
    return float(np.mean(values)) if values else float("nan")


def normalised_entropy(probabilities: np.ndarray) -> np.ndarray:
    """``-sum_k p_k log p_k / log K`` over axis 0 of ``(K, *spatial)`` probabilities, in [0, 1]."""
    p = np.clip(probabilities.astype(np.float64), 1e-12, 1.0)
    k = probabilities.shape[0]
    return (-(p * np.log(p)).sum(0) / np.log(k)).astype(np.float32)


def foreground_union(maps: Sequence[np.ndarray]) -> np.ndarray:
    """Voxels that at least one source labels foreground."""
    union = np.zeros(maps[0].shape, dtype=bool)
    for seg in maps:
        union |= seg > 0
    return union


def confidence_scores(probabilities: np.ndarray, maps: Sequence[np.ndarray],
                      uncertainty: np.ndarray | None = None) -> dict[str, float]:
    """Mean max-probability and mean uncertainty of the ensemble over the sources' foreground union (over the
    whole image when no source finds foreground), and the union's size. The uncertainty is the given voxel map
    (e.g. the Dirichlet ``K / S`` of evidential sources), by default the normalised entropy of ``probabilities``."""
    region = foreground_union(maps)
    if not region.any():
        region = np.ones_like(region)
    if uncertainty is None:
        uncertainty = normalised_entropy(probabilities)
    return {"confidence": float(probabilities.max(0)[region].mean()),
            "uncertainty": float(uncertainty[region].mean()),
            "foreground_voxels": int(foreground_union(maps).sum())}


def ignore_mask(probabilities: np.ndarray, maps: Sequence[np.ndarray], min_probability: float,
                ignore_disagreement: bool) -> np.ndarray:
    """Voxels a student should not learn from: ensemble max-probability below ``min_probability`` and, with
    ``ignore_disagreement``, voxels where the sources' label maps differ."""
    mask = probabilities.max(0) < min_probability if min_probability > 0 else np.zeros(maps[0].shape, dtype=bool)
    if ignore_disagreement and len(maps) > 1:
        for seg in maps[1:]:
            mask |= seg != maps[0]
    return mask
