"""LongRoPE2's factor search: critical dimension, needle data, needle-driven loss, evolutionary search, outputs.

Layer: above ``hf`` (the evaluators patch a transformers model); nothing below imports it. ``import
lr2kernels.search`` does not import transformers.
"""

from lr2kernels.search.critical import (
    baseline_tables,
    critical_dimension,
    extension_table,
    ntk_critical_factors,
    ntk_shaped_factors,
    yarn_critical_factors,
)
from lr2kernels.search.evaluate import NeedleEvaluator, NeedleScore, PasskeyEvaluator
from lr2kernels.search.evolution import (
    SearchConfig,
    SearchLog,
    SearchResult,
    evolutionary_search,
    initial_population,
    move_log_aside,
)
from lr2kernels.search.needle import (
    IGNORE_INDEX,
    PASSKEY_FILLER,
    NeedleSample,
    needle_samples,
    package_text,
    passkey_samples,
    read_texts,
)
from lr2kernels.search.space import Candidate, SearchSpace

__all__ = [
    "IGNORE_INDEX",
    "PASSKEY_FILLER",
    "Candidate",
    "NeedleEvaluator",
    "NeedleSample",
    "NeedleScore",
    "PasskeyEvaluator",
    "SearchConfig",
    "SearchLog",
    "SearchResult",
    "SearchSpace",
    "baseline_tables",
    "critical_dimension",
    "move_log_aside",
    "evolutionary_search",
    "extension_table",
    "initial_population",
    "needle_samples",
    "ntk_critical_factors",
    "ntk_shaped_factors",
    "package_text",
    "passkey_samples",
    "read_texts",
    "yarn_critical_factors",
]
