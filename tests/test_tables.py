"""RopeTable against transformers: every rope type, the real configs, precision vs float64, round trips, errors.

The oracle is transformers' own code (``ROPE_INIT_FUNCTIONS`` and the models' rotary modules). longrope and default
tables must reproduce HF bit for bit; the converted types (linear, dynamic, yarn, llama3) get their factors from
float64 closed forms and may differ from HF's fp32 ``inv_freq`` by an ulp or two, which bounds the cos/sin difference
(see :func:`assert_close_to_hf`).
"""

from __future__ import annotations

import copy
import importlib.util
import itertools
import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, _compute_dynamic_ntk_parameters
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding
from transformers.models.phimoe.modeling_phimoe import PhimoeRotaryEmbedding
from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding

from lr2kernels import tables
from lr2kernels.tables import ROPE_TYPES, RopeTable

ROOT = Path(__file__).resolve().parents[1]
# Copies of ../shared/real-configs (the published configs of the models we target), kept in the repo so that
# these tests never depend on what sits beside the checkout.
REAL_CONFIG_DIR = Path(os.environ.get("LR2_REAL_CONFIGS", ROOT / "tests" / "data" / "real_configs"))
REAL_CONFIGS = sorted(REAL_CONFIG_DIR.glob("*.json"))
REAL_IDS = [p.stem for p in REAL_CONFIGS]
assert REAL_CONFIGS, f"no real configs in {REAL_CONFIG_DIR}"
ROTARY = {
    "llama": LlamaRotaryEmbedding,
    "phi3": Phi3RotaryEmbedding,
    "qwen2": Qwen2RotaryEmbedding,
    "phimoe": PhimoeRotaryEmbedding,
}
EXACT_TYPES = ("default", "longrope")  # read as-is: HF's own fp32 ops in HF's order
EPS32 = 2.0**-23


def _load_precision_module():
    spec = importlib.util.spec_from_file_location("table_precision", ROOT / "benchmarks" / "table_precision.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


precision = _load_precision_module()


# ---------------------------------------------------------------------------------------------------- helpers
def real_dict(name: str) -> dict:
    return precision.load_config_dict(REAL_CONFIG_DIR / f"{name}.json")


def hf_config(data: dict):
    """HF config from a config.json dict; a deep copy, since HF mutates the rope dict it is handed."""
    return precision.hf_config(copy.deepcopy(data))


def quiet_table(config, seq_len=None) -> RopeTable:
    """``from_hf_config`` without the one-time L0 warning (tested on its own in the L0-trap test)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*top-level original_max_position_embeddings", category=UserWarning)
        return RopeTable.from_hf_config(config, seq_len=seq_len)


def hf_rope_type(config) -> str:
    config.standardize_rope_params()
    return config.rope_parameters["rope_type"]


def hf_inv_freq(config, seq_len: int | None) -> torch.Tensor:
    """HF's fp32 inv_freq for a config at a sequence length (its default type lives on the rotary class)."""
    rope_type = hf_rope_type(config)
    if rope_type == "default":
        return ROTARY[config.model_type].compute_default_rope_parameters(config)[0]
    return ROPE_INIT_FUNCTIONS[rope_type](config, None, seq_len=seq_len)[0]


def hf_cos_sin(module, positions: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The rotary module's cos/sin for positions ``[1, n]``, called with an fp32 x as the attention layer does."""
    with torch.no_grad():
        return module(torch.zeros(1, dtype=torch.float32), torch.tensor([positions]))


def ulp_diff(a: torch.Tensor, b: torch.Tensor) -> int:
    """Max distance in ulps between two positive fp32 tensors."""
    assert a.dtype == b.dtype == torch.float32 and a.shape == b.shape
    return (a.view(torch.int32).long() - b.view(torch.int32).long()).abs().max().item()


def ulps_from_float64(table: RopeTable, long: bool, inv_freq: torch.Tensor) -> float:
    """Max distance, in ulps of ``inv_freq``, from ``1 / (f * base**(2i/d))`` evaluated in float64."""
    factors = torch.tensor(table.factors(long), dtype=torch.float64)
    exponent = torch.arange(0, table.rotary_dim, 2, dtype=torch.float64) / table.rotary_dim
    truth = 1.0 / (factors * table.base**exponent)
    spacing = (torch.nextafter(inv_freq, torch.tensor(math.inf)) - inv_freq).double()
    return ((inv_freq.double() - truth).abs() / spacing).max().item()


def assert_close_to_hf(ours, theirs, positions, inv_ours, inv_theirs, attention: float) -> None:
    """cos/sin agree within what the inv_freq difference can explain.

    |angle - angle'| <= pos * |inv - inv'| + ulp(pos * inv) (each fp32 product rounds by half an ulp), cos and sin
    are 1-Lipschitz, and each fp32 cos/sin adds about an ulp of 1: tol = attention * (that + 2.5e-7).
    """
    pos = torch.tensor(positions, dtype=torch.float64)[:, None]
    inv = torch.maximum(inv_ours.double(), inv_theirs.double())
    tol = attention * (pos * (inv_ours.double() - inv_theirs.double()).abs() + EPS32 * pos * inv + 2.5e-7)
    tol = torch.cat((tol, tol), dim=-1)[None]  # [1, n, rotary_dim]
    for a, b in zip(ours, theirs, strict=True):
        err = (a.double() - b.double()).abs()
        assert (err <= tol).all(), f"max err {err.max().item():.3g}, worst excess {(err - tol).max().item():.3g}"


def assert_matches_hf(table: RopeTable, module, positions: list[int], rope_type: str) -> None:
    """table.cos_sin(long=None) vs the HF module on the same positions: bit-exact or within the ulp bound."""
    ours = table.cos_sin(torch.tensor([positions]))
    theirs = hf_cos_sin(module, positions)
    assert ours[0].shape == theirs[0].shape == (1, len(positions), table.rotary_dim)
    if rope_type in EXACT_TYPES:
        assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1])
    else:
        long = table.use_long(max(positions) + 1)
        inv_theirs = module.inv_freq.float()
        assert_close_to_hf(ours, theirs, positions, table.inv_freq(long), inv_theirs, table.attention_factor_for(long))


