"""MMLU, letter format (design §6), exactly as lm-evaluation-harness's ``mmlu`` task (0-shot) defines it.

Prompt: ``"The following are multiple choice questions (with answers) about {subject}.\\n\\n{question}\\nA. …\\nB. …
\\nC. …\\nD. …\\nAnswer:"`` (subject with ``_`` → space, question stripped); the prediction is the argmax of the
log-probabilities of the continuations ``" A"``, ``" B"``, ``" C"``, ``" D"``. When each continuation is one token
that leaves the context's tokens unchanged (true for BPE tokenizers such as SmolLM2's), that is the next-token
distribution at the prompt's last position: one forward per question, keeping only the last position's logits.
Otherwise the scorer falls back to full continuation log-likelihoods (the same numbers, more compute).
Reported: micro accuracy (Wilson interval, stderr) and macro accuracy (mean of per-subject accuracies).
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, ClassVar

from sst_merge.errors import DataError
from sst_merge.eval.base import EvalContext, Evaluator, register_task
from sst_merge.eval.loglik import (
    encode_pair,
    next_token_logprobs,
    packed_continuation_logliks,
    packed_next_token_logprobs,
    shared_context_logliks,
    takes_4d_masks,
)
from sst_merge.eval.stats import Z95, mean_stderr, rate_metric
from sst_merge.models.tokenize import pad_id

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def normalise_item(it: dict[str, Any]) -> dict[str, Any]:
    """Check an MMLU-style item and return it with ``answer`` as an int index and ``subject`` spelled out."""
    choices = it["choices"]
    if not isinstance(choices, list | tuple) or len(choices) < 2:
        raise DataError(f"MMLU item {it.get('id')!r}: 'choices' must be a list of at least 2 strings")
    ans = it["answer"]
    if isinstance(ans, str):
        ans = LETTERS.index(ans.strip().upper()) if ans.strip().upper() in LETTERS else int(ans)
    if not 0 <= int(ans) < len(choices):
        raise DataError(f"MMLU item {it.get('id')!r}: answer {it['answer']!r} is not one of {len(choices)} choices")
    return {**it, "answer": int(ans), "subject": str(it.get("subject", "")).replace("_", " ")}


def letter_prompt(item: dict[str, Any]) -> str:
    """lm-eval's ``mmlu`` description + ``doc_to_text`` for one question (0-shot)."""
    lines = [item["question"].strip()]
    lines += [f"{LETTERS[i]}. {c}" for i, c in enumerate(item["choices"])]
    return (
        f"The following are multiple choice questions (with answers) about {item['subject']}.\n\n"
        + "\n".join(lines)
        + "\nAnswer:"
    )


def argmax_first(values: list[float]) -> int:
    """Index of the largest value, the first one on ties (``numpy.argmax``, as lm-eval uses)."""
    return max(range(len(values)), key=lambda i: (values[i], -i))


def score_choices(
    model, tok, contexts: list[str], continuations: list[list[str]], settings: EvalContext, desc: str
) -> list[list[float]]:
    """Log-likelihood of every continuation of every context, tokenised as lm-eval does.

    One-token continuations that leave the context's tokens unchanged (the letter format) need only the next-token
    distribution at the context's last position; anything else needs every continuation token's log-probability.
    Both give lm-eval's numbers: the model sees ``context_ids + continuation_ids``. ``settings.decode`` picks the
    scorer: ``fast`` packs what contexts share (a subject's description; a question under its choices) into one
    row computed once (:func:`~sst_merge.eval.loglik.packed_logprobs`), ``reference`` runs every context whole.
    """
    pairs = [[encode_pair(tok, ctx, c) for c in conts] for ctx, conts in zip(contexts, continuations, strict=True)]
    for q, row in enumerate(pairs):
        if any(ctx_ids != row[0][0] for ctx_ids, _ in row):  # cannot happen with lm-eval's _encode_pair
            raise ValueError(f"question {q}: the context tokenises differently per choice")
    ctx_ids = [row[0][0] for row in pairs]
    cont_ids = [[cont for _, cont in row] for row in pairs]
    common = dict(pad_id=pad_id(tok), batch_size=settings.batch_size, show_progress=settings.show_progress, desc=desc)
    fast = getattr(settings, "decode", "fast") == "fast" and takes_4d_masks(model)
    if all(len(c) == 1 for row in cont_ids for c in row) and all(row == cont_ids[0] for row in cont_ids):
        next_token = packed_next_token_logprobs if fast else next_token_logprobs
        return next_token(model, ctx_ids, [c[0] for c in cont_ids[0]], **common).tolist()
    continuations = packed_continuation_logliks if fast else shared_context_logliks
    return continuations(model, ctx_ids, cont_ids, **common)


