"""Base models: aliases, loading (local directories, hub ids, the embedded GGUF default)."""

from sst_merge.models.loading import ALIASES, base_identity, base_provenance, load_model, loadable_base, resolve_model

__all__ = ["ALIASES", "base_identity", "base_provenance", "load_model", "loadable_base", "resolve_model"]
