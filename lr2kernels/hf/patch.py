"""``lr2kernels.patch(model)``: fused rescaled-RoPE attention and a PRE-RoPE KV cache in a transformers model.

Instance-level, all or nothing, and reversible. For the given model only:
1. its rotary module(s) return the identity rotation (cos 1, sin 0), so the attention layers keep q and k PRE-RoPE
   and the KV cache (DynamicCache, StaticCache, sliding, paged, ...) stores PRE-RoPE keys;
2. its attention layers get a private copy of the config that selects
   :func:`lr2kernels.hf.attention.rope_attention_forward` (registered in transformers' ``AttentionInterface``), which
   rotates q and every key at its own position; ``model.config`` itself is never changed;
3. hooks on the base model record each forward's positions (:mod:`lr2kernels.hf.positions`) and make the forward's
   plan (:mod:`lr2kernels.hf.plan`), once, before any layer runs;
4. ``generate`` re-runs the sequence at the L0 crossing under ``rule="hf"`` (every architecture, decided by
   position), and keeps its cache under ``rule="position"``;
5. continuous batching (``generate_batch``, ``init_continuous_batching``, ``transformers serve
   --continuous-batching``) runs on the same attention: the paged cache stores PRE-RoPE keys and each flattened
   batch is routed per request to the fused varlen prefill and decode kernels (:mod:`lr2kernels.hf.serving`).

Where the state lives. A patch is one :class:`PatchedModel`, held in one place: the model's ``_lr2_patch_state``
attribute. It holds the settings (table, backend, rule, rotated-key option), the architecture's row
(:mod:`lr2kernels.hf.architectures`), the forward tracker and the running forward's plan, and everything
:func:`unpatch` restores. The model's own modules reach it through one reference each and nothing else: attention
layers through ``_lr2_patch`` (transformers passes the attention function the layer, not the model), the rotary
modules and the ``generate`` wrapper through the ``functools.partial`` that replaced their method, the base model's
hooks through bound methods of the state. What a layer does in a forward is decided by the plan (tables, routes,
lengths: :mod:`lr2kernels.hf.plan`), the layer only runs it. Outside the model the patch keeps data about the caches
the model writes, on the caches themselves: each cache's key positions (``_lr2_ledger``, :mod:`~.positions`) and, for
CPU decoding, each cache layer's rotated-key copy (``_lr2_rotated_keys``, :mod:`~.rotated_keys`); they travel with
the cache (copied, pickled) and mean nothing to a stock model. On that CPU path the cache layers also become
:class:`~.appending_layer.AppendingDynamicLayer` (buffers with growth room, ``_lr2_kv_room``), which give the same
keys and values as ``DynamicLayer`` and copy back to plain ones. Where an attention layer owns a private
``apply_rotary_pos_emb`` wrapper (transformers with ``kernels``, see :func:`_rotation_wrapper`), that layer's
wrapper skips the identity rotation, recognising the identity cos that the patched rotary module marks
(``_lr2_identity_rotation``, on a tensor the patch itself creates at each forward).

What is process-wide, and why each is acceptable (none of it is state of a model, and none refers to one):
- the name "lr2kernels" in transformers' ``AttentionInterface`` and ``AttentionMaskInterface`` (registered by the
  first patch, or at transformers' load for ``attn_implementation="lr2kernels"``; a pickled patched model registers
  it again in a new process): a name in a registry, looked up only by a config that names it. It stays after
  ``unpatch``, as a registered name stays in any registry; a config copied from a patched layer that reaches it
  on an unpatched module runs stock SDPA (:func:`lr2kernels.hf.attention._unpatched`).
- with ``import lr2kernels`` (not with a patch): a finder on ``sys.meta_path`` until ``transformers.modeling_utils``
  loads (:mod:`lr2kernels._transformers_hook`), then wrappers of ``PreTrainedModel.post_init`` and
  ``set_attn_implementation`` (:mod:`lr2kernels.hf.loading`) that act only on a model whose config asks for
  "lr2kernels" (one string comparison otherwise; they keep no list of models, a patch made there is marked on its own
  state). They are how transformers' own ``attn_implementation`` argument reaches lr2kernels, so they belong to the
  import, not to a patch, and ``unpatch`` leaves them.
- caches of what was imported or probed once (transformers' output-collector variable and ``DynamicLayer`` class,
  the CPU trigonometry choice of :func:`lr2kernels.tables.resolve_cpu_trig`) and the set of one-time warnings
  already given: facts about the process, the same for every model.
transformers' modeling modules and functions are left as they are, so pickling and deep-copying work for patched and
stock models alike, before, during and after a patch. transformers is imported inside the functions, never at
package import.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import sys
import types
import warnings
from typing import Any

import torch

from lr2kernels.hf.architectures import ARCHITECTURES, SUPPORTED_MODEL_TYPES, Architecture
from lr2kernels.hf.attention import ATTENTION_NAME
from lr2kernels.hf.plan import ForwardPlan, make_plan
from lr2kernels.hf.positions import ForwardTracker, newest_cached_position
from lr2kernels.tables import RopeTable, resolve_cpu_trig

_STATE = "_lr2_patch_state"  # on the patched model: its PatchedModel
_LAYER = "_lr2_patch"  # on each of its attention layers: the same PatchedModel (the one way in from a layer)


def _register_attention() -> str:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    from lr2kernels.hf.attention import rope_attention_forward

    # A new name in transformers' registries (not a change to any existing entry); masks built as for SDPA.
    AttentionInterface.register(ATTENTION_NAME, rope_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
    return ATTENTION_NAME


@dataclasses.dataclass(eq=False)
class PatchedModel:
    """Everything a patch is, for one patched model: held in ONE place, the model's ``_lr2_patch_state`` attribute.

    Its attention layers reach it through one reference each (``_lr2_patch``: transformers hands the attention
    function the layer, not the model), its rotary modules and ``generate`` wrapper through the ``functools.partial``
    that replaced their method. Nothing of it is copied per layer: ``patch(model, table=...)`` changes it here, once.
    It pickles and deep-copies with the model (the references inside are the model's own modules, so a copy is an
    independent patched model); loading it in a new process registers the attention name there (the registry is per
    process).

    Attributes:
        table, backend, rule, rotated_key_cache: the settings of :func:`patch`.
        config: the model's own config (never changed; the layers get it back at :func:`unpatch`).
        arch: the architecture's row of :data:`lr2kernels.hf.architectures.ARCHITECTURES`.
        attention_config: the attention layers' private copy of it, naming :data:`ATTENTION_NAME`.
        tracker: the base model's hooks record each forward's facts (positions) here.
        plan: the running forward's :class:`lr2kernels.hf.plan.ForwardPlan`, made from those facts and the settings
            by the base model's pre-hook (:meth:`begin_forward`), once per forward; the attention layers run it.
        rotary, attention, hooks, rotation_wrappers, prepare: what :func:`unpatch` restores (filled as they are
            applied, so that a patch that fails half-way is undone exactly).
    """

    table: RopeTable
    backend: str | None
    rule: str
    rotated_key_cache: bool
    config: Any
    arch: Architecture
    attention_config: Any = None
    tracker: ForwardTracker = dataclasses.field(default_factory=ForwardTracker)
    rotary: list = dataclasses.field(default_factory=list)
    attention: list = dataclasses.field(default_factory=list)
    hooks: list = dataclasses.field(default_factory=list)
    rotation_wrappers: list = dataclasses.field(default_factory=list)
    prepare: Any = None  # the class's prepare_inputs_for_generation that generate() calls through the wrapper
    warned_switch: bool = False  # the attention implementation was switched after the patch (warned once)
    patched_at_init: bool = False  # by attn_implementation="lr2kernels" at post_init (lr2kernels.hf.loading)
    plan: ForwardPlan | None = None  # the running forward's plan (made by begin_forward; the layers run it)

    def begin_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        """Forward pre-hook of the base model: this forward's facts (positions), then its plan, once."""
        self.tracker.begin_forward(module, args, kwargs)
        facts = self.tracker.facts
        self.plan = None if facts is None else make_plan(self, facts)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "plan": None}  # a forward's plan does not outlive it (nor travel: weak references)

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        _register_attention()


