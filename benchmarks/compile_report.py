"""Compile every Triton kernel for real GPUs on the CPU, exactly as its launcher launches it, and report registers,
spills, shared memory and the machine code of its tile loop.

Triton ships ptxas, so ``triton.compile`` for a ``GPUTarget("cuda", 80 | 90, 32)`` runs the whole pipeline (TTIR ->
TTGIR -> LLVM -> PTX -> cubin) without a GPU. What gets compiled is what a launch would compile: each launcher
(``rope_attention_fwd`` / ``rope_attention_bwd``, ``rope_decode``, ``apply_rope``, ``rerotate``) runs on
representative CPU tensors (a long prefill, a decode step; :func:`launcher_calls`) while every ``kernel[grid](...)``
it issues is recorded instead of launched. The recorded arguments then go through Triton's own binder and
``JITFunction._pack_args`` for the target, which apply the JIT's specialization: integers equal to 1 become
constants, integers divisible by 16 and 16-byte-aligned pointers get ``tt.divisibility`` (CPU tensors are 64-byte
aligned, like cudaMalloc's 256-byte blocks). Autotuned kernels are compiled for every config their
``early_config_prune`` keeps for the target arch (``--all-configs``: every config).

Each compilation records ptxas's registers and spill stores, Triton's dynamic shared memory (fits: sm_80 166,912 B,
sm_90 232,448 B), and, for the kernels with a tile loop (attention forward, dq, dk/dv, decode), the loop in the
cubin's disassembly (nvdisasm; Triton 3.6's ``asm["sass"]`` is cut short): the innermost loop issuing MMA, its SASS
instructions per trip, its MMA kind (wgmma on sm_90 / mma.sync / none) and warp-instructions per 1K scores
(per-trip SASS x num_warps x 1000 / scores per trip: BLOCK_M x BLOCK_N, decode: real rows x BLOCK_N). ``bwd_dkdv``
names the dk/dv kernel and its two passes (``bwd_dv``, ``bwd_dk``: what the backward launches above 128 channels),
each compiled where the launcher launches it.

Usage::

    python benchmarks/compile_report.py --kernels fwd bwd_dq bwd_dkdv --heads 128 --dtypes bf16 --archs 90 --quick
    python benchmarks/compile_report.py                 # reduced matrix, writes benchmarks/results/triton_compile.md
    python benchmarks/compile_report.py --matrix full   # every head case x fp16/bf16/fp32
    python benchmarks/compile_report.py --json out.json # also the raw rows (tests/ops/test_compile_gate.py)

With ``benchmarks/results/peer_tutorial_attention.json`` present (``benchmarks/peer_report.py``), the report adds
the ratio of each attention kernel's best spill-free figure to Triton's tutorial attention's (:func:`peer_ratios`).
TRITON_INTERPRET is removed from the environment before Triton is imported.
"""

from __future__ import annotations

import os

os.environ.pop("TRITON_INTERPRET", None)  # must happen before any @triton.jit function is created

import argparse  # noqa: E402
import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import functools  # noqa: E402
import inspect  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402
from dataclasses import asdict, dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SMEM_LIMIT = {80: 166_912, 90: 232_448}  # max dynamic shared memory per block (opt-in)
# name -> (head_dim, rotary_dim)
HEAD_CASES = {
    "64": (64, 64),
    "80": (80, 80),
    "96": (96, 96),
    "128": (128, 128),
    "256": (256, 256),
    "96of128": (128, 96),
}
MATRICES = {
    "full": (list(HEAD_CASES), ["fp16", "bf16", "fp32"]),
    "reduced": (["64", "128", "256", "96of128"], ["bf16", "fp32"]),
    "gate": (list(HEAD_CASES), ["bf16"]),
    "half": (list(HEAD_CASES), ["bf16", "fp16"]),
}
KERNELS = ["fwd", "bwd_dq", "bwd_dkdv", "bwd_dv", "bwd_dk", "bwd_delta", "bwd_stage", "decode", "apply_rope",
           "rerotate"]  # fmt: skip
# dk/dv: the fused kernel, and the two passes (dv, then dk) that replace it above 128 channels
# (attention.dkdv_two_pass); naming bwd_dkdv compiles all three, each where the launcher launches it.
DKDV_PASSES = ["bwd_dv", "bwd_dk"]
FAMILIES = {"bwd_dkdv": ["bwd_dkdv", *DKDV_PASSES]}
LOOP_KERNELS = ["fwd", "bwd_dq", "bwd_dkdv"]  # the attention kernels (loops staged vs rotated per tile)
SCORE_KERNELS = {*LOOP_KERNELS, *DKDV_PASSES}  # scores per trip: BLOCK_M x BLOCK_N
TILE_LOOP_KERNELS = {*SCORE_KERNELS, "decode"}  # kernels whose tile loop is found in the SASS
PEER_JSON = ROOT / "benchmarks/results/peer_tutorial_attention.json"

# The SM count the launchers' grid heuristics see (rope's head chunks, the dk/dv group split): an H100 SXM's.
GPU_SMS = 132

# Representative launches (the shapes the specialization sees: every length below is a multiple of 16).
BATCH, Q_HEADS, KV_HEADS, SEQ_LEN = 2, 32, 8, 4096  # prefill / training: GQA 4, 4K tokens, explicit positions
DECODE_CASES = {
    # name -> (batch, q heads, kv heads, new tokens, cache capacity, valid length, KV splits)
    # One new token, GQA 4, a long cache: a GPU splits the keys (a 132-SM H100 picks 33 splits; any count that
    # is neither 1 nor a multiple of 16 specializes alike).
    "decode_1": (1, 32, 8, 1, 32768, 30000, 8),
    # 8 new tokens of a GQA group of 8 (64 packed rows), a batch that fills the GPU: one split.
    "decode_64": (64, 32, 4, 8, 4096, 4000, 1),
    # The same two through a block table (paged caches, rope_decode's block_table), one block id per key: vLLM's
    # 16-token blocks, smaller than a key tile ...
    "decode_1_paged16": (1, 32, 8, 1, 32768, 30000, 8),
    # ... and one per key tile: transformers' continuous batching's 256-token pages.
    "decode_64_paged256": (64, 32, 4, 8, 4096, 4000, 1),
}
DECODE_BLOCK_SIZES = {"decode_1_paged16": 16, "decode_64_paged256": 256}  # paged cases: case -> block size


@dataclass
class Launch:
    """One recorded ``kernel[grid](*args, **kwargs)``."""

    kernel: str
    case: str
    args: tuple
    kwargs: dict


@dataclass
class Job:
    kernel: str
    head: str
    dtype: str
    arch: int
    config: str  # human-readable: tiles, warps, stages
    case: str  # the launch it comes from
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    num_warps: int
    scores_per_trip: int  # attention: BLOCK_M x BLOCK_N; decode: real rows x BLOCK_N; else 0
    block_m: int = 0
    block_n: int = 0
    sass: bool = True  # find the tile loop in the disassembly


