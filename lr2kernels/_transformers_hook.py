"""When transformers loads its models' base module, make ``attn_implementation="lr2kernels"`` known to it.

``import lr2kernels`` calls :func:`install`. transformers checks an ``attn_implementation`` name against its registry
as a model is built, so the name must be registered before any model is, yet ``import lr2kernels`` must not import
transformers (or torch). So: if ``transformers.modeling_utils`` is already loaded, :mod:`lr2kernels.hf.loading` is
installed now; otherwise a finder at the front of ``sys.meta_path`` waits for that one module, lets the normal
finders find and load it, installs :mod:`lr2kernels.hf.loading` once the module has run, and removes itself. Every
other import passes through it untouched (one string comparison). This module imports only the standard library.
"""

from __future__ import annotations

import importlib.abc
import sys
import warnings
from types import ModuleType

TARGET = "transformers.modeling_utils"  # where PreTrainedModel and the AttentionInterface registry live


def install() -> None:
    """Install lr2kernels' ``attn_implementation`` now if transformers' models are loaded, else when they load."""
    module = sys.modules.get(TARGET)
    if module is not None:
        _loaded(module)
    elif not any(isinstance(finder, _Finder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _Finder())


def _loaded(module: ModuleType) -> None:
    """transformers.modeling_utils has run: install. A failure here must not break ``import transformers`` for a
    user who never asks for lr2kernels, so it is a warning (the name is then unknown to transformers, which says so
    when it is asked for)."""
    try:
        from lr2kernels.hf import loading

        loading.install()
    except Exception as error:  # noqa: BLE001 - reported, see above
        warnings.warn(
            f"lr2kernels: attn_implementation='lr2kernels' is unavailable in this process: the integration with "
            f"transformers failed to install ({type(error).__name__}: {error}). lr2kernels.patch(model) may still "
            "work.",
            RuntimeWarning,
            stacklevel=2,
        )


class _Finder(importlib.abc.MetaPathFinder):
    """Finds nothing itself: for :data:`TARGET` only, it asks the finders after it and wraps the loader they give."""

    def find_spec(self, fullname, path, target=None):
        if fullname != TARGET:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec  # a loader this cannot wrap: transformers loads as usual, without the name
        spec.loader = _Loader(spec.loader, self)
        return spec


class _Loader(importlib.abc.Loader):
    """The real loader, then :func:`_loaded`; the module keeps the real loader as its ``__loader__``."""

    def __init__(self, loader, finder: _Finder) -> None:
        self.loader, self.finder = loader, finder

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        try:
            self.loader.exec_module(module)
        finally:  # the module as the normal import leaves it (inspect, reload and pickling read its loader)
            module.__loader__ = self.loader
            if module.__spec__ is not None:
                module.__spec__.loader = self.loader
        if self.finder in sys.meta_path:
            sys.meta_path.remove(self.finder)
        _loaded(module)