def accuracy_metrics(records: list[dict[str, Any]], key: str = "score") -> dict[str, Any]:
    """Micro accuracy (Wilson) and macro accuracy over subjects (mean of subject means, stderr pooled)."""
    by_subject: dict[str, list[int]] = defaultdict(list)
    for r in records:
        by_subject[r["subject"]].append(r[key])
    subj_acc = {s: sum(v) / len(v) for s, v in by_subject.items()}
    ses = [mean_stderr(v) for v in by_subject.values() if len(v) > 1]
    k = len(by_subject)
    macro = sum(subj_acc.values()) / k
    # stderr of a mean of k independent subject means; undefined when a subject has a single question
    macro_se = math.sqrt(sum(se * se for se in ses)) / k if len(ses) == k else None
    return {
        "micro": rate_metric([r[key] for r in records]),
        "macro": {
            "value": macro,
            "n": len(records),
            "n_subjects": k,
            "stderr": macro_se,
            "ci95": None if macro_se is None else [macro - Z95 * macro_se, macro + Z95 * macro_se],
            "interval": "normal",
            "higher_is_better": True,
        },
        "per_subject": {s: {"acc": subj_acc[s], "n": len(by_subject[s])} for s in sorted(by_subject)},
    }


class MultipleChoiceEval(Evaluator):
    """Score every choice of each MMLU-style question by log-likelihood; one record per question.

    Subclasses give the prompt, the scored continuations and the record of one question (and ``summarise``).
    """

    default_source = "mmlu"
    required_fields = ("question", "choices", "answer")
    progress_label: ClassVar[str] = ""

    def prompt(self, item: dict[str, Any]) -> str:
        raise NotImplementedError

    def continuations(self, item: dict[str, Any]) -> list[str]:
        raise NotImplementedError

    def record(self, item: dict[str, Any], lls: list[float]) -> dict[str, Any]:
        raise NotImplementedError

    def run(self, model, tokenizer, items, settings: EvalContext) -> dict[str, Any]:
        items = [normalise_item(it) for it in items]
        contexts = [self.prompt(it) for it in items]
        conts = [self.continuations(it) for it in items]
        lls = score_choices(model, tokenizer, contexts, conts, settings, desc=self.progress_label)
        records = [self.record(it, ll) for it, ll in zip(items, lls, strict=True)]
        return {
            "task": self.task_name,
            "primary": "acc",
            **self.summarise(records),
            "n": len(records),
            "records": records,
        }


@register_task
class MMLULetterEval(MultipleChoiceEval):
    """MMLU accuracy, letter format (lm-eval ``mmlu``)."""

    name = "mmlu"
    description = "MMLU letter format, lm-eval prompt, argmax over ' A'..' D' (micro + macro accuracy)"
    progress_label = "mmlu"

    def prompt(self, item: dict[str, Any]) -> str:
        return letter_prompt(item)

    def continuations(self, item: dict[str, Any]) -> list[str]:
        return [f" {LETTERS[i]}" for i in range(len(item["choices"]))]

    def record(self, item: dict[str, Any], lls: list[float]) -> dict[str, Any]:
        pred = argmax_first(lls)
        return {
            "id": item["id"],
            "subject": item["subject"],
            "logprobs": lls,
            "pred": pred,
            "answer": item["answer"],
            "score": int(pred == item["answer"]),
        }

    def summarise(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        acc = accuracy_metrics(records)
        return {"metrics": {"acc": acc["micro"], "acc_macro": acc["macro"]}, "per_subject": acc["per_subject"]}
