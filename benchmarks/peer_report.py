"""Measure Triton's tutorial fused attention (``python/tutorials/06-fused-attention.py``) the way
``benchmarks/compile_report.py`` measures lr2kernels' kernels: compiled on the CPU for sm_80 / sm_90, exactly as its
own launcher launches it, with the same instruments (registers, spills, shared memory, the tile loop's SASS per trip,
MMA kind, warp-instructions per 1K scores).

The project does not contain the tutorial: pass a copy of it (``--tutorial PATH``, kept outside the repository) and
say where it comes from (``--ref``, e.g. ``triton-lang/triton@v3.6.0``); its SHA-256 is recorded with the figures.
The script imports it with a stand-in Triton driver (a CUDA target of the arch being measured, CPU tensors for the
device) and ``torch.cuda.get_device_capability`` answering that arch, so the tutorial's own host code picks what it
picks on that GPU (host tensor descriptors on sm_90, its ``keep`` filter of the autotune list), then runs its autograd
Function's ``forward`` (causal, ``warp_specialize=False`` as its causal benchmark does) and ``backward`` on CPU tensors
of its benchmark's shape (batch 4, 32 heads, 4,096 tokens) while every ``kernel[grid](...)`` is recorded. The forward
is compiled for every config of its autotune list that survives its pruning; the backward, which hard-codes 4 warps
and 5 stages, at 4 and 8 warps and 2 to 5 stages (its 4-warp launch spills at head 128).

Its loops: the forward's first loop issuing MMA is the off-band stage (every key tile left of the diagonal; the
diagonal stage runs once per query block); the backward's kernel holds four (dk/dv on the diagonal in half tiles, dk/dv
off it, then dq likewise), told apart by their tt.dot ops in the TTIR (four per dk/dv trip, three per dq trip, in the
order the SASS has them) and counted off the diagonal.

Usage::

    python benchmarks/peer_report.py --tutorial /tmp/peer/06-fused-attention.py --ref triton-lang/triton@v3.6.0

Each run replaces its own (Triton version, arch, head, dtype) rows in
``benchmarks/results/peer_tutorial_attention.json`` (run it with each Triton: ``.venv/bin/python`` and
``.ci/.triton36/bin/python``) and rewrites the ``.md`` beside it from all rows.
"""

from __future__ import annotations

import os

os.environ.pop("TRITON_INTERPRET", None)  # must happen before any @triton.jit function is created

import argparse  # noqa: E402
import contextlib  # noqa: E402
import hashlib  # noqa: E402
import importlib.util  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import types  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

import compile_report as cr  # noqa: E402

OUT = cr.ROOT / "benchmarks/results/peer_tutorial_attention"
BATCH, HEADS, SEQ_LEN = 4, 32, 4096  # the tutorial's benchmark shape (BATCH, N_HEADS; N_CTX 1K..16K)
BACKWARD_VARIANTS = [(w, s) for w in (4, 8) for s in (2, 3, 4, 5)]  # (num_warps, num_stages) of its backward
TORCH_DTYPES = {"fp16": "float16", "bf16": "bfloat16"}


class _Driver:
    """The part of a Triton driver the tutorial's module and host code ask: the target, the torch device."""

    def __init__(self, arch: int):
        self.arch = arch

    def get_current_target(self):
        return cr._target(self.arch)

    def get_active_torch_device(self):
        import torch

        return torch.device("cpu")

    def get_current_device(self) -> int:
        return 0


