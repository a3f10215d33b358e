"""LongRoPE2's evolutionary factor search: seeded, checkpointed after every evaluation, resumable, and parallel
across processes with torch.distributed (gloo on CPUs, nccl on GPUs; ``torchrun`` launchable).

Determinism is what makes resuming exact: every choice comes from ``random.Random(seed)`` and from scores already
known, in a fixed order. A resumed search replays from the start, taking the scores of logged candidates from the
log instead of evaluating them again, so it reaches the same state and ends with the same result as a search that
was never interrupted. Processes split each generation's new candidates round-robin and exchange the scores, so
every process holds the same state, and the result does not depend on the number of processes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lr2kernels.search.space import Candidate, SearchSpace
from lr2kernels.tables import RopeTable

LOG_FORMAT = "lr2kernels-search-log"


@dataclasses.dataclass(frozen=True)
class SearchConfig:
    """The evolutionary search's budget and moves (defaults: the LongRoPE2 paper and its released code).

    Attributes:
        population: candidates in the first generation (NTK-style seeds, then their mutations).
        parents: the best candidates so far that each later generation is bred from.
        mutations / crossovers: children per generation made by mutation / by crossover of two parents.
        iterations: generations after the first.
        mutation_prob: chance that each factor (and the critical dimension) of a mutated child moves.
        mutation_step: std of a factor's move, as a fraction of the width of ``[s, upper * s]``.
        seed: seeds every random choice.
    """

    population: int = 64
    parents: int = 32
    mutations: int = 16
    crossovers: int = 16
    iterations: int = 40
    mutation_prob: float = 0.3
    mutation_step: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("population", "parents"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive integer, got {value!r}")
        for name in ("mutations", "crossovers", "iterations", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name}: expected a non-negative integer, got {value!r}")
        if self.iterations and self.mutations + self.crossovers == 0:
            raise ValueError("mutations / crossovers: expected at least one child per iteration, got 0 and 0")
        if not 0.0 < self.mutation_prob <= 1.0:
            raise ValueError(f"mutation_prob: expected a probability in (0, 1], got {self.mutation_prob!r}")
        if not 0.0 < self.mutation_step <= 1.0:
            raise ValueError(f"mutation_step: expected a fraction in (0, 1], got {self.mutation_step!r}")

    @property
    def budget(self) -> int:
        """The most evaluations the search makes."""
        return self.population + self.iterations * (self.mutations + self.crossovers)


@dataclasses.dataclass(frozen=True)
class SearchResult:
    """The outcome of :func:`evolutionary_search`.

    Attributes:
        best: the best candidate; ``table`` is its RopeTable and ``score`` its objective (lower is better).
        history: the best score after each generation (generation 0 = the first population).
        evaluations: distinct candidates scored; ``reused`` of them came from the log of an earlier run.
        log: every scored candidate in the order the search made them, ``(candidate, score)``.
        wall_s: seconds this run took.
        skipped: evaluations of the budget (:attr:`SearchConfig.budget`) not made: children that came out equal to a
            candidate already scored in 20 tries (a narrow space, or a converged population), and crossovers of a
            generation with fewer than two parents. ``evaluations + skipped == budget``.
        logged_s: seconds the ``reused`` evaluations took in the earlier runs that logged them (evaluations logged
            without their time, by an lr2kernels before 0.3, count 0; ``logged_untimed`` says how many).
    """

    best: Candidate
    score: float
    table: RopeTable
    history: tuple[float, ...]
    evaluations: int
    reused: int
    log: tuple[tuple[Candidate, float], ...]
    wall_s: float
    skipped: int = 0
    logged_s: float = 0.0
    logged_untimed: int = 0


# ---------------------------------------------------------------------------------------------------- processes
def _process_group() -> tuple[int, int]:
    """(rank, world size) of the default torch.distributed group, (0, 1) when none is initialised."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_gather(obj: Any, world: int) -> list[Any]:
    if world == 1:
        return [obj]
    import torch.distributed as dist

    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, obj)
    return gathered


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


# ---------------------------------------------------------------------------------------------------- the log
LOG_VERSION = 2  # 2: the header records the objective's fingerprint; 1 (no "version"): space and config only

_MISSING = "(not recorded)"


def _flat(prefix: str, value: Any) -> dict[str, Any]:
    """A nested JSON value as ``{"a.b.c": leaf}`` (dict keys in their order), so a mismatch names one field."""
    if isinstance(value, dict) and value:
        flat: dict[str, Any] = {}
        for key, item in value.items():
            flat.update(_flat(f"{prefix}.{key}", item))
        return flat
    return {prefix: value}


