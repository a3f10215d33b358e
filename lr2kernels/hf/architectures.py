"""What lr2kernels knows about each transformers architecture it patches: one row per ``model_type``, in one table.

Everything architecture-specific the patch needs is a field of :class:`Architecture`; the code in
:mod:`lr2kernels.hf.patch` reads the row and never branches on a model type. Supporting another RoPE decoder is one
row here (and its differential tests), provided its attention layers call transformers' attention interface with
RoPE'd q and k from a rotary module that owns ``forward(x, position_ids) -> (cos, sin)``.

What every supported architecture shares, and so is not a field: the rotary module is a child of the base model
(``LlamaModel`` ...), whose forward pre-hook plans each forward; attention layers carry ``layer_idx`` and read their
implementation from ``self.config``; ``apply_rotary_pos_emb`` lives in the modeling module (where transformers with
the ``kernels`` package gives each layer its own wrapper of it, lr2kernels finds the wrapper by that function);
partial rotary (Phi-3's ``partial_rotary_factor``) comes from the config through
:meth:`lr2kernels.tables.RopeTable.from_hf_config`.
"""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass(frozen=True)
class Architecture:
    """One supported architecture.

    Attributes:
        model_type: ``config.model_type``.
        modeling: transformers' modeling module of the architecture.
        rotary_class, attention_class: the class names of its rotary-embedding and attention modules (subclasses
            count).
        prepare_drops_cache: its own ``prepare_inputs_for_generation`` drops the KV cache when the padded length
            crosses L0 (Phi-3: stock re-runs the prefix there). A patched model decides that crossing by position
            instead (:func:`lr2kernels.hf.patch._prepare_inputs_for_generation`), so it calls the next definition up
            the MRO, which keeps the cache.
    """

    model_type: str
    modeling: str
    rotary_class: str
    attention_class: str
    prepare_drops_cache: bool = False

    def is_rotary(self, module: torch.nn.Module) -> bool:
        return any(cls.__name__ == self.rotary_class for cls in type(module).__mro__)

    def is_attention(self, module: torch.nn.Module) -> bool:
        return hasattr(module, "layer_idx") and any(
            cls.__name__ == self.attention_class for cls in type(module).__mro__
        )


def _row(model_type: str, prefix: str, **fields) -> Architecture:
    return Architecture(model_type, f"transformers.models.{model_type}.modeling_{model_type}",
                        f"{prefix}RotaryEmbedding", f"{prefix}Attention", **fields)  # fmt: skip


ARCHITECTURES: dict[str, Architecture] = {
    row.model_type: row
    for row in (
        _row("llama", "Llama"),
        _row("mistral", "Mistral"),
        _row("qwen2", "Qwen2"),
        _row("qwen3", "Qwen3"),
        _row("phi3", "Phi3", prepare_drops_cache=True),
    )
}

SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(ARCHITECTURES)