def state_of(model: torch.nn.Module) -> PatchedModel | None:
    """The :class:`PatchedModel` of a patched model (its table, backend, rule, ...); None for a stock model."""
    return getattr(model, _STATE, None)


def _identity_rotary_forward(state: PatchedModel, module, x: torch.Tensor, position_ids: torch.Tensor, *args, **kwargs):
    """The patched rotary module's forward (bound with functools.partial, which pickles, unlike a bound method)."""
    implementation = state.attention_config._attn_implementation
    if implementation != ATTENTION_NAME:
        # The attention implementation was switched after patch() (e.g. set_attn_implementation("sdpa")): that
        # attention expects rotated q/k, so give it the stock rotation rather than run the model without RoPE.
        if not state.warned_switch:
            state.warned_switch = True
            warnings.warn(
                "lr2kernels: the model's attention implementation was changed after lr2kernels.patch(); it now runs "
                f"{implementation!r} with stock RoPE (call lr2kernels.unpatch(model) or "
                "patch it again).",
                UserWarning,
                stacklevel=2,
            )
        return type(module).forward(module, x, position_ids, *args, **kwargs)
    # [B, L, rotary_dim] cos = 1, sin = 0: HF's apply_rotary_pos_emb becomes the identity (x * 1 + y * 0 == x),
    # and is skipped altogether by a layer's own wrapper (_skip_identity_forward; the mark says which cos this is).
    batch, seq = position_ids.shape[0], position_ids.shape[-1]
    width = state.table.rotary_dim
    ones = torch.ones(1, 1, width, dtype=x.dtype, device=x.device).expand(batch, seq, width)
    ones._lr2_identity_rotation = True
    return ones, torch.zeros_like(ones)


