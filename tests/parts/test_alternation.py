"""AD-MT's alternation of the active teacher: random turns of 1..P steps, the same on every rank and after --c."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from nnunet_ssl.parts.alternation import AlternatingTeachers


def _actives(alternation: AlternatingTeachers, steps: int) -> list[int]:
    """The active teacher of each of ``steps`` steps (read before the step, as the trainer does)."""
    out = []
    for _ in range(steps):
        out.append(alternation.active)
        alternation.step()
    return out


def test_flips_after_each_drawn_period():
    alternation = AlternatingTeachers(5, seed=3)
    periods = [int(np.random.default_rng([3, k]).integers(1, 6)) for k in range(8)]
    assert alternation.active == 0 and alternation.teacher_a_active and alternation.period == periods[0]
    # teacher A for periods[0] steps, then B for periods[1] steps, ...
    expected = list(itertools.chain.from_iterable([k % 2] * p for k, p in enumerate(periods)))
    assert _actives(alternation, len(expected)) == expected
    assert alternation.switches == len(periods) and alternation.counter == 0
    assert all(1 <= p <= 5 for p in periods) and len(set(periods)) > 1  # random lengths, within 1..P


def test_step_reports_the_switch_and_a_period_of_one_alternates_every_step():
    alternation = AlternatingTeachers(1)
    assert [alternation.step() for _ in range(4)] == [True] * 4
    assert _actives(alternation, 4) == [0, 1, 0, 1]
    with pytest.raises(ValueError, match="at least 1"):
        AlternatingTeachers(0)


def test_same_seed_same_turns_other_seed_other_turns():
    a, b, c = AlternatingTeachers(19, seed=7), AlternatingTeachers(19, seed=7), AlternatingTeachers(19, seed=8)
    seq_a, seq_b, seq_c = _actives(a, 400), _actives(b, 400), _actives(c, 400)
    assert seq_a == seq_b  # e.g. two DDP ranks, no communication
    assert seq_a != seq_c
    assert a.state_dict() == b.state_dict()


def test_state_dict_round_trip_mid_period_continues_the_same_turns():
    reference = AlternatingTeachers(6, seed=1)
    _actives(reference, 11)
    while reference.counter == 0:  # stop inside a turn, not at its boundary
        reference.step()
    state = reference.state_dict()
    assert all(type(v) is int for v in state.values())  # plain ints: torch.load(weights_only=True) reads them
    resumed = AlternatingTeachers(6, seed=999)
    resumed.load_state_dict(state)
    assert resumed.state_dict() == state
    assert _actives(resumed, 100) == _actives(reference, 100)