@dataclass
class Row:
    kernel: str
    head: str
    dtype: str
    arch: int
    config: str
    regs: int | None
    spill_bytes: int | None
    smem: int | None
    fits: bool
    error: str = ""
    seconds: float = 0.0
    triton: str = ""  # the Triton version that compiled it
    case: str = ""
    num_warps: int = 0
    block_m: int = 0
    block_n: int = 0
    scores_per_trip: int = 0
    loop_sass: int | None = None  # SASS instructions per trip of the tile loop
    loop_mma: int | None = None  # MMA instructions per trip (HGMMA or HMMA)
    mma_kind: str = ""  # "wgmma", "mma.sync", "none" ("" where not looked for)
    per_1k_scores: float | None = None  # warp-instructions per 1K scores
    mma_channels: int | None = None  # TTIR: the loop's tt.dot work over BLOCK_M x BLOCK_N
    dot_work: int | None = None  # TTIR: the loop's tt.dot work per trip (sum of M x K x N)
    mma_work: int | None = None  # SASS: the MMA work the loop's instructions issue per trip, all warps
    trig_in_loop: int | None = None  # TTIR: math.sin / math.cos ops inside loops
    mma_loops: list = field(default_factory=list)  # every innermost MMA loop: [SASS, MMA] each
    entry: str = ""  # the compiled kernel's name (its PTX entry), as a profiler shows it

    @property
    def ok(self) -> bool:
        return not self.error and self.fits and self.spill_bytes == 0


def _modules():
    from lr2kernels.ops.triton import attention, decode, rope

    return attention, decode, rope


_KERNEL_OBJECTS = {
    "fwd": (0, "_rope_attention_fwd_kernel"),
    "bwd_dq": (0, "_rope_attention_bwd_dq_kernel"),
    "bwd_dkdv": (0, "_rope_attention_bwd_dkdv_kernel"),
    "bwd_dv": (0, "_rope_attention_bwd_dv_kernel"),  # the two-pass dk/dv backward's passes (above 128 channels)
    "bwd_dk": (0, "_rope_attention_bwd_dk_kernel"),
    "bwd_delta": (0, "_delta_kernel"),
    "bwd_stage": (0, "_stage_rotated_kernel"),  # the backward's rotated copies of q and k
    "decode": (1, "_rope_decode_kernel"),
    "apply_rope": (2, "_apply_rope_kernel"),
    "rerotate": (2, "_rerotate_kernel"),
}


def _kernel_object(kernel: str):
    module, name = _KERNEL_OBJECTS[kernel]
    return getattr(_modules()[module], name)


def _jit_fn(kernel: str):
    """The kernel's JITFunction (an autotuned kernel's inner function)."""
    fn = _kernel_object(kernel)
    while not hasattr(fn, "params"):  # triton.autotune / heuristics wrap the JITFunction in .fn
        fn = fn.fn
    return fn


# ------------------------------------------------------------------------------------------------ recording
@contextlib.contextmanager
def recording(launches: list[Launch], case: str):
    """Within the block, every kernel's ``kernel[grid](...)`` appends a :class:`Launch` instead of running, and the
    launchers see a GPU of :data:`GPU_SMS` SMs. ``kernel[grid]`` calls the object's ``run``: an instance attribute
    shadows the class's (JITFunction and Autotuner alike)."""
    modules = _modules()
    saved_sm_count = [getattr(m, "sm_count", None) for m in modules]
    objects = {kernel: _kernel_object(kernel) for kernel in _KERNEL_OBJECTS}

    def recorder(kernel: str):
        def run(*args, grid, warmup, **kwargs):
            launches.append(Launch(kernel, case, args, kwargs))

        return run

    for kernel, obj in objects.items():
        obj.run = recorder(kernel)
    for m in modules:
        if hasattr(m, "sm_count"):
            m.sm_count = lambda device: GPU_SMS
    try:
        yield
    finally:
        for obj in objects.values():
            del obj.run
        for m, saved in zip(modules, saved_sm_count):
            if saved is not None:
                m.sm_count = saved


def _torch_dtype(dtype: str):
    import torch

    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]


def _empty(*shape, dtype):
    """An uninitialized CPU tensor (its pages are never touched: the launches are recorded, not run), 16-byte
    aligned as every CUDA allocation is."""
    import torch

    x = torch.empty(shape, dtype=dtype)
    assert x.data_ptr() % 16 == 0, "CPU allocations are 64-byte aligned"
    return x


