"""The extension lr2kernels._cuda (when this install built it) imports on a machine without a GPU, the "cuda"
backend then reports itself unavailable with a reason, and dispatch never picks it for CPU tensors.
Importing lr2kernels never loads the extension.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
import torch

import lr2kernels as lr2
from lr2kernels.ops import dispatch
from lr2kernels.ops.calls import CallSpec
from lr2kernels.ops.cuda import BACKEND, launch

BUILT = importlib.util.find_spec("lr2kernels._cuda") is not None
requires_extension = pytest.mark.skipif(
    not BUILT, reason="lr2kernels._cuda is not built here (install with LR2_BUILD_CUDA=1 where nvcc is present)"
)
NO_GPU = not torch.cuda.is_available()


def test_import_lr2kernels_does_not_load_the_extension():
    code = "import sys, lr2kernels, lr2kernels.ops; print('lr2kernels._cuda' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_registered_as_cuda():
    assert dispatch.get_backend("cuda") is BACKEND


@requires_extension
def test_extension_imports_and_links():
    module = launch.extension()
    assert tuple(module.DECODE_HEAD_DIMS) == launch.DECODE_HEAD_DIMS  # the Python side's copy agrees
    count, error = module.device_count()
    assert count >= 0 and isinstance(error, str)
    assert callable(module.rope_decode) and callable(module.rope_rotate)


@requires_extension
@pytest.mark.skipif(not NO_GPU, reason="checks the no-GPU report; this machine has a GPU")
def test_no_gpu_is_reported_cleanly():
    ok, reason = BACKEND.is_available()
    assert not ok and "no GPU" in reason
    ok, reason = dispatch.backend_status("cuda", torch.device("cpu"))
    assert not ok and "CUDA tensors only" in reason
    assert "cuda" not in lr2.available_backends()


@pytest.mark.skipif(BUILT, reason="checks the not-built report; the extension is built here")
def test_missing_extension_is_reported_cleanly():
    ok, reason = BACKEND.is_available()
    assert not ok and "LR2_BUILD_CUDA=1" in reason
    with pytest.raises(RuntimeError, match="not built"):
        launch.extension()


def test_cpu_tensors_never_go_to_cuda():
    q = torch.randn(1, 2, 3, 64)
    table = lr2.RopeTable.longrope(head_dim=64, base=10000.0, original_max_position=8, max_position=32,
                                   short_factor=[1.0] * 32, long_factor=[2.0] * 32)  # fmt: skip
    with pytest.raises(ValueError, match="backend: 'cuda' cannot run this apply_rope on cpu tensors"):
        lr2.apply_rope(q, q, table, backend="cuda")
    out_q, _ = lr2.apply_rope(q, q, table)  # backend=None: torch, no error
    assert out_q.shape == q.shape


@pytest.mark.parametrize(
    ("op", "dtype", "head_dim", "expected"),
    [
        ("rope_decode", torch.float16, 128, None),
        ("rope_decode", torch.bfloat16, 256, None),
        ("rope_decode", torch.float32, 64, None),
        ("apply_rope", torch.bfloat16, 80, None),
        ("rerotate", torch.float16, 96, None),
        ("rope_attention", torch.float16, 128, "no CUDA kernel for rope_attention"),
        ("rope_decode", torch.float16, 80, "head_dim 64, 96, 128, 256, not 80"),
        ("apply_rope", torch.float64, 64, "not torch.float64"),
    ],
)
def test_supports(op, dtype, head_dim, expected):
    ok, reason = BACKEND.supports(CallSpec(op, torch.device("cuda", 0), dtype, head_dim, False))
    if expected is None:
        assert ok and reason == ""
    else:
        assert not ok and expected in reason


def test_backend_none_prefers_triton_until_the_cuda_kernels_are_validated_on_a_gpu(monkeypatch):
    # On a GPU machine: backend=None keeps Triton first (the CUDA kernels have not run on a device yet); "cuda" is
    # chosen by name, and a call it declines says why.
    monkeypatch.setattr(dispatch, "backend_status", lambda name, device=None: (True, ""))
    assert dispatch._choose(None, "rope_attention", "cuda", 0, torch.float16, 128, False) == "triton"
    assert dispatch._choose(None, "rope_decode", "cuda", 0, torch.float16, 128, False) == "triton"
    assert dispatch._choose("cuda", "rope_decode", "cuda", 0, torch.float16, 128, False) == "cuda"
    with pytest.raises(ValueError, match="no CUDA kernel for rope_attention"):
        dispatch._choose("cuda", "rope_attention", "cuda", 0, torch.float16, 128, False)


@pytest.mark.parametrize(
    ("head_dim", "rows", "expected"), [(128, 1, 1), (128, 2, 2), (128, 3, 4), (64, 5, 8), (96, 24, 8), (256, 7, 4)]
)
def test_rows_per_block_mirror_the_kernel(head_dim, rows, expected):
    # csrc/rope_decode.cuh: decode_rows_for<D>(group * n_new); tests/cuda/test_ptxas.py checks each is compiled.
    assert launch._rows_per_block(head_dim, rows) == expected


def test_num_splits_from_capacity_and_sms(monkeypatch):
    monkeypatch.setattr(launch, "sm_count", lambda device: 132)
    device = torch.device("cuda", 0)
    assert launch._num_splits(8, 32768, device) == 50  # batch 1, 8 kv heads: 3 blocks per SM
    assert launch._num_splits(8, 1024, device) == 4  # >= 256 keys per split
    assert launch._num_splits(32, 131072, device) == 13
    assert launch._num_splits(396, 131072, device) == 1  # the batch alone fills the GPU


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_misaligned_cache_is_rejected(dtype):
    cache = torch.zeros(2, 2, 40, 64, dtype=dtype)
    launch._check_aligned_cache("k_cache", cache)  # whole
    launch._check_aligned_cache("k_cache", cache[1:, :, 3:])  # sliced along batch and token: still aligned
    with pytest.raises(ValueError, match=r"k_cache: .* 16-byte copies.*data_ptr % 16 = \d+"):
        launch._check_aligned_cache("k_cache", cache.flatten()[1 : 1 + 2 * 2 * 39 * 64].view(2, 2, 39, 64))
    step = 16 // cache.element_size()
    strided = torch.zeros(2, 2, 40, 64 + step // 2, dtype=dtype)[..., :64]  # token stride not a multiple of 16 bytes
    with pytest.raises(ValueError, match=rf"v_cache: .*multiples of {step} elements"):
        launch._check_aligned_cache("v_cache", strided)
