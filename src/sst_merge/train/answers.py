"""The base model's own greedy answers to prompts, cached: the benign half of the safety adapter's training data
(and the rejected responses of its preference pairs).

Training on the base model's own answers keeps the adapter's behaviour on benign prompts where it was. The
prompts are data (:mod:`sst_merge.tasks.safety`); answering them needs a model and the generator
(:mod:`sst_merge.eval.generation`), so it happens here, in training.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from sst_merge.cache import check_benign_answers, read_checked
from sst_merge.eval.generation import generate_greedy
from sst_merge.io import atomic_write_json
from sst_merge.models.embedded import cache_dir
from sst_merge.tasks import safety
from sst_merge.tasks.base import Item


def benign_items(
    model: Any,
    tokenizer: Any,
    cache_key: str | None,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    prompts: list[str] | None = None,
) -> list[Item]:
    """Pair benign prompts with the model's own greedy answers, cached per ``cache_key`` (e.g. the model name).

    Training on the base model's own answers keeps the adapter's behaviour on benign prompts where it was, so
    it learns *when* to refuse instead of refusing everything. Answers cut at ``max_new_tokens`` are kept
    without an end-of-turn token (see ``Item["complete"]``).
    """
    prompts = list(prompts if prompts is not None else safety.BENIGN_TRAIN_PROMPTS)
    return model_answers(model, tokenizer, cache_key, prompts, max_new_tokens, batch_size, "benign-train", "benign")


def model_answers(
    model: Any,
    tokenizer: Any,
    cache_key: str | None,
    prompts: list[str],
    max_new_tokens: int,
    batch_size: int,
    id_prefix: str,
    kind: str,
) -> list[Item]:
    """The model's greedy answers to ``prompts`` as items ``{"id": "<id_prefix>-NNN", ..., "kind"}``, cached.

    The cache file is named by ``cache_key`` and a digest of the prompts, the length cap and the batch size.
    """
    # the batch size is in the key: padding in a batch can flip a greedy token, so it is part of "the answers"
    digest = hashlib.sha256(json.dumps([prompts, max_new_tokens, batch_size]).encode()).hexdigest()[:12]
    path = None
    if cache_key is not None:
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in cache_key)
        path = cache_dir() / "benign-answers" / f"{safe}-{digest}.json"
        cached = read_checked(path, lambda p: check_benign_answers(p, prompts))  # damaged: moved aside, redone
        if cached is not None:
            return cached
    outs = generate_greedy(
        model, tokenizer, prompts, batch_size=batch_size, max_new_tokens=max_new_tokens, desc=f"{kind} answers"
    )
    items = [
        {
            "id": f"{id_prefix}-{i:03d}",
            "prompt": p,
            "response": o["response"],
            "answer": o["response"],
            "kind": kind,
            "complete": o["stopped"],
        }
        for i, (p, o) in enumerate(zip(prompts, outs, strict=True))
    ]
    if path is not None:
        atomic_write_json(path, items)
    return items
