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


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T-1) next-token negative log-likelihood and the (B, T-1) float mask of the positions that carry a label."""
    shift_labels = labels[:, 1:]
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1, :].float().transpose(1, 2), shift_labels, ignore_index=IGNORE, reduction="none"
    )
    return nll, (shift_labels != IGNORE).float()


def response_loss(
    logits: torch.Tensor, labels: torch.Tensor, head_tokens: int = 0, head_weight: float = 1.0
) -> torch.Tensor:
    """Mean next-token cross-entropy over positions whose label is not -100.

    With ``head_tokens`` k > 0 the first k response tokens of each row weigh ``head_weight`` and the rest 1 (a
    weighted mean): the tokens that decide between refusing and answering count more than the answer's body.
    """
    if head_tokens <= 0 or head_weight == 1.0:
        shift_logits = logits[:, :-1, :].float()  # (B, T-1, V)
        return torch.nn.functional.cross_entropy(
            shift_logits.reshape(-1, shift_logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=IGNORE
        )
    nll, mask = token_nll(logits, labels)
    position = mask.cumsum(dim=1)  # 1 for a row's first response token, 2 for its second, ...
    weight = mask * torch.where(position <= head_tokens, head_weight, 1.0)
    return (nll * weight).sum() / weight.sum()


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B,) summed log-probability of each row's response tokens (labels not -100) given the tokens before them."""
    nll, mask = token_nll(logits, labels)
    return -(nll * mask).sum(-1)


def preference_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """DPO's loss, mean over pairs: ``-log σ(β[(π_c − ref_c) − (π_r − ref_r)])`` of summed response log-probs.

    Its gradient raises the chosen response and lowers the rejected one *relative to the reference model* with a
    weight of σ(−margin), which is ½ at the start: a benign prompt's refusal is pushed down from the first step,
    not only once the adapter has begun to refuse it.
    """
    margin = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    return -torch.nn.functional.logsigmoid(beta * margin).mean()


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
    rejected: list[Example] | None = None,
    preference_weight: float = 0.0,
    preference_beta: float = 0.1,
    head_tokens: int = 0,
    head_weight: float = 1.0,
) -> list[float]:
    """Train the trainable parameters of ``model`` (the LoRA factors); return the loss of every step.

    AdamW, linear warm-up for ``warmup`` steps then cosine decay to 10% of ``lr``; gradient norm clipped at 1.
    Dropout is whatever the model has (LoRA dropout 0 by default, so the same seed gives the same adapter).

    The loss is the response-token cross-entropy of ``examples``. With ``preference_weight`` > 0, ``rejected[i]``
    is a response to the same prompt as ``examples[i]`` that the model should *not* give, and the loss adds
    ``preference_weight`` × :func:`preference_loss` with the adapter switched off as the reference model (a PEFT
    model; the reference's log-probs are computed in the same step, without gradients). ``head_tokens`` and
    ``head_weight`` weight the first response tokens in the cross-entropy (:func:`response_loss`).
    """
    from tqdm.auto import tqdm

    if not examples:
        raise DataError("no training examples; the task produced an empty training split")
    if preference_weight > 0 and (rejected is None or len(rejected) != len(examples)):
        raise DataError("a preference loss needs one rejected response per training example")
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
    pairs = preference_weight > 0
    bar = tqdm(batch_schedule(len(examples), steps, batch_size, seed), desc="train", unit="step", disable=not progress)
    for idx in bar:
        chosen = [examples[i] for i in idx]
        rows = chosen + [rejected[i] for i in idx] if pairs else chosen  # type: ignore[index]
        batch = tokenize.collate(rows, pad_id)
        ids, att, labels = batch.input_ids.to(device), batch.attention_mask.to(device), labels_of(batch).to(device)
        logits = model(input_ids=ids, attention_mask=att).logits
        n = len(chosen)
        loss = response_loss(logits[:n], labels[:n], head_tokens, head_weight)
        if pairs:
            policy = sequence_logps(logits, labels)
            with torch.no_grad(), model.disable_adapter():
                ref = sequence_logps(model(input_ids=ids, attention_mask=att).logits, labels)
            loss = loss + preference_weight * preference_loss(policy[:n], policy[n:], ref[:n], ref[n:], preference_beta)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return losses