def _skip_identity_forward(wrapper: torch.nn.Module, q, k, cos, sin, *args, **kwargs):
    """A patched attention layer's own ``apply_rotary_pos_emb`` (bound to its private kernel wrapper with
    ``types.MethodType``, which the wrapper's pickle and deepcopy support): q and k as they are for a patched rotary
    module's identity cos, instead of ``q * 1 + rotate_half(q) * 0`` (ten passes over q and k per layer that a decode
    step on the CPU would pay for nothing); the stock rotation for any other cos."""
    if getattr(cos, "_lr2_identity_rotation", False):
        return q, k  # the identity rotation, exactly (x * 1 + y * 0 == x for every finite x)
    return type(wrapper).forward(wrapper, q, k, cos, sin, *args, **kwargs)


def _rotation_wrapper(attention: torch.nn.Module) -> torch.nn.Module | None:
    """The attention layer's private ``apply_rotary_pos_emb`` wrapper, or None where it has none.

    transformers builds the Llama, Mistral, Qwen2 and Qwen3 attention classes with
    ``use_kernelized_func(apply_rotary_pos_emb)``; where the ``kernels`` package is installed (a dependency of
    transformers since 5.25), each layer instance owns a wrapper module (``_kernel_funcs``) that the module-level
    ``apply_rotary_pos_emb`` dispatches to while that layer's forward runs, and whose ``forward``
    ``kernels.kernelize`` replaces per instance. lr2kernels replaces it the same way, on this layer only. A wrapper
    that already has an instance forward (kernelized) is left to its kernel. Phi-3 (5.25) and installs without
    ``kernels`` have no wrapper: the identity rotation is then computed, exactly (about 20 small ops per layer).
    """
    function = getattr(sys.modules.get(type(attention).__module__), "apply_rotary_pos_emb", None)
    # The key kernels files it under: the function's name, or (a function made a module) its kernel layer name.
    name = getattr(function, "__name__", None) or getattr(function, "kernel_layer_name", None)
    wrapper = getattr(attention, "_kernel_funcs", {}).get(name) if name else None
    if type(wrapper) is not type(function) or not isinstance(wrapper, torch.nn.Module) or "forward" in vars(wrapper):
        return None
    return wrapper


def _keep_cache_prepare(model: torch.nn.Module, arch: Architecture):
    """The ``prepare_inputs_for_generation`` that keeps the cache: the class's own, or where the architecture's own
    drops the cache at L0 by the padded length (``Architecture.prepare_drops_cache``: Phi-3) the next definition up
    its MRO. None for a model that cannot generate."""
    definers = [cls for cls in type(model).__mro__ if "prepare_inputs_for_generation" in vars(cls)]
    if not definers:
        return None
    if arch.prepare_drops_cache and definers[0].__module__ == arch.modeling and len(definers) > 1:
        return vars(definers[1])["prepare_inputs_for_generation"]
    return vars(definers[0])["prepare_inputs_for_generation"]


def _table_switches(table: RopeTable) -> bool:
    return table.factors(False) != table.factors(True) or (
        table.attention_factor_for(False) != table.attention_factor_for(True)
    )


