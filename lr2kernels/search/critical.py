"""The critical dimension of RoPE and the baseline extension tables (PI, NTK-aware, YaRN, and their
"real critical dimension" variants from LongRoPE2, arXiv 2502.20082).

Frequencies are counted in pairs: index ``i`` in ``[0, rotary_dim / 2)`` is the frequency
``base^(-2i / rotary_dim)`` shared by channels ``i`` and ``i + rotary_dim / 2`` (NeoX pairing). Its period is
``2 pi base^(2i / rotary_dim)`` positions.
"""

from __future__ import annotations

import math

from lr2kernels.tables import RopeTable, ntk_factors


def _check_length(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name}: expected a positive integer, got {value!r}")


def critical_dimension(base: float, rotary_dim: int, original_length: int) -> int:
    """The first frequency pair whose period exceeds the pretraining length: the theoretical critical dimension.

    ``ceil((d / 2) * log_base(L_train / (2 pi)))`` for ``d = rotary_dim``; pairs at or above it never completed a
    full rotation in pretraining, so their long-range angles are under-trained. The theory counts
    ``2 * critical_dimension(...)`` rotary channels. LLaMA3-8B (base 5e5, d 128, L 8192) gives 35; Phi3-mini
    (base 1e4, d 96, L 2048) gives 31. LongRoPE2 finds the real critical dimension a few pairs lower (30 and 25).

    Returns:
        an index in ``[0, rotary_dim / 2]``; ``rotary_dim / 2`` when every period fits in ``original_length``.
    """
    if not (isinstance(base, (int, float)) and math.isfinite(base) and base > 1):
        raise ValueError(f"base: expected a finite RoPE base > 1, got {base!r}")
    _check_length("rotary_dim", rotary_dim)
    if rotary_dim % 2:
        raise ValueError(f"rotary_dim: expected an even number of rotated channels, got {rotary_dim}")
    _check_length("original_length", original_length)
    half = rotary_dim // 2
    exact = half * math.log(original_length / (2 * math.pi)) / math.log(base)
    return min(max(math.ceil(exact), 0), half)


def _scale(target_length: int, original_length: int) -> float:
    _check_length("target_length", target_length)
    _check_length("original_length", original_length)
    if target_length <= original_length:
        raise ValueError(
            f"target_length: expected a length past the original {original_length} to extend to, got {target_length}"
        )
    return target_length / original_length


def _check_critical(critical: int, half: int) -> None:
    if not isinstance(critical, int) or isinstance(critical, bool) or not 1 <= critical <= half:
        raise ValueError(f"critical: expected a frequency pair index in [1, {half}], got {critical!r}")


def ntk_shaped_factors(
    lambda_critical: float, critical: int, half: int, tail: list[float] | None = None
) -> list[float]:
    """LongRoPE2's factors below the critical dimension: ``lambda_i = lambda_cd^(i / cd)`` for ``i < cd``.

    Pairs at and above ``critical`` take ``tail`` (``half - critical`` values) or ``lambda_critical``.
    """
    _check_critical(critical, half)
    below = [lambda_critical ** (i / critical) for i in range(critical)]
    above = [lambda_critical] * (half - critical) if tail is None else list(tail)
    if len(above) != half - critical:
        raise ValueError(f"tail: expected {half - critical} factors (pairs {critical}..{half - 1}), got {len(above)}")
    return below + above


def ntk_critical_factors(scale: float, rotary_dim: int, critical: int) -> list[float]:
    """NTK with a critical dimension: every pair at or above ``critical`` interpolated by ``scale``, NTK-shaped
    below (``scale^(i / critical)``). The lower corner of LongRoPE2's search space."""
    return ntk_shaped_factors(scale, critical, rotary_dim // 2)


def yarn_critical_factors(
    scale: float, rotary_dim: int, base: float, original_length: int, critical: int, beta_fast: float = 32.0
) -> list[float]:
    """YaRN whose ramp ends at ``critical``: pairs below YaRN's ``beta_fast`` bound keep their frequency, pairs at
    or above ``critical`` are interpolated by ``scale``, linear in between (YaRN's ``beta_slow = 1`` bound is the
    theoretical critical dimension; this puts the real one in its place)."""
    half = rotary_dim // 2
    _check_critical(critical, half)
    low = math.floor(rotary_dim * math.log(original_length / (beta_fast * 2 * math.pi)) / (2 * math.log(base)))
    low = min(max(low, 0), critical - 1)
    factors = []
    for i in range(half):
        ramp = min(max((i - low) / (critical - low), 0.0), 1.0)  # 0 keeps the frequency, 1 interpolates by s
        factors.append(1.0 / ((1.0 - ramp) + ramp / scale))
    return factors


def baseline_tables(model_table: RopeTable, target_length: int, critical: int | None = None) -> dict[str, RopeTable]:
    """The extension baselines for a model, as tables for ``target_length``.

    Returns ``{"PI", "NTK", "YaRN", "NTK-rcd", "YaRN-rcd"}``: position interpolation, NTK-aware, YaRN (HF's
    defaults, beta 32/1) and their versions with a critical dimension ``critical`` (default the theoretical one)
    in LongRoPE-table form: the model's own table below its L0, the extended one past it. ``model_table`` is the
    model's table (``RopeTable.from_hf_config``); its ``max_position`` is the pretraining length ``L_train``.
    """
    original = model_table.max_position
    scale = _scale(target_length, original)
    d, half = model_table.rotary_dim, model_table.rotary_dim // 2
    critical = critical_dimension(model_table.base, d, original) if critical is None else critical
    _check_critical(critical, half)
    shape = dict(head_dim=model_table.head_dim, base=model_table.base, rotary_dim=d,
                 original_max_position=original, max_position=target_length)  # fmt: skip
    yarn = RopeTable.yarn(**shape)
    long_factors = {
        "PI": [scale] * half,
        "NTK": ntk_factors(scale, d),
        "YaRN": list(yarn.long_factor),
        "NTK-rcd": ntk_critical_factors(scale, d, critical),
        "YaRN-rcd": yarn_critical_factors(scale, d, model_table.base, original, critical),
    }
    attention = {"PI": 1.0, "NTK": 1.0, "YaRN": yarn.attention_factor, "YaRN-rcd": yarn.attention_factor}
    return {
        name: extension_table(model_table, target_length, factors, attention.get(name))
        for name, factors in long_factors.items()
    }


def extension_table(
    model_table: RopeTable, target_length: int, long_factor: list[float] | tuple[float, ...], attention_factor=None
) -> RopeTable:
    """A LongRoPE table extending ``model_table`` to ``target_length`` with ``long_factor`` past its length.

    Up to ``L_train = model_table.max_position`` the model keeps its own factors (the short table); past it,
    ``long_factor``. ``attention_factor=None``: LongRoPE's ``sqrt(1 + ln(s) / ln(L_train))``, as HF and vLLM
    compute it for ``longrope``.
    """
    original = model_table.max_position
    _scale(target_length, original)
    return RopeTable.longrope(
        head_dim=model_table.head_dim,
        base=model_table.base,
        rotary_dim=model_table.rotary_dim,
        original_max_position=original,
        max_position=target_length,
        short_factor=model_table.long_factor,
        long_factor=long_factor,
        attention_factor=attention_factor,
    )
