"""The package's front door: lazy public names, and a command line whose --help and --version load no torch."""

from __future__ import annotations

import importlib
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
    assert "torch" in info["backends"]
    for name in ("triton", "cuda"):
        assert (name in info["backends"]) != (name in info["unavailable"])
        assert info["unavailable"].get(name, "x")  # a reason, never empty