def _prepare_inputs_for_generation(model: torch.nn.Module, input_ids: torch.Tensor, *args, **kwargs):
    """``generate``'s per-step input preparation on a patched model (bound with functools.partial).

    Under ``rule="hf"``, the step where the sequence crosses L0 runs the whole sequence again with the long table,
    as stock Phi-3 does, so every generated token equals what a full forward over the sequence gives (stock
    transformers re-prefills only Phi-3; Llama-type LongRoPE models drift there). Unlike stock Phi-3 the crossing is
    decided by position (max position + 1 > L0, the full forward's rule), not by the padded length. Under
    ``rule="position"`` the cache is kept: one cached step crosses L0.
    """
    state: PatchedModel = getattr(model, _STATE)
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    table, rule = state.table, state.rule
    if rule == "hf" and cache is not None and _table_switches(table):
        cached = newest_cached_position(cache)  # None: nothing cached (or not by this model): nothing to re-run
        if cached is not None:
            newest = cached + (input_ids.shape[1] - cache.get_seq_length())  # generate advances positions by 1
            if not table.use_long(cached + 1) and table.use_long(newest + 1):
                cache.reset()  # the next forward runs the whole sequence, with the long table
                kwargs["next_sequence_length"] = None
    return state.prepare(model, input_ids, *args, **kwargs)


def _rotary_modules(model: torch.nn.Module, arch: Architecture) -> list[torch.nn.Module]:
    return [m for m in model.modules() if arch.is_rotary(m)]


def _attention_modules(model: torch.nn.Module, arch: Architecture) -> list[torch.nn.Module]:
    return [m for m in model.modules() if arch.is_attention(m)]


def _table_for(config: Any) -> RopeTable:
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type")) == "dynamic":
        raise ValueError(
            "model.config.rope_parameters['rope_type']: 'dynamic' rescales with the current length at every step; "
            "expected a fixed table (default, linear, yarn, llama3 or longrope)"
        )
    try:
        return RopeTable.from_hf_config(config)
    except (ValueError, TypeError) as error:
        raise ValueError(f"model.config: its RoPE parameters cannot be used: {error}") from error


RULES = ("hf", "position")


def patch(
    model: torch.nn.Module,
    backend: str | None = None,
    table: RopeTable | None = None,
    rule: str = "hf",
    rotated_key_cache: bool = True,
) -> torch.nn.Module:
    """Run ``model``'s attention through lr2kernels with a PRE-RoPE KV cache. Idempotent; returns the model.

    Args:
        model: a transformers model whose ``config.model_type`` is in :data:`SUPPORTED_MODEL_TYPES`.
        backend: "torch", "triton", "cuda" or None (the best available for the model's device).
        table: the RoPE table to use; default ``RopeTable.from_hf_config(model.config)``. Swapping tables on a
            patched model (e.g. during a factor search) is ``patch(model, table=new_table)``.
        rule: which table a token uses. ``"hf"`` (default): transformers' rule, one table for the whole sequence
            (long iff it is longer than L0), so the patched model's logits equal the stock model's at every length,
            and ``generate`` runs the sequence once more at the L0 crossing (as stock Phi-3 does), so every generated
            token equals what a full forward gives. ``"position"``: each token uses the table of its own position,
            so incremental decoding equals its own full forward exactly and crossing L0 is one cached step; past L0
            it then differs from stock transformers (which re-rotates the whole prefix): the README gives the cost.
        rotated_key_cache: where decoding runs on the torch backend (the CPU), keep a rotated copy of each cache
            layer's keys, so that a step rotates only its new keys instead of the whole cache (the same numbers,
            bit for bit; one more key tensor per layer: +50% KV cache memory). False: rotate the whole cache at
            every step. The fused GPU kernels rotate as they read and keep no copy either way.
    """
    if rule not in RULES:
        raise ValueError(f"rule: expected one of {list(RULES)}, got {rule!r}")
    if not isinstance(rotated_key_cache, bool):
        raise TypeError(f"rotated_key_cache: expected a bool, got {type(rotated_key_cache).__name__}")
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"model.config.model_type: expected one of {sorted(SUPPORTED_MODEL_TYPES)}, got {model_type!r}"
        )
    resolve_cpu_trig()  # before any forward of this process computes RoPE on the CPU (stock ones included)
    table = _table_for(config) if table is None else table
    if not isinstance(table, RopeTable):
        raise TypeError(f"table: expected a lr2kernels.RopeTable or None, got {type(table).__name__}")
    model_rotary_dim = RopeTable.from_hf_config(config).rotary_dim
    if table.rotary_dim != model_rotary_dim:
        raise ValueError(
            f"table.rotary_dim: expected the model's rotary width {model_rotary_dim} (head_dim x "
            f"partial_rotary_factor), got {table.rotary_dim}"
        )
    arch = ARCHITECTURES[model_type]
    rotary = _rotary_modules(model, arch)
    attention = _attention_modules(model, arch)
    if not rotary or not attention:
        raise ValueError(
            f"model: expected rotary-embedding and attention modules in a {model_type!r} model, found "
            f"{len(rotary)} and {len(attention)}"
        )
    head_dim = getattr(attention[0], "head_dim", None)
    if head_dim is not None and head_dim != table.head_dim:
        raise ValueError(f"table.head_dim: expected the model's head_dim {head_dim}, got {table.head_dim}")

    state: PatchedModel | None = getattr(model, _STATE, None)
    if state is not None:  # already patched: its settings change, in their one place
        state.table, state.backend, state.rule, state.rotated_key_cache = table, backend, rule, rotated_key_cache
        return model
    try:
        _apply(model, PatchedModel(table, backend, rule, rotated_key_cache, config, arch), rotary, attention)
    except BaseException:
        unpatch(model)  # all or nothing: undo whatever was applied
        raise
    return model


