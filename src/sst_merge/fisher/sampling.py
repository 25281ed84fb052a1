"""Seeded ancestral sampling of responses from the pre-merge model (for the *true* Fisher of ``F_u``).

The true Fisher takes ``y ~ p(y | x)`` from the model itself, at temperature 1 with no top-k/top-p truncation (that
is the model's distribution). Every prompt has its own ``torch.Generator``, seeded from the run's seed and the
prompt's tokens (:func:`prompt_seed`), so a prompt's sample does not depend on which batch, order or
torch.distributed rank it lands in; the global RNG is never touched. Sampled token ids are used directly
(no decode/re-encode round trip), including the end-of-turn token when the model produced one.
"""

from __future__ import annotations

import hashlib
import inspect
from typing import Any

import torch
from tqdm.auto import tqdm

from sst_merge.models.tokenize import left_pad, pad_id


def eos_ids(model: Any, tok: Any) -> set[int]:
    """Token ids that end a response: the tokenizer's EOS and the generation config's EOS ids."""
    ids: set[int] = set()
    for src in (getattr(tok, "eos_token_id", None), getattr(model.generation_config, "eos_token_id", None)):
        if isinstance(src, int):
            ids.add(src)
        elif isinstance(src, list | tuple):
            ids.update(int(i) for i in src)
    return ids


def _cache_kwarg(model: Any) -> str:
    """The forward argument that takes the KV cache (``cache`` in recent transformers, ``past_key_values`` before)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _cache_of(res: Any) -> Any:
    return res.get("cache", None) if res.get("cache", None) is not None else res.get("past_key_values", None)


def prompt_seed(seed: int, prompt: list[int]) -> int:
    """A 63-bit seed for one prompt's sampling, from the run's seed and the prompt's token ids."""
    digest = hashlib.sha256(f"{seed}:{','.join(map(str, prompt))}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


@torch.no_grad()
def sample_responses(
    model: Any,
    tok: Any,
    prompts: list[list[int]],
    max_new_tokens: int,
    seed: int,
    batch_size: int = 8,
    show_progress: bool = True,
    greedy: bool = False,
) -> list[list[int]]:
    """Sample one response per prompt (token ids), stopping at an EOS id or ``max_new_tokens``.

    ``greedy`` takes the most likely token at every step instead (the model's own answer; ``seed`` is then unused).

    Prompts are left-padded in batches with explicit position ids, and decoding uses the KV cache. Prompt ``p``'s
    draws come from its own generator seeded with :func:`prompt_seed` ``(seed, p)``.
    """
    device = model.get_input_embeddings().weight.device
    stop = eos_ids(model, tok)
    pad = pad_id(tok)
    cache_kw = _cache_kwarg(model)
    out: list[list[int]] = []
    for start in tqdm(
        range(0, len(prompts), batch_size),
        desc="greedy answers" if greedy else "sample (true Fisher)",
        disable=not show_progress,
        leave=False,
    ):
        chunk = prompts[start : start + batch_size]
        batch = left_pad(chunk, pad, device)
        ids, att, pos = batch["input_ids"], batch["attention_mask"], batch["position_ids"]
        gens = [torch.Generator(device=device).manual_seed(prompt_seed(seed, p)) for p in chunk]
        responses: list[list[int]] = [[] for _ in chunk]
        done = torch.zeros(len(chunk), dtype=torch.bool)
        res = model(input_ids=ids, attention_mask=att, position_ids=pos, use_cache=True, logits_to_keep=1)
        next_pos = pos[:, -1:] + 1
        for _ in range(max_new_tokens):
            probs = torch.softmax(res.logits[:, -1, :].float(), dim=-1)
            if greedy:
                nxt = probs.argmax(dim=-1, keepdim=True)  # (B, 1)
            else:
                nxt = torch.cat([torch.multinomial(probs[b : b + 1], 1, generator=g) for b, g in enumerate(gens)])
            for b, t in enumerate(nxt[:, 0].tolist()):
                if not done[b]:
                    responses[b].append(t)
                    if t in stop:
                        done[b] = True
            if bool(done.all()):
                break
            att = torch.cat([att, torch.ones_like(nxt)], dim=1)
            res = model(
                input_ids=nxt,
                attention_mask=att,
                position_ids=next_pos,
                use_cache=True,
                logits_to_keep=1,
                **{cache_kw: _cache_of(res)},
            )
            next_pos = next_pos + 1
        out.extend(responses)
    return out