def positions_for(l0: int, max_position: int, long: bool) -> list[int]:
    if not long:
        return [0, 1, l0 - 2, l0 - 1]  # max + 1 == L0: still the short table
    return [0, 1, l0 - 1, l0, l0 + 1, max_position - 1]


# ---------------------------------------------------------------------------------------------------- real configs
def hf_comparable_config(name: str):
    """The HF config to compare a real config with. For the LongRoPE2 LLaMA3 config the real L0 (8192) is put into
    ``rope_parameters`` by hand: stock transformers does not read it there at construction (see the L0-trap test)."""
    data = real_dict(name)
    config = hf_config(data)
    if name == "llama3-8b-longrope2":
        config.rope_parameters["original_max_position_embeddings"] = 8192
    return config


@pytest.mark.parametrize("name", REAL_IDS)
def test_real_config_object_and_dict_give_equal_tables(name):
    data = real_dict(name)
    from_object = quiet_table(hf_config(data))
    from_dict = quiet_table(data)
    assert from_object == from_dict
    assert from_object.max_position == data["max_position_embeddings"]
    assert from_object.base == float(data["rope_theta"])


@pytest.mark.parametrize("long", [False, True], ids=["short", "long"])
@pytest.mark.parametrize("name", REAL_IDS)
def test_real_config_inv_freq_matches_hf(name, long):
    config = hf_comparable_config(name)
    table = quiet_table(real_dict(name))
    l0 = table.original_max_position
    theirs = hf_inv_freq(config, seq_len=l0 + 1 if long else l0)
    ours = table.inv_freq(long)
    assert ours.dtype == torch.float32 and ours.shape == (table.rotary_dim // 2,)
    if hf_rope_type(config) in EXACT_TYPES:
        assert torch.equal(ours, theirs)
    else:
        assert ulp_diff(ours, theirs) <= 2


@pytest.mark.parametrize("long", [False, True], ids=["short", "long"])
@pytest.mark.parametrize("name", REAL_IDS)
def test_real_config_cos_sin_matches_hf_rotary_module(name, long):
    config = hf_comparable_config(name)
    table = quiet_table(real_dict(name))
    module = ROTARY[config.model_type](config)
    assert module.attention_scaling == pytest.approx(table.attention_factor, rel=1e-15)
    positions = positions_for(table.original_max_position, table.max_position, long)
    assert table.use_long(max(positions) + 1) == long
    assert_matches_hf(table, module, positions, hf_rope_type(config))


def test_llama3_longrope2_l0_trap():
    data = real_dict("llama3-8b-longrope2")
    tables._warned.clear()
    with pytest.warns(
        UserWarning, match="top-level original_max_position_embeddings is 8192 but the rope parameters say L0 = 131072"
    ):
        table = RopeTable.from_hf_config(data)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process: a second read is silent
        assert RopeTable.from_hf_config(data) == table

    assert table.original_max_position == 8192 and table.max_position == 131072
    assert not table.use_long(8192) and table.use_long(8193)
    expected_attention = math.sqrt(1 + math.log(16) / math.log(8192))
    assert table.attention_factor == pytest.approx(expected_attention, rel=1e-15)

    config = hf_config(data)
    config.rope_parameters["original_max_position_embeddings"] = 8192
    module = LlamaRotaryEmbedding(config)
    assert module.attention_scaling == table.attention_factor
    for positions in ([0, 1, 8190, 8191], [0, 8191, 8192, 8200], [8200]):
        assert_matches_hf(table, module, positions, "longrope")
    cos_long, _ = table.cos_sin(torch.tensor([[8200]]))
    cos_short, _ = table.cos_sin(torch.tensor([[8200]]), long=False)
    assert not torch.allclose(cos_long, cos_short, atol=1e-2)  # the tables really differ there


def test_llama3_longrope2_what_stock_transformers_does():
    """Documents transformers 5.24's handling of the top-level L0 of a ``llama`` LongRoPE2 config.

    Right after ``LlamaConfig(**config_json)`` the standardised ``rope_parameters`` say L0 = max_position_embeddings
    (131072): the top-level field is set on the config only after standardisation. Anything reading
    ``rope_parameters`` then (vLLM-style readers, a table built from the dict) never switches. But every HF RoPE init
    function re-standardises, and the top-level attribute then wins: the rotary module itself does switch at 8192,
    with the LongRoPE attention factor for s = 16, exactly like the table.
    """
    data = real_dict("llama3-8b-longrope2")
    config = hf_config(data)
    assert config.rope_parameters["original_max_position_embeddings"] == 131072  # the trap a reader falls into
    assert config.original_max_position_embeddings == 8192
    module = LlamaRotaryEmbedding(config)
    assert config.rope_parameters["original_max_position_embeddings"] == 8192  # re-standardised by the init fn
    table = quiet_table(data)
    assert module.attention_scaling == table.attention_factor
    cos, _ = hf_cos_sin(module, [0, 8200])
    assert torch.equal(cos, table.cos_sin(torch.tensor([[0, 8200]]), long=True)[0])
    assert not torch.allclose(cos, table.cos_sin(torch.tensor([[0, 8200]]), long=False)[0], atol=1e-2)


def test_phi4_mini_partial_rotary():
    table = RopeTable.from_hf_config(real_dict("phi4-mini-instruct"))
    assert (table.head_dim, table.rotary_dim) == (128, 96)
    assert len(table.short_factor) == len(table.long_factor) == 48
    assert table.original_max_position == 4096 and table.max_position == 131072
    assert table.attention_factor == pytest.approx(math.sqrt(1 + math.log(32) / math.log(4096)), rel=1e-15)
    assert table.short_attention_factor is None
    cos, sin = table.cos_sin(torch.arange(5000))
    assert cos.shape == sin.shape == (5000, 96)
    assert torch.equal(cos[:, :48], cos[:, 48:])


# ---------------------------------------------------------------------------------------------------- synthetic
def _ramp(n: int, lo: float, hi: float, power: float = 1.0) -> list[float]:
    return [lo + (hi - lo) * (i / (n - 1)) ** power for i in range(n)]


def llama(rope: dict | None, head_dim: int = 64, heads: int = 2, max_position: int = 1024, **extra):
    return transformers.LlamaConfig(
        hidden_size=head_dim * heads,
        num_attention_heads=heads,
        num_key_value_heads=1,
        head_dim=head_dim,
        max_position_embeddings=max_position,
        rope_parameters=None if rope is None else {"rope_theta": 10000.0, **copy.deepcopy(rope)},
        **extra,
    )


def phi3(rope: dict, hidden: int = 256, heads: int = 4, max_position: int = 1024, l0: int = 128, partial=0.5):
    return transformers.Phi3Config(
        hidden_size=hidden,
        num_attention_heads=heads,
        max_position_embeddings=max_position,
        original_max_position_embeddings=l0,
        partial_rotary_factor=partial,
        rope_parameters={"rope_theta": 10000.0, **copy.deepcopy(rope)},
    )


def phimoe(rope: dict, hidden: int = 128, heads: int = 4, max_position: int = 1024):
    return transformers.PhimoeConfig(
        hidden_size=hidden,
        num_attention_heads=heads,
        num_key_value_heads=2,
        max_position_embeddings=max_position,
        rope_parameters={"rope_theta": 10000.0, **copy.deepcopy(rope)},
    )


LONGROPE_32 = {"short_factor": _ramp(32, 1.0, 1.3), "long_factor": _ramp(32, 1.0, 12.0, 1.5)}
LONGROPE_16 = {"short_factor": _ramp(16, 1.0, 1.2), "long_factor": _ramp(16, 1.0, 9.0, 2.0)}
SYNTHETIC = {
    "llama-default": lambda: llama({"rope_type": "default"}),
    "llama-default-head80": lambda: llama({"rope_type": "default"}, head_dim=80, heads=3),
    "llama-linear": lambda: llama({"rope_type": "linear", "factor": 4.0}),
    "llama-dynamic": lambda: llama({"rope_type": "dynamic", "factor": 2.0}, max_position=256),
    "llama-yarn": lambda: llama({"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 128}),
    "llama-yarn-mscale": lambda: llama(
        {
            "rope_type": "yarn",
            "factor": 8.0,
            "original_max_position_embeddings": 128,
            "mscale": 1.0,
            "mscale_all_dim": 0.8,
        }
    ),
    "llama-yarn-attention-factor-betas": lambda: llama(
        {
            "rope_type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": 256,
            "attention_factor": 1.25,
            "beta_fast": 16.0,
            "beta_slow": 2.0,
        }
    ),
    "llama-yarn-truncate-false": lambda: llama(
        {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 128, "truncate": False}
    ),
    "llama-yarn-head96": lambda: llama(
        {"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 64}, head_dim=96, heads=2
    ),
    "llama-llama3": lambda: llama(
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        }
    ),
    "llama-llama3-base500k": lambda: llama(
        {
            "rope_type": "llama3",
            "factor": 4.0,
            "low_freq_factor": 2.0,
            "high_freq_factor": 8.0,
            "original_max_position_embeddings": 256,
            "rope_theta": 500000.0,
        },
        head_dim=128,
        heads=2,
    ),
    "llama-longrope": lambda: llama({"rope_type": "longrope", "original_max_position_embeddings": 128, **LONGROPE_32}),
    "llama-longrope-attention-factor": lambda: llama(
        {"rope_type": "longrope", "original_max_position_embeddings": 256, "attention_factor": 1.5, **LONGROPE_32}
    ),
    "llama-longrope-factor": lambda: llama(
        {"rope_type": "longrope", "original_max_position_embeddings": 128, "factor": 4.0, **LONGROPE_32}
    ),
    "phi3-longrope-partial": lambda: phi3({"rope_type": "longrope", **LONGROPE_16}),
    "phi3-default-partial": lambda: phi3({"rope_type": "default"}),
}


@pytest.mark.parametrize("name", list(SYNTHETIC))
def test_synthetic_dict_and_object_agree(name):
    config = SYNTHETIC[name]()
    as_dict = config.to_dict()
    assert quiet_table(config) == quiet_table(as_dict)


@pytest.mark.parametrize("long", [False, True], ids=["short", "long"])
@pytest.mark.parametrize("name", list(SYNTHETIC))
def test_synthetic_inv_freq_matches_hf(name, long):
    config = SYNTHETIC[name]()
    table = quiet_table(config)
    l0 = table.original_max_position
    theirs = hf_inv_freq(config, seq_len=l0 + 1 if long else l0)
    if hf_rope_type(config) == "dynamic":  # seq_len <= max_position: plain RoPE, and the table says so
        assert table.max_position == table.original_max_position == config.max_position_embeddings
        theirs = hf_inv_freq(config, seq_len=None)
    ours = table.inv_freq(long)
    if hf_rope_type(config) in EXACT_TYPES:
        assert torch.equal(ours, theirs)
    elif name == "llama-yarn-truncate-false":
        # HF evaluates the untruncated (fractional) ramp in fp32 and lands up to 3 ulp from the float64 YaRN value;
        # the table's float64 factors stay closer. Measured: 3 ulp apart, HF ~3 ulp and ours ~1.4 ulp from float64.
        assert ulp_diff(ours, theirs) <= 3
        assert ulps_from_float64(table, long, ours) <= ulps_from_float64(table, long, theirs)
    else:
        assert ulp_diff(ours, theirs) <= 2


@pytest.mark.parametrize("long", [False, True], ids=["short", "long"])
@pytest.mark.parametrize("name", list(SYNTHETIC))
def test_synthetic_cos_sin_matches_hf_rotary_module(name, long):
    config = SYNTHETIC[name]()
    table = quiet_table(config)
    module = ROTARY[config.model_type](config)
    assert module.attention_scaling == pytest.approx(table.attention_factor, rel=1e-15)
    positions = positions_for(table.original_max_position, table.max_position, long)
    assert_matches_hf(table, module, positions, hf_rope_type(config))


def test_synthetic_types_read_as_expected():
    yarn = quiet_table(SYNTHETIC["llama-yarn"]())
    assert (yarn.original_max_position, yarn.max_position) == (128, 1024)
    assert yarn.short_factor == yarn.long_factor and yarn.attention_factor == pytest.approx(0.1 * math.log(8) + 1)
    mscale = quiet_table(SYNTHETIC["llama-yarn-mscale"]())
    assert mscale.attention_factor == pytest.approx((0.1 * math.log(8) + 1) / (0.08 * math.log(8) + 1))
    assert quiet_table(SYNTHETIC["llama-yarn-attention-factor-betas"]()).attention_factor == 1.25
    linear = quiet_table(SYNTHETIC["llama-linear"]())
    assert set(linear.long_factor) == {4.0} and linear.attention_factor == 1.0
    phi = quiet_table(SYNTHETIC["phi3-longrope-partial"]())
    assert (phi.head_dim, phi.rotary_dim, phi.original_max_position) == (64, 32, 128)
    assert phi.attention_factor == pytest.approx(math.sqrt(1 + math.log(8) / math.log(128)))
    factor = quiet_table(SYNTHETIC["llama-longrope-factor"]())  # explicit factor beats max/L0 for the attention
    assert factor.attention_factor == pytest.approx(math.sqrt(1 + math.log(4) / math.log(128)))
    llama3 = quiet_table(SYNTHETIC["llama-llama3"]())
    assert llama3.long_factor[0] == 1.0 and llama3.long_factor[-1] == 8.0
    assert any(1.0 < f < 8.0 for f in llama3.long_factor)  # the smoothed band is exercised


@pytest.mark.parametrize("seq_len", [257, 300, 1000, 4096])
def test_dynamic_ntk_at_length_matches_hf(seq_len):
    config = SYNTHETIC["llama-dynamic"]()  # max_position_embeddings 256, factor 2
    table = RopeTable.from_hf_config(config, seq_len=seq_len)
    assert (table.original_max_position, table.max_position) == (256, seq_len)
    assert table.use_long(seq_len) and not table.use_long(256)
    theirs, attention = _compute_dynamic_ntk_parameters(config, None, seq_len=seq_len)
    assert attention == table.attention_factor == 1.0
    assert ulp_diff(table.inv_freq(True), theirs) <= 2
    assert torch.equal(table.inv_freq(False), hf_inv_freq(config, seq_len=None))
    # the module grows its table from the call's max position, as the table does for seq_len = max + 1
    module = LlamaRotaryEmbedding(config)
    positions = [0, 1, 255, 256, seq_len - 1]
    ours = table.cos_sin(torch.tensor([positions]))
    assert_close_to_hf(ours, hf_cos_sin(module, positions), positions, table.inv_freq(True), module.inv_freq, 1.0)


@pytest.mark.parametrize("seq_len", [None, 1, 100, 256])
def test_dynamic_ntk_within_max_position_is_plain_rope(seq_len):
    config = SYNTHETIC["llama-dynamic"]()
    table = RopeTable.from_hf_config(config, seq_len=seq_len)
    assert table == RopeTable.default(head_dim=64, base=10000.0, max_position=256)
    assert torch.equal(table.inv_freq(True), LlamaRotaryEmbedding.compute_default_rope_parameters(config)[0])


def longrope_init_at(seq_len: int):
    """HF's longrope init function pinned to a sequence length (to stand in for PhiMoE's ``rope_init_fn``)."""

    def init(config):
        return ROPE_INIT_FUNCTIONS["longrope"](config, None, seq_len=seq_len)

    return init


def test_phimoe_short_and_long_mscale():
    config = phimoe(
        {
            "rope_type": "longrope",
            "original_max_position_embeddings": 128,
            "short_mscale": 1.1,
            "long_mscale": 1.3,
            **LONGROPE_16,
        }
    )
    table = RopeTable.from_hf_config(config)
    assert (table.rotary_dim, table.original_max_position, table.max_position) == (32, 128, 1024)
    assert table.attention_factor == 1.3 and table.short_attention_factor == 1.1
    assert table.attention_factor_for(True) == 1.3 and table.attention_factor_for(False) == 1.1
    assert table == RopeTable.from_hf_config(config.to_dict())
    module = PhimoeRotaryEmbedding(config)
    assert_matches_hf(table, module, [0, 1, 126, 127], "longrope")  # short: HF's module as it stands

    # Long: transformers 5.24's PhimoeRotaryEmbedding.forward recomputes inv_freq with rope_init_fn(config) and no
    # seq_len, i.e. always from the *short* factors (while applying long_mscale). The reference is HF's own forward
    # with the long inv_freq the longrope init function gives for that length.
    positions = [0, 1, 127, 128, 129, 1023]
    long_inv, _ = ROPE_INIT_FUNCTIONS["longrope"](config, None, seq_len=max(positions) + 1)
    assert torch.equal(long_inv, table.inv_freq(True))
    fixed = PhimoeRotaryEmbedding(config)
    fixed.rope_init_fn = longrope_init_at(max(positions) + 1)
    assert_matches_hf(table, fixed, positions, "longrope")

    stock_cos, _ = hf_cos_sin(module, positions)
    ours_cos, _ = table.cos_sin(torch.tensor([positions]))
    if not torch.equal(stock_cos, ours_cos):  # HF not fixed yet: short inv_freq times long_mscale
        short_cos, _ = table.cos_sin(torch.tensor([positions]), long=False)
        assert torch.allclose(stock_cos, short_cos / 1.1 * 1.3, rtol=1e-6, atol=0)


# ---------------------------------------------------------------------------------------------------- precision
@pytest.fixture(scope="module")
def precision_results():
    return {name: precision.measure(real_dict(name), name) for name in REAL_IDS}


@pytest.mark.parametrize("name", REAL_IDS)
def test_precision_no_worse_than_hf_at_every_position(precision_results, name):
    """Design's Numerics rule over positions 0..131071, long table, against a float64 computation."""
    result = precision_results[name]
    assert result.ours_vs_fp64 <= result.hf_vs_fp64 * (1 + 1e-3)
    assert result.ours_vs_fp64 < 0.02  # fp32 angles at 131K: ~pos * ulp(1)
    assert sorted(result.ours_bucket) == list(range(-1, 17))  # position 0, then [2^k, 2^(k+1)) up to 2^17
    for k, ours in result.ours_bucket.items():
        assert ours <= result.hf_bucket[k] * 1.05 + 1e-6, f"bucket {k}: ours {ours:.3g} vs HF {result.hf_bucket[k]:.3g}"
    if hf_rope_type(hf_config(real_dict(name))) in EXACT_TYPES:
        assert result.max_cos_vs_hf == result.max_sin_vs_hf == 0.0


# ---------------------------------------------------------------------------------------------------- round trips
ROUND_TRIP_SYNTHETIC = {
    "default": lambda: RopeTable.default(head_dim=64, base=10000.0, max_position=2048),
    "default-partial": lambda: RopeTable.default(head_dim=80, base=10000.0, max_position=2048, rotary_dim=40),
    "longrope-partial": lambda: RopeTable.longrope(
        head_dim=128,
        rotary_dim=96,
        base=10000.0,
        original_max_position=256,
        max_position=4096,
        short_factor=_ramp(48, 1.0, 1.1),
        long_factor=_ramp(48, 1.0, 16.0, 1.7),
    ),
    "yarn-converted": lambda: quiet_table(SYNTHETIC["llama-yarn"]()),
    "yarn-mscale-converted": lambda: quiet_table(SYNTHETIC["llama-yarn-mscale"]()),
    "llama3-converted": lambda: quiet_table(SYNTHETIC["llama-llama3"]()),
    "dynamic-at-1000": lambda: RopeTable.from_hf_config(SYNTHETIC["llama-dynamic"](), seq_len=1000),
    "short-attention-factor": lambda: RopeTable.longrope(
        head_dim=32,
        base=10000.0,
        original_max_position=128,
        max_position=1024,
        short_factor=_ramp(16, 1.0, 1.2),
        long_factor=_ramp(16, 1.0, 8.0),
        attention_factor=1.3,
        short_attention_factor=1.1,
    ),
    "ntk": lambda: RopeTable.ntk(head_dim=64, base=10000.0, original_max_position=256, max_position=2048),
}
ROUND_TRIP_IDS = [f"real-{n}" for n in REAL_IDS] + list(ROUND_TRIP_SYNTHETIC)


def round_trip_table(case: str) -> RopeTable:
    if case.startswith("real-"):
        return quiet_table(real_dict(case[len("real-") :]))
    return ROUND_TRIP_SYNTHETIC[case]()


def hf_config_for_table(table: RopeTable, params: dict):
    """An HF config that carries ``params``: PhiMoE for a separate short mscale, Phi3 for partial rotary (Llama's
    default rope ignores partial_rotary_factor), else Llama."""
    params = copy.deepcopy(params)
    heads = 2
    if table.short_attention_factor is not None:
        return transformers.PhimoeConfig(
            hidden_size=table.head_dim * heads,
            num_attention_heads=heads,
            num_key_value_heads=1,
            max_position_embeddings=table.max_position,
            rope_parameters=params,
        )
    if table.rotary_dim != table.head_dim:
        # Phi3's config has a top-level L0 (default 4096) that overrides the one in rope_parameters.
        return transformers.Phi3Config(
            hidden_size=table.head_dim * heads,
            num_attention_heads=heads,
            max_position_embeddings=table.max_position,
            original_max_position_embeddings=table.original_max_position,
            rope_parameters=params,
        )
    return llama(params, head_dim=table.head_dim, heads=heads, max_position=table.max_position)


def assert_hf_module_reproduces(table: RopeTable, config) -> None:
    module = ROTARY[config.model_type](config)
    l0, top = table.original_max_position, table.max_position
    for long in (False, True):
        positions = positions_for(l0, top, long)
        if isinstance(module, PhimoeRotaryEmbedding) and table.use_long(max(positions) + 1):
            # see test_phimoe_short_and_long_mscale: stock PhiMoE forward ignores the long factors
            module.rope_init_fn = longrope_init_at(max(positions) + 1)
        assert_matches_hf(table, module, positions, "longrope")


@pytest.mark.parametrize("case", ROUND_TRIP_IDS)
def test_round_trip_through_hf_rope_parameters(case):
    table = round_trip_table(case)
    params = table.to_hf_rope_parameters()
    json.dumps(params)  # plain JSON types only
    is_plain = case.startswith("default") or case == "real-smollm2-135m"
    assert params["rope_type"] == ("default" if is_plain else "longrope")
    config = hf_config_for_table(table, params)
    assert RopeTable.from_hf_config(config) == table
    assert_hf_module_reproduces(table, config)


@pytest.mark.parametrize("case", ROUND_TRIP_IDS)
def test_round_trip_through_old_style_rope_scaling_dict(case):
    """A config.json as vLLM and older transformers read it: ``rope_scaling`` with ``type``, top-level theta."""
    table = round_trip_table(case)
    params = table.to_hf_rope_parameters()
    rope_scaling = {k: v for k, v in params.items() if k not in ("rope_theta", "rope_type", "partial_rotary_factor")}
    data = {
        "model_type": "phi3" if table.rotary_dim != table.head_dim else "llama",
        "hidden_size": table.head_dim * 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "max_position_embeddings": table.max_position,
        "rope_theta": table.base,
        "rope_scaling": None if params["rope_type"] == "default" else {"type": params["rope_type"], **rope_scaling},
    }
    if table.rotary_dim != table.head_dim:
        data["partial_rotary_factor"] = params["partial_rotary_factor"]
        data["original_max_position_embeddings"] = table.original_max_position
    else:
        data["head_dim"] = table.head_dim
    if table.short_attention_factor is not None:
        data["model_type"] = "phimoe"
    data = json.loads(json.dumps(data))
    assert RopeTable.from_hf_config(data) == table
    config = hf_config(data)
    assert RopeTable.from_hf_config(config) == table
    assert_hf_module_reproduces(table, config)


def test_to_hf_rope_parameters_fields():
    table = ROUND_TRIP_SYNTHETIC["longrope-partial"]()
    params = table.to_hf_rope_parameters()
    assert params["rope_type"] == "longrope" and params["original_max_position_embeddings"] == 256
    assert params["factor"] == 16.0 and params["attention_factor"] == table.attention_factor
    assert int(128 * params["partial_rotary_factor"]) == 96
    assert params["short_factor"] == list(table.short_factor) and params["long_factor"] == list(table.long_factor)
    assert RopeTable.default(head_dim=64, base=5e5, max_position=8).to_hf_rope_parameters() == {
        "rope_theta": 5e5,
        "rope_type": "default",
    }


@pytest.mark.parametrize("head_dim", [80, 96, 100, 112, 128, 160])
@pytest.mark.parametrize("rotary_dim", [2, 16, 24, 40, 48, 62])
def test_partial_rotary_factor_truncates_back(head_dim, rotary_dim):
    factor = tables._partial_rotary_factor(rotary_dim, head_dim)
    assert int(head_dim * factor) == rotary_dim


# ---------------------------------------------------------------------------------------------------- persistence
@pytest.mark.parametrize(
    "case",
    [
        "real-llama3-8b-longrope2",
        "real-phi4-mini-instruct",
        "longrope-partial",
        "short-attention-factor",
        "yarn-converted",
    ],
)
def test_save_load_round_trip(tmp_path, case):
    table = round_trip_table(case)
    path = tmp_path / "table.json"
    table.save(path)
    loaded = RopeTable.load(path)
    assert loaded == table
    assert torch.equal(loaded.inv_freq(True), table.inv_freq(True))
    data = json.loads(path.read_text())
    assert data["format"] == "lr2kernels.RopeTable" and data["version"] == 1
    assert RopeTable.from_dict(table.to_dict()) == table


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"format": "something.else"}, "format"),
        ({"format": None}, "format"),
        ({"version": 2}, "version"),
        ({"version": "1"}, "version"),
        ({"short_factor": None}, "short_factor"),
    ],
    ids=["wrong-format", "no-format", "future-version", "string-version", "missing-field"],
)
def test_from_dict_rejects_bad_data(change, match):
    data = RopeTable.default(head_dim=8, base=10000.0, max_position=16).to_dict()
    data.update(change)
    data = {k: v for k, v in data.items() if v is not None}
    with pytest.raises(ValueError, match=match):
        RopeTable.from_dict(data)


