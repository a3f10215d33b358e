"""Census of the state a patch puts outside its model, and of the decisions one decode step takes in lr2kernels/hf.

    python tools/hf_state_census.py [--arch llama] [--json]

Three counts (issue 23 item 4 asks to shrink the first two):

1. ``_lr2_*`` attributes: the names the source of ``lr2kernels/hf`` sets (``x._lr2_name = ...``, ``setattr(x,
   "_lr2_...")``, ``x.__dict__["_lr2_..."]`` and the module-level name constants), and, on a patched tiny model after
   a prefill and one cached decode step, every object that holds one in its ``__dict__`` (found through the garbage
   collector, so caches, cache layers, configs and partials are found too), grouped by attribute and object type.
   Marks on short-lived tensors (gone by the end of the step) are caught by a watch on ``Tensor.__setattr__``.
2. decision points: the ``if`` / ``elif`` / ``while`` tests, conditional expressions, boolean operators and
   comprehension filters in the package's source (static), and those that one decode step executes (a line trace
   of the step: distinct decision lines, and executions of them), in ``lr2kernels/hf`` and in the whole package.
3. process-wide state: what ``import lr2kernels`` + ``patch`` leave in transformers' registries and classes.

Small and CPU-only: a tiny random model (2 layers, ``--layers``), the torch backend, no hub access.
"""

from __future__ import annotations

import argparse
import ast
import collections
import gc
import inspect
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lr2kernels"
HF = PACKAGE / "hf"
_NAME = re.compile(r"_lr2_[A-Za-z0-9_]+")


def source_attributes() -> dict[str, list[str]]:
    """``{attribute: [file:line, ...]}`` for every ``_lr2_*`` name the hf/ source writes or names as a constant."""
    found: dict[str, list[str]] = collections.defaultdict(list)
    for path in sorted([*HF.glob("*.py"), PACKAGE / "_transformers_hook.py"]):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for target in targets:
                    for sub in ast.walk(target):
                        if isinstance(sub, ast.Attribute) and sub.attr.startswith("_lr2_"):
                            names.append(sub.attr)
                        if isinstance(sub, ast.Subscript) and isinstance(sub.slice, ast.Constant):
                            names += _NAME.findall(str(sub.slice.value))
                # module constants that name an attribute set elsewhere (LEDGER = "_lr2_ledger")
                if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant):
                    names += _NAME.findall(str(node.value.value))
            elif (
                isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setattr" and len(node.args) > 1
                and isinstance(node.args[1], ast.Constant)
            ):  # fmt: skip
                names += _NAME.findall(str(node.args[1].value))
            for name in names:
                found[name].append(f"{path.relative_to(ROOT)}:{node.lineno}")
    return dict(sorted(found.items()))


def _decision_lines(path: Path) -> set[int]:
    """Lines of ``path`` holding a decision: if/elif/while tests, ``x if c else y``, ``and``/``or``, comprehension
    filters, ``match`` cases."""
    lines: set[int] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.If, ast.While)):
            lines.add(node.test.lineno)
        elif isinstance(node, (ast.IfExp, ast.BoolOp)):
            lines.add(node.lineno)
        elif isinstance(node, ast.comprehension):
            lines.update(condition.lineno for condition in node.ifs)
        elif isinstance(node, ast.match_case):
            lines.add(node.pattern.lineno)
    return lines


def static_decisions() -> dict[str, int]:
    counts = {}
    for scope, root in (("hf", HF), ("package", PACKAGE)):
        counts[scope] = sum(len(_decision_lines(path)) for path in root.rglob("*.py"))
    return counts


def _tiny_model(arch: str, layers: int):
    import torch
    import transformers

    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0 + 0.05 * i for i in range(8)],
            "long_factor": [1.0 + 1.5 * i for i in range(8)], "original_max_position_embeddings": 32}  # fmt: skip
    config = transformers.AutoConfig.for_model(
        arch, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=layers, head_dim=16,
        intermediate_size=96, vocab_size=101, max_position_embeddings=256, rope_parameters=rope, pad_token_id=0,
        original_max_position_embeddings=32,
    )  # fmt: skip
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def _objects_with_attributes() -> dict[str, collections.Counter]:
    """``{attribute: Counter(type name)}`` over every gc-tracked object whose ``__dict__`` holds an ``_lr2_*`` key."""
    found: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for obj in gc.get_objects():
        try:
            attributes = object.__getattribute__(obj, "__dict__")
        except Exception:  # noqa: BLE001 - objects without a __dict__ (or with a strange one)
            continue
        if not isinstance(attributes, dict):
            continue
        for key in attributes:
            if isinstance(key, str) and key.startswith("_lr2_"):
                found[key][type(obj).__name__] += 1
    return found


