import math

import pytest

import lr2kernels as lr2
from lr2kernels.search import (
    baseline_tables,
    critical_dimension,
    extension_table,
    ntk_critical_factors,
    yarn_critical_factors,
)


def test_paper_values():
    # LongRoPE2 (arXiv 2502.20082): LLaMA3-8B 35 pairs, Phi3-mini 31 pairs.
    assert critical_dimension(500000.0, 128, 8192) == 35
    assert critical_dimension(10000.0, 96, 2048) == 31


@pytest.mark.parametrize(
    "base,d,length", [(500000.0, 128, 8192), (10000.0, 96, 2048), (100000.0, 64, 8192), (1e6, 128, 32768)]
)
def test_formula_and_its_meaning(base, d, length):
    cd = critical_dimension(base, d, length)
    assert cd == math.ceil((d / 2) * math.log(length / (2 * math.pi), base))
    # The critical pair is the first whose period 2*pi*base^(2i/d) is longer than the pretraining length.
    periods = [2 * math.pi * base ** (2 * i / d) for i in range(d // 2)]
    assert periods[cd] > length >= periods[cd - 1]


def test_every_period_fits_gives_all_pairs():
    assert critical_dimension(2.0, 8, 10**6) == 4


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(base=1.0, rotary_dim=64, original_length=8192), "base"),
        (dict(base=1e4, rotary_dim=63, original_length=8192), "rotary_dim"),
        (dict(base=1e4, rotary_dim=64, original_length=0), "original_length"),
    ],
)
def test_bad_arguments_are_named(kwargs, name):
    with pytest.raises(ValueError, match=name):
        critical_dimension(**kwargs)


def test_baselines():
    model = lr2.RopeTable.default(head_dim=64, base=1e5, max_position=8192)
    tables = baseline_tables(model, 32768)
    assert set(tables) == {"PI", "NTK", "YaRN", "NTK-rcd", "YaRN-rcd"}
    for name, table in tables.items():
        assert table.original_max_position == 8192 and table.max_position == 32768, name
        assert table.short_factor == model.long_factor, name  # the model's own RoPE up to L_train
        assert not table.use_long(8192) and table.use_long(8193), name
    assert tables["PI"].long_factor == (4.0,) * 32
    assert tables["NTK"].long_factor == lr2.RopeTable.ntk(head_dim=64, base=1e5, original_max_position=8192,
                                                         max_position=32768).long_factor  # fmt: skip
    yarn = lr2.RopeTable.yarn(head_dim=64, base=1e5, original_max_position=8192, max_position=32768)
    assert tables["YaRN"].long_factor == yarn.long_factor
    assert tables["YaRN"].attention_factor == yarn.attention_factor
    cd = critical_dimension(1e5, 64, 8192)
    assert tables["NTK-rcd"].long_factor[cd:] == (4.0,) * (32 - cd)
    assert tables["NTK-rcd"].long_factor[:cd] == tuple(4.0 ** (i / cd) for i in range(cd))
    # YaRN's beta_slow = 1 bound is the theoretical critical dimension: YaRN-rcd at that dimension is YaRN.
    assert tables["YaRN-rcd"].long_factor == pytest.approx(yarn.long_factor, rel=1e-12)


def test_real_critical_dimension_moves_the_ramp():
    factors = yarn_critical_factors(4.0, 64, 1e5, 8192, critical=16)
    assert factors[16:] == pytest.approx([4.0] * 16)
    assert factors[15] < 4.0
    assert ntk_critical_factors(4.0, 64, 16)[15] == pytest.approx(4.0 ** (15 / 16))


def test_extension_table_checks_the_target():
    model = lr2.RopeTable.default(head_dim=64, base=1e5, max_position=8192)
    with pytest.raises(ValueError, match="target_length"):
        extension_table(model, 8192, [1.0] * 32)
    table = extension_table(model, 16384, [2.0] * 32)
    assert table.attention_factor == pytest.approx(math.sqrt(1 + math.log(2) / math.log(8192)))
