"""The LoRA training step on one screen: chat-formatted examples, loss on response tokens only, AdamW.

Kept free of files and caches (see :mod:`sst_merge.train.adapter` for those) so tests can run it on the tiny
in-process model.
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass
from typing import Any

import torch

from sst_merge.errors import DataError

log = logging.getLogger(__name__)

IGNORE = -100  # label value that cross-entropy skips (prompt and padding tokens)


@dataclass
class Example:
    """One tokenised training example: ``labels`` is ``input_ids`` with every non-response position = -100."""

    id: str
    input_ids: list[int]
    labels: list[int]


def encode_example(tokenizer: Any, item: dict[str, Any], max_length: int = 256) -> Example:
    """Tokenise ``item`` with the chat template and mask everything but the assistant response.

    The prompt is the chat template applied to the user turn with the generation prompt; the response tokens
    follow it, closed by the end-of-turn token unless ``item["complete"]`` is False (a response cut at a length
    cap must not teach the model to stop there). Long examples lose prompt tokens from the left, never response
    tokens, so the model always sees what it is graded on.
    """
    prompt_text = tokenizer.apply_chat_template(
        [{"role": "user", "content": item["prompt"]}], tokenize=False, add_generation_prompt=True
    )
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(item["response"], add_special_tokens=False)["input_ids"]
    if item.get("complete", True):
        response_ids = response_ids + [tokenizer.eos_token_id]
    if not response_ids:
        raise DataError(f"training item {item.get('id')!r} has an empty response; drop it or give it a response")
    response_ids = response_ids[:max_length]
    prompt_ids = prompt_ids[-(max_length - len(response_ids)) :] if len(response_ids) < max_length else []
    return Example(
        id=str(item.get("id")),
        input_ids=prompt_ids + response_ids,
        labels=[IGNORE] * len(prompt_ids) + list(response_ids),
    )


def collate(batch: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch; padding gets attention 0 and label -100."""
    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, e in enumerate(batch):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


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
        batch = {k: v.to(device) for k, v in collate([examples[i] for i in idx], pad_id).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = response_loss(logits, batch["labels"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return losses
