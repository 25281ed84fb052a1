"""Fisher data: load prompt/response items, tokenise them with the chat template, batch them.

A data source is a local JSONL file (one object per line with ``prompt`` and, where needed, ``response``) or a named
source resolved by :func:`sst_merge.data.load_source` (the embedded Fisher data are ``safety_fisher`` and
``utility:NAME``, :mod:`sst_merge.tasks.sources`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from typing import Any

import torch

from sst_merge.errors import ConfigError, DataError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Example:
    """One tokenised example: the chat-formatted prompt and the response tokens that carry the loss."""

    prompt_ids: tuple[int, ...]
    response_ids: tuple[int, ...]


def load_items(source: str, need_response: bool, what: str) -> list[dict[str, Any]]:
    """Load items from a local file or a named source; check the fields before any heavy work.

    Args:
        source: a ``.jsonl`` (or ``.json``/``.csv``/``.parquet``) path, or a name known to
            :func:`sst_merge.data.load_source`.
        need_response: whether every item must carry a ``response``.
        what: the parameter name, for error messages (``safety_data`` ...).
    """
    import sst_merge.tasks  # noqa: F401  (registers the named Fisher sources)
    from sst_merge.data import load_source

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


def _ids(x: Any) -> list[int]:
    if isinstance(x, dict) or hasattr(x, "keys"):
        x = x["input_ids"]
    return list(x)


def encode_prompt(tok: Any, prompt: str) -> list[int]:
    """Prompt tokens as the model sees them before its answer (chat template with the generation prompt)."""
    if getattr(tok, "chat_template", None):
        return _ids(
            tok.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True, return_dict=False
            )
        )
    return _ids(tok(prompt, add_special_tokens=True)["input_ids"])


def encode_example(tok: Any, prompt: str, response: str, max_length: int) -> Example:
    """Tokenise a prompt/response pair; the response part is everything the template adds after the prompt.

    With a chat template the full conversation is rendered and the response tokens are its suffix after the
    generation prompt (so the end-of-turn token is part of the response and learned). Without one, the response is
    tokenised on its own and the EOS token appended. Over-long examples keep the end of the prompt and the start of
    the response.
    """
    prompt_ids = encode_prompt(tok, prompt)
    response_ids: list[int] | None = None
    if getattr(tok, "chat_template", None):
        full = _ids(
            tok.apply_chat_template(
                [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}],
                tokenize=True,
                return_dict=False,
            )
        )
        if full[: len(prompt_ids)] == prompt_ids and len(full) > len(prompt_ids):
            response_ids = full[len(prompt_ids) :]
    if response_ids is None:
        response_ids = _ids(tok(response, add_special_tokens=False)["input_ids"])
        if tok.eos_token_id is not None:
            response_ids.append(tok.eos_token_id)
    return truncate(Example(tuple(prompt_ids), tuple(response_ids)), max_length)


def truncate(ex: Example, max_length: int) -> Example:
    """Fit an example into ``max_length`` tokens, keeping the prompt's end and the response's start.

    The prompt keeps at least half of the budget when both parts are long; a short part leaves the rest to the other.
    """
    if len(ex.prompt_ids) + len(ex.response_ids) <= max_length:
        return ex
    n_prompt = min(len(ex.prompt_ids), max(max_length // 2, max_length - len(ex.response_ids)))
    n_resp = min(len(ex.response_ids), max_length - n_prompt)
    return Example(ex.prompt_ids[len(ex.prompt_ids) - n_prompt :], ex.response_ids[:n_resp])


@dataclass
class Batch:
    """A right-padded batch.

    Attributes:
        input_ids: (B, T) token ids, padding filled with ``pad_id``.
        attention_mask: (B, T), 1 on real tokens.
        response_mask: (B, T), 1 on response tokens (the tokens whose log-probability is the objective).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor


def collate(examples: list[Example], pad_id: int) -> Batch:
    """Right-pad examples (positions then start at 0 for every row, as in a single-example forward)."""
    lengths = [len(e.prompt_ids) + len(e.response_ids) for e in examples]
    T = max(lengths)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    att = torch.zeros((len(examples), T), dtype=torch.long)
    resp = torch.zeros((len(examples), T), dtype=torch.long)
    for b, e in enumerate(examples):
        n_p, n = len(e.prompt_ids), lengths[b]
        ids[b, :n] = torch.tensor(e.prompt_ids + e.response_ids, dtype=torch.long)
        att[b, :n] = 1
        resp[b, n_p:n] = 1
    return Batch(ids, att, resp)