def _base_models(model: torch.nn.Module, rotary: list[torch.nn.Module]) -> list[torch.nn.Module]:
    """The modules that own a rotary module (``LlamaModel`` ...): they compute the positions of a forward."""
    rotary_ids = {id(m) for m in rotary}
    return [m for m in model.modules() if any(id(child) in rotary_ids for child in m.children())]


def _apply(model, state: PatchedModel, rotary, attention) -> None:
    """Every change :func:`patch` makes, each recorded in the state first so that :func:`unpatch` can undo a part."""
    name = _register_attention()
    setattr(model, _STATE, state)
    # The attention layers read their implementation from their config. They get a private copy that names ours, so
    # the model's config (which other models may share, and which save_pretrained writes) is never changed.
    state.attention_config = copy.copy(state.config)
    state.attention_config._attn_implementation = name
    for module in attention:
        state.attention.append(module)
        rotation = _rotation_wrapper(module)
        if rotation is not None:  # this layer's own apply_rotary_pos_emb skips the identity rotation
            state.rotation_wrappers.append(rotation)
            rotation.forward = types.MethodType(_skip_identity_forward, rotation)
        module.config = state.attention_config
        setattr(module, _LAYER, state)
    for module in rotary:
        state.rotary.append(module)
        module.forward = functools.partial(_identity_rotary_forward, state, module)
    for base in _base_models(model, rotary):
        state.hooks.append(base.register_forward_pre_hook(state.begin_forward, with_kwargs=True))
        state.hooks.append(base.register_forward_hook(state.tracker.end_forward, with_kwargs=True))
    prepare = _keep_cache_prepare(model, state.arch)
    if prepare is not None:
        state.prepare = prepare
        wrapper = functools.partial(_prepare_inputs_for_generation, model)
        # generate() reads this signature to decide what it may pass (e.g. ``inputs_embeds``): keep the original's.
        wrapper.__signature__ = inspect.signature(functools.partial(prepare, model))
        model.prepare_inputs_for_generation = wrapper


def unpatch(model: torch.nn.Module) -> torch.nn.Module:
    """Undo :func:`patch` exactly (a no-op on a model that is not patched). Returns the model."""
    state: PatchedModel | None = getattr(model, _STATE, None)
    if state is None:
        return model
    for handle in state.hooks:
        handle.remove()
    for module in state.rotary:
        module.__dict__.pop("forward", None)  # the instance attribute hid the class's forward
    for wrapper in state.rotation_wrappers:
        if getattr(vars(wrapper).get("forward"), "__func__", None) is _skip_identity_forward:  # not a later kernel's
            del wrapper.forward
    for module in state.attention:
        module.config = state.config
        module.__dict__.pop(_LAYER, None)
    model.__dict__.pop("prepare_inputs_for_generation", None)
    delattr(model, _STATE)
    return model


def is_patched(model: torch.nn.Module) -> bool:
    return getattr(model, _STATE, None) is not None