def launcher_calls(head: str, dtype: str, staged: bool = True) -> dict[str, Callable[[], None]]:
    """Representative calls of each launcher (case name -> call), on CPU tensors of the head case and dtype: a 4K
    prefill with GQA 4 and explicit positions (the patched model's call) forward and backward, the decode steps of
    :data:`DECODE_CASES`, apply_rope of q and k, and rerotate of the keys to the long table."""
    import torch

    attention, decode, rope = _modules()
    head_dim, rotary_dim = HEAD_CASES[head]
    tdt = _torch_dtype(dtype)
    b, hq, hk, n = BATCH, Q_HEADS, KV_HEADS, SEQ_LEN
    inv_freq = torch.rand(2, rotary_dim // 2, dtype=torch.float32)
    is_long = torch.zeros(b, dtype=torch.int32)
    positions = torch.arange(n).expand(b, n)  # [B, L], int64: the launchers make it int32
    scale = head_dim**-0.5
    table = (inv_freq, is_long, positions, None, n)  # inv_freq, is_long, position_ids, cu_seqlens, max_seqlen

    def q_k_v():
        return _empty(b, hq, n, head_dim, dtype=tdt), _empty(b, hk, n, head_dim, dtype=tdt), \
            _empty(b, hk, n, head_dim, dtype=tdt)  # fmt: skip

    def forward():
        q, k, v = q_k_v()
        attention.rope_attention_fwd(q, k, v, *table, True, scale, 1.0, 1.2, staged=staged)

    def backward():
        q, k, v = q_k_v()
        out, grad = _empty(b, hq, n, head_dim, dtype=tdt), _empty(b, hq, n, head_dim, dtype=tdt)
        lse = _empty(b, hq, n, dtype=torch.float32)
        attention.rope_attention_bwd(grad, q, k, v, out, lse, *table, True, scale, 1.0, 1.2, staged=staged)

    def decode_call(case: str):
        batch, heads_q, heads_kv, new, capacity, length, splits = DECODE_CASES[case]

        def call():
            q = _empty(batch, heads_q, new, head_dim, dtype=tdt)
            lengths = torch.full((batch,), length, dtype=torch.int32)
            block_size, paged = DECODE_BLOCK_SIZES.get(case), {}
            if block_size is None:
                k_cache = _empty(batch, heads_kv, capacity, head_dim, dtype=tdt)
                v_cache = _empty(batch, heads_kv, capacity, head_dim, dtype=tdt)
            else:  # [num_blocks, block_size, Hk, D], each sequence's blocks in a row of the table
                blocks = batch * capacity // block_size
                k_cache = _empty(blocks, block_size, heads_kv, head_dim, dtype=tdt)
                v_cache = _empty(blocks, block_size, heads_kv, head_dim, dtype=tdt)
                paged = dict(block_table=torch.arange(blocks, dtype=torch.int32).view(batch, -1))
            decode.rope_decode(q, k_cache, v_cache, lengths, inv_freq, 8192, 1.0, 1.2, scale, num_splits=splits,
                               **paged)  # fmt: skip

        return call

    def apply():
        q, k, _ = q_k_v()
        rope.apply_rope(q, k, *table, 1.0, 1.2, transposed=False)

    def rerotate():
        _, k, _ = q_k_v()
        rope.rerotate(k, inv_freq, positions, False, True, 1.2, False)

    calls = {"forward": forward, "backward": backward, "apply_rope": apply, "rerotate": rerotate}
    calls.update({case: decode_call(case) for case in DECODE_CASES})
    return calls


# kernel -> the launcher calls whose launches of that kernel are compiled
KERNEL_CALLS = {
    "fwd": ["forward"],
    "bwd_dq": ["backward"],
    "bwd_dkdv": ["backward"],
    "bwd_dv": ["backward"],
    "bwd_dk": ["backward"],
    "bwd_delta": ["backward"],
    "bwd_stage": ["backward"],
    "decode": list(DECODE_CASES),
    "apply_rope": ["apply_rope"],
    "rerotate": ["rerotate"],
}


def _staged_supported() -> bool:
    attention = _modules()[0]
    return "staged" in inspect.signature(attention.rope_attention_fwd).parameters


@functools.cache
def captured(call: str, head: str, dtype: str, staged: bool = True) -> tuple[Launch, ...]:
    """The launches one launcher call issues (cached: the recorded tensors stay alive with them)."""
    launches: list[Launch] = []
    with recording(launches, call):
        launcher_calls(head, dtype, staged)[call]()
    return tuple(launches)


# ------------------------------------------------------------------------------------------------ specialization
def _target(arch: int):
    from triton.backends.compiler import GPUTarget

    return GPUTarget("cuda", arch, 32)


@functools.cache
def _backend(arch: int):
    from triton.compiler import make_backend

    return make_backend(_target(arch))


def specialize(fn, args: tuple, kwargs: dict, arch: int) -> tuple[dict, dict, dict, dict]:
    """(signature, constexprs, attrs, options) of a launch of JITFunction ``fn`` on ``arch``, as
    ``JITFunction.run`` computes them: the options it adds to the launch's keywords, its binder (the runtime's
    specialization of every argument) and ``_pack_args``. Both Triton 3.6 and 3.9 have these."""
    import triton
    from triton.runtime.jit import create_function_from_signature

    backend = _backend(arch)
    kwargs = dict(kwargs)
    # What JITFunction.run sets before binding (3.6: debug, instrumentation_mode; 3.9 also fpsan_homomorphic_casts).
    kwargs["debug"] = kwargs.get("debug", fn.debug) or triton.knobs.runtime.debug
    option_names = {f.name for f in dataclasses.fields(backend.parse_options({}))}
    for name in ("instrumentation_mode", "fpsan_homomorphic_casts"):
        if name in option_names and hasattr(triton.knobs.compilation, name):
            kwargs[name] = getattr(triton.knobs.compilation, name)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    return signature, constexprs, attrs, dict(options.__dict__)


def _named(fn, constexprs: dict) -> dict:
    """Top-level constexprs by argument name (constexprs are keyed by argument path)."""
    return {fn.arg_names[path[0]]: value for path, value in constexprs.items() if len(path) == 1}


def _config_name(kernel: str, named: dict, options: dict, case: str) -> str:
    warps, stages = options["num_warps"], options["num_stages"]
    if kernel in SCORE_KERNELS:
        return f"M{named['BLOCK_M']} N{named['BLOCK_N']} w{warps} s{stages}"
    if kernel == "decode":
        page = f" page={named['PAGE']}" if named.get("PAGE") else ""  # paged caches (block_table)
        return (f"M{named['BLOCK_M']} N{named['BLOCK_N']} w{warps} s{stages} split={int(bool(named['IS_SPLIT']))}"
                f"{page}")  # fmt: skip
    return f"B{named['BLOCK']} w{warps}"


def _decode_rows(case: str) -> int:
    batch, heads_q, heads_kv, new, *_ = DECODE_CASES[case]
    return heads_q // heads_kv * new


def jobs_for(
    kernel: str, head: str, dtype: str, arch: int, staged: bool = True, all_configs: bool = False,
    sass: bool = True,
) -> list[Job]:  # fmt: skip
    """The compilations of one (kernel, head case, dtype, arch): one per distinct launch the launchers issue and,
    for an autotuned kernel, per config its ``early_config_prune`` keeps for ``arch`` (``all_configs``: every
    config). ``staged``: the attention launchers rotate the loop operand once (their default), else per tile."""
    fn = _jit_fn(kernel)
    tuner = _kernel_object(kernel)
    jobs, seen = [], set()
    for call in KERNEL_CALLS[kernel]:
        for launch in captured(call, head, dtype, staged):
            if launch.kernel != kernel:
                continue
            if hasattr(tuner, "configs"):  # autotuned: the configs a GPU of this arch would time
                configs = tuner.configs
                if not all_configs and getattr(tuner, "early_config_prune", None):
                    tuner.nargs = dict(zip(tuner.arg_names, launch.args))
                    try:
                        configs = tuner.prune_configs(dict(launch.kwargs, arch=arch))
                    finally:
                        tuner.nargs = None
                variants = [dict(launch.kwargs, **c.all_kwargs()) for c in configs]
            else:
                variants = [launch.kwargs]
            if kernel == "fwd" and arch < 90:  # the launcher loads k/v by TMA only on a GPU that has it (sm_90+)
                variants = [dict(kw, USE_TMA=False) for kw in variants]
            for kwargs in variants:
                signature, constexprs, attrs, options = specialize(fn, launch.args, kwargs, arch)
                named = _named(fn, constexprs)
                name = _config_name(kernel, named, options, launch.case)
                if name in seen:
                    continue
                seen.add(name)
                block_m, block_n = named.get("BLOCK_M", 0), named.get("BLOCK_N", 0)
                scores = block_m * block_n if kernel in SCORE_KERNELS else 0
                if kernel == "decode":
                    scores = min(_decode_rows(launch.case), block_m) * block_n
                jobs.append(Job(kernel, head, dtype, arch, name, launch.case, signature, constexprs, attrs, options,
                                options["num_warps"], scores, block_m, block_n,
                                sass=sass and kernel in TILE_LOOP_KERNELS))  # fmt: skip
    return jobs


# ------------------------------------------------------------------------------------------------ machine code
_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes spill stores")
_SASS_LABEL = re.compile(r"^\s*(\.L\w+):")
_SASS_INSN = re.compile(r"^\s*/\*[0-9a-f]{4,}\*/\s+(.*?)\s*;")
_SASS_BRANCH = re.compile(r"\bBRA\b.*`\((\.L\w+)\)")
_SASS_MMA = re.compile(r"\b(HGMMA|HMMA)\b")
# The MMA shape of an instruction: HGMMA.64x128x16.F32.BF16 (M x N x K, one warp group), HMMA.16816.F32.BF16
# (m16 n8 k16, one warp; HMMA.1688: k8).
_SASS_MMA_SHAPE = re.compile(r"\bHGMMA\.(\d+)x(\d+)x(\d+)\b|\bHMMA\.(16)(8)(16|8)\b")


def mma_shape_work(instruction: str) -> tuple[int, int]:
    """(M x N x K of one MMA instruction, how many warps issue it together: 4 for wgmma), or (0, 1) if unknown."""
    m = _SASS_MMA_SHAPE.search(instruction)
    if not m:
        return 0, 1
    if m.group(1):
        return int(m.group(1)) * int(m.group(2)) * int(m.group(3)), 4
    return int(m.group(4)) * int(m.group(5)) * int(m.group(6)), 1


def nvdisasm_path() -> str:
    """The nvdisasm that ships with this Triton."""
    import triton.backends.nvidia as nvidia

    return str(Path(nvidia.__file__).parent / "bin" / "nvdisasm")


def disassemble(cubin: bytes) -> str:
    """The SASS of a cubin (``nvdisasm -c``; Triton 3.6's ``asm["sass"]`` is cut short)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        done = subprocess.run([nvdisasm_path(), "-c", f.name], capture_output=True, text=True, check=True)
    return done.stdout


def sass_loops(sass: str) -> tuple[list[str], list[tuple[int, int]]]:
    """(instructions, loops): the instructions in address order, and each loop as (first, last) instruction
    indices: from a label to a branch back to it (the loop's backward edge)."""
    labels: dict[str, int] = {}
    instructions: list[str] = []
    for line in sass.splitlines():
        label = _SASS_LABEL.match(line)
        if label:
            labels[label.group(1)] = len(instructions)
            continue
        insn = _SASS_INSN.match(line)
        if insn:
            instructions.append(insn.group(1))
    loops = []
    for i, insn in enumerate(instructions):
        branch = _SASS_BRANCH.search(insn)
        if branch and labels.get(branch.group(1), i + 1) <= i:
            first = labels[branch.group(1)]
            # Not a loop: a block placed after the kernel's exit (e.g. an mbarrier wait's retry path) that jumps
            # back into the code it was branched from.
            if not any(x.startswith("EXIT") or " EXIT" in x for x in instructions[first:i]):
                loops.append((first, i))
    return instructions, loops


def mma_loops(sass: str) -> list[dict]:
    """The innermost loops that issue MMA (no loop inside them does), in address order: SASS instructions per trip
    (the loop's body: head label to backward branch, forward-branched blocks inside it included), MMA instructions
    and kind (HGMMA: wgmma, HMMA: mma.sync), and ``work``: M x N x K summed over the loop's MMA instructions, each
    divided by the warps that issue it together (times the kernel's warps: the MMA work one trip issues)."""
    instructions, loops = sass_loops(sass)

    def mma(first: int, last: int) -> list[str]:
        return [m.group(1) for m in map(_SASS_MMA.search, instructions[first : last + 1]) if m]

    with_mma = sorted({loop for loop in loops if mma(*loop)})
    innermost = [a for a in with_mma if not any(b != a and a[0] <= b[0] and b[1] <= a[1] for b in with_mma)]
    out = []
    for first, last in innermost:
        kinds = mma(first, last)
        shapes = [mma_shape_work(x) for x in instructions[first : last + 1] if _SASS_MMA.search(x)]
        out.append(dict(sass=last - first + 1, mma=len(kinds), kind="wgmma" if "HGMMA" in kinds else "mma.sync",
                        work=sum(w / n for w, n in shapes)))  # fmt: skip
    return out


def loop_trig_ops(ttir: str) -> int:
    """``math.sin`` / ``math.cos`` operations inside ``scf.for`` loops of Triton's TTIR (before libdevice is inlined,
    so each tl.sin / tl.cos of the source is one op)."""
    depth, loop_depths, count = 0, [], 0
    for line in ttir.splitlines():
        if "scf.for" in line and line.rstrip().endswith("{"):
            loop_depths.append(depth)
        if loop_depths and ("math.sin" in line or "math.cos" in line):
            count += 1
        depth += line.count("{") - line.count("}")
        while loop_depths and depth <= loop_depths[-1]:
            loop_depths.pop()
    return count


_TT_DOT = re.compile(r"tt\.dot .*: tensor<(\d+)x(\d+)x\w+> \* tensor<\d+x(\d+)x\w+>")


def loop_dot_work(ttir: str) -> int:
    """The MMA work of one trip of a tile loop: M x K x N summed over the ``tt.dot`` ops of each ``scf.for`` loop of
    the TTIR (a dot counts for the innermost loop holding it), the largest over the loops."""
    depth, stack, works = 0, [], []  # stack: (brace depth at the loop's start, its work)
    for line in ttir.splitlines():
        if "scf.for" in line and line.rstrip().endswith("{"):
            stack.append([depth, 0])
        dot = _TT_DOT.search(line) if stack else None
        if dot:
            m, k, n = map(int, dot.groups())
            stack[-1][1] += m * k * n
        depth += line.count("{") - line.count("}")
        while stack and depth <= stack[-1][0]:
            works.append(stack.pop()[1])
    return max(works, default=0)


def loop_mma_channels(ttir: str, block_m: int, block_n: int) -> int:
    """The MMA work of one trip of a tile loop, in channels: M x K x N summed over the ``tt.dot`` ops of each
    ``scf.for`` loop of the TTIR (a dot counts for the innermost loop holding it), the largest over the loops,
    divided by BLOCK_M x BLOCK_N. A kernel that walks its tiles in two loops (unmasked tiles, then the diagonal)
    does the same work per trip in each. The forward's q k^T and p v give twice its head size when no channel is
    padding (D96: 2 x 96, not 2 x 128)."""
    return loop_dot_work(ttir) // (block_m * block_n) if block_m and block_n else 0


def per_1k_scores(loop_sass: int, num_warps: int, scores_per_trip: int) -> float:
    """Warp-instructions a tile loop issues per 1,000 scores: every warp runs the loop body once per trip."""
    return loop_sass * num_warps * 1000 / scores_per_trip


def _worker_init():
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="lr2_compile_report_")  # fresh: ptxas always runs
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")


def compile_source(src, arch: int, options: dict) -> tuple[object, str]:
    """(compiled kernel, ptxas log) of an ASTSource for ``arch``, in a fresh cache so that ptxas always runs."""
    import triton
    from triton import knobs

    knobs.cache.dir = tempfile.mkdtemp(prefix="lr2_compile_report_")
    knobs.nvidia.dump_ptxas_log = True
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        compiled = triton.compile(src, target=_target(arch), options=options)
    return compiled, buf.getvalue()


def measure(compiled, log: str, arch: int) -> dict:
    """Registers and spill stores (ptxas), shared memory and whether it fits."""
    regs, spills = _PTXAS_REGS.findall(log), _PTXAS_SPILL.findall(log)
    smem = int(compiled.metadata.shared)
    return dict(regs=max(map(int, regs)) if regs else None, spill_bytes=max(map(int, spills)) if spills else None,
                smem=smem, fits=smem <= SMEM_LIMIT[arch], error="" if regs else "no ptxas log")  # fmt: skip


def tile_loop(mma_loop: dict | None, num_warps: int, scores_per_trip: int) -> dict:
    """The tile-loop fields of a row from one entry of :func:`mma_loops` (None: no loop issues MMA)."""
    if mma_loop is None:
        return dict(loop_sass=None, loop_mma=0, mma_kind="none", per_1k_scores=None, mma_work=None)
    return dict(loop_sass=mma_loop["sass"], loop_mma=mma_loop["mma"], mma_kind=mma_loop["kind"],
                per_1k_scores=round(per_1k_scores(mma_loop["sass"], num_warps, scores_per_trip), 1),
                mma_work=round(mma_loop.get("work", 0) * num_warps))  # fmt: skip


def compile_job(job: Job) -> Row:
    import triton

    t0 = time.perf_counter()
    fn = _jit_fn(job.kernel)
    src = triton.compiler.ASTSource(fn=fn, signature=job.signature, constexprs=job.constexprs, attrs=job.attrs)
    base = dict(kernel=job.kernel, head=job.head, dtype=job.dtype, arch=job.arch, config=job.config, case=job.case,
                num_warps=job.num_warps, block_m=job.block_m, block_n=job.block_n,
                scores_per_trip=job.scores_per_trip, triton=triton.__version__)  # fmt: skip
    try:
        compiled, log = compile_source(src, job.arch, job.options)
    except Exception as e:  # noqa: BLE001 - reported, not raised
        msg = str(e).strip().splitlines()
        return Row(**base, regs=None, spill_bytes=None, smem=None, fits=False,
                   error=(msg[0] if msg else type(e).__name__)[:200], seconds=time.perf_counter() - t0)  # fmt: skip
    extra: dict = {}
    if job.kernel in TILE_LOOP_KERNELS:
        ttir = compiled.asm["ttir"]
        extra.update(trig_in_loop=loop_trig_ops(ttir), mma_channels=loop_mma_channels(ttir, job.block_m, job.block_n),
                     dot_work=loop_dot_work(ttir))  # fmt: skip
    if job.sass:
        loops = mma_loops(disassemble(compiled.asm["cubin"]))
        # The loop doing the most MMA is the tile loop; where a kernel walks its tiles in two loops of equal MMA
        # (unmasked tiles, then the masked diagonal / last tile), the leaner one, which runs all but O(1) trips.
        main = max(loops, key=lambda x: (x["mma"], -x["sass"]), default=None)
        extra.update(tile_loop(main, job.num_warps, job.scores_per_trip), mma_loops=[[x["sass"], x["mma"]]
                                                                                      for x in loops])  # fmt: skip
    return Row(**base, **measure(compiled, log, job.arch), **extra, entry=compiled.metadata.name,
               seconds=time.perf_counter() - t0)  # fmt: skip


# ------------------------------------------------------------------------------------------------ runs
def run(kernels, heads, dtypes, archs, workers: int, all_configs: bool = False, sass_heads=None) -> list[Row]:
    """Compile the matrix; ``sass_heads``: the head cases whose tile loops are disassembled (None: all)."""
    _worker_init()
    jobs_by_kernel = {}
    for kernel in kernels:
        jobs_by_kernel[kernel] = [
            j
            for head in heads
            for dtype in dtypes
            for arch in archs
            for j in jobs_for(kernel, head, dtype, arch, all_configs=all_configs,
                              sass=sass_heads is None or head in sass_heads)  # fmt: skip
        ]
    rows: list[Row] = []
    t_all = time.perf_counter()
    with ProcessPoolExecutor(max_workers=workers, initializer=_worker_init) as pool:
        futures = {k: pool.map(compile_job, js) for k, js in jobs_by_kernel.items()}  # all queued at once
        for kernel in kernels:
            t0 = time.perf_counter()
            krows = list(futures[kernel])
            rows += krows
            bad = sum(not r.ok for r in krows)
            print(f"{kernel:13s} {len(krows):4d} compiles, {bad:3d} spilling/over-smem/failed, "
                  f"done at {time.perf_counter() - t_all:6.1f} s (waited {time.perf_counter() - t0:5.1f} s)",
                  flush=True)  # fmt: skip
    return rows


def print_rows(rows: list[Row]) -> None:
    """One line per compilation (the --quick view)."""
    for r in sorted(rows, key=_row_order):
        loop = "" if r.loop_sass is None else (f"  loop {r.loop_sass:5d} SASS/trip, {r.loop_mma:3d} {r.mma_kind:8s} "
                                                f"{r.per_1k_scores:8.1f} per 1K scores")  # fmt: skip
        print(f"{r.triton} {r.kernel:12s} {r.head:7s} {r.dtype} sm_{r.arch} {r.config:24s} regs {r.regs} "
              f"spill {r.spill_bytes} smem {r.smem}{loop}{'  ' + r.error if r.error else ''}")  # fmt: skip


def loop_job(kernel: str, head: str, dtype: str, arch: int) -> tuple[str, str, int | None, int]:
    """(kernel, config, tile-loop SASS per trip, cos/sin ops in loops) of the first config the launcher may pick,
    with the loop operand rotated in every tile (``staged=False``)."""
    _worker_init()
    job = jobs_for(kernel, head, dtype, arch, staged=False)[0]
    row = compile_job(job)
    return kernel, job.config, row.loop_sass, row.trig_in_loop or 0


def run_loops(head: str, dtype: str, arch: int, workers: int, rows: list[Row]) -> list[dict]:
    """The attention kernels' tile loops rotated per tile against the staged ones in ``rows`` (same config): SASS
    per trip and cos/sin ops in the loops."""
    if not _staged_supported():
        return []
    cases = [(k, head, dtype, arch) for k in LOOP_KERNELS]
    with ProcessPoolExecutor(max_workers=workers, initializer=_worker_init) as pool:
        results = list(pool.map(loop_job, *zip(*cases)))
    loops = []
    for kernel, config, per_tile, trig in results:
        staged = [r for r in rows if (r.kernel, r.head, r.dtype, r.arch, r.config) == (kernel, head, dtype, arch,
                                                                                          config)]  # fmt: skip
        if not staged:
            continue
        s = staged[0]
        loops.append(dict(kernel=kernel, head=head, dtype=dtype, arch=arch, config=config, per_tile_rotation=per_tile,
                          staged=s.loop_sass, trig_per_tile_rotation=trig, trig_staged=s.trig_in_loop,
                          mma_channels=s.mma_channels))  # fmt: skip
        print(f"{kernel:13s} tile loop: {per_tile} SASS instructions and {trig} cos/sin rotating per tile, "
              f"{s.loop_sass} and {s.trig_in_loop} staged", flush=True)  # fmt: skip
    return loops


def summarize(rows: list[Row]) -> dict[tuple, bool]:
    """(kernel, head, dtype, arch) -> whether at least one spill-free config fits shared memory."""
    out: dict[tuple, bool] = {}
    for r in rows:
        key = (r.kernel, r.head, r.dtype, r.arch)
        out[key] = out.get(key, False) or r.ok
    return out


# ------------------------------------------------------------------------------------------------ the peer
PEER_KERNELS = {"fwd": "forward", "bwd_dq": "dq", "bwd_dkdv": "dk/dv"}
# The kernels whose loops make up each compared figure, alternatives in order: dk/dv is the fused kernel's or, at a
# head where the launcher runs the two passes instead (attention.dkdv_two_pass), the sum of the dv and dk passes'
# figures (each pass walks every score once, so their warp-instructions per 1K scores add).
PEER_PARTS = {"fwd": [["fwd"]], "bwd_dq": [["bwd_dq"]], "bwd_dkdv": [["bwd_dkdv"], DKDV_PASSES]}
# Head case -> the tutorial's head size it is compared with: the same size; Phi-4-mini's 96-of-128 is a head of 128;
# 96 channels, which the tutorial cannot run (it takes 16, 32, 64, 128 or 256), against its 128, the size a user of
# it pads 96 to. 80 is not compared.
PEER_HEADS = {"64": "64", "96": "128", "128": "128", "256": "256", "96of128": "128"}


def _as_dict(r) -> dict:
    return asdict(r) if dataclasses.is_dataclass(r) else dict(r)


def _minor(version: str) -> str:
    return ".".join(version.split(".")[:2])


def best_spill_free(
    rows: list, kernel: str, head: str, dtype: str, arch: int, triton_version: str, spilling: bool = False
) -> dict | None:
    """The spill-free, fitting config with the fewest warp-instructions per 1K scores, the least shared memory among
    equals (None: none measured). ``spilling``: any fitting config, spill-free or not."""
    candidates = [
        r for r in map(_as_dict, rows)
        if (r["kernel"], r["head"], r["dtype"], r["arch"]) == (kernel, head, dtype, arch)
        and _minor(r["triton"]) == _minor(triton_version) and not r["error"] and r["fits"]
        and (spilling or r["spill_bytes"] == 0) and r.get("per_1k_scores")
    ]  # fmt: skip
    return min(candidates, key=lambda r: (r["per_1k_scores"], r["smem"]), default=None)


def peer_ratios(
    rows: list, peer_rows: list, head: str = "128", dtype: str = "bf16", arch: int = 90, kernels=tuple(PEER_KERNELS)
) -> list[dict]:
    """Per attention kernel and Triton version in ``rows``: our best spill-free figure (warp-instructions per 1K
    scores, :func:`best_spill_free`) at head case ``head`` over the tutorial's (``peer_rows``,
    benchmarks/peer_report.py) at :data:`PEER_HEADS`' head size, on the same arch and Triton minor version. The
    tutorial measured in fp16 stands in where it has no ``dtype`` rows (its kernels cast to fp16 themselves:
    :func:`peer_dtype`). Where every config of the tutorial spills (its backward at head 256), its fewest
    instructions among them stand in (``peer_spill_bytes`` > 0; spill traffic is not counted, so that figure flatters
    it). A ratio is None where either side has no figure. Where the figure is the sum of several kernels'
    (:data:`PEER_PARTS`: the two-pass dk/dv), ``parts`` holds each one's best spill-free config and MMA work, and
    ``ours`` is None unless each has one."""
    out = []
    for version in sorted({_as_dict(r)["triton"] for r in rows}):
        for kernel in kernels:
            ours, parts = ours_figure(rows, kernel, head, dtype, arch, version)
            theirs_dtype = peer_dtype(peer_rows, dtype)
            peer_head = PEER_HEADS.get(head, head)
            theirs = best_spill_free(peer_rows, kernel, peer_head, theirs_dtype, arch, version) or best_spill_free(
                peer_rows, kernel, peer_head, theirs_dtype, arch, version, spilling=True
            )
            ratio = ours["per_1k_scores"] / theirs["per_1k_scores"] if ours and theirs else None
            out.append(dict(kernel=kernel, head=head, dtype=dtype, arch=arch, triton=version,
                            ours=ours and ours["per_1k_scores"], ours_config=ours and ours["config"],
                            ours_mma=ours and ours["mma_kind"], peer=theirs and theirs["per_1k_scores"],
                            peer_config=theirs and theirs["config"], peer_dtype=theirs_dtype,
                            peer_head=peer_head, peer_spill_bytes=theirs and theirs["spill_bytes"],
                            ours_mma_work=ours and ours.get("mma_work"),
                            ours_dot_work=ours and ours.get("dot_work"), parts=parts,
                            ratio=None if ratio is None else round(ratio, 3)))  # fmt: skip
    return out


def ours_figure(rows: list, kernel: str, head: str, dtype: str, arch: int, triton_version: str) -> tuple:
    """(figure, parts) of a compared kernel (:data:`PEER_PARTS`): the first alternative whose kernels were all
    compiled at this head (as launched: the launcher runs them there), each part's best spill-free row (None where it
    has none) and the figure as one row: per-1K scores, MMA and dot work summed over the parts, configs and MMA kinds
    joined (None unless every part has a spill-free config)."""
    compiled = {(r["kernel"], _minor(r["triton"])) for r in map(_as_dict, rows)
                if (r["head"], r["dtype"], r["arch"]) == (head, dtype, arch)}  # fmt: skip
    alternatives = PEER_PARTS[kernel]
    names = next((a for a in alternatives if all((k, _minor(triton_version)) in compiled for k in a)), alternatives[0])
    best = [best_spill_free(rows, name, head, dtype, arch, triton_version) for name in names]
    parts = [dict(kernel=name, per_1k_scores=b and b["per_1k_scores"], config=b and b["config"],
                  mma_kind=b and b["mma_kind"], mma_work=b and b.get("mma_work"), dot_work=b and b.get("dot_work"))
             for name, b in zip(names, best)]  # fmt: skip
    if any(b is None for b in best):
        return None, parts
    if len(best) == 1:
        return best[0], parts

    def total(field: str):
        values = [b.get(field) for b in best]
        return None if any(v is None for v in values) else sum(values)

    kinds = list(dict.fromkeys(b["mma_kind"] for b in best))
    figure = dict(per_1k_scores=round(total("per_1k_scores"), 1), mma_kind="+".join(kinds),
                  config=" + ".join(f"{name.removeprefix('bwd_')} {b['config']}" for name, b in zip(names, best)),
                  mma_work=total("mma_work"), dot_work=total("dot_work"))  # fmt: skip
    return figure, parts


def peer_dtype(peer_rows: list, dtype: str) -> str:
    """The dtype of the tutorial's rows to compare with ours in ``dtype``: the same where it has rows in it, else
    fp16 (the tutorial's kernels are written for fp16)."""
    return dtype if any(_as_dict(r)["dtype"] == dtype for r in peer_rows) else "fp16"


def load_peer(path: Path = PEER_JSON) -> dict:
    """The tutorial's measurements (benchmarks/peer_report.py's JSON), or no rows."""
    return json.loads(path.read_text()) if path.exists() else {"rows": []}


# ------------------------------------------------------------------------------------------------ markdown
def _row_order(r):
    return (KERNELS.index(r.kernel), list(HEAD_CASES).index(r.head), r.dtype, r.arch, r.config)


def loops_markdown(loops: list[dict]) -> list[str]:
    if not loops:
        return []
    lines = [
        "",
        "## Instructions per tile: the loop operand rotated once (staged) vs rotated in every tile",
        "",
        "SASS instructions per trip of each attention kernel's tile loop, the first config its launcher may pick, as "
        "launched. Staged (the default): the launcher rotates the keys (forward, dq) or queries (dk/dv) once into a "
        "scratch buffer; per tile: each program recomputes sin/cos and rotates every tile it visits. cos/sin: "
        "math.cos / math.sin ops inside scf.for loops of the TTIR. MMA channels: the loop's tt.dot work (sum of "
        "M x K x N) over BLOCK_M x BLOCK_N, staged (the forward's q k^T and p v: twice the head size when no channel "
        "is padding).",
        "",
        "| kernel | head | dtype | arch | config | per-tile rotation | staged | ratio | cos/sin in loop: per tile, "
        "staged | MMA channels |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in loops:
        ratio = f"{r['per_tile_rotation'] / r['staged']:.2f}x" if r["per_tile_rotation"] and r["staged"] else "n/a"
        lines.append(f"| {r['kernel']} | {r['head']} | {r['dtype']} | sm_{r['arch']} | {r['config']} | "
                     f"{r['per_tile_rotation']} | {r['staged']} | {ratio} | {r['trig_per_tile_rotation']}, "
                     f"{r['trig_staged']} | {r['mma_channels']} |")  # fmt: skip
    return lines


def tile_loops_markdown(rows: list[Row]) -> list[str]:
    shown = [r for r in sorted(rows, key=_row_order) if r.loop_sass is not None or (r.mma_kind and not r.error)]
    if not shown:
        return []
    lines = [
        "",
        "## Tile loops as launched",
        "",
        "The innermost loop issuing MMA in the cubin's SASS (nvdisasm), per config a launcher may pick: SASS "
        "instructions per trip (head label to backward branch), MMA instructions per trip and their kind (wgmma: "
        "HGMMA, sm_90 only; mma.sync: HMMA), warp-instructions per 1K scores = per-trip SASS x warps x 1000 / "
        "scores per trip (BLOCK_M x BLOCK_N; decode: its case's real rows x BLOCK_N, so padding rows count for "
        "nothing). Spilling or over-smem configs are marked.",
        "",
        "| kernel | head | dtype | arch | config | case | regs | spill B | SASS/trip | MMA/trip | MMA kind | "
        "per 1K scores |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in shown:
        per_1k = "-" if r.per_1k_scores is None else f"{r.per_1k_scores:,.0f}"
        flag = "" if r.ok else " **(spills)**" if r.fits else " **(over smem)**"
        lines.append(f"| {r.kernel} | {r.head} | {r.dtype} | sm_{r.arch} | {r.config}{flag} | {r.case} | {r.regs} | "
                     f"{r.spill_bytes} | {r.loop_sass if r.loop_sass is not None else '-'} | {r.loop_mma} | "
                     f"{r.mma_kind} | {per_1k} |")  # fmt: skip
    return lines


def ratios_markdown(ratios: list[dict], peer: dict) -> list[str]:
    if not ratios:
        return []
    source = peer.get("tutorial", {})
    lines = [
        "",
        "## Against Triton's tutorial fused attention (same compiler, arch and head)",
        "",
        f"Warp-instructions per 1K scores in the tile loop, best spill-free config each side; the tutorial "
        f"(`python/tutorials/06-fused-attention.py` {source.get('ref', '?')}) measured by "
        "`benchmarks/peer_report.py` (`benchmarks/results/peer_tutorial_attention.md`). Ratio: ours / tutorial "
        "(below 1: fewer instructions than the tutorial); where every config of the tutorial spills, its fewest "
        "instructions among them, marked (spill traffic uncounted). The tutorial takes heads of 16 to 256 channels, "
        "powers of "
        "two: a head of 96 is compared with its 128 (what it pads 96 to), Phi-4-mini's 96-of-128 with its 128. MMA "
        "work: what the loop's MMA instructions issue per trip (M x N x K of each, all warps) over what its dots "
        "need (1.00: none repeated). dk/dv at a head where the backward runs it in two passes (above 128 channels): "
        "the sum of the dv and dk passes' figures, each pass's best spill-free config (joined by +), MMA and dot "
        "work summed.",
        "",
        "| Triton | kernel | head | arch | lr2kernels | config | MMA | MMA work | tutorial | config | ratio |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in ratios:
        ours = "none spill-free" if r["ours"] is None else f"{r['ours']:,.0f}"
        theirs = "-" if r["peer"] is None else f"{r['peer']:,.0f} (D{r['peer_head']} {r['peer_dtype']})"
        if r.get("peer_spill_bytes"):
            theirs += f", spills {r['peer_spill_bytes']:,} B"
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}x"
        work = (f"{r['ours_mma_work'] / r['ours_dot_work']:.2f}" if r.get("ours_mma_work") and r.get("ours_dot_work")
                else "-")  # fmt: skip
        lines.append(f"| {r['triton']} | {PEER_KERNELS[r['kernel']]} | {r['head']} | sm_{r['arch']} | {ours} | "
                     f"{r['ours_config'] or '-'} | {r['ours_mma'] or '-'} | {work} | {theirs} | "
                     f"{r['peer_config'] or '-'} | {ratio} |")  # fmt: skip
    return lines


def tile_widths_markdown(heads: list[str]) -> list[str]:
    """The tiles each head case is cut into (``_host.tile_widths``): the channels tl.dot contracts q k^T over in
    the forward and decode, in the backward (``one_tile``: one tile per segment), and the width of the v / output
    rows, against one power-of-two tile per segment."""
    from lr2kernels.ops.triton._host import head_sizes, one_tile_widths, segment_tiles, split_sizes

    lines = [
        "",
        "## Tile widths: the channels tl.dot runs over",
        "",
        "Each segment (a NeoX half, the pass-through, a whole v / output row) is cut into at most two power-of-two "
        "tiles, so a 48-channel half is 32 + 16 channels, not 64. The backward keeps the halves and the "
        "pass-through of its dq / dk accumulators in one tile each (16-channel accumulator tiles spill), and decode "
        "its v / output rows (its 16-row tiles). In parentheses: one power-of-two tile per segment (before).",
        "",
        "| head | forward, decode: q k^T tiles | q k^T channels | backward q k^T channels | "
        "v / output rows (not decode) |",
        "|---|---|---|---|---|",
    ]
    for head in heads:
        head_dim, rotary_dim = HEAD_CASES[head]
        split, row = split_sizes(head_dim, rotary_dim), head_sizes(head_dim)
        backward = split_sizes(head_dim, rotary_dim, one_tile=True)

        def contracted(sizes: dict) -> tuple[list[int], list[int], int]:
            halves = segment_tiles(sizes["HALF"], sizes["HALF_A"], sizes["HALF_B"])
            passthrough = segment_tiles(sizes["PASS"], sizes["PASS_A"], sizes["PASS_B"])
            return halves, passthrough, 2 * sum(halves) + sum(passthrough)

        halves, passthrough, channels = contracted(split)
        one_tile = 2 * one_tile_widths(split["HALF"])[0] + (one_tile_widths(split["PASS"])[0] if split["PASS"] else 0)
        shown = f"2 x ({'+'.join(map(str, halves))})" + (f" + {'+'.join(map(str, passthrough))}" if passthrough else "")
        rows = sum(segment_tiles(row["HEAD_DIM"], row["HEAD_A"], row["HEAD_B"]))
        lines.append(f"| {head} | {shown} | {channels} ({one_tile}) | {contracted(backward)[2]} ({one_tile}) | "
                     f"{rows} ({one_tile_widths(head_dim)[0]}) |")  # fmt: skip
    return lines


def markdown(rows: list[Row], seconds: float, argv: str, loops: list[dict] | None = None,
             ratios: list[dict] | None = None, peer: dict | None = None) -> str:  # fmt: skip
    decode = "; ".join(f"{c}: batch {b}, {hq} q / {hk} kv heads, {n} new, cache {cap}"
                       f"{f' in blocks of {DECODE_BLOCK_SIZES[c]}' if c in DECODE_BLOCK_SIZES else ''}, {s} split(s)"
                       for c, (b, hq, hk, n, cap, _len, s) in DECODE_CASES.items())  # fmt: skip
    lines = [
        "# Triton kernels compiled for sm_80 / sm_90 on the CPU, as launched",
        "",
        f"Generated by `python benchmarks/compile_report.py {argv}` with Triton "
        f"{', '.join(sorted({r.triton for r in rows}))} in {seconds:.0f} s "
        f"({len(rows)} compilations). Each kernel is compiled with the arguments its launcher passes and Triton's "
        f"specialization of them (integers equal to 1 constant, integers divisible by 16 and 16-byte-aligned "
        f"pointers marked), for every autotune config its pruning keeps on the arch. Launches: attention and rope "
        f"batch {BATCH}, {Q_HEADS} q / {KV_HEADS} kv heads, {SEQ_LEN} tokens, causal, explicit positions; {decode}. "
        f"Registers and spill stores from ptxas `-v`; shared memory is Triton's dynamic shared memory "
        f"(`metadata.shared`); fits: <= {SMEM_LIMIT[80]:,} B (sm_80), <= {SMEM_LIMIT[90]:,} B (sm_90).",
        "",
        "## Spill-free config that fits, per (kernel, head, dtype, arch)",
        "",
        "| kernel | head | dtype | sm_80 | sm_90 |",
        "|---|---|---|---|---|",
    ]
    summary = summarize(rows)
    keys = sorted({(k, h, d) for (k, h, d, _a) in summary},
                  key=lambda x: (KERNELS.index(x[0]), list(HEAD_CASES).index(x[1]), x[2]))  # fmt: skip
    for k, h, d in keys:
        cells = []
        for a in (80, 90):
            v = summary.get((k, h, d, a))
            cells.append("-" if v is None else ("yes" if v else "**NO**"))
        lines.append(f"| {k} | {h} | {d} | {cells[0]} | {cells[1]} |")
    lines += ratios_markdown(ratios or [], peer or {})
    lines += tile_loops_markdown(rows)
    lines += loops_markdown(loops or [])
    lines += tile_widths_markdown(sorted({r.head for r in rows}, key=list(HEAD_CASES).index))
    lines += [
        "",
        "## Every config",
        "",
        "| kernel | head | dtype | arch | config | regs | spill B | smem B | fits | note |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=_row_order):
        note = r.error or ("" if r.ok else ("spills" if r.fits else "over smem"))
        lines.append(f"| {r.kernel} | {r.head} | {r.dtype} | sm_{r.arch} | {r.config} | {r.regs} | "
                     f"{r.spill_bytes} | {r.smem} | {'yes' if r.fits else '**no**'} | {note} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--matrix", choices=sorted(MATRICES), default="reduced")
    p.add_argument("--kernels", nargs="*", default=KERNELS, choices=KERNELS)
    p.add_argument("--heads", nargs="*", choices=list(HEAD_CASES), help="overrides the matrix's head cases")
    p.add_argument("--dtypes", nargs="*", choices=["fp16", "bf16", "fp32"], help="overrides the matrix's dtypes")
    p.add_argument("--archs", nargs="*", type=int, default=[80, 90], choices=[80, 90])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/triton_compile.md")
    p.add_argument("--json", type=Path, help="also write the raw rows as JSON")
    p.add_argument("--quick", action="store_true",
                   help="print one line per compilation and write nothing (no per-tile-rotation loops)")  # fmt: skip
    p.add_argument(
        "--all-configs",
        action="store_true",
        help="compile every attention autotune config, before pruning (to choose attention._KEEP)",
    )
    p.add_argument("--sass-heads", nargs="*", choices=list(HEAD_CASES),
                   help="head cases whose tile loops are disassembled (default: all)")  # fmt: skip
    p.add_argument("--loop-heads", nargs="*", default=["128"], choices=list(HEAD_CASES),
                   help="head cases whose tile loops are also compiled rotating per tile (--loops on)")  # fmt: skip
    p.add_argument("--loops", choices=["on", "off"], default="on",
                   help="also compile the attention kernels rotating their loop operand per tile (the --loop-heads, "
                        "the first dtype, sm_90) against the staged default")  # fmt: skip
    p.add_argument("--peer", type=Path, default=PEER_JSON, help="the tutorial's measurements (peer_report.py)")
    p.add_argument("--from-json", type=Path,
                   help="compile nothing: rewrite the report (and --json) from an earlier --json output of the same "
                        "arguments, with the tutorial's figures as --peer holds them now")  # fmt: skip
    args = p.parse_args(argv)
    args.kernels = list(dict.fromkeys(k for name in args.kernels for k in FAMILIES.get(name, [name])))
    heads, dtypes = MATRICES[args.matrix]
    heads, dtypes = args.heads or heads, args.dtypes or dtypes
    t0 = time.perf_counter()
    shown = " ".join(argv if argv is not None else sys.argv[1:])
    if args.from_json:
        earlier = json.loads(args.from_json.read_text())
        rows, loops, t0 = [Row(**r) for r in earlier["rows"]], earlier["loops"], t0 - earlier["seconds"]
        shown = earlier.get("argv", shown)
    else:
        rows = run(args.kernels, heads, dtypes, args.archs, args.workers, args.all_configs, args.sass_heads)
    if args.quick:
        print_rows(rows)
        print(f"{len(rows)} compilations in {time.perf_counter() - t0:.1f} s")
        return 0
    if not args.from_json:
        loops = []
        if args.loops == "on" and set(LOOP_KERNELS) <= set(args.kernels) and 90 in args.archs:
            for head in args.loop_heads:
                loops += run_loops(head, dtypes[0], 90, args.workers, rows)
    peer = load_peer(args.peer)
    ratios = []
    if 90 in args.archs and set(PEER_KERNELS) & set(args.kernels):  # every compared head whose loops were counted
        compared = [h for h in heads if h in PEER_HEADS and (args.sass_heads is None or h in args.sass_heads)]
        ratios = [r for dtype in dtypes if dtype != "fp32" for head in compared
                  for r in peer_ratios(rows, peer["rows"], head, dtype, 90,
                                       [k for k in PEER_KERNELS if k in args.kernels])]  # fmt: skip
    seconds = time.perf_counter() - t0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(markdown(rows, seconds, shown, loops, ratios, peer))
    if args.json:
        args.json.write_text(json.dumps({"seconds": seconds, "argv": shown, "limits": SMEM_LIMIT, "loops": loops,
                                         "ratios": ratios, "peer": peer.get("tutorial"),
                                         "rows": [asdict(r) for r in rows]}, indent=1, default=str))  # fmt: skip
    for r in ratios:
        shown_ratio = "n/a (no tutorial figure)" if r["ratio"] is None else f"{r['ratio']:.2f}x the tutorial"
        ours = "no spill-free config" if r["ours"] is None else f"{r['ours']:,.0f} per 1K scores ({r['ours_config']})"
        print(f"{r['triton']} {r['kernel']:9s} D{r['head']} {r['dtype']} sm_{r['arch']}: {ours}, {shown_ratio}")
    missing = [k for k, v in summarize(rows).items() if not v]
    print(f"{len(rows)} compilations in {seconds:.1f} s; no spill-free fitting config for: {missing or 'none'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
