"""Every CUDA kernel compiles for sm_80 and sm_90 without spills, within 255 registers and the shared-memory limit.

Runs csrc/ptxas_report.py's compilation (nvcc -c -Xptxas -v into a temporary directory; translation units in
parallel; no GPU needed). Skipped only where nvcc is absent.
"""

from __future__ import annotations

import pytest

from tests.cuda.helpers import load_ptxas_report

ptxas_report = load_ptxas_report()
NVCC = ptxas_report.find_nvcc()
pytestmark = pytest.mark.skipif(
    NVCC is None, reason="nvcc is not installed ($CUDA_HOME, $CUDA_PATH, /usr/local/cuda, PATH): cannot run ptxas"
)


@pytest.fixture(scope="module")
def kernels():
    return ptxas_report.report(NVCC, ("80", "90"))


def test_every_kernel_fits(kernels):
    problems = [f"{k.source} {k.name} sm_{k.arch}: {'; '.join(k.problems())}" for k in kernels if k.problems()]
    assert not problems, "\n".join(problems)


def test_every_instantiation_is_compiled(kernels):
    """Every decode kernel the launch can pick, dense and paged (test_every_kernel_fits: no spills in any, the paged
    ones included: their tile's block lookup must not push the sm_80 tiles at the register edge over it)."""
    names = {(k.name, k.arch) for k in kernels}
    for arch in ("80", "90"):
        for dtype in ("float", "__half", "__nv_bfloat16"):
            for head_dim in (64, 96, 128, 256):
                for rows in (1, 2, 4, 8) if head_dim < 256 else (1, 2, 4):  # csrc/rope_decode.cuh: decode_rows_for
                    for paged in ("false", "true"):
                        assert (f"rope_decode_kernel<{dtype}, {head_dim}, {rows}, {paged}>", arch) in names
            assert (f"rope_decode_merge_kernel<{dtype}>", arch) in names
            assert (f"rope_rotate_kernel<{dtype}>", arch) in names


def test_parse_reads_ptxas_lines():
    text = (
        "ptxas info    : Compiling entry function '_Z3foov' for 'sm_90'\n"
        "ptxas info    : Function properties for _Z3foov\n"
        "    16 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads\n"
        "ptxas info    : Used 255 registers, used 1 barriers, 300000 bytes smem, 400 bytes cmem[0]\n"
    )
    (kernel,) = ptxas_report.parse(text, "x.cu")
    assert (kernel.arch, kernel.registers, kernel.stack, kernel.spill_stores, kernel.spill_loads, kernel.smem) == (
        "90",
        255,
        16,
        8,
        4,
        300000,
    )
    assert len(kernel.problems()) == 2  # spills, and smem over sm_90's 227 KB
