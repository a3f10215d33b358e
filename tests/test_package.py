"""The package's front door: lazy public names, and a command line whose --help and --version load no torch."""

from __future__ import annotations

import importlib
import importlib.util
import subprocess
import sys

import pytest

import lr2kernels


def test_every_public_name_resolves_to_its_defining_module():
    for name in lr2kernels.__all__:
        value = getattr(lr2kernels, name)
        if name != "__version__":
            assert value is getattr(importlib.import_module(lr2kernels._EXPORTS[name]), name)
    assert set(lr2kernels.__all__) <= set(dir(lr2kernels))


def test_namespace_shows_only_the_api():
    # In a fresh process, after every public name and subpackage was touched: dir() lists exactly the API.
    code = (
        "import lr2kernels as l\n"
        "for n in [*l.__all__, *l._SUBPACKAGES]: getattr(l, n)\n"
        "print(' '.join(dir(l)))\n"
    )
    listed = set(_run(code).stdout.split())
    assert listed == {*lr2kernels.__all__, *lr2kernels._SUBPACKAGES}
    for helper in ("Any", "TYPE_CHECKING", "annotations", "importlib"):
        assert not hasattr(lr2kernels, helper), helper
    for name in lr2kernels._SUBPACKAGES:  # every subpackage listed exists
        assert importlib.util.find_spec(f"lr2kernels.{name}") is not None, name


def test_unknown_attribute_is_an_attribute_error():
    try:
        lr2kernels.no_such_name  # noqa: B018
    except AttributeError as error:
        assert "no_such_name" in str(error)
    else:
        raise AssertionError("expected an AttributeError")


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_version_and_help_import_no_torch():
    for flag in ("--version", "--help"):
        code = (
            "import sys\n"
            "from lr2kernels.apps.cli import main\n"
            f"try:\n    main([{flag!r}])\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules)\n"
        )
        result = _run(code)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip().splitlines()[-1] == "False", flag
    assert lr2kernels.__version__ in _run("from lr2kernels.apps.cli import main; main(['--version'])").stdout


@pytest.mark.parametrize(
    "module",
    [
        "lr2kernels.apps.search_job",
        "lr2kernels.apps.finetune_job",
        "lr2kernels.apps.demo",
        "lr2kernels.apps.bench.extension",
        "lr2kernels.apps.bench.training",
    ],  # fmt: skip
)
def test_every_command_option_has_help_text(module):
    import argparse
    import importlib

    parser = argparse.ArgumentParser()
    importlib.import_module(module).add_arguments(parser)
    silent = [action.option_strings for action in parser._actions if action.help in (None, "")]
    assert not silent


def test_info_says_why_a_backend_is_unavailable():
    from lr2kernels.apps.info import collect_info

    info = collect_info()
    for name in ("torch", "triton", "transformers", "numpy", "cuda_toolkit"):  # what a bug report needs
        assert info[name], name
    assert info["numpy"] == importlib.import_module("numpy").__version__
    assert "torch built with" in info["cuda_toolkit"] and "nvcc" in info["cuda_toolkit"]
    assert "torch" in info["backends"]
    for name in ("triton", "cuda"):
        assert (name in info["backends"]) != (name in info["unavailable"])
        assert info["unavailable"].get(name, "x")  # a reason, never empty
