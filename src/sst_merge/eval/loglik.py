"""Log-likelihood scoring with left-padded batches (pure model calls; no data loading, no judging).

Tokenisation follows lm-evaluation-harness (``lm_eval.api.model.LM._encode_pair`` and ``HFLM.tok_encode``): the
tokenizer's default special tokens, trailing context whitespace moved into the continuation, the whole string
encoded and split at the context's length. Left padding needs explicit ``position_ids`` (a padded row would
otherwise start at position ``n_pad``), and ``logits_to_keep`` asks the model for only the last positions'
logits instead of a ``(B, T, V)`` tensor.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel
from transformers.cache_utils import Cache, DynamicLayer

from sst_merge.models.tokenize import left_pad

log = logging.getLogger(__name__)


def encode(tok, text: str) -> list[int]:
    """Encode like lm-eval's ``HFLM.tok_encode``: the tokenizer's default special tokens, unless BOS is written."""
    bos = getattr(tok, "bos_token", None)
    if bos and text.startswith(bos):
        return tok.encode(text, add_special_tokens=False)
    return tok.encode(text)


def encode_pair(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Return ``(context_ids, continuation_ids)`` exactly as lm-eval's ``_encode_pair`` does for causal models."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = encode(tok, context + continuation)
    ctx = encode(tok, context)
    return ctx, whole[len(ctx) :]


def model_device(model) -> torch.device:
    """The device of the input embeddings (the first shard under ``device_map='auto'``)."""
    return model.get_input_embeddings().weight.device


def max_length(model, default: int = 2048) -> int:
    n = getattr(model.config, "max_position_embeddings", None)
    return int(n) if n else default


def last_logits(model, seqs: Sequence[Sequence[int]], pad_id: int, keep: int) -> torch.Tensor:
    """Return fp32 logits of the last ``keep`` positions of each left-padded sequence, shape ``(B, keep, V)``."""
    batch = left_pad(seqs, pad_id, model_device(model))
    try:
        out = model(**batch, use_cache=False, logits_to_keep=keep)
    except TypeError:  # an architecture without logits_to_keep: slice the full logits instead
        out = model(**batch, use_cache=False)
    return out.logits[:, -keep:, :].float()


def _cache_kw(model, cache) -> dict:
    """transformers ≥ 5.2x names the KV-cache argument ``cache``; earlier 5.x releases ``past_key_values``."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    name = "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"
    return {name: cache}


class SlabLayer(DynamicLayer):
    """One layer's keys and values in a pre-allocated ``(B, H, max_len, D)`` slab, written in place.

    ``update`` writes the new positions and returns a view of the filled part, so a decode step copies one position
    instead of the whole cache (a dynamic cache concatenates). A write with batch 1 fills every row (broadcast): a
    shared prefix is computed once and reused by the whole batch.
    """

    def __init__(self, batch: int, max_len: int) -> None:
        super().__init__()
        self.batch, self.max_len, self.length = batch, max_len, 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        b, h, _, d = key_states.shape
        self.keys = key_states.new_zeros((self.batch, h, self.max_len, d))
        self.values = value_states.new_zeros((self.batch, h, self.max_len, value_states.shape[-1]))
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self.max_len:
            raise ValueError(f"KV slab overflow: {end} positions in a slab of {self.max_len}")
        self.keys[:, :, self.length : end] = key_states
        self.values[:, :, self.length : end] = value_states
        self.length = end
        n = key_states.shape[0]  # 1 while the shared prefix runs, B afterwards
        return self.keys[:n, :, :end], self.values[:n, :, :end]

    def get_seq_length(self) -> int:
        return self.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_max_length(self) -> int:
        return self.max_len

    def crop(self, max_length: int) -> None:
        self.length = min(self.length, max_length) if max_length >= 0 else self.length + max_length


def slab_cache(model, batch: int, max_len: int, prefix: Cache | None = None) -> Cache:
    """A KV cache of ``batch`` rows and ``max_len`` positions per layer; ``prefix``'s positions copied into every row."""
    n_layers = model.config.num_hidden_layers
    cache = Cache(layers=[SlabLayer(batch, max_len) for _ in range(n_layers)])
    if prefix is not None:
        for layer, src in zip(cache.layers, prefix.layers, strict=True):
            layer.update(src.keys[:1, :, : src.length], src.values[:1, :, : src.length])
    return cache


