"""The package's layers, read from the source (every import, lazy ones inside functions included):

tables -> reference (ground truth, tests only) -> ops -> nn / hf -> search (-> train) -> apps.
Nothing below the apps imports them; no library layer imports the reference; ``import lr2kernels`` stays cheap.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lr2kernels"
APPS = "lr2kernels.apps"
ENTRY_POINT = "lr2kernels.__main__"  # `python -m lr2kernels`: runs the apps' command line, imported by nothing
REFERENCE = "lr2kernels.reference"
# Library layers that must run without the reference implementation (it is the tests' ground truth).
WITHOUT_REFERENCE = ("lr2kernels.ops", "lr2kernels.hf", "lr2kernels.nn", "lr2kernels.search", "lr2kernels.train")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str) -> bool:
    path = PACKAGE.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


MODULES = {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imported(module: str) -> set[str]:
    """The lr2kernels modules ``module`` imports anywhere in its source: ``from P import name`` counts as importing
    ``P.name`` when that is a module, else ``P`` itself (``from lr2kernels import RopeTable`` is the package root);
    ``importlib.import_module("...")`` with a literal name counts too."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                names.add(f"{source}.{alias.name}" if _is_module(f"{source}.{alias.name}") else source)
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", getattr(node.func, "id", None)) in ("import_module", "__import__")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            names.add(node.args[0].value)
    return {name for name in names if _within(name, "lr2kernels")}


def test_the_modules_are_found():
    assert {"lr2kernels.tables", "lr2kernels.reference", "lr2kernels.ops", "lr2kernels.hf.patch"} <= set(MODULES)
    assert "lr2kernels.apps.cli" in MODULES and "lr2kernels.apps.common" in MODULES
    # Lazy imports inside functions count; `from lr2kernels import x` is the module x, or the root for a name.
    assert imported("lr2kernels.apps.demo") >= {"lr2kernels", "lr2kernels.apps.common", "lr2kernels.hf.patch"}


@pytest.mark.parametrize("module", [m for m in MODULES if not _within(m, APPS) and m != ENTRY_POINT])
def test_nothing_below_the_apps_imports_them(module):
    assert not [name for name in imported(module) if _within(name, APPS)]


@pytest.mark.parametrize("module", [m for m in MODULES if any(_within(m, layer) for layer in WITHOUT_REFERENCE)])
def test_library_layers_do_not_import_the_reference(module):
    assert not [name for name in imported(module) if _within(name, REFERENCE)]


def test_the_reference_imports_only_the_tables():
    assert imported(REFERENCE) <= {"lr2kernels.tables"}


def test_the_tables_import_nothing_from_the_package():
    assert imported("lr2kernels.tables") == set()


def test_import_lr2kernels_imports_no_transformers_and_no_apps():
    code = (
        "import sys, lr2kernels; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] == 'transformers' or m.startswith('lr2kernels.apps')); "
        "assert not bad, bad"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


TRAIN = "lr2kernels.train"
BELOW_TRAIN = ("lr2kernels.tables", "lr2kernels.reference", "lr2kernels.ops", "lr2kernels.nn", "lr2kernels.hf",
               "lr2kernels.search")  # fmt: skip


@pytest.mark.parametrize("module", [m for m in MODULES if any(_within(m, layer) for layer in BELOW_TRAIN)])
def test_layers_below_training_do_not_import_it(module):
    assert not [name for name in imported(module) if _within(name, TRAIN)]
