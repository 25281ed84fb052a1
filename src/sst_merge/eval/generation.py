"""Greedy generation for the generative evaluators: chat template, left-padded batches sorted by length.

Prompts are tokenised by the project's one rule (:mod:`sst_merge.models.tokenize`).

Only the generated tokens are decoded and returned — the prompt (and the chat template around it) never reaches a
judge, so a refusal keyword echoed from the prompt cannot count as a refusal.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from sst_merge.eval.loglik import model_device
from sst_merge.models.tokenize import left_pad, pad_id, prompt_ids

log = logging.getLogger(__name__)


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
) -> list[dict[str, Any]]:
    """Generate a greedy answer to each prompt (through the chat template).

    Returns:
        One dict per prompt, in input order: ``response`` (decoded new tokens, special tokens skipped),
        ``n_new_tokens`` (up to and including EOS) and ``stopped`` (EOS reached before ``max_new_tokens``).
    """
    seqs = [prompt_ids(tok, p) for p in prompts]
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))  # similar lengths together: less padding
    pid = pad_id(tok)
    eos = model.generation_config.eos_token_id if model.generation_config.eos_token_id is not None else tok.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos])
    out: list[dict[str, Any]] = [{}] * len(seqs)
    for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=not show_progress, leave=False):
        idx = order[start : start + batch_size]
        batch = left_pad([seqs[i] for i in idx], pid, model_device(model))
        batch.pop("position_ids")  # generate() derives positions from the attention mask itself
        gen = model.generate(
            **batch,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            max_new_tokens=max_new_tokens,
            pad_token_id=pid,
            eos_token_id=list(eos_ids),
        )
        new = gen[:, batch["input_ids"].shape[1] :].cpu()  # (B, new): only what the model wrote
        for row, i in enumerate(idx):
            toks = new[row].tolist()
            stop = next((j for j, t in enumerate(toks) if t in eos_ids), None)
            kept = toks if stop is None else toks[: stop + 1]
            out[i] = {
                "response": tok.decode(kept, skip_special_tokens=True).strip(),
                "n_new_tokens": len(kept),
                "stopped": stop is not None,
            }
    return out
