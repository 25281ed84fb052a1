"""Drift on benign prompts: how far a model moved from a reference, read on the reference's own answers.

For each benign prompt the reference model's greedy answer is scored under the evaluated model: the mean
negative log-likelihood per answer token, with the prompt written by the same chat template the answer was
generated from (:func:`~sst_merge.models.tokenize.prompt_ids`). The reference's own score on its own answers is
the baseline; a model's drift is the mean over prompts of ``NLL_model − NLL_reference`` (0 for the reference
itself, larger the less the model would say what the reference said). Unlike a refusal judge it reads every
token, so a merge that keeps answering but answers differently — or in loops — shows up here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from sst_merge.eval.loglik import last_logits
from sst_merge.models.tokenize import pad_id, prompt_ids, response_ids


@torch.inference_mode()
def answer_nll(
    model,
    tok,
    prompts: Sequence[str],
    answers: Sequence[str],
    *,
    batch_size: int = 8,
    show_progress: bool = False,
) -> list[tuple[float, int]]:
    """Return ``(summed NLL, number of answer tokens)`` of each answer given its prompt, in input order.

    An empty answer gives ``(0.0, 0)``; the caller drops it (there is nothing to score).
    """
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers; pass one answer per prompt")
    seqs = []
    for p, a in zip(prompts, answers, strict=True):
        seqs.append((prompt_ids(tok, p), response_ids(tok, a, complete=False)))
    out: list[tuple[float, int]] = [(0.0, 0)] * len(seqs)
    todo = [i for i, (_, ans) in enumerate(seqs) if ans]
    todo.sort(key=lambda i: -sum(len(x) for x in seqs[i]))  # similar lengths together: less padding
    pid = pad_id(tok)
    for start in tqdm(range(0, len(todo), batch_size), desc="drift", disable=not show_progress, leave=False):
        idx = todo[start : start + batch_size]
        keep = max(len(seqs[i][1]) for i in idx) + 1
        logits = last_logits(model, [seqs[i][0] + seqs[i][1] for i in idx], pid, keep)  # (B, keep, V)
        logp = torch.log_softmax(logits, dim=-1)
        for row, i in enumerate(idx):
            ans = seqs[i][1]
            n = len(ans)
            # left padding: the answer fills the last n positions; position t predicts token t + 1
            pred = logp[row, keep - n - 1 : keep - 1]  # (n, V)
            target = torch.tensor(ans, device=pred.device)
            out[i] = (float(-pred.gather(1, target[:, None]).sum()), n)
    return out


def per_token_nll(scores: Sequence[tuple[float, int]]) -> list[float | None]:
    """Mean NLL per answer token of each item (``None`` for an empty answer)."""
    return [s / n if n else None for s, n in scores]
