"""``lr2kernels.patch(model)``: fused rescaled-RoPE attention and a PRE-RoPE KV cache in a transformers model.

Instance-level and reversible. For the given model only:
1. its rotary module(s) return the identity rotation (cos 1, sin 0), so the attention layers keep q and k PRE-RoPE
   and the KV cache (DynamicCache, StaticCache, ...) stores PRE-RoPE keys;
2. its config selects the attention function :func:`lr2kernels.hf.attention.rope_attention_forward` (registered
   in transformers' ``AttentionInterface``), which rotates q and all keys with the table the sequence needs now;
3. Phi3-style models no longer drop their cache and re-prefill when generation crosses L0.

``unpatch`` restores all three exactly. transformers is imported inside the functions, never at package import.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import torch

from lr2kernels.hf.attention import ATTENTION_NAME, ForwardFacts
from lr2kernels.tables import RopeTable

# model_type -> whether its generate() re-prefills at the LongRoPE boundary (Phi3 does; patched models need not).
SUPPORTED_MODEL_TYPES: dict[str, bool] = {
    "llama": False,
    "mistral": False,
    "qwen2": False,
    "qwen3": False,
    "phi3": True,
}
_STATE = "_lr2_patch_state"


def _register_attention() -> str:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    from lr2kernels.hf.attention import rope_attention_forward

    # A new name in transformers' registries (not a change to any existing entry); masks built as for SDPA.
    AttentionInterface.register(ATTENTION_NAME, rope_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
    return ATTENTION_NAME


class _PatchState(dict):
    """What :func:`patch` replaced, for :func:`unpatch`. A dict that re-registers the attention function with
    transformers when a pickled patched model is loaded in a new process (the registry is per process)."""

    def __setstate__(self, state: dict) -> None:
        self.update(state)
        _register_attention()

    def __reduce__(self):
        return (_PatchState, (), dict(self))


def _identity_rotary_forward(module, x: torch.Tensor, position_ids: torch.Tensor, *args, **kwargs):
    """The patched rotary module's forward (bound with functools.partial, which pickles, unlike a bound method)."""
    if module._lr2_config._attn_implementation != ATTENTION_NAME:
        # The attention implementation was switched after patch() (e.g. set_attn_implementation("sdpa")): that
        # attention expects rotated q/k, so give it the stock rotation rather than run the model without RoPE.
        if not getattr(module, "_lr2_warned_switch", False):
            module._lr2_warned_switch = True
            warnings.warn(
                "lr2kernels: the model's attention implementation was changed after lr2kernels.patch(); it now runs "
                f"{module._lr2_config._attn_implementation!r} with stock RoPE (call lr2kernels.unpatch(model) or "
                "patch it again).",
                UserWarning,
                stacklevel=2,
            )
        return type(module).forward(module, x, position_ids, *args, **kwargs)
    # [B, L, rotary_dim] cos = 1, sin = 0: HF's apply_rotary_pos_emb becomes the identity (x * 1 + y * 0 == x).
    batch, seq = position_ids.shape[0], position_ids.shape[-1]
    width = module._lr2_rotary_width
    ones = torch.ones(1, 1, width, dtype=x.dtype, device=x.device).expand(batch, seq, width)
    return ones, torch.zeros_like(ones)


def _boundary_reprefill(model: torch.nn.Module):
    """The function that replaces Phi-3's boundary re-prefill in ``generate``, or None for a class without one.

    Phi3ForCausalLM's ``prepare_inputs_for_generation`` drops the cache when the sequence crosses L0 (its cached keys
    were rotated with the short table); the next definition up its MRO keeps the cache. Phi3Model and the
    classification heads have no such method of their own.
    """
    definers = [cls for cls in type(model).__mro__ if "prepare_inputs_for_generation" in vars(cls)]
    if len(definers) < 2 or not definers[0].__module__.endswith(".phi3.modeling_phi3"):
        return None
    return vars(definers[1])["prepare_inputs_for_generation"]


def _rotary_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if type(m).__name__.endswith("RotaryEmbedding")]


