"""A synthetic search objective with a known optimum, picklable and deterministic (for the evolution tests and
the multi-process worker)."""

from __future__ import annotations

import math
import time

import lr2kernels as lr2
from lr2kernels.search import SearchSpace

MODEL = lr2.RopeTable.default(head_dim=64, base=1e5, max_position=8192)
TARGET_LENGTH = 32768  # s = 4


def space(critical_window: int = 4) -> SearchSpace:
    return SearchSpace.for_table(MODEL, TARGET_LENGTH, critical_window=critical_window)


def optimum():
    """A valid candidate away from every seed: critical pair 18, a convex tail from 4.6 to 7.8."""
    s = space()
    return s.repair(18, [1.0] * 18 + [4.6 + 3.2 * (j / 13) ** 2 for j in range(14)])


class Distance:
    """Mean squared log-distance of a table's long factors to the optimum's (0 at the optimum)."""

    def __init__(self, delay: float = 0.0) -> None:
        self.target, self.delay, self.calls = optimum().factors, delay, 0

    def __call__(self, table: lr2.RopeTable) -> float:
        self.calls += 1
        if self.delay:
            time.sleep(self.delay)
        pairs = zip(table.long_factor, self.target)
        return sum((math.log(a) - math.log(b)) ** 2 for a, b in pairs) / len(self.target)
