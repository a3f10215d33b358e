"""cos/sin precision of RopeTable against transformers' own rotary modules and a float64 computation.

Run: python benchmarks/table_precision.py [--positions 131072] [--configs DIR]

For every real config (by default ``tests/data/real_configs/*.json``, copies of ``../shared/real-configs``) this
builds the HF config, the HF rotary module and ``RopeTable.from_hf_config``, evaluates cos/sin of the long table at
every position ``0 .. positions-1`` with both, and compares them with each other and with the float64 truth
(``inv_freq`` in float64 from the table's float64 factors, angle = position * inv_freq in float64). Prints a
markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

try:
    from lr2kernels.tables import RopeTable
except ModuleNotFoundError:  # run from a checkout that is not installed: use the checkout's package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from lr2kernels.tables import RopeTable

DEFAULT_CONFIG_DIR = Path(__file__).resolve().parents[1] / "tests" / "data" / "real_configs"
ROTARY_MODULES = {
    "llama": "transformers.models.llama.modeling_llama.LlamaRotaryEmbedding",
    "phi3": "transformers.models.phi3.modeling_phi3.Phi3RotaryEmbedding",
    "qwen2": "transformers.models.qwen2.modeling_qwen2.Qwen2RotaryEmbedding",
}


def load_config_dict(path: str | Path) -> dict[str, Any]:
    """A real ``config.json`` as a dict, without the ``_note`` key the shared copies carry."""
    data = json.loads(Path(path).read_text())
    data.pop("_note", None)
    return data


def hf_config(data: dict[str, Any]):
    """The HF config object for a ``config.json`` dict (a fresh copy each call: HF mutates what it is given)."""
    import transformers

    data = json.loads(json.dumps(data))
    return transformers.CONFIG_MAPPING[data["model_type"]](**data)


def hf_rotary(config):
    """The model's own rotary module (``LlamaRotaryEmbedding`` etc.) for an HF config."""
    import importlib

    module_name, _, cls_name = ROTARY_MODULES[config.model_type].rpartition(".")
    return getattr(importlib.import_module(module_name), cls_name)(config)


def float64_cos_sin(table: RopeTable, positions: torch.Tensor, long: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The truth: ``inv_freq = 1 / (f * base**(2i/d))`` and angle in float64, times the attention factor."""
    factors = torch.tensor(table.factors(long), dtype=torch.float64)
    exponent = torch.arange(0, table.rotary_dim, 2, dtype=torch.float64) / table.rotary_dim
    inv_freq = 1.0 / (factors * table.base**exponent)
    angle = positions.to(torch.float64)[..., None] * inv_freq
    emb = torch.cat((angle, angle), dim=-1)
    scale = table.attention_factor_for(long)
    return emb.cos() * scale, emb.sin() * scale


def _bucket(positions: torch.Tensor) -> torch.Tensor:
    """Position bucket k for [2^k, 2^(k+1)); position 0 is bucket -1."""
    pos = positions.clamp(min=1).to(torch.float64)
    return torch.where(positions > 0, torch.floor(torch.log2(pos)).long(), torch.full_like(positions, -1))


@dataclass
class PrecisionResult:
    """Max absolute errors over all positions and rotary channels (cos and sin together where not split)."""

    name: str
    max_cos_vs_hf: float = 0.0
    max_sin_vs_hf: float = 0.0
    ours_vs_fp64: float = 0.0
    hf_vs_fp64: float = 0.0
    ours_bucket: dict[int, float] = field(default_factory=dict)
    hf_bucket: dict[int, float] = field(default_factory=dict)


def measure(data: dict[str, Any], name: str = "", positions: int = 131072, chunk: int = 16384) -> PrecisionResult:
    """Compare the long table's cos/sin at positions ``0 .. positions-1`` with HF's rotary module and float64.

    HF's rotary module is called on chunks of ``chunk`` positions; it picks its table from the chunk's largest
    position, so every chunk (all larger than L0 for the real configs) uses the long table, as ``long=True`` does.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        table = RopeTable.from_hf_config(data)
        config = hf_config(data)
        module = hf_rotary(config)
    result = PrecisionResult(name or data.get("model_type", "?"))
    x = torch.zeros(1, dtype=torch.float32)
    for start in range(0, positions, chunk):
        pos = torch.arange(start, min(start + chunk, positions))[None]  # [1, n]
        long = table.use_long(int(pos.max()) + 1)
        with torch.no_grad():
            hf_cos, hf_sin = module(x, pos)
        cos, sin = table.cos_sin(pos, long=long)
        cos64, sin64 = float64_cos_sin(table, pos, long)
        result.max_cos_vs_hf = max(result.max_cos_vs_hf, (cos - hf_cos).abs().max().item())
        result.max_sin_vs_hf = max(result.max_sin_vs_hf, (sin - hf_sin).abs().max().item())
        ours = torch.maximum((cos.double() - cos64).abs(), (sin.double() - sin64).abs()).amax(-1)[0]  # [n]
        hf = torch.maximum((hf_cos.double() - cos64).abs(), (hf_sin.double() - sin64).abs()).amax(-1)[0]
        result.ours_vs_fp64 = max(result.ours_vs_fp64, ours.max().item())
        result.hf_vs_fp64 = max(result.hf_vs_fp64, hf.max().item())
        buckets = _bucket(pos[0])
        for k in buckets.unique().tolist():
            sel = buckets == k
            result.ours_bucket[k] = max(result.ours_bucket.get(k, 0.0), ours[sel].max().item())
            result.hf_bucket[k] = max(result.hf_bucket.get(k, 0.0), hf[sel].max().item())
    return result


def markdown(results: list[PrecisionResult], positions: int) -> str:
    lines = [
        f"positions 0..{positions - 1}, long table; errors are max |.| over all positions and rotary channels",
        "",
        "| config | max \\|cos-HF\\| | max \\|sin-HF\\| | ours vs fp64 | HF vs fp64 |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.name} | {r.max_cos_vs_hf:.3g} | {r.max_sin_vs_hf:.3g} | {r.ours_vs_fp64:.6g} | {r.hf_vs_fp64:.6g} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--positions", type=int, default=131072)
    parser.add_argument("--configs", type=Path, default=DEFAULT_CONFIG_DIR)
    args = parser.parse_args()
    paths = sorted(args.configs.glob("*.json"))
    if not paths:
        raise SystemExit(f"--configs: no *.json files in {args.configs}")
    results = [measure(load_config_dict(p), p.stem, args.positions) for p in paths]
    print(markdown(results, args.positions))
    print()
    print("per position bucket [2^k, 2^(k+1)): ours / HF max error vs fp64")
    for r in results:
        worst = max(r.ours_bucket, key=lambda k: r.ours_bucket[k] / max(r.hf_bucket[k], 1e-30))
        ratio = r.ours_bucket[worst] / max(r.hf_bucket[worst], 1e-30)
        print(
            f"- {r.name}: worst bucket k={worst}: ours {r.ours_bucket[worst]:.3g}, HF {r.hf_bucket[worst]:.3g}, "
            f"ratio {ratio:.4f}" + ("" if math.isfinite(ratio) else " (HF exact)")
        )


if __name__ == "__main__":
    main()