# ---------------------------------------------------------------------------------------------------- validation
def longrope_kwargs(**change):
    kwargs = {
        "head_dim": 64,
        "base": 10000.0,
        "original_max_position": 128,
        "max_position": 1024,
        "short_factor": [1.0] * 32,
        "long_factor": [2.0] * 32,
    }
    return {**kwargs, **change}


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"short_factor": [1.0] * 31}, r"short_factor: expected rotary_dim // 2 = 32 factors, got 31"),
        ({"long_factor": [1.0] * 33}, r"long_factor: expected rotary_dim // 2 = 32 factors, got 33"),
        ({"rotary_dim": 32}, r"short_factor: expected rotary_dim // 2 = 16 factors, got 32"),
        ({"short_factor": [1.0] * 3 + [math.nan] + [1.0] * 28}, r"short_factor\[3\]: expected a finite factor > 0"),
        ({"long_factor": [math.inf] + [1.0] * 31}, r"long_factor\[0\]: expected a finite factor > 0"),
        ({"long_factor": [1.0] * 31 + [-math.inf]}, r"long_factor\[31\]: expected a finite factor > 0"),
        ({"short_factor": [0.0] * 32}, r"short_factor\[0\]: expected a finite factor > 0, got 0.0"),
        ({"long_factor": [1.0] * 5 + [-2.0] + [1.0] * 26}, r"long_factor\[5\]: expected a finite factor > 0"),
        ({"rotary_dim": 63}, r"rotary_dim: expected an even number"),
        ({"rotary_dim": 66}, r"rotary_dim: expected at most head_dim = 64, got 66"),
        ({"rotary_dim": 0}, r"rotary_dim: expected a finite value > 0"),
        ({"head_dim": -64}, r"head_dim: expected a finite value > 0"),
        ({"original_max_position": 2048}, r"original_max_position: expected L0 <= max_position = 1024, got 2048"),
        ({"original_max_position": 0}, r"original_max_position: expected a finite value > 0"),
        ({"max_position": -1, "attention_factor": 1.0}, r"max_position: expected a finite value > 0"),
        ({"base": 1.0}, r"base: expected a RoPE base != 1"),
        ({"base": 1}, r"base: expected a RoPE base != 1"),
        ({"base": -10000.0}, r"base: expected a finite value > 0"),
        ({"base": 0.0}, r"base: expected a finite value > 0"),
        ({"base": math.inf}, r"base: expected a finite value > 0"),
        ({"attention_factor": 0.0}, r"attention_factor: expected a finite value > 0"),
        ({"attention_factor": -1.2}, r"attention_factor: expected a finite value > 0"),
        ({"attention_factor": math.nan}, r"attention_factor: expected a finite value > 0"),
        ({"short_attention_factor": 0.0}, r"short_attention_factor: expected a finite value > 0"),
    ],
    ids=[
        "short-factor-length",
        "long-factor-length",
        "factors-vs-rotary-dim",
        "nan-factor",
        "inf-factor",
        "neg-inf-factor",
        "zero-factor",
        "negative-factor",
        "odd-rotary-dim",
        "rotary-dim-over-head-dim",
        "zero-rotary-dim",
        "negative-head-dim",
        "l0-over-max",
        "zero-l0",
        "negative-max",
        "base-1.0",
        "base-int-1",
        "negative-base",
        "zero-base",
        "inf-base",
        "zero-attention",
        "negative-attention",
        "nan-attention",
        "zero-short-attention",
    ],
)
def test_invalid_table_raises_value_error_naming_the_argument(change, match):
    with pytest.raises(ValueError, match=match):
        RopeTable.longrope(**longrope_kwargs(**change))


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"head_dim": 64.0}, r"head_dim: expected an int, got float"),
        ({"short_factor": "1.0"}, r"short_factor: expected a sequence of 32 numbers, got str"),
        ({"long_factor": [1.0] * 31 + ["2"]}, r"long_factor\[31\]: expected a number, got str"),
        ({"long_factor": [True] * 32}, r"long_factor\[0\]: expected a number, got bool"),
    ],
    ids=["float-head-dim", "string-factors", "string-factor", "bool-factor"],
)
def test_wrong_types_raise_type_error_naming_the_argument(change, match):
    with pytest.raises(TypeError, match=match):
        RopeTable.longrope(**longrope_kwargs(**change))


