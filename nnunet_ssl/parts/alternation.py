"""Which of AD-MT's two teachers is active: a flag that flips after a random number of steps.

Zhao et al., "Alternate Diverse Teaching for Semi-supervised Medical Image Segmentation", ECCV 2024; official code
ZhenZHAO/AD-MT ``AlternateUpdate`` (``code/train_utils.py``): teacher A is active first; after each training step a
counter grows, and when it reaches the current period the other teacher becomes active, the counter restarts and a
new period is drawn uniformly from {1, ..., P}.

The official code draws the periods from numpy's global generator. Here period k (after k switches) is drawn from
``numpy.random.default_rng([seed, k])``, so every DDP rank draws the same periods without communicating, and a
resumed training draws the periods the uninterrupted one would have drawn.
"""

from __future__ import annotations

import numpy as np


class AlternatingTeachers:
    """The active teacher (0 = A, 1 = B), the steps it has been active and the length of its turn."""

    def __init__(self, max_period: int, seed: int = 0):
        if int(max_period) < 1:
            raise ValueError(f"the alternation period must be at least 1 step, got {max_period}")
        if int(seed) < 0:
            raise ValueError(f"the alternation seed must be >= 0, got {seed}")
        #: P: each turn lasts a number of steps drawn uniformly from {1, ..., P}
        self.max_period = int(max_period)
        self.seed = int(seed)
        #: index of the active teacher: 0 (A, the official flag True) or 1 (B)
        self.active = 0
        #: steps of the current turn already taken
        self.counter = 0
        #: switches so far (the index of the current turn's period)
        self.switches = 0
        #: length of the current turn
        self.period = self.draw_period(0)

    def draw_period(self, turn: int) -> int:
        """The length of turn ``turn``, in {1, ..., P}: a function of (seed, turn) only."""
        return int(np.random.default_rng([self.seed, int(turn)]).integers(1, self.max_period + 1))

    @property
    def teacher_a_active(self) -> bool:
        return self.active == 0

    def step(self) -> bool:
        """Counts one training step; returns whether the other teacher became active."""
        self.counter += 1
        if self.counter < self.period:
            return False
        self.active = 1 - self.active
        self.counter = 0
        self.switches += 1
        self.period = self.draw_period(self.switches)
        return True

    def state_dict(self) -> dict[str, int]:
        return {"max_period": self.max_period, "seed": self.seed, "active": self.active, "counter": self.counter,
                "switches": self.switches, "period": self.period}

    def load_state_dict(self, state: dict) -> None:
        self.max_period = int(state["max_period"])
        self.seed = int(state["seed"])
        self.active = int(state["active"])
        self.counter = int(state["counter"])
        self.switches = int(state["switches"])
        self.period = int(state["period"])