def runtime_census(arch: str, layers: int = 2) -> dict:
    """Patch a tiny model, run a prefill and one cached decode step (torch backend), and count."""
    import torch

    import lr2kernels

    model = _tiny_model(arch, layers)
    before = _objects_with_attributes()
    marks: collections.Counter = collections.Counter()
    original_setattr = torch.Tensor.__setattr__

    def watch(tensor, name, value):  # short-lived tensor marks (gone before the walk)
        if name.startswith("_lr2_"):
            marks[name] += 1
        return original_setattr(tensor, name, value)

    lr2kernels.patch(model, backend="torch")
    ids = torch.randint(1, 101, (1, 12), generator=torch.Generator().manual_seed(0))
    torch.Tensor.__setattr__ = watch
    try:
        with torch.no_grad():
            out = model(ids, use_cache=True)
            cache = out.past_key_values
            step = (
                {"cache": cache}
                if "cache" in inspect.signature(model.forward).parameters
                else {"past_key_values": cache}
            )
            trace = _trace(lambda: model(ids[:, :1], **step, use_cache=True))
    finally:
        torch.Tensor.__setattr__ = original_setattr
    after = _objects_with_attributes()
    objects = {
        name: dict(counter - before.get(name, collections.Counter()))
        for name, counter in sorted(after.items())
        if counter - before.get(name, collections.Counter())
    }
    for name, count in marks.items():
        objects.setdefault(name, {})["Tensor (per step, transient)"] = count
    lr2kernels.unpatch(model)
    del out, cache
    gc.collect()
    left = {name: dict(counter) for name, counter in sorted(_objects_with_attributes().items())}
    return {"objects": objects, "decode_step": trace, "left_on_model_after_unpatch": _left_on(model), "_all": left}


def _left_on(model) -> list[str]:
    return sorted({key for module in model.modules() for key in vars(module) if key.startswith("_lr2_")})


def _trace(step) -> dict:
    """Decision lines executed by ``step()``: distinct and total, in hf/ and in the package."""
    decision = {}
    executed: collections.Counter = collections.Counter()
    package = str(PACKAGE)

    def tracer(frame, event, arg):
        filename = frame.f_code.co_filename
        if not filename.startswith(package):
            return None
        if event == "line":
            lines = decision.get(filename)
            if lines is None:
                lines = decision[filename] = _decision_lines(Path(filename))
            if frame.f_lineno in lines:
                executed[(filename, frame.f_lineno)] += 1
        return tracer

    sys.settrace(tracer)
    try:
        step()
    finally:
        sys.settrace(None)
    hf = str(HF)
    in_hf = {key: n for key, n in executed.items() if key[0].startswith(hf)}
    return {
        "decision_lines_executed": {"hf": len(in_hf), "package": len(executed)},
        "decision_executions": {"hf": sum(in_hf.values()), "package": sum(executed.values())},
    }


def process_wide() -> dict:
    """What the process holds for lr2kernels outside any model (after a patch and an unpatch)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface
    from transformers.modeling_utils import PreTrainedModel

    from lr2kernels.hf.attention import ATTENTION_NAME

    wrapped = [name for name in ("post_init", "set_attn_implementation")
               if hasattr(vars(PreTrainedModel)[name], "__wrapped__")]  # fmt: skip
    return {
        "attention_registry": ATTENTION_NAME in AttentionInterface._global_mapping,
        "mask_registry": ATTENTION_NAME in AttentionMaskInterface._global_mapping,
        "PreTrainedModel_wrappers": wrapped,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="llama")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers of the tiny model")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    report = {
        "source_attributes": source_attributes(),
        "static_decisions": static_decisions(),
        **runtime_census(args.arch, args.layers),
        "process_wide": process_wide(),
    }
    report.pop("_all")
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    print(f"_lr2_* attribute names in the hf/ source: {len(report['source_attributes'])}")
    for name, where in report["source_attributes"].items():
        print(f"  {name}: {', '.join(where)}")
    print(f"_lr2_* attributes present after a patch + prefill + decode step ({args.arch}): {len(report['objects'])}")
    for name, holders in report["objects"].items():
        print(f"  {name}: " + ", ".join(f"{count} x {kind}" for kind, count in sorted(holders.items())))
    print(f"left on the model after unpatch: {report['left_on_model_after_unpatch'] or 'nothing'}")
    print(f"decision points in the source: hf/ {report['static_decisions']['hf']}, "
          f"package {report['static_decisions']['package']}")  # fmt: skip
    step = report["decode_step"]
    print(f"one decode step: decision lines executed hf/ {step['decision_lines_executed']['hf']} "
          f"(package {step['decision_lines_executed']['package']}); executions hf/ "
          f"{step['decision_executions']['hf']} (package {step['decision_executions']['package']})")  # fmt: skip
    print(f"process-wide: {report['process_wide']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