def test_factors_accept_tensors_and_ints():
    table = RopeTable.longrope(**longrope_kwargs(short_factor=torch.ones(32), long_factor=[2] * 32))
    assert table.short_factor == (1.0,) * 32 and table.long_factor == (2.0,) * 32
    assert all(type(f) is float for f in table.short_factor + table.long_factor)


def test_unknown_rope_type_lists_the_known_ones():
    config = {
        "model_type": "llama",
        "hidden_size": 64,
        "num_attention_heads": 1,
        "max_position_embeddings": 64,
        "rope_scaling": {"rope_type": "su-perb", "factor": 2.0},
    }
    with pytest.raises(ValueError, match=r"rope_type.*'su-perb'") as excinfo:
        RopeTable.from_hf_config(config)
    assert all(repr(t) in str(excinfo.value) for t in ROPE_TYPES)


@pytest.mark.parametrize("missing", ["short_factor", "long_factor"])
def test_longrope_config_missing_factors(missing):
    rope = {"type": "longrope", "original_max_position_embeddings": 32, **LONGROPE_16}
    del rope[missing]
    config = {
        "model_type": "llama",
        "hidden_size": 64,
        "num_attention_heads": 2,
        "max_position_embeddings": 256,
        "rope_scaling": rope,
    }
    with pytest.raises(ValueError, match=rf"rope_parameters\['{missing}'\]: expected a list of 16 factors"):
        RopeTable.from_hf_config(config)