def _attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if type(m).__name__.endswith("Attention") and hasattr(m, "layer_idx")]


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
    model: torch.nn.Module, backend: str | None = None, table: RopeTable | None = None, rule: str = "hf"
) -> torch.nn.Module:
    """Run ``model``'s attention through lr2kernels with a PRE-RoPE KV cache. Idempotent; returns the model.

    Args:
        model: a transformers model whose ``config.model_type`` is in :data:`SUPPORTED_MODEL_TYPES`.
        backend: "torch", "triton", "cuda" or None (the best available for the model's device).
        table: the RoPE table to use; default ``RopeTable.from_hf_config(model.config)``. Swapping tables on a
            patched model (e.g. during a factor search) is ``patch(model, table=new_table)``.
        rule: which table a token uses. ``"hf"`` (default): transformers' rule, one table for the whole sequence
            (long iff it is longer than L0), so the patched model's logits equal the stock model's at every length;
            past L0 a cached step then differs slightly from a full forward in models of 2+ layers, because earlier
            tokens' hidden states were computed with the short table. ``"position"``: each token uses the table of
            its own position, so incremental decoding equals a full forward exactly, at every length; a full
            forward past L0 then differs from stock transformers' (which re-rotates the whole prefix).
    """
    if rule not in RULES:
        raise ValueError(f"rule: expected one of {list(RULES)}, got {rule!r}")
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"model.config.model_type: expected one of {sorted(SUPPORTED_MODEL_TYPES)}, got {model_type!r}"
        )
    table = _table_for(config) if table is None else table
    if not isinstance(table, RopeTable):
        raise TypeError(f"table: expected a lr2kernels.RopeTable or None, got {type(table).__name__}")
    model_rotary_dim = RopeTable.from_hf_config(config).rotary_dim
    if table.rotary_dim != model_rotary_dim:
        raise ValueError(
            f"table.rotary_dim: expected the model's rotary width {model_rotary_dim} (head_dim x "
            f"partial_rotary_factor), got {table.rotary_dim}"
        )
    rotary = _rotary_modules(model)
    attention = _attention_modules(model)
    if not rotary or not attention:
        raise ValueError(
            f"model: expected rotary-embedding and attention modules in a {model_type!r} model, found "
            f"{len(rotary)} and {len(attention)}"
        )
    head_dim = getattr(attention[0], "head_dim", None)
    if head_dim is not None and head_dim != table.head_dim:
        raise ValueError(f"table.head_dim: expected the model's head_dim {head_dim}, got {table.head_dim}")

    forward_facts = attention[0].__dict__.get("_lr2_forward_facts") or ForwardFacts()  # one per model
    for module in attention:
        module._lr2_table = table
        module._lr2_backend = backend
        module._lr2_rule = rule
        module._lr2_forward_facts = forward_facts
    if getattr(model, _STATE, None) is not None:
        return model  # already patched: table, backend and rule updated above

    name = _register_attention()
    state = _PatchState(attn_implementation=config._attn_implementation, rotary=rotary, attention=attention)
    for module in rotary:
        module._lr2_rotary_width = table.rotary_dim
        module._lr2_config = config
        module.forward = functools.partial(_identity_rotary_forward, module)
    config._attn_implementation = name
    keep_cache = _boundary_reprefill(model) if SUPPORTED_MODEL_TYPES[model_type] else None
    if keep_cache is not None:
        # Patched, the cache holds PRE-RoPE keys: the parent class's version, which keeps the cache, is right.
        model.prepare_inputs_for_generation = functools.partial(keep_cache, model)
        state["generation"] = True
    setattr(model, _STATE, state)
    return model


def unpatch(model: torch.nn.Module) -> torch.nn.Module:
    """Undo :func:`patch` exactly (a no-op on a model that is not patched). Returns the model."""
    state = getattr(model, _STATE, None)
    if state is None:
        return model
    for module in state["rotary"]:
        del module.forward  # the instance attribute hid the class's forward
        del module._lr2_rotary_width, module._lr2_config
        module.__dict__.pop("_lr2_warned_switch", None)
    for module in state["attention"]:
        del module._lr2_table, module._lr2_backend, module._lr2_rule, module._lr2_forward_facts
    model.config._attn_implementation = state["attn_implementation"]
    if state.get("generation"):
        del model.prepare_inputs_for_generation
    delattr(model, _STATE)
    return model


def is_patched(model: torch.nn.Module) -> bool:
    return getattr(model, _STATE, None) is not None
