"""MMLU, cloze format (design §6), as lm-evaluation-harness's ``mmlu_continuation`` task defines it.

Prompt: ``"The following are questions (with answers) about {subject}.\n\nQuestion: {question}\nAnswer:"``; each
choice is scored by the log-likelihood of the continuation ``" {choice}"``. ``acc`` takes the argmax of the raw
sums; ``acc_norm`` divides each by the choice's length in characters (lm-eval's ``acc_norm`` uses ``len(choice)``;
its documentation calls this byte length, which it is for ASCII); ``acc_bytes`` divides by the UTF-8 byte length.
"""

from __future__ import annotations

from typing import Any

from sst_merge.eval.base import register_task
from sst_merge.eval.mmlu import MultipleChoiceEval, accuracy_metrics, argmax_first


def cloze_prompt(item: dict[str, Any]) -> str:
    """lm-eval's ``mmlu_continuation`` description + ``doc_to_text`` (0-shot)."""
    return (
        f"The following are questions (with answers) about {item['subject']}.\n\n"
        f"Question: {item['question'].strip()}\nAnswer:"
    )


@register_task
class MMLUClozeEval(MultipleChoiceEval):
    """MMLU accuracy, cloze format (lm-eval ``mmlu_continuation``): acc, acc_norm, acc_bytes."""

    name = "mmlu_cloze"
    description = "MMLU cloze format, log-likelihood of each answer text; acc, acc_norm (length-normalised)"
    progress_label = "mmlu-cloze"

    def prompt(self, item: dict[str, Any]) -> str:
        return cloze_prompt(item)

    def continuations(self, item: dict[str, Any]) -> list[str]:
        return [f" {c}" for c in item["choices"]]

    def record(self, item: dict[str, Any], lls: list[float]) -> dict[str, Any]:
        choices = item["choices"]
        pred = argmax_first(lls)
        pred_norm = argmax_first([v / len(c) for v, c in zip(lls, choices, strict=True)])
        pred_bytes = argmax_first([v / len(c.encode("utf-8")) for v, c in zip(lls, choices, strict=True)])
        return {
            "id": item["id"],
            "subject": item["subject"],
            "logliks": lls,
            "pred": pred,
            "pred_norm": pred_norm,
            "answer": item["answer"],
            "score": int(pred == item["answer"]),
            "score_norm": int(pred_norm == item["answer"]),
            "score_bytes": int(pred_bytes == item["answer"]),
        }

    def summarise(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        acc, norm, byt = (accuracy_metrics(records, k) for k in ("score", "score_norm", "score_bytes"))
        return {
            "metrics": {
                "acc": acc["micro"],
                "acc_macro": acc["macro"],
                "acc_norm": norm["micro"],
                "acc_norm_macro": norm["macro"],
                "acc_bytes": byt["micro"],
            },
            "per_subject": acc["per_subject"],
        }
