"""Selection scores and ignored voxels against hand computations."""

from __future__ import annotations

import math

import numpy as np
import pytest

from nnunet_ssl.pseudolabel import scores as S


def test_class_dice_and_pairwise_mean_by_hand():
    a = np.array([0, 1, 1, 2, 2, 0])
    b = np.array([0, 1, 0, 2, 2, 2])
    # class 1: |A|=2, |B|=1, overlap 1 -> 2/3; class 2: |A|=2, |B|=3, overlap 2 -> 4/5; class 3 absent in both -> 1
    assert S.class_dice(a, b, [1, 2, 3]) == pytest.approx([2 / 3, 4 / 5, 1.0])
    c = np.zeros(6, int)
    # pairs (a,b) (a,c) (b,c) with labels 1,2: (2/3+4/5)/2, (0+0)/2, (0+0)/2
    assert S.mean_pairwise_dice([a, b, c], [1, 2]) == pytest.approx((2 / 3 + 4 / 5) / 2 / 3)
    assert math.isnan(S.mean_pairwise_dice([a], [1, 2]))


def test_agreement_compares_models_and_stability_compares_checkpoints():
    """Keys are (model, checkpoint): swapping the grouping would give the other number."""
    x = np.array([1, 1, 0, 0])
    y = np.array([1, 0, 0, 0])  # Dice(x, y) = 2/3
    z = np.array([0, 0, 1, 1])  # Dice(x, z) = Dice(y, z) = 0
    maps = {("fold0", "snap"): x, ("fold0", "final"): x,   # fold 0 stable
            ("fold1", "snap"): z, ("fold1", "final"): y}   # fold 1 unstable
    # agreement: at "snap" x vs z -> 0; at "final" x vs y -> 2/3; mean 1/3
    assert S.grouped_pairwise_dice(maps, [1], across=0) == pytest.approx(1 / 3)
    # stability: fold 0 x vs x -> 1; fold 1 z vs y -> 0; mean 1/2
    assert S.grouped_pairwise_dice(maps, [1], across=1) == pytest.approx(1 / 2)
    assert math.isnan(S.grouped_pairwise_dice({("m", "final"): x, ("n", "final"): y}, [1], across=1))


def test_confidence_and_uncertainty_over_the_foreground_union():
    p = np.array([[0.9, 0.2, 0.5, 1.0],
                  [0.1, 0.8, 0.5, 0.0]])
    maps = [np.array([0, 1, 0, 0]), np.array([0, 0, 1, 0])]  # union: voxels 1 and 2
    out = S.confidence_scores(p, maps)
    assert out["confidence"] == pytest.approx((0.8 + 0.5) / 2)
    h1 = -(0.2 * math.log(0.2) + 0.8 * math.log(0.8)) / math.log(2)
    assert out["uncertainty"] == pytest.approx((h1 + 1.0) / 2, rel=1e-5)
    assert out["foreground_voxels"] == 2
    # no foreground anywhere: the whole image
    empty = S.confidence_scores(p, [np.zeros(4, int)])
    assert empty["confidence"] == pytest.approx((0.9 + 0.8 + 0.5 + 1.0) / 4)
    assert empty["foreground_voxels"] == 0
    # a given uncertainty map (evidential sources' K / S) replaces the entropy, over the same voxels
    given = S.confidence_scores(p, maps, uncertainty=np.array([0.7, 0.1, 0.3, 0.9]))
    assert given["uncertainty"] == pytest.approx((0.1 + 0.3) / 2)
    assert given["confidence"] == out["confidence"]


def test_ignore_mask_by_probability_and_disagreement():
    p = np.array([[0.9, 0.6, 0.3], [0.1, 0.4, 0.7]])
    maps = [np.array([0, 0, 1]), np.array([0, 1, 1])]
    assert S.ignore_mask(p, maps, 0.65, False).tolist() == [False, True, False]
    assert S.ignore_mask(p, maps, 0.0, True).tolist() == [False, True, False]
    assert S.ignore_mask(p, maps, 0.8, True).tolist() == [False, True, True]
    assert not S.ignore_mask(p, maps, 0.0, False).any()
