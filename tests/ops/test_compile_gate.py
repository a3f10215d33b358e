"""GPU-readiness gate, on the CPU: every Triton kernel compiles for sm_80 and sm_90 (Triton's bundled ptxas, a fake
GPUTarget) with a spill-free config that fits shared memory, and no config a launcher can pick spills or overflows it.
Each kernel is compiled as launched: its launcher runs on CPU tensors, the launches are recorded, and Triton's own
specialization of the recorded arguments (integers equal to 1 constant, multiples of 16 and aligned pointers marked)
is what gets compiled, for every autotune config the pruning keeps on the arch.

Runs ``benchmarks/compile_report.py`` in a subprocess without TRITON_INTERPRET (tests/conftest.py sets it, and
@triton.jit functions created under it cannot be compiled for a GPU), on the gate matrix: bf16, head dims 64, 80, 96,
128, 256 and partial rotary 96-of-128, both archs; the tile loops are disassembled at the LOOP_HEADS. fp16 spilled
exactly where bf16 did (every case of ``--matrix half`` when it was last compared; registers differ by a few), so CI
gates bf16 only, to stay short; ``--matrix full`` adds fp32. It runs with this interpreter's Triton and with every
Python named in ``LR2_GATE_PYTHONS`` (colon-separated): ``.ci/run`` adds one with Triton 3.6, the GPU image's, so
that the kernels are proven for the Triton that will run them as well as CI's.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "compile_report.py"
PEER_JSON = ROOT / "benchmarks" / "results" / "peer_tutorial_attention.json"  # benchmarks/peer_report.py


def _ptxas_missing() -> str:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    try:
        import triton.backends.nvidia as nvidia
    except ImportError as e:
        return f"triton's nvidia backend is absent ({e})"
    if not (Path(nvidia.__file__).parent / "bin" / "ptxas").exists():
        return "triton's bundled ptxas is absent"
    return ""


pytestmark = pytest.mark.skipif(bool(_ptxas_missing()), reason=_ptxas_missing() or "ptxas present")

# (kernels, head cases) compiled by the gate, each for bf16 on sm_80 and sm_90.
GATE = [
    (["fwd", "bwd_dq", "bwd_dkdv", "bwd_delta", "bwd_stage", "decode", "decode_merge", "apply_rope", "rerotate"],
     ["64", "80", "96", "128", "256", "96of128"]),
]  # fmt: skip


# Head cases whose tile loops are counted (instructions, cos/sin, MMA work): 128, and the two whose halves are cut
# in two tiles (Phi-3-mini's 96, Phi-4-mini's 96-of-128).
LOOP_HEADS = ["128", "96", "96of128"]


def gate_pythons() -> list[str]:
    """This interpreter, then the ones ``LR2_GATE_PYTHONS`` names (each must exist: a missing one fails the gate)."""
    extra = [p for p in os.environ.get("LR2_GATE_PYTHONS", "").split(":") if p]
    return [sys.executable, *extra]


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    rows, loops, ratios = [], [], []
    for python in gate_pythons():
        assert Path(python).exists(), f"LR2_GATE_PYTHONS names {python}, which does not exist"
        for kernels, heads in GATE:
            out = tmp_path_factory.mktemp("compile")
            cmd = [python, str(SCRIPT), "--matrix", "gate", "--kernels", *kernels, "--heads", *heads,
                   "--loop-heads", *LOOP_HEADS, "--sass-heads", *LOOP_HEADS, "--json", str(out / "rows.json"),
                   "--out", str(out / "report.md")]  # fmt: skip
            proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=1800)
            assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
            written = json.loads((out / "rows.json").read_text())
            rows += [dict(r, python=python) for r in written["rows"]]
            loops += [dict(r, python=python) for r in written["loops"]]
            ratios += [dict(r, python=python) for r in written["ratios"]]
    return {"rows": rows, "loops": loops, "ratios": ratios}


def test_every_kernel_compiles(report):
    failed = [(r["kernel"], r["head"], r["dtype"], r["arch"], r["config"], r["error"]) for r in report["rows"]
              if r["error"]]  # fmt: skip
    assert not failed


def test_no_reachable_config_overflows_shared_memory(report):
    over = [(r["kernel"], r["head"], r["dtype"], r["arch"], r["config"], r["smem"]) for r in report["rows"]
            if not r["fits"]]  # fmt: skip
    assert not over


def test_spill_free_config_exists(report):
    ok: dict[tuple, bool] = {}
    for r in report["rows"]:
        key = (r["triton"], r["kernel"], r["head"], r["dtype"], r["arch"])
        ok[key] = ok.get(key, False) or (not r["error"] and r["fits"] and r["spill_bytes"] == 0)
    assert ok
    assert not [key for key, good in ok.items() if not good]


def test_staged_rotation_takes_the_sin_cos_out_of_the_tile_loops(report):
    """The launchers rotate the loop operand once (keys in the forward and dq, queries in dk/dv): each tile loop
    then issues at most half the instructions of one that recomputes sin/cos and rotates every tile it visits (bf16,
    head 128, sm_90; static SASS counts, deterministic for a Triton version)."""
    assert {r["kernel"] for r in report["loops"]} == {"fwd", "bwd_dq", "bwd_dkdv"}
    for r in report["loops"]:
        assert r["trig_staged"] == 0 < r["trig_per_tile_rotation"], r  # no cos/sin left in the tile loops
        assert 0 < r["staged"] <= r["per_tile_rotation"] / 2, r  # SASS from the cubin: both Tritons


def test_forward_tiles_do_the_mma_work_of_the_head_not_of_its_power_of_two(report):
    """The forward's q k^T and p v run over exactly the head's channels per key tile (MMA work M x K x N summed over
    the loop's tt.dot ops, over BLOCK_M x BLOCK_N): 2 x 96 at Phi-3-mini's 96 channels and 2 x 128 at Phi-4-mini's
    96-of-128, where one power-of-two tile per segment made them 2 x 128 and 160 + 128."""
    forward = {(r["python"], r["head"]): r["mma_channels"] for r in report["loops"] if r["kernel"] == "fwd"}
    for python in gate_pythons():
        assert forward[(python, "128")] == 2 * 128
        assert forward[(python, "96")] == 2 * 96
        assert forward[(python, "96of128")] == 2 * 128


def test_no_launch_choice_spills(report):
    """What a launcher can pick (the autotune lists after pruning, decode's and rope's block sizes) never spills
    registers: a spilling config kept in an autotune list could win the tuning on one GPU and run slow there."""
    spilling = [(r["triton"], r["kernel"], r["head"], r["dtype"], r["arch"], r["config"], r["spill_bytes"])
                for r in report["rows"] if not r["error"] and r["spill_bytes"]]  # fmt: skip
    assert not spilling


def test_every_gate_python_compiled(report):
    """Every gate interpreter compiled the matrix: a Python named in LR2_GATE_PYTHONS that compiled nothing fails."""
    assert {r["python"] for r in report["rows"]} == set(gate_pythons())


def test_tile_loops_are_found_and_issue_mma(report):
    """The attention kernels' and decode's tile loops are found in the SASS of every config compiled for the loop
    heads (bf16): an innermost loop issuing MMA, with its per-trip count and warp-instructions per 1K scores."""
    loops = [r for r in report["rows"] if r["kernel"] in ("fwd", "bwd_dq", "bwd_dkdv", "decode")
             and r["head"] in LOOP_HEADS and not r["error"]]  # fmt: skip
    assert loops
    for r in loops:
        assert r["loop_sass"] and r["loop_mma"] and r["per_1k_scores"] > 0, r
        assert r["mma_kind"] in ("wgmma", "mma.sync"), r
        if r["arch"] == 90 and r["kernel"] == "fwd":  # 64+ row tiles: Hopper's warpgroup MMA
            assert r["mma_kind"] == "wgmma", r


def test_ratio_to_the_tutorial_is_computed_and_recorded(report):
    """Each gate Triton's report carries, per attention kernel (forward, dq, dk/dv; head 128, bf16, sm_90), our best
    spill-free warp-instructions per 1K scores and its ratio to Triton's tutorial attention
    (benchmarks/results/peer_tutorial_attention.json) wherever that file holds the same Triton's figures. Recorded,
    not yet bounded: the bound (issue 22: at most 1.10x) is turned on once the kernels meet it."""
    peer = json.loads(PEER_JSON.read_text()) if PEER_JSON.exists() else {"rows": []}
    peer_versions = {".".join(r["triton"].split(".")[:2]) for r in peer["rows"]}
    for python in gate_pythons():
        mine = [r for r in report["ratios"] if r["python"] == python]
        assert {r["kernel"] for r in mine} == {"fwd", "bwd_dq", "bwd_dkdv"}, mine
        for r in mine:
            assert (r["head"], r["dtype"], r["arch"]) == ("128", "bf16", 90)
            if r["ours"] is None:  # no spill-free config measured: the spill tests name it
                continue
            assert r["ours"] > 0
            if ".".join(r["triton"].split(".")[:2]) in peer_versions:
                assert r["peer"] > 0 and abs(r["ratio"] - r["ours"] / r["peer"]) < 1e-3, r
