"""The extension lr2kernels._cuda (when this install built it) imports on a machine without a GPU, the "cuda"
backend then reports itself unavailable with a reason, and dispatch never picks it for CPU tensors.
Importing lr2kernels never loads the extension; a stale one (built from other sources) is reported, never used.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import types

import pytest
import torch

import lr2kernels as lr2
from lr2kernels.ops import dispatch
from lr2kernels.ops.calls import CallSpec
from lr2kernels.ops.cuda import BACKEND, build, jit, launch
from tests.cuda.helpers import ROOT

# A current extension (installed, or a cached build of these sources); a stale in-tree one does not count.
EXTENSION, NOT_LOADED = launch.load_extension()
BUILT = EXTENSION is not None
requires_extension = pytest.mark.skipif(not BUILT, reason=f"no current lr2kernels._cuda here: {NOT_LOADED}")
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
    assert module.BINDINGS_VERSION == launch.BINDINGS_VERSION
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


# In a child process: the installed extension hidden, an empty build cache, no build on first use.
_NOT_BUILT = textwrap.dedent("""
    import sys
    class Hide:
        def find_spec(self, name, path=None, target=None):
            if name == "lr2kernels._cuda":
                raise ImportError("hidden by the test")
    sys.meta_path.insert(0, Hide())
    from lr2kernels.ops.cuda import BACKEND, launch
    ok, reason = BACKEND.is_available()
    print("AVAILABLE", ok, reason)
    try:
        launch.extension()
    except RuntimeError as error:
        print("RAISED", error)
""")


def test_missing_extension_is_reported_cleanly(tmp_path):
    """Also where this machine has an installed extension or a build cache (both hidden from the child)."""
    env = {**os.environ, "LR2KERNELS_CACHE_DIR": str(tmp_path)}
    env.pop("LR2_CUDA_JIT", None)
    result = subprocess.run([sys.executable, "-c", _NOT_BUILT], env=env, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines())
    assert lines["AVAILABLE"].startswith("False ") and "LR2_BUILD_CUDA=1" in lines["AVAILABLE"]
    assert "is not built (hidden by the test)" in lines["RAISED"]


def _fake_extension(**attributes) -> types.ModuleType:
    module = types.ModuleType("lr2kernels._cuda")
    module.__file__ = "/somewhere/lr2kernels/_cuda.so"
    module.__dict__.update(attributes)
    return module


@pytest.mark.parametrize(
    ("attributes", "expected"),
    [
        ({}, "its bindings are version 1, and this lr2kernels calls version 2"),  # built before the version existed
        ({"BINDINGS_VERSION": 1}, "its bindings are version 1"),
        (
            {"BINDINGS_VERSION": launch.BINDINGS_VERSION, "SOURCES_DIGEST": "0123456789abcdef"},
            "it was built from other CUDA sources",
        ),  # fmt: skip
        ({"BINDINGS_VERSION": launch.BINDINGS_VERSION, "SOURCES_DIGEST": "current"}, None),
        ({"BINDINGS_VERSION": launch.BINDINGS_VERSION, "SOURCES_DIGEST": ""}, None),  # a build that recorded none
    ],
)
def test_a_stale_extension_is_reported_and_not_loaded(monkeypatch, tmp_path, attributes, expected):
    """An importable lr2kernels._cuda built with other bindings or from other sources (an in-tree build left from
    before a change of csrc/) is not used: load_extension says why and how to rebuild, and the module leaves
    sys.modules; a current one loads."""
    if attributes.get("SOURCES_DIGEST") == "current":
        attributes["SOURCES_DIGEST"] = build.sources_digest(jit.sources_dir())
    fake = _fake_extension(**attributes)
    monkeypatch.setitem(sys.modules, "lr2kernels._cuda", fake)
    monkeypatch.setenv("LR2KERNELS_CACHE_DIR", str(tmp_path))  # no cached build to fall back on
    monkeypatch.delenv("LR2_CUDA_JIT", raising=False)
    launch.load_extension.cache_clear()
    try:
        module, reason = launch.load_extension()
        if expected is None:
            assert module is fake and reason == ""
        else:
            assert module is None and sys.modules.get("lr2kernels._cuda") is not fake
            assert f"{fake.__file__} is stale, not used: {expected}" in reason and "LR2_BUILD_CUDA=1" in reason
    finally:
        launch.load_extension.cache_clear()


def test_sources_digest_follows_the_sources(tmp_path):
    """The digest a build embeds changes with any source file's name or contents, and only with those."""
    for name in ("a.cu", "b.cuh", "c.h", "d.cpp", "README.md"):
        (tmp_path / name).write_text(name)
    first = build.sources_digest(tmp_path)
    (tmp_path / "README.md").write_text("changed")
    assert build.sources_digest(tmp_path) == first  # not a source
    (tmp_path / "b.cuh").write_text("changed")
    assert build.sources_digest(tmp_path) != first
    assert build.digest_define(tmp_path) == ("LR2_SOURCES_DIGEST", f'"{build.sources_digest(tmp_path)}"')


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
    assert launch._num_splits(8, 32768, device, 2) == 33  # fp16/bf16 head 256 at 4 rows: 2 blocks per SM resident


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


@pytest.mark.parametrize(
    ("dtype", "head_dim", "rows", "block_size", "tile"),
    [
        (torch.bfloat16, 128, 1, 16, None),  # tiles of 16: blocks of 16 fit
        (torch.float16, 64, 1, 16, 32),  # tiles of 32
        (torch.float32, 128, 1, 256, None),
        (torch.bfloat16, 256, 4, 8, None),  # head 256: tiles of 8
        (torch.float16, 128, 8, 48, None),  # not a power of two: fits (the kernel divides)
        (torch.float16, 64, 2, 40, 32),
    ],
)
def test_paged_block_size_must_hold_whole_key_tiles(dtype, head_dim, rows, block_size, tile):
    """The CUDA launcher refuses a paged cache whose block_size is not a multiple of the kernel's key tile (a tile
    is read from one block), with a ValueError naming the tile and what works; tests/cuda/test_host_math.py checks
    decode_key_tile against the kernel's own DecodeShape."""
    if tile is None:
        launch._check_block_size(block_size, dtype, head_dim, rows)
    else:
        with pytest.raises(ValueError, match=rf"multiple of {tile}; got block_size {block_size}.*multiple of 32"):
            launch._check_block_size(block_size, dtype, head_dim, rows)
