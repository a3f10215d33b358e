"""What a search leaves behind: the table as JSON, a Hugging Face ``config.json`` that transformers and vLLM load,
and a plot of factor against frequency pair for the result and the baselines."""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lr2kernels.tables import RopeTable


def hf_config_dict(model_config: Any, table: RopeTable, architectures: Sequence[str] | None = None) -> dict[str, Any]:
    """The model's config as a ``config.json`` dict, extended with ``table`` as a ``longrope`` RoPE.

    A transformers config is written as its own ``save_pretrained`` writes it (``to_diff_dict``: the fields at
    their class defaults, such as a classifier's labels, left out). The RoPE is written three ways so every loader
    finds it: ``rope_parameters`` (transformers >= 5), ``rope_scaling`` with ``type`` and ``rope_type`` (older
    transformers, vLLM), and the top-level ``original_max_position_embeddings`` (which Phi3 and transformers'
    longrope read for L0). ``max_position_embeddings`` becomes the table's length.

    Args:
        model_config: a transformers config or a ``config.json`` dict.
        table: a LongRoPE table.
        architectures: the model classes (e.g. ``["LlamaForCausalLM"]``), as ``save_pretrained`` of the model
            records them; None: the config's own (a config loaded from a GGUF file has none).
    """
    if architectures is not None and (isinstance(architectures, str) or not all(
            isinstance(name, str) for name in architectures)):  # fmt: skip
        raise TypeError(f"architectures: expected a list of class names or None, got {architectures!r}")
    if hasattr(model_config, "to_diff_dict"):
        config = copy.deepcopy(model_config)
        if architectures is not None:
            config.architectures = list(architectures)
        data = config.to_diff_dict()
    elif isinstance(model_config, Mapping):
        data = copy.deepcopy(dict(model_config))
        if architectures is not None:
            data["architectures"] = list(architectures)
    else:
        raise TypeError(f"model_config: expected a transformers config or a dict, got {type(model_config).__name__}")
    rope = table.to_hf_rope_parameters()
    if rope["rope_type"] != "longrope":
        raise ValueError("table: expected a LongRoPE table (different short/long factors or L0 < max_position)")
    data["rope_parameters"] = dict(rope)
    data["rope_scaling"] = {"type": "longrope", **rope}
    data["rope_theta"] = table.base
    data["max_position_embeddings"] = table.max_position
    data["original_max_position_embeddings"] = table.original_max_position
    data.pop("_name_or_path", None)
    return data


def save_hf_config(
    path: str | os.PathLike, model_config: Any, table: RopeTable, architectures: Sequence[str] | None = None
) -> Path:
    """Write :func:`hf_config_dict` to ``path`` (a folder gets ``config.json``). Returns the file."""
    path = Path(path)
    if path.is_dir() or path.suffix != ".json":
        path.mkdir(parents=True, exist_ok=True)
        path = path / "config.json"
    with open(path, "w") as f:
        json.dump(hf_config_dict(model_config, table, architectures), f, indent=2, sort_keys=True)
        f.write("\n")
    return path


def plot_factors(
    path: str | os.PathLike,
    tables: Mapping[str, RopeTable],
    critical_dim: int | None = None,
    title: str = "",
    theoretical_critical_dim: int | None = None,
) -> Path:
    """PNG of long factor against frequency pair (log scale) for each named table, the critical pair found marked
    (dashed) and the theoretical one (:func:`lr2kernels.search.critical_dimension`, dotted)."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for name, table in tables.items():
        ax.plot(range(len(table.long_factor)), table.long_factor, marker="." if name == "searched" else None,
                linewidth=2.5 if name == "searched" else 1.2, label=name)  # fmt: skip
    if critical_dim is not None:
        ax.axvline(critical_dim, color="grey", linestyle="--", linewidth=1)
        ax.text(critical_dim, ax.get_ylim()[1], f" critical dim {critical_dim}", va="top", fontsize=8, color="grey")
    if theoretical_critical_dim is not None:
        ax.axvline(theoretical_critical_dim, color="tab:red", linestyle=":", linewidth=1)
        ax.text(theoretical_critical_dim, ax.get_ylim()[0], f" theoretical {theoretical_critical_dim}", va="bottom",
                fontsize=8, color="tab:red")  # fmt: skip
    ax.set_yscale("log", base=2)
    ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%.2g"))
    ax.set_xlabel("frequency pair i (period 2*pi*base^(2i/d))")
    ax.set_ylabel("long factor (frequency divisor)")
    ax.set_title(title or "RoPE long factors")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
