"""Base models: aliases, loading (local directories, hub ids, the embedded GGUF default)."""

from sst_merge.models.loading import ALIASES, load_model, resolve_model

__all__ = ["ALIASES", "load_model", "resolve_model"]
