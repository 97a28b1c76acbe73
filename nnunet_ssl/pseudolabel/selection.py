"""Which pseudo-labeled cases enter the student's training set: thresholds on the scores, then the best k or a
fraction, every rule optional and combinable (pure; no nnU-Net)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass

from nnunet_ssl.errors import SSLInputError

#: scores where larger is better; ``uncertainty`` is the one where smaller is better
HIGHER_IS_BETTER = {"agreement": True, "stability": True, "confidence": True, "quality": True, "uncertainty": False}
#: the ranking score when none is chosen: the first one every case has
RANK_ORDER = ("agreement", "stability", "quality", "confidence", "uncertainty")


@dataclass
class SelectionRule:
    min_agreement: float | None = None
    min_stability: float | None = None
    min_confidence: float | None = None
    max_uncertainty: float | None = None
    min_quality: float | None = None
    max_ignored_fraction: float | None = None
    top_k: int | None = None
    top_fraction: float | None = None
    rank_by: str | None = None

    def check(self) -> None:
        if self.top_k is not None and self.top_fraction is not None:
            raise SSLInputError("give at most one of --top-k and --top-fraction")
        if self.top_k is not None and self.top_k < 1:
            raise SSLInputError(f"--top-k must be at least 1, got {self.top_k}")
        if self.top_fraction is not None and not 0 < self.top_fraction <= 1:
            raise SSLInputError(f"--top-fraction must be in (0, 1], got {self.top_fraction}")
        if self.rank_by is not None and self.rank_by not in HIGHER_IS_BETTER:
            raise SSLInputError(f"--rank-by {self.rank_by!r} is not a score; choose one of "
                                f"{', '.join(HIGHER_IS_BETTER)}")

    def thresholds(self) -> list[tuple[str, str, float]]:
        """(score, '>=' or '<=', value) for every threshold that is set."""
        out = []
        for name, value in asdict(self).items():
            if value is None or not name.startswith(("min_", "max_")):
                continue
            out.append((name[4:], ">=" if name.startswith("min_") else "<=", float(value)))
        return out


def _finite(x: float | None) -> bool:
    return x is not None and not math.isnan(x)


def ranking_score(scores: Mapping[str, Mapping[str, float]], rule: SelectionRule) -> str:
    """The score cases are ranked by: ``rule.rank_by``, else the first of ``RANK_ORDER`` every case has."""
    if rule.rank_by is not None:
        return rule.rank_by
    for name in RANK_ORDER:
        if scores and all(_finite(s.get(name)) for s in scores.values()):
            return name
    return "confidence"


def select_cases(scores: Mapping[str, Mapping[str, float]], rule: SelectionRule) -> dict[str, str]:
    """Each case's decision: ``"kept"`` or the reason it was dropped. A case whose voxels are all ignored is
    dropped (nnU-Net could not sample a patch with a label from it). Thresholds apply first (a case without the
    score a threshold needs is dropped: that rule cannot vouch for it); then the top k (or fraction, rounded up)
    of what passed, by ``ranking_score``."""
    rule.check()
    decisions: dict[str, str] = {}
    for case, s in scores.items():
        if s.get("ignored_fraction", 0.0) >= 1.0:
            decisions[case] = "every voxel ignored"
            continue
        for name, op, value in rule.thresholds():
            x = s.get(name)
            if not _finite(x):
                decisions[case] = f"no {name} score (needs more models or checkpoints)"
                break
            if (op == ">=" and x < value) or (op == "<=" and x > value):
                decisions[case] = f"{name} {x:.4f} {'<' if op == '>=' else '>'} {value:g}"
                break
        else:
            decisions[case] = "kept"
    passed = [c for c, d in decisions.items() if d == "kept"]
    limit = rule.top_k if rule.top_k is not None else (
        math.ceil(rule.top_fraction * len(scores)) if rule.top_fraction is not None else None)
    if limit is not None and len(passed) > limit:
        name = ranking_score(scores, rule)
        sign = 1.0 if HIGHER_IS_BETTER[name] else -1.0

        def key(case: str) -> tuple[float, str]:
            x = scores[case].get(name)
            return (-sign * x if _finite(x) else math.inf, case)

        for rank, case in enumerate(sorted(passed, key=key)):
            if rank >= limit:
                decisions[case] = f"ranked {rank + 1} by {name}, beyond the {limit} kept"
    return decisions
