"""LongRoPE2's search space of long factors, and the moves of the evolutionary search within it.

A candidate is a critical dimension ``cd`` (a frequency pair index) and ``rotary_dim / 2`` long factors with:
- pairs ``i >= cd``: factors in ``[s, upper * s]`` (``s = target / L_train``, ``upper = 2``), non-decreasing in i;
- pairs ``i < cd``: NTK-shaped from the critical pair's factor, ``lambda_i = lambda_cd^(i / cd)``.
Every candidate the search makes goes through :meth:`SearchSpace.repair`, so every one satisfies both.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
from collections.abc import Sequence
from typing import Any

from lr2kernels.search.critical import critical_dimension, extension_table, ntk_shaped_factors
from lr2kernels.tables import RopeTable

_DECIMALS = 6  # searched factors are rounded to 1e-6: finer differences do not matter, and duplicates are found


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One point of the search space: the critical pair index and the ``rotary_dim / 2`` long factors."""

    critical_dim: int
    factors: tuple[float, ...]

    @property
    def key(self) -> str:
        """Exact identity (floats as JSON reprs, which round-trip): the search's cache and log key."""
        return json.dumps([self.critical_dim, list(self.factors)])

    def to_dict(self) -> dict[str, Any]:
        return {"critical_dim": self.critical_dim, "factors": list(self.factors)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Candidate:
        return cls(int(data["critical_dim"]), tuple(float(f) for f in data["factors"]))


@dataclasses.dataclass(frozen=True)
class SearchSpace:
    """Where LongRoPE2 searches: long factors for extending ``model_table`` to ``target_length``.

    Build it with :meth:`for_table`. Attributes:
        model_table: the model's own table (its ``max_position`` is ``L_train``).
        target_length: the length to extend to.
        critical_min / critical_max: the critical dimensions searched (pair indices, inclusive).
        upper: factors at and above the critical pair lie in ``[s, upper * s]``.
    """

    model_table: RopeTable
    target_length: int
    critical_min: int
    critical_max: int
    upper: float = 2.0

    def __post_init__(self) -> None:
        if not isinstance(self.model_table, RopeTable):
            raise TypeError(f"model_table: expected a lr2kernels.RopeTable, got {type(self.model_table).__name__}")
        original = self.model_table.max_position
        if not isinstance(self.target_length, int) or self.target_length <= original:
            raise ValueError(f"target_length: expected an integer > L_train = {original}, got {self.target_length!r}")
        half = self.half
        if not (isinstance(self.critical_min, int) and isinstance(self.critical_max, int)):
            raise TypeError(f"critical_min / critical_max: expected integers, got {self.critical_min!r}, "
                            f"{self.critical_max!r}")  # fmt: skip
        if not 1 <= self.critical_min <= self.critical_max <= half - 1:
            raise ValueError(
                f"critical_min / critical_max: expected 1 <= min <= max <= {half - 1}, got {self.critical_min}, "
                f"{self.critical_max}"
            )
        if not (isinstance(self.upper, (int, float)) and math.isfinite(self.upper) and self.upper >= 1.0):
            raise ValueError(f"upper: expected a finite ratio >= 1, got {self.upper!r}")

    @classmethod
    def for_table(
        cls,
        model_table: RopeTable,
        target_length: int,
        critical_dim: int | None = None,
        critical_window: int = 4,
        upper: float = 2.0,
    ) -> SearchSpace:
        """The space for extending a model: critical dimensions ``[cd - critical_window, cd]`` around
        ``critical_dim`` (default: the theoretical one, :func:`critical_dimension`; the real one is usually a few
        pairs lower)."""
        half = model_table.rotary_dim // 2
        if critical_dim is None:
            critical_dim = critical_dimension(model_table.base, model_table.rotary_dim, model_table.max_position)
        if not isinstance(critical_window, int) or critical_window < 0:
            raise ValueError(f"critical_window: expected a non-negative integer, got {critical_window!r}")
        high = min(max(critical_dim, 1), half - 1)
        return cls(model_table, target_length, max(1, high - critical_window), high, upper)

    # ------------------------------------------------------------------ geometry
    @property
    def half(self) -> int:
        return self.model_table.rotary_dim // 2

    @property
    def scale(self) -> float:
        """s = target_length / L_train."""
        return self.target_length / self.model_table.max_position

    @property
    def bounds(self) -> tuple[float, float]:
        """(s, upper * s): the range of every factor at or above the critical pair."""
        return self.scale, self.upper * self.scale

    def table(self, candidate: Candidate) -> RopeTable:
        """The LongRoPE table of a candidate (the model's own factors up to L_train, the candidate's past it)."""
        return extension_table(self.model_table, self.target_length, candidate.factors)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model_table": self.model_table.to_dict(),
            "target_length": self.target_length,
            "critical_min": self.critical_min,
            "critical_max": self.critical_max,
            "upper": self.upper,
        }

    # ------------------------------------------------------------------ constraints
    def repair(self, critical_dim: int, factors: Sequence[float]) -> Candidate:
        """The nearest valid candidate: ``critical_dim`` clipped to the range; factors at and above it rounded,
        clipped to the bounds and made non-decreasing (running maximum); NTK-shaped below it."""
        if len(factors) != self.half:
            raise ValueError(f"factors: expected {self.half} values, got {len(factors)}")
        critical = min(max(int(critical_dim), self.critical_min), self.critical_max)
        low, high = self.bounds
        tail, running = [], low
        for value in factors[critical:]:
            value = min(max(round(float(value), _DECIMALS), low), high)
            running = max(running, value)
            tail.append(running)
        return Candidate(critical, tuple(ntk_shaped_factors(tail[0], critical, self.half, tail)))

    def violations(self, candidate: Candidate) -> list[str]:
        """What about ``candidate`` breaks the space's constraints (empty when it is valid)."""
        problems = []
        critical, factors = candidate.critical_dim, candidate.factors
        if len(factors) != self.half:
            return [f"expected {self.half} factors, got {len(factors)}"]
        if not self.critical_min <= critical <= self.critical_max:
            problems.append(f"critical_dim {critical} outside [{self.critical_min}, {self.critical_max}]")
            return problems
        low, high = self.bounds
        tail = factors[critical:]
        if any(not low <= f <= high for f in tail):
            problems.append(f"a factor at or above the critical pair is outside [{low}, {high}]")
        if any(b < a for a, b in zip(tail, tail[1:])):
            problems.append("factors at or above the critical pair decrease")
        for i in range(critical):
            expected = tail[0] ** (i / critical)
            if not math.isclose(factors[i], expected, rel_tol=1e-12):
                problems.append(f"factor {i} = {factors[i]} is not NTK-shaped ({expected})")
                break
        return problems

    # ------------------------------------------------------------------ moves
    def seeds(self) -> list[Candidate]:
        """NTK-style starting points: for every critical dimension (the theoretical one first), tails rising
        geometrically from ``a * s`` at the critical pair to ``b * s`` at the last pair, ``(a, b)`` in
        ``(1, 1)`` (NTK with that critical dimension), ``(1, upper)``, ``((1 + upper) / 2, upper)`` and
        ``(upper, upper)``."""
        low, _ = self.bounds
        shapes = [(1.0, 1.0), (1.0, self.upper), ((1.0 + self.upper) / 2, self.upper), (self.upper, self.upper)]
        seeds = []
        for start, end in shapes:
            for critical in range(self.critical_max, self.critical_min - 1, -1):
                count = self.half - critical
                tail = [low * start * (end / start) ** (j / max(count - 1, 1)) for j in range(count)]
                seeds.append(self.repair(critical, [1.0] * critical + tail))
        unique = {c.key: c for c in seeds}
        return list(unique.values())

    def mutate(self, parent: Candidate, rng: random.Random, probability: float, step: float) -> Candidate:
        """Each factor at or above the critical pair moves with ``probability`` by a Gaussian step of std
        ``step * (upper - 1) * s`` (at least one moves); the critical dimension moves by one with ``probability``."""
        critical = parent.critical_dim
        if rng.random() < probability:
            critical += rng.choice((-1, 1))
        critical = min(max(critical, self.critical_min), self.critical_max)
        factors = list(parent.factors)
        sigma = step * (self.bounds[1] - self.bounds[0]) or step * self.scale
        moved = [i for i in range(critical, self.half) if rng.random() < probability]
        for i in moved or [rng.randrange(critical, self.half)]:
            factors[i] += rng.gauss(0.0, sigma)
        return self.repair(critical, factors)

    def crossover(self, first: Candidate, second: Candidate, rng: random.Random) -> Candidate:
        """Each factor from either parent (uniform crossover), the critical dimension from either; repaired."""
        critical = rng.choice((first.critical_dim, second.critical_dim))
        factors = [rng.choice(pair) for pair in zip(first.factors, second.factors)]
        return self.repair(critical, factors)