def run_prefix(model, ids: Sequence[int], device: torch.device) -> tuple[Cache, torch.Tensor]:
    """Run one token sequence shared by a whole batch; return its KV cache and the fp32 logits of its last position."""
    cache = slab_cache(model, 1, len(ids))
    inp = torch.tensor([list(ids)], dtype=torch.long, device=device)
    pos = torch.arange(len(ids), device=device)[None, :]
    out = model(input_ids=inp, position_ids=pos, use_cache=True, logits_to_keep=1, **_cache_kw(model, cache))
    return cache, out.logits[:, -1, :].float()


def common_prefix(seqs: Sequence[Sequence[int]]) -> int:
    """Length of the longest token prefix shared by every sequence."""
    first = seqs[0]
    n = min(len(s) for s in seqs)
    for s in seqs[1:]:
        k = 0
        while k < n and s[k] == first[k]:
            k += 1
        n = k
    return n


def takes_4d_masks(model) -> bool:
    """Whether ``model`` is a Hugging Face model whose every layer attends through a ready 4D mask we build: the
    fast decoder and the packed scorers need it (flash kernels and sliding windows take the reference path)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not isinstance(base, PreTrainedModel):
        return False
    cfg = base.config
    if cfg._attn_implementation not in ("sdpa", "eager"):
        return False
    return all(t == "full_attention" for t in (getattr(cfg, "layer_types", None) or ()))


def attention_mask(model, allowed: torch.Tensor) -> torch.Tensor:
    """A ready 4D mask for the model's attention: boolean for SDPA, additive (0 / dtype min) for eager."""
    if model.config._attn_implementation == "sdpa":
        return allowed
    dtype = next(model.parameters()).dtype
    zero = torch.zeros((), dtype=dtype, device=allowed.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)


def packed_logprobs(
    model, rows: Sequence[tuple[Sequence[int], Sequence[Sequence[int]]]], wanted: Sequence[Sequence[int]], pad_id: int
) -> list[torch.Tensor]:
    """Log-probabilities at chosen positions of packed rows: a shared root, then branches that each see only the root.

    Row ``r`` is ``root + branch_1 + branch_2 + ...`` in one sequence; a branch token attends to the root and to the
    earlier tokens of its own branch, and sits at the position it would have right after the root — so every branch
    is scored exactly as ``root + branch`` alone would be, while the root runs once. ``wanted[r]`` lists indices into
    row ``r``'s packed tokens; only their logits are computed.

    Returns:
        Per row, an fp32 ``(len(wanted[r]), V)`` tensor of log-probabilities of the next token.
    """
    device = model_device(model)
    lengths = [len(root) + sum(len(b) for b in branches) for root, branches in rows]
    B, T = len(rows), max(lengths)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    seg = torch.full((B, T), -1, dtype=torch.long)  # -1 padding, 0 root, i the i-th branch
    pos = torch.zeros((B, T), dtype=torch.long)
    keep = torch.zeros((B, T), dtype=torch.bool)
    for r, (root, branches) in enumerate(rows):
        at = T - lengths[r]  # left padding
        for i, part in enumerate([root, *branches]):
            n = len(part)
            ids[r, at : at + n] = torch.tensor(list(part), dtype=torch.long)
            seg[r, at : at + n] = i
            pos[r, at : at + n] = torch.arange(n) + (len(root) if i else 0)
            at += n
        keep[r, [T - lengths[r] + w for w in wanted[r]]] = True
    seg, keep = seg.to(device), keep.to(device)
    causal = torch.ones((T, T), dtype=torch.bool, device=device).tril()
    key, query = seg[:, None, :], seg[:, :, None]
    allowed = causal[None] & (key >= 0) & ((key == 0) | (key == query))  # (B, T, T)
    allowed |= torch.eye(T, dtype=torch.bool, device=device)[None]  # a padding query sees itself: no empty row
    out = model(
        input_ids=ids.to(device),
        attention_mask=attention_mask(model, allowed[:, None]),
        position_ids=pos.to(device),
        use_cache=False,
        logits_to_keep=keep,  # (B, T) bool: logits of the wanted positions only, flattened row by row
    )
    logp = torch.log_softmax(out.logits.float().reshape(-1, out.logits.shape[-1]), dim=-1)  # (Σ wanted, V)
    counts = keep.sum(-1).tolist()
    order = [sorted(range(len(w)), key=lambda j, w=w: w[j]) for w in wanted]  # flattened in position order
    parts, start = [], 0
    for r, n in enumerate(counts):
        block = logp[start : start + n]
        back = torch.empty(n, dtype=torch.long)
        back[torch.tensor(order[r], dtype=torch.long)] = torch.arange(n)
        parts.append(block[back.to(block.device)])
        start += n
    return parts


