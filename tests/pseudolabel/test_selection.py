"""Case selection: thresholds, top k / fraction, the ranking score and missing scores."""

from __future__ import annotations

import pytest

from nnunet_ssl.errors import SSLInputError
from nnunet_ssl.pseudolabel.selection import SelectionRule, ranking_score, select_cases

NAN = float("nan")
SCORES = {
    "a": {"agreement": 0.95, "stability": 0.90, "confidence": 0.80, "uncertainty": 0.30, "quality": NAN},
    "b": {"agreement": 0.80, "stability": 0.99, "confidence": 0.95, "uncertainty": 0.10, "quality": NAN},
    "c": {"agreement": 0.90, "stability": 0.70, "confidence": 0.90, "uncertainty": 0.20, "quality": NAN},
    "d": {"agreement": 0.60, "stability": 0.95, "confidence": 0.70, "uncertainty": 0.50, "quality": NAN},
}


def kept(decisions):
    return sorted(c for c, d in decisions.items() if d == "kept")


def test_no_rule_keeps_everything_and_thresholds_combine():
    assert kept(select_cases(SCORES, SelectionRule())) == ["a", "b", "c", "d"]
    assert kept(select_cases(SCORES, SelectionRule(min_agreement=0.85))) == ["a", "c"]
    assert kept(select_cases(SCORES, SelectionRule(min_agreement=0.85, min_stability=0.8))) == ["a"]
    decisions = select_cases(SCORES, SelectionRule(max_uncertainty=0.25))
    assert kept(decisions) == ["b", "c"] and decisions["d"] == "uncertainty 0.5000 > 0.25"
    # a threshold on a score no case has drops every case, saying why
    decisions = select_cases(SCORES, SelectionRule(min_quality=0.5))
    assert kept(decisions) == [] and decisions["a"].startswith("no quality score")


def test_top_k_and_fraction_rank_by_the_chosen_score():
    # default ranking: agreement (every case has it)
    assert ranking_score(SCORES, SelectionRule()) == "agreement"
    assert kept(select_cases(SCORES, SelectionRule(top_k=2))) == ["a", "c"]
    assert kept(select_cases(SCORES, SelectionRule(top_k=2, rank_by="stability"))) == ["b", "d"]
    # smaller uncertainty is better
    assert kept(select_cases(SCORES, SelectionRule(top_k=1, rank_by="uncertainty"))) == ["b"]
    # a fraction of the pool, rounded up: 0.5 * 4 = 2; 0.3 * 4 -> 2
    assert kept(select_cases(SCORES, SelectionRule(top_fraction=0.3, rank_by="confidence"))) == ["b", "c"]
    # thresholds first, then the best of what passed
    decisions = select_cases(SCORES, SelectionRule(min_stability=0.8, top_k=1))
    assert kept(decisions) == ["a"] and decisions["b"].startswith("ranked 2 by agreement")


def test_fully_ignored_cases_are_dropped_and_bad_rules_refused():
    scores = {"a": {**SCORES["a"], "ignored_fraction": 1.0}, "b": {**SCORES["b"], "ignored_fraction": 0.2}}
    decisions = select_cases(scores, SelectionRule())
    assert decisions == {"a": "every voxel ignored", "b": "kept"}
    assert kept(select_cases(scores, SelectionRule(max_ignored_fraction=0.1))) == []
    for rule in (SelectionRule(top_k=1, top_fraction=0.5), SelectionRule(top_k=0), SelectionRule(top_fraction=1.5),
                 SelectionRule(rank_by="dice")):
        with pytest.raises(SSLInputError):
            select_cases(SCORES, rule)