def _first_difference(logged: dict[str, Any], wanted: dict[str, Any]) -> tuple[str, Any, Any] | None:
    """(field, logged value, wanted value) of the first field that differs, None when all match."""
    a, b = _flat("", logged), _flat("", wanted)
    for key in [*b, *(k for k in a if k not in b)]:
        if a.get(key, _MISSING) != b.get(key, _MISSING):
            return key.lstrip("."), a.get(key, _MISSING), b.get(key, _MISSING)
    return None


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


_HOW_TO_PROCEED = (
    "Its scores cannot be reused for this run, and it is left as it is. To keep it and start over, write to another "
    "log (lr2kernels search: another --out), or move it aside with move_log_aside (lr2kernels search --fresh: it is "
    "renamed, nothing is deleted); to resume it, rerun with the settings it was written for."
)


class SearchLog:
    """A JSON-lines log: a header line, then one line per evaluation.

    The header (``{"kind": "header", "format": LOG_FORMAT, "version": LOG_VERSION, "search": {"space", "config"},
    "objective": fingerprint}``) says what the scores are of; a log is only resumed by a search with the same
    search space, config and objective fingerprint (every field equal), and a log without a header is refused.

    Process ``r > 0`` of a distributed search writes ``<path>.rank<r>``; reading merges every shard. A last line cut
    short by a kill is ignored when reading and removed by :meth:`repair` before anything is appended after it.
    Anything else unreadable is an error.
    """

    def __init__(
        self, path: str | os.PathLike, header: dict[str, Any], rank: int, objective: dict[str, Any] | None = None
    ) -> None:
        self.path = Path(path)
        # As they read back from the log's header (tuples become lists...).
        self.header, self.objective = json.loads(json.dumps(header)), json.loads(json.dumps(objective))
        self.own = self.path if rank == 0 else self.path.with_name(f"{self.path.name}.rank{rank}")
        self._file = None
        self.seconds: dict[str, float | None] = {}  # by key, as read(): how long each evaluation took (None: unknown)

    def shards(self) -> list[Path]:
        return [self.path, *sorted(self.path.parent.glob(f"{self.path.name}.rank*"))]

    def _check_header(self, shard: Path, record: Any) -> None:
        if not isinstance(record, dict) or record.get("kind") != "header" or record.get("format") != LOG_FORMAT:
            raise ValueError(
                f"log: {shard} does not start with a search-log header line (its first line is not one), so what its "
                f"scores are of cannot be checked. {_HOW_TO_PROCEED}"
            )
        version = record.get("version", 1)
        if version not in (1, LOG_VERSION):
            raise ValueError(f"log: {shard} has version {version!r}, this lr2kernels reads 1 and {LOG_VERSION}")
        if version == 1 and self.objective is not None:
            raise ValueError(
                f"log: {shard} was written by an earlier lr2kernels that did not record the objective (model, "
                f"weights, samples, dtype, backend...), so its scores cannot be matched safely to this run. "
                f"{_HOW_TO_PROCEED}"
            )
        if (record.get("objective") is None) != (self.objective is None):
            was, now = ("recorded", "not given") if self.objective is None else ("not recorded", "given")
            raise ValueError(
                f"log: {shard} was written for a different search: objective fingerprint {was} in the log, {now} in "
                f"this run. {_HOW_TO_PROCEED}"
            )
        logged = {"search": record.get("search"), "objective": record.get("objective")}
        wanted = {"search": self.header, "objective": self.objective}
        difference = _first_difference(logged, wanted)
        if difference is not None:
            field, was, now = difference
            raise ValueError(
                f"log: {shard} was written for a different search: {field} is {_short(was)} in the log and "
                f"{_short(now)} in this run. {_HOW_TO_PROCEED}"
            )

    def read(self) -> dict[str, float]:
        """Scores of the candidates already logged, by key (every shard's header checked against this search)."""
        scores: dict[str, float] = {}
        for shard in self.shards():
            if not shard.exists():
                continue
            lines = shard.read_bytes().split(b"\n")
            last = max((n for n, line in enumerate(lines) if line.strip()), default=-1)
            header_seen = False
            for number, line in enumerate(lines):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line.decode("utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError):
                    if number == last:  # the last line, cut short by a kill mid-write (repair() removes it)
                        continue
                    if header_seen and line.startswith(b'{"kind": "evaluation"'):
                        # A record cut by a kill that an earlier lr2kernels then appended after: skip it (that
                        # evaluation runs again); the rest of the log is good.
                        print(f"search log: line {number + 1} of {shard} is a record cut short by a kill; skipped, "
                              "its evaluation runs again", file=sys.stderr, flush=True)  # fmt: skip
                        continue
                    raise ValueError(f"log: line {number + 1} of {shard} is not JSON") from None
                if not header_seen:
                    self._check_header(shard, record)
                    header_seen = True
                elif record.get("kind") == "evaluation":
                    scores[record["key"]] = float(record["score"])
                    self.seconds[record["key"]] = record.get("seconds")
        return scores

    def repair(self) -> list[Path]:
        """Ends every shard after its last complete line: a last line cut short by a kill is removed (its
        evaluation simply runs again), so records appended later start on a line of their own and the log stays
        readable. Returns the shards repaired."""
        repaired = []
        for shard in self.shards():
            if not shard.exists():
                continue
            data = shard.read_bytes()
            if not data or data.endswith(b"\n"):
                continue
            cut = data.rfind(b"\n") + 1  # 0 when the only line was cut
            tail = data[cut:]
            try:
                json.loads(tail.decode("utf-8"))
                complete = True
            except (UnicodeDecodeError, json.JSONDecodeError):
                complete = False
            with open(shard, "r+b") as f:
                if complete:  # a whole record short of its newline: end it
                    f.seek(0, os.SEEK_END)
                    f.write(b"\n")
                else:
                    f.truncate(cut)
                f.flush()
                os.fsync(f.fileno())
            what = "ended a last line short of its newline" if complete else (
                f"removed a last line cut short by a kill ({len(tail)} bytes; its evaluation runs again)")  # fmt: skip
            print(f"search log: repaired {shard}: {what}", file=sys.stderr, flush=True)
            repaired.append(shard)
        return repaired

    def append(self, candidate: Candidate, score: float, generation: int, seconds: float | None = None) -> None:
        if self._file is None:
            fresh = not self.own.exists() or self.own.stat().st_size == 0
            self.own.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.own, "a", encoding="utf-8")  # noqa: SIM115 (kept open across appends; close())
            if fresh:
                self._write({"kind": "header", "format": LOG_FORMAT, "version": LOG_VERSION, "search": self.header,
                             "objective": self.objective})  # fmt: skip
        record = {"kind": "evaluation", "key": candidate.key, "generation": generation, "score": score,
                  **candidate.to_dict(), "time": time.time(), "seconds": seconds}  # fmt: skip
        self._write(record)

    def _write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def move_log_aside(path: str | os.PathLike) -> Path | None:
    """Moves a search log and its per-process shards aside (a fresh start that deletes nothing).

    ``<path>`` becomes ``<path>.old-<YYYYmmdd-HHMMSS>`` (``-2``, ``-3``... appended if taken) and each shard
    ``<path>.rank<r>`` becomes ``<that name>.rank<r>``, next to it: together they are a log that a search given the
    new name resumes. Returns the new name of the log, None when there was nothing to move.
    """
    path = Path(path)
    shards = [s for s in [path, *sorted(path.parent.glob(f"{path.name}.rank*"))] if s.exists()]
    if not shards:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for attempt in range(1, 10_000):
        backup = path.with_name(f"{path.name}.old-{stamp}" + (f"-{attempt}" if attempt > 1 else ""))
        if not backup.exists() and not any(backup.parent.glob(f"{backup.name}.rank*")):
            break
    else:
        raise FileExistsError(f"log: no free backup name next to {path}")
    for shard in shards:
        shard.rename(backup.with_name(backup.name + shard.name[len(path.name) :]))
    return backup


