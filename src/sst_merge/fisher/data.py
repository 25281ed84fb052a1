"""Fisher data: load prompt/response items and subsample them; tokenising and batching follow the project's one rule
(:mod:`sst_merge.models.tokenize`, re-exported here: ``encode_prompt`` is its ``prompt_ids``).

A data source is a local JSONL file (one object per line with ``prompt`` and, where needed, ``response``) or a named
source resolved by :func:`sst_merge.data.load_source` (the embedded Fisher data are ``safety_fisher`` and
``utility:NAME``, :mod:`sst_merge.tasks.sources`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

import torch

import sst_merge.tasks  # noqa: F401  (registers the named Fisher sources)
from sst_merge.data import load_source
from sst_merge.errors import ConfigError, DataError
from sst_merge.models.tokenize import Batch, Example, collate, encode_example, truncate
from sst_merge.models.tokenize import prompt_ids as encode_prompt

__all__ = [
    "Batch",
    "Example",
    "collate",
    "encode_example",
    "encode_prompt",
    "items_hash",
    "load_items",
    "subsample",
    "truncate",
]

log = logging.getLogger(__name__)


def load_items(source: str, need_response: bool, what: str) -> list[dict[str, Any]]:
    """Load items from a local file or a named source; check the fields before any heavy work.

    Args:
        source: a ``.jsonl`` (or ``.json``/``.csv``/``.parquet``) path, or a name known to
            :func:`sst_merge.data.load_source`.
        need_response: whether every item must carry a ``response``.
        what: the parameter name, for error messages (``safety_data`` ...).
    """
    try:
        items = load_source(source)
    except (DataError, ConfigError) as e:
        raise type(e)(f"{what}: {e}") from e
    for i, it in enumerate(items):
        if not isinstance(it.get("prompt"), str) or not it["prompt"]:
            raise DataError(f"{what} {source}: item {i} has no non-empty 'prompt' string")
        if need_response and (not isinstance(it.get("response"), str) or not it["response"]):
            raise DataError(
                f"{what} {source}: item {i} has no non-empty 'response' string; the Fisher needs one here "
                "(for utility data, utility_fisher: true samples responses from the model instead)"
            )
    return items


def items_hash(items: list[dict[str, Any]], need_response: bool) -> str:
    """Hash of the fields the Fisher reads (prompt, and response where used), in order."""
    h = hashlib.sha256()
    for it in items:
        h.update(json.dumps([it["prompt"], it.get("response") if need_response else None]).encode())
    return h.hexdigest()


def subsample(items: list[dict[str, Any]], n: int, seed: int, what: str) -> list[dict[str, Any]]:
    """Take ``n`` items in a seeded random order (all of them, with a warning, if there are fewer)."""
    if len(items) < n:
        log.warning("%s has %d items, fewer than n_samples=%d; using all of them", what, len(items), n)
        n = len(items)
    perm = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed))[:n]
    return [items[i] for i in perm.tolist()]