def test_config_errors_name_the_field():
    base = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 2}
    with pytest.raises(ValueError, match="max_position_embeddings"):
        RopeTable.from_hf_config(base)
    with pytest.raises(TypeError, match="rope_parameters"):
        RopeTable.from_hf_config({**base, "max_position_embeddings": 64, "rope_parameters": [1, 2]})
    nested = {"full_attention": {"rope_type": "default"}, "sliding_attention": {"rope_type": "default"}}
    with pytest.raises(ValueError, match="per-layer-type"):
        RopeTable.from_hf_config({**base, "max_position_embeddings": 64, "rope_parameters": nested})


@pytest.mark.parametrize(
    "positions",
    [torch.tensor([0.0, 1.0]), torch.tensor([True, False]), torch.tensor([1j]), [0.5, 1.5]],
    ids=["float-tensor", "bool-tensor", "complex-tensor", "float-list"],
)
def test_cos_sin_rejects_non_integer_positions(positions):
    table = RopeTable.default(head_dim=8, base=10000.0, max_position=16)
    with pytest.raises(TypeError, match="position_ids: expected an integer tensor"):
        table.cos_sin(positions)


# ---------------------------------------------------------------------------------------------------- baselines
BASELINE = {"head_dim": 64, "base": 10000.0, "original_max_position": 256, "max_position": 4096}  # s = 16


