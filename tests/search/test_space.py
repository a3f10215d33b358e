import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import lr2kernels as lr2
from lr2kernels.search import Candidate, SearchConfig, SearchSpace, evolutionary_search, initial_population


def make_space(half, base, original, ratio, window, upper):
    model = lr2.RopeTable.default(head_dim=2 * half, base=base, max_position=original)
    return SearchSpace.for_table(model, int(original * ratio), critical_window=window, upper=upper)


spaces = st.builds(
    make_space,
    half=st.integers(4, 64),
    base=st.sampled_from([500.0, 1e4, 1e5, 5e5, 1e6]),
    original=st.sampled_from([256, 2048, 8192]),
    ratio=st.sampled_from([1.5, 2, 4, 16, 64]),
    window=st.integers(0, 8),
    upper=st.sampled_from([1.0, 1.5, 2.0, 3.0]),
)


@settings(max_examples=60, deadline=None)
@given(space=spaces, seed=st.integers(0, 2**31), critical=st.integers(-5, 80),
       raw=st.lists(st.floats(-10, 1e3, allow_nan=False), min_size=64, max_size=64))  # fmt: skip
def test_repair_always_gives_a_valid_candidate(space, seed, critical, raw):
    candidate = space.repair(critical, raw[: space.half])
    assert space.violations(candidate) == []
    # A valid candidate is a fixed point of repair.
    assert space.repair(candidate.critical_dim, candidate.factors) == candidate


@settings(max_examples=25, deadline=None)
@given(space=spaces, seed=st.integers(0, 2**16), prob=st.floats(0.05, 1.0), step=st.floats(0.01, 1.0))
def test_every_candidate_the_search_makes_is_valid(space, seed, prob, step):
    # A deterministic pseudo-random objective: the search explores, and every candidate it makes is checked.
    def objective(table):
        return random.Random(hash(table.long_factor)).random()

    config = SearchConfig(population=6, parents=3, mutations=3, crossovers=3, iterations=3, seed=seed,
                          mutation_prob=prob, mutation_step=step)  # fmt: skip
    result = evolutionary_search(objective, space, config)
    assert result.evaluations >= 1
    for candidate, _ in result.log:
        assert space.violations(candidate) == []
        table = space.table(candidate)
        assert table.long_factor == candidate.factors and table.max_position == space.target_length
    rng = random.Random(seed)
    parents = initial_population(space, config, rng)
    for parent in parents:
        assert space.violations(parent) == []
        assert space.violations(space.mutate(parent, rng, prob, step)) == []
        assert space.violations(space.crossover(parent, rng.choice(parents), rng)) == []


def test_seeds_start_with_ntk_at_the_critical_dimensions():
    model = lr2.RopeTable.default(head_dim=64, base=1e5, max_position=8192)
    space = SearchSpace.for_table(model, 16384, critical_window=2)
    assert (space.critical_min, space.critical_max) == (18, 20)
    seeds = space.seeds()
    assert seeds[0].critical_dim == 20 and seeds[0].factors[20:] == (2.0,) * 12  # NTK-rcd, theoretical dim
    assert {s.critical_dim for s in seeds} == {18, 19, 20}
    assert any(s.factors[-1] == 4.0 for s in seeds)


def test_violations_name_the_problem():
    model = lr2.RopeTable.default(head_dim=16, base=1e4, max_position=256)
    space = SearchSpace.for_table(model, 512)
    low, high = space.bounds
    good = space.repair(space.critical_max, [1.0] * 8)
    assert space.violations(good) == []
    cd = good.critical_dim
    decreasing = Candidate(cd, good.factors[:cd] + (high,) + (low,) * (7 - cd))
    assert any("decrease" in v for v in space.violations(decreasing))
    outside = Candidate(cd, good.factors[:-1] + (high * 1.5,))
    assert any("outside" in v for v in space.violations(outside))
    not_ntk = Candidate(cd, (1.5,) + good.factors[1:])
    assert any("NTK" in v for v in space.violations(not_ntk))
    assert "critical_dim" in space.violations(Candidate(0, good.factors))[0]


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(target_length=256), "target_length"),
        (dict(target_length=512, critical_min=0, critical_max=3), "critical_min"),
        (dict(target_length=512, critical_min=2, critical_max=8), "critical_max"),
        (dict(target_length=512, critical_min=2, critical_max=3, upper=0.5), "upper"),
    ],
)
def test_bad_space_arguments(kwargs, name):
    model = lr2.RopeTable.default(head_dim=16, base=1e4, max_position=256)
    kwargs = {"critical_min": 2, "critical_max": 3, **kwargs}
    with pytest.raises(ValueError, match=name):
        SearchSpace(model, **kwargs)


def test_candidate_round_trip_and_key():
    candidate = Candidate(3, (1.0, 1.1 + 1e-15, math.pi, 2.0))
    assert Candidate.from_dict(candidate.to_dict()) == candidate
    assert Candidate(3, (1.0, 1.1, math.pi, 2.0)).key != candidate.key
