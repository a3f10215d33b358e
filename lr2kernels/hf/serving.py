"""transformers' serving path (continuous batching on a paged KV cache) is refused on a patched model, loudly.

Continuous batching (``model.generate_batch``, ``model.init_continuous_batching``,
``model.continuous_batching_context_manager``, ``generate(cache_implementation="paged")``, and ``transformers serve
--continuous-batching``) flattens every request into one row and writes keys into a ``PagedAttentionCache``, which
a patched model's attention cannot place (it keeps PRE-RoPE keys and rotates each at its own position, known only
for the caches it tracks). Run as is, a patched model would return wrong tokens without a word, so until the paged
path is supported a patched model refuses it: the three entry points above raise on the instance (they are instance
attributes that :func:`lr2kernels.unpatch` removes), and so does any forward of a patched model that is given a cache
that is not a transformers ``Cache`` (the paged cache is not one), whoever builds it.
"""

from __future__ import annotations

from typing import Any

# The entry points of transformers' ContinuousMixin (generate(cache_implementation="paged") calls generate_batch).
CONTINUOUS_BATCHING_ENTRIES: tuple[str, ...] = (
    "generate_batch",
    "init_continuous_batching",
    "continuous_batching_context_manager",
)


def _how_to_proceed() -> str:
    return (
        "continuous batching (a paged KV cache) is not supported by lr2kernels yet. To proceed: call "
        "lr2kernels.unpatch(model) and run continuous batching with the stock attention, or keep the patch and use "
        "model.generate(...), which supports batches (with padding) through lr2kernels."
    )


def refuse_continuous_batching(model: Any, entry: str, *args: Any, **kwargs: Any) -> None:
    """A patched model's ``generate_batch``, ``init_continuous_batching`` and ``continuous_batching_context_manager``
    (installed on the instance with functools.partial, which pickles): raise."""
    raise NotImplementedError(
        f"{type(model).__name__}.{entry}(): this model is patched by lr2kernels.patch(), and {_how_to_proceed()}"
    )


def _cache_base_class() -> type | None:
    try:
        from transformers.cache_utils import Cache
    except ImportError:  # pragma: no cover - every supported transformers has it
        return None
    return Cache


def check_cache(model: Any, cache: Any) -> None:
    """Raise unless ``cache`` is None or a transformers ``Cache`` (DynamicCache, StaticCache, ...): a patched model
    tracks the positions of the keys only in those. The paged cache of continuous batching is refused here, at the
    start of the forward, before any layer writes to it."""
    if cache is None:
        return
    base = _cache_base_class()
    if base is None or isinstance(cache, base):
        return
    raise NotImplementedError(
        f"{type(model).__name__}.forward: got a {type(cache).__name__} as the KV cache, expected a transformers Cache "
        f"(DynamicCache, StaticCache, ...) or None. This model is patched by lr2kernels.patch(), and "
        f"{_how_to_proceed()}"
    )
