"""Hugging Face transformers integration: ``patch`` / ``unpatch`` (transformers is imported only when used)."""

from lr2kernels.hf.patch import SUPPORTED_MODEL_TYPES, PatchedModel, is_patched, patch, state_of, unpatch

__all__ = ["SUPPORTED_MODEL_TYPES", "PatchedModel", "is_patched", "patch", "state_of", "unpatch"]
