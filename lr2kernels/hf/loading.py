"""``attn_implementation="lr2kernels"``: transformers' own way to ask for an attention, giving a patched model.

After ``import lr2kernels``, each of these gives exactly what :func:`lr2kernels.patch` gives on the stock model::

    AutoModelForCausalLM.from_pretrained(path, attn_implementation="lr2kernels")
    AutoModelForCausalLM.from_config(config, attn_implementation="lr2kernels")   # or Model(config) of such a config
    model.set_attn_implementation("lr2kernels")

Why not just the registered attention function: a patched model is more than its attention function. Its rotary
module returns the identity rotation (q and k reach the attention PRE-RoPE and the KV cache stores them so), its
attention layers get a private config, hooks record each forward's positions, and ``generate`` gets a wrapper. An
attention function alone would receive keys that transformers already rotated and rotate them again. So the name is
a request to patch the model, and :func:`install` adds two wrappers to ``PreTrainedModel`` (the only process-wide
changes, besides the name in transformers' attention and mask registries):

- ``post_init``, which every transformers model calls at the end of its ``__init__``, the one point that
  ``from_pretrained``, ``from_config`` and a plain constructor all pass once the modules exist (transformers 5.2x has
  no hook after loading). A model whose config asks for "lr2kernels" is patched there. Nothing in a patch touches
  the weights (``from_pretrained`` builds the model on the meta device and loads the weights afterwards; a patch
  only replaces forwards and sets attributes), so patching before the weights are loaded gives the same model as
  patching after. Models that do not ask are left as they are: the wrapper compares one string.
- ``set_attn_implementation``, which switches an existing model: "lr2kernels" patches it.

A ``LlamaForCausalLM`` builds its ``LlamaModel`` first, which calls ``post_init`` too, with the same config: the
inner model is patched first, then, when the outer one's ``post_init`` runs, unpatched and the outer one patched (a
patch belongs on the outermost model of a config: its ``generate`` is wrapped as well).

What the patched model's config says: its ``_attn_implementation`` becomes the one transformers would pick without
the request ("sdpa", else "eager"), exactly as on a model given to :func:`lr2kernels.patch` (which never changes
``model.config``). That implementation is the one lr2kernels falls back to (masks are built for it; "eager" gives
attention maps), every transformers code path that branches on the name (continuous batching, masks, generation)
sees what it sees for :func:`lr2kernels.patch`, and ``save_pretrained`` writes a config that any transformers loads,
with or without lr2kernels. :func:`lr2kernels.hf.is_patched` tells a patched model; :func:`lr2kernels.unpatch` gives
the stock model back, and ``set_attn_implementation("sdpa")`` or ``("eager")`` on a patched model changes that
fallback and keeps the patch (continuous batching switches implementations this way and back).
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from lr2kernels.hf.attention import ATTENTION_NAME
from lr2kernels.hf.patch import SUPPORTED_MODEL_TYPES, _register_attention, is_patched, patch, state_of, unpatch

_ORIGINALS: dict[str, Any] = {}  # the PreTrainedModel methods the wrappers call; empty until install()


def install() -> None:
    """Register "lr2kernels" with transformers and wrap ``PreTrainedModel.post_init`` and
    ``PreTrainedModel.set_attn_implementation`` (idempotent). Imports transformers."""
    if _ORIGINALS:
        return
    from transformers.modeling_utils import PreTrainedModel

    _register_attention()
    for name, wrapper in (("post_init", _post_init), ("set_attn_implementation", _set_attn_implementation)):
        original = vars(PreTrainedModel)[name]
        _ORIGINALS[name] = original
        # functools.wraps: the same name, qualname and docstring, so that help() and a pickle by reference (which
        # finds this very function at PreTrainedModel.<name>) see transformers' method.
        setattr(PreTrainedModel, name, functools.wraps(original)(wrapper))


def is_installed() -> bool:
    """Whether :func:`install` ran in this process."""
    return bool(_ORIGINALS)


def check_supported(model: Any) -> None:
    """Raise unless lr2kernels can patch ``model``'s architecture (names the model type and the supported ones)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f'attn_implementation="{ATTENTION_NAME}": {type(model).__name__} is a {model_type!r} model; lr2kernels '
            f"supports the model types {sorted(SUPPORTED_MODEL_TYPES)}"
        )


def _fallback_implementation(model: Any) -> str:
    """The implementation transformers picks when none is asked for: "sdpa" where the model supports it, else
    "eager"."""
    return model.get_correct_attn_implementation(None, is_init_check=True)


def _post_init(self, *args, **kwargs):
    result = _ORIGINALS["post_init"](self, *args, **kwargs)
    config = getattr(self, "config", None)
    asks = getattr(config, "_attn_implementation", None) == ATTENTION_NAME
    # An inner model of this config (the base model, a direct child) patched by its own post_init: the patch moves
    # up here. Found through the child's own patch state: nothing process-wide keeps track of patched models.
    inner = [m for m in self.children() if _patched_at_init(m) and getattr(m, "config", None) is config]
    if not asks and not (inner and getattr(config, "model_type", None) in SUPPORTED_MODEL_TYPES):
        return result
    check_supported(self)
    for module in inner:
        unpatch(module)
    if asks:
        config._attn_implementation = _fallback_implementation(self)
    # from_pretrained builds models under torch.device("meta"): the patch's few tensors (the CPU trig probe of
    # lr2kernels.tables.resolve_cpu_trig) must be real ones.
    with torch.device("cpu"):
        patch(self)
    state_of(self).patched_at_init = True
    return result


def _patched_at_init(module: Any) -> bool:
    state = state_of(module) if isinstance(module, torch.nn.Module) else None
    return state is not None and state.patched_at_init


def _set_attn_implementation(self, attn_implementation, *args, **kwargs):
    asked = attn_implementation.get("") if isinstance(attn_implementation, dict) else attn_implementation
    before = self.config._attn_implementation
    if asked == ATTENTION_NAME:
        check_supported(self)  # before transformers changes anything
    result = _ORIGINALS["set_attn_implementation"](self, attn_implementation, *args, **kwargs)
    if self.config._attn_implementation != ATTENTION_NAME:
        return result
    # Asked for: keep the implementation the model had as the fallback (see the module's docstring), and patch.
    self.config._attn_implementation = before if before != ATTENTION_NAME else _fallback_implementation(self)
    if not is_patched(self):  # a patched model keeps its table, backend and rule
        patch(self)
    return result