def _batches(order: list[int], batch_size: int) -> list[list[int]]:
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def token_batches(lengths: Sequence[int], batch_size: int, fill: float = 0.9) -> list[list[int]]:
    """Batches of row indices, longest first, for rows of very different lengths (packed rows).

    A batch holds at most ``batch_size`` rows and ``batch_size`` × the longest row's tokens (the memory of the
    first batch of plain rows); a row shorter than ``fill`` × the batch's longest starts a new batch, so padding
    stays under ``1 - fill`` of any batch.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    budget = batch_size * max(lengths, default=0)
    out: list[list[int]] = []
    for i in order:
        b = out[-1] if out else None
        if b and len(b) < batch_size and (len(b) + 1) * lengths[b[0]] <= budget and lengths[i] >= fill * lengths[b[0]]:
            b.append(i)
        else:
            out.append([i])
    return out


@torch.inference_mode()
def next_token_logprobs(
    model,
    contexts: Sequence[Sequence[int]],
    candidate_ids: Sequence[int],
    *,
    pad_id: int,
    batch_size: int = 8,
    show_progress: bool = True,
    desc: str = "scoring",
) -> torch.Tensor:
    """Log-probabilities of ``candidate_ids`` as the next token after each context: one forward per context.

    Returns:
        ``(N, C)`` fp32 tensor, rows in the order of ``contexts``.
    """
    limit = max_length(model)
    seqs = [list(c)[-limit:] for c in contexts]
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))  # longest first: less padding per batch
    cand = torch.tensor(list(candidate_ids), dtype=torch.long)
    out = torch.empty((len(seqs), len(cand)), dtype=torch.float32)
    for idx in tqdm(_batches(order, batch_size), desc=desc, disable=not show_progress, leave=False):
        logits = last_logits(model, [seqs[i] for i in idx], pad_id, keep=1)[:, -1, :]  # (B, V)
        logp = torch.log_softmax(logits, dim=-1)
        out[idx] = logp[:, cand.to(logp.device)].cpu()
    return out


@torch.inference_mode()
def continuation_logliks(
    model,
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    pad_id: int,
    batch_size: int = 8,
    show_progress: bool = True,
    desc: str = "scoring",
) -> list[tuple[float, bool]]:
    """Sum of log-probabilities of each continuation given its context, and whether it is the greedy path.

    The model sees ``(context + continuation)[:-1]`` (left-truncated to the model's length, as lm-eval does); the
    continuation's tokens are the last ones, so ``logits_to_keep`` = the longest continuation in the batch.
    """
    limit = max_length(model)
    inputs, conts = [], []
    for ctx, cont in pairs:
        if not cont:
            raise ValueError("an empty continuation has no log-likelihood")
        inputs.append((list(ctx) + list(cont))[-(limit + 1) :][:-1])
        conts.append(list(cont))
    order = sorted(range(len(inputs)), key=lambda i: -len(inputs[i]))
    results: list[tuple[float, bool]] = [(0.0, False)] * len(inputs)
    for idx in tqdm(_batches(order, batch_size), desc=desc, disable=not show_progress, leave=False):
        keep = max(len(conts[i]) for i in idx)
        logp = torch.log_softmax(last_logits(model, [inputs[i] for i in idx], pad_id, keep), dim=-1)  # (B, K, V)
        for row, i in enumerate(idx):
            c = torch.tensor(conts[i], dtype=torch.long, device=logp.device)
            lp = logp[row, keep - len(c) :, :]  # (len(c), V): positions predicting each continuation token
            total = lp.gather(-1, c[:, None]).sum().item()
            greedy = bool((lp.argmax(-1) == c).all().item())
            results[i] = (total, greedy)
    return results


@torch.inference_mode()
def shared_context_logliks(
    model,
    contexts: Sequence[Sequence[int]],
    continuations: Sequence[Sequence[Sequence[int]]],
    *,
    pad_id: int,
    batch_size: int = 8,
    show_progress: bool = True,
    desc: str = "scoring",
) -> list[list[float]]:
    """Log-likelihood of every continuation of every context, running each context through the model once.

    Equivalent to :func:`continuation_logliks` on ``(context, continuation)`` pairs (same tokens, same positions),
    but the context's keys and values are computed once and shared by its continuations (a multiple-choice
    question's 4 answers): the context forward gives every first continuation token; only continuations longer
    than one token need a second, short forward over the cached context.

    Returns:
        ``lls[q][c]`` for context ``q`` and its continuation ``c``.
    """
    limit = max_length(model)
    ctxs = [list(c)[-limit:] for c in contexts]
    order = sorted(range(len(ctxs)), key=lambda i: -len(ctxs[i]))
    device = model_device(model)
    out: list[list[float]] = [[] for _ in ctxs]
    for idx in tqdm(_batches(order, batch_size), desc=desc, disable=not show_progress, leave=False):
        batch = left_pad([ctxs[i] for i in idx], pad_id, device)
        res = model(**batch, use_cache=True, logits_to_keep=1)
        first = torch.log_softmax(res.logits[:, -1, :].float(), dim=-1)  # (B, V): predicts each first token
        rows = [(b, list(c)) for b, q in enumerate(idx) for c in continuations[q]]  # (batch row, continuation)
        lls = [first[b, c[0]].item() for b, c in rows]
        k = max(len(c) for _, c in rows) - 1
        if k > 0:
            sel = torch.tensor([b for b, _ in rows], device=device)
            cache = res["cache"] if "cache" in res else res.past_key_values
            cache.reorder_cache(sel)  # one cached context row per continuation
            inp = torch.full((len(rows), k), pad_id, dtype=torch.long)
            for r, (_, c) in enumerate(rows):
                inp[r, : len(c) - 1] = torch.tensor(c[:-1], dtype=torch.long)  # right-padded: causal, harmless
            mask = torch.cat(
                [batch["attention_mask"][sel], torch.ones((len(rows), k), dtype=torch.long, device=device)], 1
            )
            start = batch["attention_mask"][sel].sum(-1, keepdim=True)  # real context length per row
            pos = start + torch.arange(k, device=device)[None, :]
            res2 = model(
                input_ids=inp.to(device),
                attention_mask=mask,
                position_ids=pos,
                use_cache=False,
                **_cache_kw(model, cache),
            )
            logp = torch.log_softmax(res2.logits.float(), dim=-1)  # (R, k, V): position j predicts token j + 1
            for r, (_, c) in enumerate(rows):
                if len(c) > 1:
                    tgt = torch.tensor(c[1:], dtype=torch.long, device=logp.device)
                    lls[r] += logp[r, : len(c) - 1, :].gather(-1, tgt[:, None]).sum().item()
        r = 0
        for q in idx:
            out[q] = lls[r : r + len(continuations[q])]
            r += len(continuations[q])
    return out


def prefix_groups(seqs: Sequence[Sequence[int]], max_group: int = 8, max_tokens: int = 2048) -> list[list[int]]:
    """Group the indices of sequences that share a token prefix, for :func:`packed_logprobs`.

    In sorted order, a sequence joins the current group when the packed row (the group's common root once, then
    every member's rest) is shorter with it than without it plus the sequence alone, while the group holds fewer
    than ``max_group`` and the row stays within ``max_tokens``.
    """
    order = sorted(range(len(seqs)), key=lambda i: list(seqs[i]))
    groups: list[list[int]] = []
    for i in order:
        g = groups[-1] if groups else None
        if g and len(g) < max_group:
            joined = _packed_length([seqs[j] for j in g] + [seqs[i]])
            if joined <= max_tokens and joined < _packed_length([seqs[j] for j in g]) + len(seqs[i]):
                g.append(i)
                continue
        groups.append([i])
    return groups


def _packed_length(members: Sequence[Sequence[int]]) -> int:
    root = _root_length(members)
    return root + sum(len(s) - root for s in members)


def _root_length(members: Sequence[Sequence[int]]) -> int:
    """The shared root of packed sequences: their common prefix, leaving every one at least one token of its own."""
    return min(common_prefix(members), min(len(s) for s in members) - 1)


@torch.inference_mode()
def packed_next_token_logprobs(
    model,
    contexts: Sequence[Sequence[int]],
    candidate_ids: Sequence[int],
    *,
    pad_id: int,
    batch_size: int = 8,
    show_progress: bool = True,
    desc: str = "scoring",
) -> torch.Tensor:
    """:func:`next_token_logprobs` with the token prefix shared by neighbouring contexts (an MMLU subject's
    description) computed once per group: each group is one packed row (:func:`packed_logprobs`).

    Returns:
        ``(N, C)`` fp32 tensor, rows in the order of ``contexts``.
    """
    limit = max_length(model)
    seqs = [list(c)[-limit:] for c in contexts]
    groups = prefix_groups(seqs)
    rows = []
    for g in groups:
        n = _root_length([seqs[i] for i in g])
        branches = [seqs[i][n:] for i in g]
        ends = [n + sum(len(b) for b in branches[: k + 1]) - 1 for k in range(len(g))]  # each context's last token
        rows.append((g, (seqs[g[0]][:n], branches), ends))
    lengths = [len(r[1][0]) + sum(len(b) for b in r[1][1]) for r in rows]
    cand = torch.tensor(list(candidate_ids), dtype=torch.long)
    out = torch.empty((len(seqs), len(cand)), dtype=torch.float32)
    for idx in tqdm(token_batches(lengths, batch_size), desc=desc, disable=not show_progress, leave=False):
        batch = [rows[i] for i in idx]
        logps = packed_logprobs(model, [r[1] for r in batch], [r[2] for r in batch], pad_id)
        for (g, _, _), lp in zip(batch, logps, strict=True):
            out[g] = lp[:, cand.to(lp.device)].cpu()
    return out


@torch.inference_mode()
def packed_continuation_logliks(
    model,
    contexts: Sequence[Sequence[int]],
    continuations: Sequence[Sequence[Sequence[int]]],
    *,
    pad_id: int,
    batch_size: int = 8,
    show_progress: bool = True,
    desc: str = "scoring",
) -> list[list[float]]:
    """:func:`shared_context_logliks` in one forward per batch: each context is the root of a packed row and its
    continuations (less their last token) are the branches, so no continuation pays for another's padding.

    Returns:
        ``lls[q][c]`` for context ``q`` and its continuation ``c``.
    """
    limit = max_length(model)
    ctxs = [list(c)[-limit:] for c in contexts]
    for q, conts in enumerate(continuations):
        if not ctxs[q] or any(not c for c in conts):
            raise ValueError(f"context {q}: an empty context or continuation has no log-likelihood")
    lengths = [len(ctxs[q]) + sum(len(c) - 1 for c in continuations[q]) for q in range(len(ctxs))]
    out: list[list[float]] = [[] for _ in ctxs]
    for idx in tqdm(token_batches(lengths, batch_size), desc=desc, disable=not show_progress, leave=False):
        rows = [(ctxs[q], [list(c)[:-1] for c in continuations[q]]) for q in idx]
        wanted = [list(range(len(ctxs[q]) - 1, lengths[q])) for q in idx]  # the root's last position, every branch
        for q, lp in zip(idx, packed_logprobs(model, rows, wanted, pad_id), strict=True):
            # lp[0] predicts every first token; branch token j of continuation c sits at lp[1 + offset_c + j]
            lls, offset = [], 1
            for c in continuations[q]:
                at = [0] + list(range(offset, offset + len(c) - 1))
                tgt = torch.tensor(list(c), dtype=torch.long, device=lp.device)
                lls.append(lp[at].gather(-1, tgt[:, None]).sum().item())
                offset += len(c) - 1
            out[q] = lls
    return out
