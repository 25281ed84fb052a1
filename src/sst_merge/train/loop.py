"""The LoRA training step on one screen: chat-formatted examples, loss on response tokens only, AdamW.

Examples are tokenised and batched by the rule evaluation and the Fisher use (:mod:`sst_merge.models.tokenize`).

Kept free of files and caches (see :mod:`sst_merge.train.adapter` for those) so tests can run it on the tiny
in-process model.
"""

from __future__ import annotations

import logging
import math
import random
from typing import Any

import torch

from sst_merge.errors import DataError
from sst_merge.models import tokenize
from sst_merge.models.tokenize import Example

log = logging.getLogger(__name__)

IGNORE = -100  # label value that cross-entropy skips (prompt and padding tokens)


def encode_example(tokenizer: Any, item: dict[str, Any], max_length: int = 256) -> Example:
    """Tokenise a training ``item`` by the project's one rule (:mod:`sst_merge.models.tokenize`).

    The response is closed by the end-of-turn token unless ``item["complete"]`` is False (a response cut at a length
    cap must not teach the model to stop there); long examples keep the prompt's end and the response's start.
    """
    if not item.get("response"):
        raise DataError(f"training item {item.get('id')!r} has an empty response; drop it or give it a response")
    return tokenize.encode_example(tokenizer, item["prompt"], item["response"], max_length, item.get("complete", True))


def labels_of(batch: tokenize.Batch) -> torch.Tensor:
    """(B, T) next-token targets: the token ids on response positions, -100 on prompt and padding."""
    return batch.input_ids.masked_fill(batch.response_mask == 0, IGNORE)


def response_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over positions whose label is not -100."""
    shift_logits = logits[:, :-1, :].float()  # (B, T-1, V)
    shift_labels = labels[:, 1:]  # (B, T-1)
    return torch.nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1), ignore_index=IGNORE
    )


def batch_schedule(n: int, steps: int, batch_size: int, seed: int) -> list[list[int]]:
    """Return ``steps`` batches of example indices: seeded shuffled epochs, concatenated."""
    rng = random.Random(seed)
    order: list[int] = []
    while len(order) < steps * batch_size:
        epoch = list(range(n))
        rng.shuffle(epoch)
        order += epoch
    return [order[s * batch_size : (s + 1) * batch_size] for s in range(steps)]


def train_loop(
    model: torch.nn.Module,
    examples: list[Example],
    pad_id: int,
    steps: int,
    batch_size: int = 8,
    lr: float = 1e-3,
    warmup: int = 4,
    weight_decay: float = 0.0,
    seed: int = 0,
    progress: bool = True,
) -> list[float]:
    """Train the trainable parameters of ``model`` (the LoRA factors); return the loss of every step.

    AdamW, linear warm-up for ``warmup`` steps then cosine decay to 10% of ``lr``; gradient norm clipped at 1.
    Dropout is whatever the model has (LoRA dropout 0 by default, so the same seed gives the same adapter).
    """
    from tqdm.auto import tqdm

    if not examples:
        raise DataError("no training examples; the task produced an empty training split")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters; wrap it with a LoRA config first")
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    device = next(model.parameters()).device
    model.train()
    losses: list[float] = []
    bar = tqdm(batch_schedule(len(examples), steps, batch_size, seed), desc="train", unit="step", disable=not progress)
    for idx in bar:
        batch = tokenize.collate([examples[i] for i in idx], pad_id)
        ids, att, labels = batch.input_ids.to(device), batch.attention_mask.to(device), labels_of(batch).to(device)
        logits = model(input_ids=ids, attention_mask=att).logits
        loss = response_loss(logits, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return losses