# ---------------------------------------------------------------------------------------------------- progress
class _Progress:
    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.enabled, self.start = total, enabled, time.perf_counter()
        self.live = enabled and sys.stderr.isatty()
        self.skipped = 0

    def skip(self, count: int, generation: int) -> None:
        """``count`` planned evaluations of ``generation`` not made (duplicates): the total shrinks, and says so."""
        self.total -= count
        self.skipped += count
        if self.enabled and count:
            line = (f"search: generation {generation}: {count} planned candidate(s) skipped (each came out equal "
                    "to one already scored, 20 tries)")  # fmt: skip
            print(("\n" if self.live else "") + line, file=sys.stderr, flush=True)

    def update(self, done: int, reused: int, best: float, generation: int) -> None:
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.start
        width = 24
        filled = int(width * done / max(self.total, 1))
        skipped = f", {self.skipped} skipped" if self.skipped else ""
        line = (f"search [{'#' * filled}{'.' * (width - filled)}] {done}/{self.total} evaluations "
                f"({reused} from log{skipped})  generation {generation}  best {best:.4f}  {elapsed:.0f}s")  # fmt: skip
        print(("\r" + line) if self.live else line, end="" if self.live else "\n", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.live:
            print(file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------- the search
class _Scores:
    """Every scored candidate, in the order the search made them; evaluates the new ones of a generation."""

    def __init__(self, objective, space, logged, log, rank, world, progress) -> None:
        self.objective, self.space, self.logged, self.log = objective, space, logged, log
        self.rank, self.world, self.progress = rank, world, progress
        self.scores: dict[str, float] = {}
        self.order: list[Candidate] = []
        self.reused = 0
        self.best_seen = math.inf
        self.logged_s, self.logged_untimed = 0.0, 0

    def best(self) -> tuple[Candidate, float]:
        return self.ranked()[0]

    def ranked(self) -> list[tuple[Candidate, float]]:
        # NaN (a diverged evaluation) ranks last; ties keep the order the search made them in.
        scored = [(c, self.scores[c.key]) for c in self.order]
        return sorted(scored, key=lambda item: math.inf if math.isnan(item[1]) else item[1])

    def evaluate(self, batch: list[Candidate], generation: int) -> None:
        new = [c for c in dict((c.key, c) for c in batch).values() if c.key not in self.scores]
        missing = [c for c in new if c.key not in self.logged]
        mine: dict[str, float] = {}
        for candidate in missing[self.rank :: self.world]:
            start = time.perf_counter()
            score = float(self.objective(self.space.table(candidate)))
            mine[candidate.key] = score
            if self.log is not None:
                self.log.append(candidate, score, generation, round(time.perf_counter() - start, 3))
            self._seen(score)
            self.progress.update(len(self.order) + len(mine), self.reused, self.best_seen, generation)
        merged: dict[str, float] = {}
        for part in _all_gather(mine, self.world):
            merged.update(part)
        for candidate in new:
            if candidate.key in merged:
                self.scores[candidate.key] = merged[candidate.key]
            else:
                self.scores[candidate.key] = self.logged[candidate.key]
                self.reused += 1
                seconds = self.log.seconds.get(candidate.key) if self.log is not None else None
                if seconds is None:
                    self.logged_untimed += 1
                else:
                    self.logged_s += float(seconds)
            self._seen(self.scores[candidate.key])
            self.order.append(candidate)
        if len(new) != len(mine):  # scores from the log or from other processes: show the merged state
            self.progress.update(len(self.order), self.reused, self.best_seen, generation)

    def _seen(self, score: float) -> None:
        if not math.isnan(score):
            self.best_seen = min(self.best_seen, score)


def _children(space: SearchSpace, config: SearchConfig, parents: list[Candidate], rng: random.Random, seen) -> list:
    children: list[Candidate] = []
    keys = set(seen)

    def add(make: Callable[[], Candidate], count: int) -> None:
        for _ in range(count):
            for _attempt in range(20):  # a child already scored teaches nothing: try again
                child = make()
                if child.key not in keys:
                    break
            else:
                continue
            keys.add(child.key)
            children.append(child)

    add(lambda: space.mutate(rng.choice(parents), rng, config.mutation_prob, config.mutation_step), config.mutations)
    if len(parents) >= 2:
        add(lambda: space.crossover(*rng.sample(parents, 2), rng), config.crossovers)
    return children


def initial_population(space: SearchSpace, config: SearchConfig, rng: random.Random) -> list[Candidate]:
    """The first generation: the NTK-style seeds (:meth:`SearchSpace.seeds`), then mutations of them."""
    population = space.seeds()[: config.population]
    keys = {c.key for c in population}
    seeds, attempts = list(population), 0
    while len(population) < config.population and attempts < 50 * config.population:
        attempts += 1
        child = space.mutate(rng.choice(seeds), rng, config.mutation_prob, config.mutation_step)
        if child.key not in keys:
            keys.add(child.key)
            population.append(child)
    return population


def evolutionary_search(
    objective: Callable[[RopeTable], float],
    space: SearchSpace,
    config: SearchConfig | None = None,
    *,
    log_path: str | os.PathLike | None = None,
    objective_fingerprint: dict[str, Any] | None = None,
    progress: bool = False,
) -> SearchResult:
    """LongRoPE2's evolutionary search for the long factors that minimise ``objective``.

    Generation 0 is ``config.population`` candidates (NTK-style seeds and their mutations); each of
    ``config.iterations`` later generations breeds ``config.mutations`` mutants and ``config.crossovers``
    crossovers from the ``config.parents`` best candidates so far. Every candidate satisfies the space's
    constraints (:meth:`SearchSpace.violations` is empty).

    Args:
        objective: ``objective(table) -> float``, lower is better (e.g. :meth:`NeedleEvaluator.loss`). It must be
            deterministic for resuming and multi-process runs to give the same result as one uninterrupted run.
        space: the search space (:meth:`SearchSpace.for_table`).
        config: budget, moves and seed.
        log_path: a JSON-lines log written after every evaluation. If it exists (from an interrupted run of the
            same search), its scores are reused and the search continues where it stopped; a log of another search
            (other space, config or ``objective_fingerprint``; or one without a header) is refused with a
            ValueError naming the first field that differs, and left untouched. A last line cut short by a kill is
            removed before anything is appended (that evaluation runs again).
        objective_fingerprint: what the objective's scores depend on, as a JSON-able dict of named fields (e.g.
            model, a hash of its weights, dtype, the evaluation data); recorded in the log's header and required
            to be equal, field by field, to resume it. None: the objective is not checked (only a log written
            without a fingerprint is then resumed).
        progress: print a progress bar with the best score so far (first process only).

    When torch.distributed is initialised, every process must call this with the same arguments: each evaluates
    its share of every generation (round-robin) and all of them return the same result.
    """
    config = SearchConfig() if config is None else config
    if not isinstance(space, SearchSpace):
        raise TypeError(f"space: expected a SearchSpace, got {type(space).__name__}")
    if not isinstance(config, SearchConfig):
        raise TypeError(f"config: expected a SearchConfig, got {type(config).__name__}")
    start = time.perf_counter()
    rank, world = _process_group()
    if objective_fingerprint is not None:
        if not isinstance(objective_fingerprint, dict):
            kind = type(objective_fingerprint).__name__
            raise TypeError(f"objective_fingerprint: expected a dict or None, got {kind}")
        try:
            json.dumps(objective_fingerprint, allow_nan=False)
        except (TypeError, ValueError) as error:
            raise TypeError(f"objective_fingerprint: expected a JSON-able dict ({error})") from None
    header = {"space": space.to_dict(), "config": dataclasses.asdict(config)}
    log = None if log_path is None else SearchLog(log_path, header, rank, objective_fingerprint)
    logged = {} if log is None else log.read()  # refuses a log of another search (identically in every process)
    _barrier(world)  # every process has read the log...
    if log is not None and rank == 0:
        log.repair()  # ...before a cut last line is removed from it...
    _barrier(world)  # ...and before anything is appended to it
    bar = _Progress(config.budget, progress and rank == 0)
    scores = _Scores(objective, space, logged, log, rank, world, bar)
    rng = random.Random(config.seed)
    history = []
    try:
        population = initial_population(space, config, rng)
        bar.skip(config.population - len({c.key for c in population}), 0)
        scores.evaluate(population, generation=0)
        history.append(scores.best()[1])
        for generation in range(1, config.iterations + 1):
            parents = [c for c, _ in scores.ranked()[: config.parents]]
            children = _children(space, config, parents, rng, scores.scores)
            bar.skip(config.mutations + config.crossovers - len(children), generation)
            scores.evaluate(children, generation)
            history.append(scores.best()[1])
        if bar.skipped:  # the bar's last line: made / budget less what was skipped
            bar.update(len(scores.order), scores.reused, scores.best_seen, config.iterations)
    finally:
        bar.close()
        if log is not None:
            log.close()
    best, score = scores.best()
    return SearchResult(
        best=best,
        score=score,
        table=space.table(best),
        history=tuple(history),
        evaluations=len(scores.order),
        reused=scores.reused,
        log=tuple((c, scores.scores[c.key]) for c in scores.order),
        wall_s=time.perf_counter() - start,
        skipped=bar.skipped,
        logged_s=scores.logged_s,
        logged_untimed=scores.logged_untimed,
    )
