"""Greedy generation for the generative evaluators: chat template, left-padded batches sorted by length.

Prompts are tokenised by the project's one rule (:mod:`sst_merge.models.tokenize`).

Only the generated tokens are decoded and returned — the prompt (and the chat template around it) never reaches a
judge, so a refusal keyword echoed from the prompt cannot count as a refusal.

Two decoders give the same tokens (``decode``):

* ``reference`` — ``model.generate()`` on each left-padded batch (dynamic cache, generate's per-step machinery).
* ``fast`` — the project's own greedy loop. The token prefix shared by every prompt (the chat template's system
  turn) runs once, at batch 1, and its keys and values are copied into every row of every batch; each batch's KV
  cache is one pre-allocated slab per layer (:class:`~sst_merge.eval.loglik.SlabLayer`: a step writes one position
  instead of concatenating the whole cache); the attention mask is a view of one boolean tensor; the loop stops when
  every row has written EOS, with one host sync per step. Row ``b``'s layout in the cache is
  ``[shared prefix (P) | padding | its own suffix (L_b) | generated]``: the suffixes are right-aligned after the
  prefix, so every row's new token sits in the same slot, and explicit positions ``P + k`` make the padding
  invisible. Models the loop cannot drive (no HF cache interface, a flash-attention kernel, sliding windows,
  logits processors in the generation config) take the reference path.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Literal

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig

from sst_merge.eval.loglik import (
    _cache_kw,
    attention_mask,
    common_prefix,
    model_device,
    run_prefix,
    slab_cache,
    takes_4d_masks,
)
from sst_merge.models.tokenize import left_pad, pad_id, prompt_ids

log = logging.getLogger(__name__)

Decode = Literal["fast", "reference"]

#: generation-config fields that make generate() change the logits; a model setting any of them decodes by reference
_PROCESSOR_FIELDS = (
    "repetition_penalty",
    "encoder_repetition_penalty",
    "no_repeat_ngram_size",
    "bad_words_ids",
    "min_length",
    "min_new_tokens",
    "suppress_tokens",
    "begin_suppress_tokens",
    "forced_bos_token_id",
    "forced_eos_token_id",
    "sequence_bias",
    "exponential_decay_length_penalty",
    "stop_strings",
)


@torch.inference_mode()
def generate_greedy(
    model,
    tok,
    prompts: Sequence[str],
    *,
    batch_size: int = 8,
    max_new_tokens: int = 64,
    show_progress: bool = True,
    desc: str = "generating",
    decode: Decode = "fast",
) -> list[dict[str, Any]]:
    """Generate a greedy answer to each prompt (through the chat template).

    Args:
        decode: ``fast`` (the project's loop, shared prefix computed once) or ``reference`` (``model.generate()``);
            both give the same tokens. A model the fast loop cannot drive is decoded by reference.

    Returns:
        One dict per prompt, in input order: ``response`` (decoded new tokens, special tokens skipped),
        ``n_new_tokens`` (up to and including EOS), ``stopped`` (EOS reached before ``max_new_tokens``) and
        ``token_ids`` (the new tokens, up to and including EOS).
    """
    if decode not in ("fast", "reference"):
        raise ValueError(f"decode must be 'fast' or 'reference', not {decode!r}")
    seqs = [prompt_ids(tok, p) for p in prompts]
    if not seqs:
        return []
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))  # similar lengths together: less padding
    pid = pad_id(tok)
    eos = model.generation_config.eos_token_id if model.generation_config.eos_token_id is not None else tok.eos_token_id
    eos_ids = list(dict.fromkeys(eos if isinstance(eos, list) else [eos]))
    fast = decode == "fast" and fast_decodable(model)
    if fast:
        prefix = _shared_prefix(model, seqs)
    out: list[dict[str, Any]] = [{}] * len(seqs)
    for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=not show_progress, leave=False):
        idx = order[start : start + batch_size]
        batch = [seqs[i] for i in idx]
        if fast:
            new = _greedy_fast(model, batch, prefix, eos_ids, pid, max_new_tokens)
        else:
            new = _greedy_reference(model, batch, eos_ids, pid, max_new_tokens)
        for row, i in enumerate(idx):
            toks = new[row].tolist()
            stop = next((j for j, t in enumerate(toks) if t in eos_ids), None)
            kept = toks if stop is None else toks[: stop + 1]
            out[i] = {
                "response": tok.decode(kept, skip_special_tokens=True).strip(),
                "n_new_tokens": len(kept),
                "stopped": stop is not None,
                "token_ids": kept,
            }
    return out


def fast_decodable(model) -> bool:
    """Whether the fast loop can drive ``model`` with the same result as ``generate()``."""
    if not takes_4d_masks(model):
        return False
    gen, default = model.generation_config, GenerationConfig()
    return all(getattr(gen, f, None) == getattr(default, f, None) for f in _PROCESSOR_FIELDS)


def _greedy_reference(model, batch: list[list[int]], eos_ids: list[int], pid: int, max_new: int) -> torch.Tensor:
    inputs = left_pad(batch, pid, model_device(model))
    inputs.pop("position_ids")  # generate() derives positions from the attention mask itself
    gen = model.generate(
        **inputs,
        do_sample=False,
        temperature=None,
        top_p=None,
        top_k=None,
        max_new_tokens=max_new,
        pad_token_id=pid,
        eos_token_id=eos_ids,
    )
    return gen[:, inputs["input_ids"].shape[1] :].cpu()  # (B, new): only what the model wrote


class _Prefix:
    """The token prefix every prompt shares and its KV cache (``None`` when the prompts share nothing)."""

    def __init__(self, ids: list[int], cache) -> None:
        self.ids, self.cache = ids, cache


def _shared_prefix(model, seqs: list[list[int]]) -> _Prefix:
    # keep at least one token of every prompt out of the prefix: the first generated token is predicted from it
    n = min(common_prefix(seqs), min(len(s) for s in seqs) - 1)
    if n <= 0:
        return _Prefix([], None)
    cache, _ = run_prefix(model, seqs[0][:n], model_device(model))
    log.debug("shared prompt prefix: %d tokens, computed once for %d prompts", n, len(seqs))
    return _Prefix(seqs[0][:n], cache)


def _greedy_fast(
    model, batch: list[list[int]], prefix: _Prefix, eos_ids: list[int], pid: int, max_new: int
) -> torch.Tensor:
    device = model_device(model)
    P = len(prefix.ids)
    sufs = [s[P:] for s in batch]
    B, W = len(sufs), max(len(s) for s in sufs)
    lens = torch.tensor([len(s) for s in sufs], device=device)  # (B,)
    T = P + W + max_new
    cache = slab_cache(model, B, T, prefix.cache)

    # which cache slots each row may attend to: the prefix, its own suffix, everything generated
    valid = torch.zeros((B, T), dtype=torch.bool, device=device)
    valid[:, :P] = True
    slot = torch.arange(W, device=device)  # suffix slots P .. P+W-1
    valid[:, P : P + W] = slot[None, :] >= (W - lens)[:, None]
    # suffix prefill: causal over the slots; a padding query sees itself only (finite, and read by nobody)
    causal = torch.arange(P + W, device=device)[None, :] <= (P + slot)[:, None]  # (W, P+W)
    allowed = valid[:, None, : P + W] & causal[None]
    allowed[:, slot, P + slot] = True
    ids = torch.full((B, W), pid, dtype=torch.long)
    for b, s in enumerate(sufs):
        ids[b, W - len(s) :] = torch.tensor(s, dtype=torch.long)
    pos = P + (slot[None, :] - (W - lens)[:, None]).clamp(min=0)  # (B, W): real tokens at P, P+1, ...
    res = model(
        input_ids=ids.to(device),
        attention_mask=attention_mask(model, allowed[:, None]),
        position_ids=pos,
        use_cache=True,
        logits_to_keep=1,
        **_cache_kw(model, cache),
    )
    logits = res.logits[:, -1, :]  # (B, V)

    out = torch.full((B, max_new), pid, dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    eos = torch.tensor(eos_ids, device=device)
    next_pos = (P + lens)[:, None]  # (B, 1): the first generated token's position
    for step in range(max_new):
        nxt = torch.where(done, pid, logits.float().argmax(-1))  # (B,): rows past EOS write padding, as generate()
        out[:, step] = nxt
        done |= torch.isin(nxt, eos)
        if step == max_new - 1 or bool(done.all()):
            break
        s = P + W + step
        valid[:, s] = True
        res = model(
            input_ids=nxt[:, None],
            attention_mask=attention_mask(model, valid[:, None, None, : s + 1]),
            position_ids=next_pos + step,
            use_cache=True,
            **_cache_kw(model, cache),
        )
        logits = res.logits[:, -1, :]
    return out.cpu()