@contextlib.contextmanager
def as_gpu(arch: int):
    """Within the block, Triton's active driver and torch's device capability are those of an sm_``arch`` GPU."""
    import torch
    import triton

    config = triton.runtime.driver
    saved_driver, saved_capability = config._active, torch.cuda.get_device_capability
    config._active = _Driver(arch)
    torch.cuda.get_device_capability = lambda *args, **kwargs: (arch // 10, arch % 10)
    try:
        yield
    finally:
        config._active = saved_driver
        torch.cuda.get_device_capability = saved_capability


def load_tutorial(path: Path, arch: int) -> types.ModuleType:
    """The tutorial imported as on an sm_``arch`` GPU (its autotune list is filtered at import by the arch)."""
    spec = importlib.util.spec_from_file_location(f"peer_tutorial_sm{arch}", path)
    module = importlib.util.module_from_spec(spec)
    with as_gpu(arch), contextlib.redirect_stdout(sys.stderr):
        spec.loader.exec_module(module)
    return module


@dataclass
class PeerLaunch:
    kernel: str  # "_attn_fwd", "_attn_bwd", ...
    args: tuple
    kwargs: dict


def capture(module: types.ModuleType, arch: int, head: int, dtype: str) -> list[PeerLaunch]:
    """The launches of the tutorial's forward and backward (its autograd Function's methods) on CPU tensors."""
    import torch

    launches: list[PeerLaunch] = []
    names = ["_attn_fwd", "_attn_bwd_preprocess", "_attn_bwd"]

    def recorder(name: str):
        def run(*args, grid, warmup, **kwargs):
            launches.append(PeerLaunch(name, args, kwargs))

        return run

    for name in names:
        getattr(module, name).run = recorder(name)
    tdt = getattr(torch, TORCH_DTYPES[dtype])
    q, k, v = (cr._empty(BATCH, HEADS, SEQ_LEN, head, dtype=tdt) for _ in range(3))
    ctx = types.SimpleNamespace()
    ctx.save_for_backward = lambda *tensors: setattr(ctx, "saved_tensors", tensors)
    try:
        with as_gpu(arch):
            out = module._attention.forward(ctx, q, k, v, True, head**-0.5, False)
            module._attention.backward(ctx, cr._empty(*out.shape, dtype=tdt))
    finally:
        for name in names:
            del getattr(module, name).run
    return launches


_DOT = re.compile(r"tt\.dot .*: tensor<(\d+)x(\d+)x\w+> \* tensor<\d+x(\d+)x\w+>")
_FOR = re.compile(r"scf\.for \S+ = (\S+) to (\S+) step (\S+)")
_CONSTANT = re.compile(r"%c-?\d+(_i\d+)?$")  # MLIR names an arith.constant after its value: %c8_i32


def ttir_dot_loops(ttir: str) -> list[dict]:
    """The innermost ``scf.for`` loops holding ``tt.dot`` ops, in program order: their dot shapes (M, K, N) and
    whether their bounds are constants (a loop of a constant trip count may be unrolled away by the compiler)."""
    loops: list[dict] = []
    stack: list[tuple[int, dict]] = []  # (brace depth at the loop's start, the loop)
    depth = 0
    for line in ttir.splitlines():
        if "scf.for" in line and line.rstrip().endswith("{"):
            bounds = _FOR.search(line)
            constant = bool(bounds) and all(_CONSTANT.match(b) for b in bounds.groups())
            stack.append((depth, dict(dots=[], constant=constant)))
        dot = _DOT.search(line)
        if dot and stack:
            stack[-1][1]["dots"].append(tuple(map(int, dot.groups())))
        depth += line.count("{") - line.count("}")
        while stack and depth <= stack[-1][0]:
            _, loop = stack.pop()
            if loop["dots"]:  # a dot belongs to the innermost open loop, so a loop around others holds only its own
                loops.append(loop)
    return loops


def match_loops(sass_loops: list[dict], dot_loops: list[dict]) -> list[tuple[dict, dict]] | None:
    """Pairs (SASS loop, TTIR loop) in program order. Where the SASS has fewer loops (the compiler unrolled some of
    constant trip count), the TTIR loops kept are those whose MMA work (sum of M x K x N) is most nearly
    proportional to the SASS loops' MMA instruction counts, every loop of a runtime trip count kept; None where no
    such choice exists."""
    if len(sass_loops) == len(dot_loops):
        return list(zip(sass_loops, dot_loops))
    best, best_spread = None, None
    for kept in itertools.combinations(dot_loops, len(sass_loops)):
        if any(not d["constant"] and all(d is not k for k in kept) for d in dot_loops):
            continue  # a loop of a runtime trip count cannot have been unrolled away
        per_work = [s["mma"] / sum(m * k * n for m, k, n in d["dots"]) for s, d in zip(sass_loops, kept)]
        spread = max(per_work) / min(per_work) if min(per_work) > 0 else float("inf")
        if best_spread is None or spread < best_spread:
            best, best_spread = list(zip(sass_loops, kept)), spread
    return best


@dataclass
class PeerJob:
    kernel: str  # "fwd" or "bwd" (the backward kernel yields dq and dk/dv rows)
    head: int
    dtype: str
    arch: int
    config: str
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    num_warps: int
    tiles: dict  # row kernel -> (scores per trip, config name)


def jobs(path: Path, arch: int, head: int, dtype: str) -> list[PeerJob]:
    module = load_tutorial(path, arch)
    out = []
    for launch in capture(module, arch, head, dtype):
        obj = getattr(module, launch.kernel)
        if launch.kernel == "_attn_fwd":  # every config its pruning keeps, each after its pre_hook (descriptors)
            nargs = dict(zip(obj.arg_names, launch.args))
            obj.nargs = nargs
            try:
                configs = obj.prune_configs(launch.kwargs)
            finally:
                obj.nargs = None
            for c in configs:
                if c.pre_hook:
                    c.pre_hook({**nargs, **launch.kwargs, **c.all_kwargs()})
                kwargs = dict(launch.kwargs, **c.all_kwargs())
                sig, ce, attrs, options = cr.specialize(obj.fn, launch.args, kwargs, arch)
                m, n = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
                name = f"M{m} N{n} w{options['num_warps']} s{options['num_stages']}"
                out.append(PeerJob("fwd", head, dtype, arch, name, sig, ce, attrs, options, options["num_warps"],
                                   {"fwd": (m * n, name)}))  # fmt: skip
        elif launch.kernel == "_attn_bwd":
            kw = launch.kwargs
            for warps, stages in BACKWARD_VARIANTS:
                kwargs = dict(kw, num_warps=warps, num_stages=stages)
                sig, ce, attrs, options = cr.specialize(obj, launch.args, kwargs, arch)
                ws = f"w{warps} s{stages}"
                tiles = {"bwd_dq": (kw["BLOCK_M2"] * kw["BLOCK_N2"], f"M{kw['BLOCK_M2']} N{kw['BLOCK_N2']} {ws}"),
                         "bwd_dkdv": (kw["BLOCK_M1"] * kw["BLOCK_N1"], f"M{kw['BLOCK_M1']} N{kw['BLOCK_N1']} {ws}")}
                out.append(PeerJob("bwd", head, dtype, arch, ws, sig, ce, attrs, options, warps, tiles))
    return out


_FN = {}


def _fn(path: str, arch: int, kernel: str):
    """The tutorial's JITFunction in a worker (imported once per arch)."""
    key = (path, arch)
    if key not in _FN:
        _FN[key] = load_tutorial(Path(path), arch)
    obj = getattr(_FN[key], "_attn_fwd" if kernel == "fwd" else "_attn_bwd")
    return obj.fn if kernel == "fwd" else obj


def compile_peer(path: str, job: PeerJob) -> list[dict]:
    """Rows of one compilation: the forward's off-band loop, or the backward's dq and dk/dv loops off the
    diagonal."""
    import triton

    t0 = time.perf_counter()
    src = triton.compiler.ASTSource(fn=_fn(path, job.arch, job.kernel), signature=job.signature,
                                    constexprs=job.constexprs, attrs=job.attrs)  # fmt: skip
    base = dict(head=str(job.head), dtype=job.dtype, arch=job.arch, num_warps=job.num_warps,
                triton=triton.__version__)  # fmt: skip
    try:
        compiled, log = cr.compile_source(src, job.arch, job.options)
    except Exception as e:  # noqa: BLE001 - reported, not raised
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        return [dict(base, kernel=k, config=name, error=msg, regs=None, spill_bytes=None, smem=None, fits=False,
                     loop_sass=None, loop_mma=None, mma_kind="", per_1k_scores=None, scores_per_trip=s, mma_loops=[])
                for k, (s, name) in job.tiles.items()]  # fmt: skip
    measured = cr.measure(compiled, log, job.arch)
    sass_loops = cr.mma_loops(cr.disassemble(compiled.asm["cubin"]))
    dot_loops = ttir_dot_loops(compiled.asm["ttir"])
    picked: dict[str, dict | None] = {}
    note = ""
    if job.kernel == "fwd":
        picked["fwd"] = sass_loops[0] if sass_loops else None  # the off-band stage comes first
    elif (pairs := match_loops(sass_loops, dot_loops)) is not None:
        # Off the diagonal: the last loop of each phase (dk/dv loops hold four dots, dq loops three).
        for kernel, dots in (("bwd_dkdv", 4), ("bwd_dq", 3)):
            same = [s for s, d in pairs if len(d["dots"]) == dots]
            picked[kernel] = same[-1] if same else None
    else:
        note = f"{len(sass_loops)} MMA loops in the SASS, {len(dot_loops)} in the TTIR: not matched"
        picked = dict.fromkeys(job.tiles)
    rows = []
    for kernel, (scores, config) in job.tiles.items():
        loop = cr.tile_loop(picked.get(kernel), job.num_warps, scores)
        rows.append(dict(base, kernel=kernel, config=config, scores_per_trip=scores, **measured, **loop,
                         mma_loops=[[x["sass"], x["mma"]] for x in sass_loops], note=note,
                         seconds=round(time.perf_counter() - t0, 1)))  # fmt: skip
    return rows


def _compile_star(args):
    return compile_peer(*args)


def markdown(data: dict, ratios: list[dict]) -> str:
    source = data["tutorial"]
    lines = [
        "# Triton's tutorial fused attention, compiled as launched",
        "",
        f"`python/tutorials/06-fused-attention.py` from {source['ref']} (SHA-256 `{source['sha256'][:16]}...`), "
        "measured by `benchmarks/peer_report.py` with the instruments of `benchmarks/compile_report.py`: its "
        "autograd Function's forward (causal, `warp_specialize=False`, as its causal benchmark) and backward run on "
        f"CPU tensors of its benchmark's shape (batch {BATCH}, {HEADS} heads, {SEQ_LEN} tokens) as on an sm_80 / "
        "sm_90 GPU, and each recorded launch is compiled with Triton's own specialization: the forward for every "
        "autotune config its `keep` filter and pruning leave on the arch, the backward (hard-coded 4 warps, 5 "
        "stages) at 4 and 8 warps and 2 to 5 stages. Per-trip SASS: the forward's off-band loop; the backward's dq "
        "and dk/dv loops off the diagonal. Warp-instructions per 1K scores = per-trip SASS x warps x 1000 / "
        "(BLOCK_M x BLOCK_N). The tutorial's kernels are written for fp16 (its probabilities and dS are cast to "
        "fp16 before their dots), so fp16 is what is measured; lr2kernels' bf16 and fp16 figures differ by a few "
        "instructions (`benchmarks/results/triton_compile.md`).",
        "",
    ]
    if ratios:
        lines += ["## lr2kernels against the tutorial (best spill-free config each, head 128, sm_90)", "",
                  "| Triton | kernel | lr2kernels | config | MMA | tutorial | config | ratio |",
                  "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in ratios:
            ours = "none spill-free" if r["ours"] is None else f"{r['ours']:,.0f}"
            theirs = "-" if r["peer"] is None else f"{r['peer']:,.0f}"
            ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}x"
            lines.append(f"| {r['triton']} | {cr.PEER_KERNELS[r['kernel']]} | {ours} | {r['ours_config'] or '-'} | "
                         f"{r['ours_mma'] or '-'} | {theirs} | {r['peer_config'] or '-'} | {ratio} |")  # fmt: skip
        lines.append("")
    lines += ["## Best spill-free config per kernel", "",
              "| Triton | kernel | head | dtype | arch | config | regs | SASS/trip | MMA/trip | MMA kind | "
              "per 1K scores |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    rows = data["rows"]
    keys = sorted({(r["triton"], r["kernel"], r["head"], r["dtype"], r["arch"]) for r in rows},
                  key=lambda k: (k[0], list(cr.PEER_KERNELS).index(k[1]), int(k[2]), k[3], k[4]))  # fmt: skip
    for version, kernel, head, dtype, arch in keys:
        best = cr.best_spill_free(rows, kernel, head, dtype, arch, version)
        if best is None:
            lines.append(f"| {version} | {cr.PEER_KERNELS[kernel]} | {head} | {dtype} | sm_{arch} | none spill-free | "
                         "- | - | - | - | - |")  # fmt: skip
            continue
        lines.append(f"| {version} | {cr.PEER_KERNELS[kernel]} | {head} | {dtype} | sm_{arch} | {best['config']} | "
                     f"{best['regs']} | {best['loop_sass']} | {best['loop_mma']} | {best['mma_kind']} | "
                     f"{best['per_1k_scores']:,.0f} |")  # fmt: skip
    lines += ["", "## Every config", "",
              "| Triton | kernel | head | dtype | arch | config | regs | spill B | smem B | SASS/trip | MMA/trip | "
              "MMA kind | per 1K scores | note |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in sorted(rows, key=lambda r: (r["triton"], list(cr.PEER_KERNELS).index(r["kernel"]), int(r["head"]),
                                         r["dtype"], r["arch"], r["config"])):  # fmt: skip
        per_1k = "-" if r["per_1k_scores"] is None else f"{r['per_1k_scores']:,.0f}"
        note = r["error"] or r.get("note", "") or ("" if r["fits"] and r["spill_bytes"] == 0 else
                                                    "spills" if r["fits"] else "over smem")  # fmt: skip
        lines.append(f"| {r['triton']} | {cr.PEER_KERNELS[r['kernel']]} | {r['head']} | {r['dtype']} | sm_{r['arch']} "
                     f"| {r['config']} | {r['regs']} | {r['spill_bytes']} | {r['smem']} | {r['loop_sass']} | "
                     f"{r['loop_mma']} | {r['mma_kind']} | {per_1k} | {note} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tutorial", type=Path, help="a copy of python/tutorials/06-fused-attention.py")
    p.add_argument("--ref", help="where the copy comes from (repository@tag or commit)")
    p.add_argument("--heads", nargs="*", type=int, default=[64, 128])
    p.add_argument("--dtypes", nargs="*", default=["fp16"], choices=sorted(TORCH_DTYPES))
    p.add_argument("--archs", nargs="*", type=int, default=[80, 90], choices=[80, 90])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", type=Path, default=OUT, help="writes OUT.json (merged by Triton version) and OUT.md")
    p.add_argument("--ours", type=Path, nargs="*", default=[],
                   help="compile_report.py --json outputs of lr2kernels, one per Triton (the ratio table)")
    p.add_argument("--markdown-only", action="store_true",
                   help="compile nothing: rewrite the .md from the JSON (with --ours: the ratios)")
    args = p.parse_args(argv)
    if not args.markdown_only and not (args.tutorial and args.ref):
        p.error("--tutorial and --ref are required unless --markdown-only")
    import triton

    cr._worker_init()
    t0 = time.perf_counter()
    json_path = args.out.with_suffix(".json")
    data = json.loads(json_path.read_text()) if json_path.exists() else {"rows": []}
    rows = []
    if not args.markdown_only:
        todo = [j for arch in args.archs for head in args.heads for dtype in args.dtypes
                for j in jobs(args.tutorial, arch, head, dtype)]  # fmt: skip
        with ProcessPoolExecutor(max_workers=args.workers, initializer=cr._worker_init) as pool:
            rows = [r for rs in pool.map(_compile_star, [(str(args.tutorial), j) for j in todo]) for r in rs]
        # This run's rows replace those of the same Triton version, arch, head and dtype.
        ran = {(cr._minor(r["triton"]), r["arch"], r["head"], r["dtype"]) for r in rows}
        data["rows"] = [r for r in data["rows"]
                        if (cr._minor(r["triton"]), r["arch"], r["head"], r["dtype"]) not in ran] + rows  # fmt: skip
        data["tutorial"] = dict(ref=args.ref, sha256=hashlib.sha256(args.tutorial.read_bytes()).hexdigest(),
                                shape=dict(batch=BATCH, heads=HEADS, seq_len=SEQ_LEN))  # fmt: skip
    ratios = [r for path in args.ours for r in cr.peer_ratios(json.loads(path.read_text())["rows"], data["rows"],
                                                               "128", "bf16", 90)]  # fmt: skip
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(data, indent=1, default=str))
    args.out.with_suffix(".md").write_text(markdown(data, ratios))
    for kernel in cr.PEER_KERNELS if rows else ():
        for arch in args.archs:
            best = cr.best_spill_free(rows, kernel, "128", args.dtypes[0], arch, triton.__version__)
            shown = "none spill-free" if best is None else f"{best['per_1k_scores']:,.0f} ({best['config']})"
            print(f"{triton.__version__} tutorial {kernel:9s} D128 {args.dtypes[0]} sm_{arch}: {shown}")
    print(f"{len(rows)} rows in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
