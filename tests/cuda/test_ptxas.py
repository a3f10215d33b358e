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


def test_decode_shared_memory_is_the_models(kernels):
    """ptxas's static shared memory of every rope_decode kernel is DecodeShape's (csrc/ptxas_report.py, the mirror of
    csrc/rope_decode.cuh's): all of the block's for the static kernels; the tables alone (< 48 KB) for the kernels
    whose stages are dynamic (fp16/bf16 head 256 at 4 rows), which the launch's opt-in check counts as static. The
    model's blocks per SM use static + dynamic."""
    checked = 0
    for kernel in kernels:
        shape = ptxas_report.decode_shape(kernel)
        if shape is None:
            continue
        checked += 1
        assert kernel.dynamic_smem == shape.dynamic_bytes, kernel.name
        assert kernel.smem == shape.smem_bytes - shape.dynamic_bytes, (kernel.name, kernel.arch, kernel.smem)
        assert kernel.smem <= ptxas_report.STATIC_SMEM_LIMIT, kernel.name
    assert checked == 2 * 3 * (4 * 3 + 3) * 2  # archs x dtypes x (head, rows) x dense/paged


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
    assert len(kernel.problems()) == 3  # spills, smem over sm_90's 227 KB, and static smem over 48 KB
    kernel.smem, kernel.dynamic_smem = 12416, 67584  # head 256 at 4 rows: its tables static, its stages dynamic
    kernel.spill_stores = kernel.spill_loads = 0
    assert not kernel.problems()
    kernel.dynamic_smem = 227 * 1024  # static + dynamic over the opt-in limit
    assert len(kernel.problems()) == 1