def test_pi_baseline():
    table = RopeTable.pi(**BASELINE)
    assert table.short_factor == table.long_factor == (16.0,) * 32
    assert table.attention_factor == 1.0
    hf = llama({"rope_type": "linear", "factor": 16.0}, max_position=4096)
    assert torch.equal(table.inv_freq(True), hf_inv_freq(hf, None))  # dividing by 16 is exact in fp32


@pytest.mark.parametrize("rotary_dim", [64, 32, 96], ids=["d64", "d32-partial", "d96"])
def test_ntk_baseline(rotary_dim):
    head_dim = max(rotary_dim, 64)
    table = RopeTable.ntk(**{**BASELINE, "head_dim": head_dim}, rotary_dim=rotary_dim)
    factors = table.long_factor
    assert factors[0] == 1.0 and factors[-1] == 16.0  # s^((d-2)/(d-2)) = s: the lowest frequency is interpolated
    assert all(a < b for a, b in itertools.pairwise(factors))
    assert table.short_factor == factors and table.attention_factor == 1.0
    # the same as raising the base to base * s^(d/(d-2))
    d = rotary_dim
    ntk_base = 10000.0 * 16.0 ** (d / (d - 2))
    expected = [1.0 / (ntk_base ** (2 * i / d)) for i in range(d // 2)]
    ours = [1.0 / (f * 10000.0 ** (2 * i / d)) for i, f in enumerate(factors)]
    assert ours == pytest.approx(expected, rel=1e-13)


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"beta_fast": 16.0, "beta_slow": 2.0}, {"truncate": False}, {"max_position": 1024}],
    ids=["defaults", "betas", "no-truncate", "s4"],
)
def test_yarn_baseline_matches_hf_yarn(kwargs):
    table = RopeTable.yarn(**{**BASELINE, **kwargs})
    s = table.scale
    factors = table.long_factor
    assert table.short_factor == factors
    assert all(1.0 <= f <= s for f in factors) and factors[0] == 1.0 and factors[-1] == s
    assert all(a <= b for a, b in itertools.pairwise(factors))
    assert table.attention_factor == pytest.approx(0.1 * math.log(s) + 1.0, rel=1e-15)

    rope = {"rope_type": "yarn", "factor": s, "original_max_position_embeddings": 256}
    rope.update({k: v for k, v in kwargs.items() if k != "max_position"})
    config = llama(rope, max_position=table.max_position)
    hf, attention = ROPE_INIT_FUNCTIONS["yarn"](config, None)
    assert attention == pytest.approx(table.attention_factor, rel=1e-15)
    assert ulp_diff(table.inv_freq(True), hf) <= 2
    plain = LlamaRotaryEmbedding.compute_default_rope_parameters(config)[0]
    assert (plain.double() / hf.double()).tolist() == pytest.approx(list(factors), rel=3e-7)
    assert RopeTable.from_hf_config(config) == table


