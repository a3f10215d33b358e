"""pytest plugin: every transformers model of a supported architecture is patched by lr2kernels right after it is
built, so that transformers' own model test suites run against patched models.

Load it with ``-p lr2_patch_plugin`` (this folder on ``PYTHONPATH``); ``LR2_SUITE_RULE`` picks the rule ("hf" by
default). A model is patched once, as a whole: a base model built inside another model's ``__init__`` (the
``LlamaModel`` of a ``LlamaForCausalLM``) is left to its owner. ``from_pretrained``, ``from_config`` and plain
construction all end in ``post_init``, which is where the patch is applied.

The terminal summary says how many models were patched: a run that patched none compared nothing.
"""

from __future__ import annotations

import collections
import inspect
import os

import torch
import transformers

import lr2kernels as lr2
from lr2kernels.hf.patch import SUPPORTED_MODEL_TYPES

RULE = os.environ.get("LR2_SUITE_RULE", "hf")
PATCHED: collections.Counter[str] = collections.Counter()
_stock_post_init = transformers.PreTrainedModel.post_init


def _built_inside_another_model(model: torch.nn.Module) -> bool:
    """Whether ``model`` is being built by an enclosing module's ``__init__`` (a submodule of a model)."""
    frame = inspect.currentframe()
    while frame is not None:
        owner = frame.f_locals.get("self") if frame.f_code.co_name == "__init__" else None
        if owner is not None and owner is not model and isinstance(owner, torch.nn.Module):
            return True
        frame = frame.f_back
    return False


def _post_init_then_patch(self) -> None:
    _stock_post_init(self)
    if getattr(self.config, "model_type", None) in SUPPORTED_MODEL_TYPES and not _built_inside_another_model(self):
        lr2.patch(self, rule=RULE)
        PATCHED[type(self).__name__] += 1


def pytest_configure(config) -> None:
    transformers.PreTrainedModel.post_init = _post_init_then_patch


def pytest_unconfigure(config) -> None:
    transformers.PreTrainedModel.post_init = _stock_post_init


def pytest_terminal_summary(terminalreporter) -> None:
    total = sum(PATCHED.values())
    classes = ", ".join(f"{name} x{count}" for name, count in PATCHED.most_common())
    terminalreporter.write_line(f"lr2kernels: patched {total} models (rule={RULE!r}): {classes or 'none'}")