# ---------------------------------------------------------------------------------------------------- table choice
def test_use_long_boundary():
    table = RopeTable.longrope(**longrope_kwargs())
    assert not table.use_long(1) and not table.use_long(128)
    assert table.use_long(129) and table.use_long(1024) and table.use_long(10**6)
    plain = RopeTable.default(head_dim=64, base=10000.0, max_position=1024)
    assert not plain.use_long(1024)


def test_cos_sin_picks_the_table_by_max_position():
    table = RopeTable.longrope(**longrope_kwargs(attention_factor=1.25))
    short = torch.arange(128)
    cos, sin = table.cos_sin(short)
    assert torch.equal(cos, table.cos_sin(short, long=False)[0])
    assert torch.equal(sin, table.cos_sin(short, long=False)[1])
    assert not torch.equal(cos, table.cos_sin(short, long=True)[0])
    one_more = torch.arange(129)
    assert torch.equal(table.cos_sin(one_more)[0], table.cos_sin(one_more, long=True)[0])
    # for the whole tensor, as HF does: one long row makes every row long
    batch = torch.stack([torch.arange(100), torch.arange(100) + 29])  # [2, 100], max 128 -> length 129
    cos, _ = table.cos_sin(batch)
    assert torch.equal(cos, table.cos_sin(batch, long=True)[0])
    assert torch.equal(cos[0], table.cos_sin(torch.arange(100), long=True)[0])
    # cos at position 0 is the attention factor; the table picks the factor
    assert table.cos_sin(torch.tensor([0]))[0].unique().item() == pytest.approx(1.25)
    empty_cos, _ = table.cos_sin(torch.zeros(0, dtype=torch.long))
    assert empty_cos.shape == (0, 64)


def test_cos_sin_short_attention_factor_and_shapes():
    table = round_trip_table("short-attention-factor")
    positions = torch.tensor([[[0, 5], [7, 9]]])  # [1, 2, 2]
    cos, sin = table.cos_sin(positions, long=False)
    assert cos.shape == sin.shape == (1, 2, 2, 32) and cos.dtype == torch.float32
    assert cos[0, 0, 0, 0].item() == pytest.approx(1.1) and table.cos_sin(positions, long=True)[0][0, 0, 0, 0] == (
        pytest.approx(1.3)
    )
    assert torch.equal(cos, table.cos_sin([[[0, 5], [7, 9]]], long=False)[0])  # lists are accepted


def test_inv_freq_is_a_copy():
    table = RopeTable.longrope(**longrope_kwargs())
    first = table.inv_freq(True)
    first.zero_()
    assert table.inv_freq(True).min() > 0
    assert table.cos_sin(torch.tensor([1000]))[1].abs().max() > 0


def test_cached_tensors_made_under_inference_mode_still_serve_autograd():
    # The table's shared caches (inverse frequencies, the cos/sin prefix of decode paths) are plain tensors even when
    # first built under torch.inference_mode: a later training step must be able to use them.
    table = RopeTable.longrope(
        head_dim=16, base=10000.0, original_max_position=32, max_position=256, short_factor=[1.0] * 8,
        long_factor=[2.0] * 8,
    )  # fmt: skip
    with torch.inference_mode():
        cos, _ = table._cos_sin_prefix(True, 40)
        table._inv_freq(False)
    assert not cos.is_inference() and not table._inv_freq(False).is_inference()
    # The cached values are the table's, and autograd takes them: the gradient of sum(x * cos * s) is cos * s.
    torch.testing.assert_close(cos, table.cos_sin(torch.arange(40), long=True)[0], atol=0, rtol=0)
    x = torch.randn(40, 16, requires_grad=True)
    factor = table._inv_freq(False).sum()
    (x * table._cos_sin_prefix(True, 40)[0] * factor).sum().backward()
    torch.testing.assert_close(x.grad, cos * factor, atol=0, rtol=0)


_FRESH_PROCESS_COS = """
import torch
from lr2kernels.tables import RopeTable
table = RopeTable.longrope(head_dim=64, base=10000.0, original_max_position=256, max_position=2048,
                           short_factor=[1.0] * 32, long_factor=[1.0 + i / 4 for i in range(32)])
positions = torch.arange(512)
cos, sin = table.cos_sin(positions, long=False)  # the process's first cos/sin: several threads, 32K elements
angle = (positions[:, None].float() * table.inv_freq(False)).double()  # HF's fp32 angle, then exact trig
angle, factor = torch.cat((angle, angle), -1), table.attention_factor_for(False)
errors = [(got.double() / factor - want).abs().max().item() for got, want in ((cos, angle.cos()), (sin, angle.sin()))]
print(max(errors))
"""


def test_the_first_cos_of_a_process_is_accurate():
    # pytorch/pytorch#188792: without resolve_cpu_trig, about a third of fresh processes computed their first
    # multi-threaded fp32 cos with a low-accuracy kernel (errors up to 1.5e-4 here); 8 clean processes in a row had
    # a 4% chance then.
    env = {**os.environ, "OMP_NUM_THREADS": str(max(2, torch.get_num_threads()))}
    for _ in range(8):
        result = subprocess.run([sys.executable, "-c", _FRESH_PROCESS_COS], capture_output=True, text=True, env=env)
        assert result.returncode == 0, result.stderr
        assert float(result.stdout) < 1e-5, result.stdout
