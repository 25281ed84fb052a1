"""MMLU, cloze format (SPEC §6), as lm-evaluation-harness's ``mmlu_continuation`` task defines it.

Prompt: ``"The following are questions (with answers) about {subject}.\n\nQuestion: {question}\nAnswer:"``; each
choice is scored by the log-likelihood of the continuation ``" {choice}"``. ``acc`` takes the argmax of the raw
sums; ``acc_norm`` divides each by the choice's length in characters (lm-eval's ``acc_norm`` uses ``len(choice)``;
its documentation calls this byte length, which it is for ASCII); ``acc_bytes`` divides by the UTF-8 byte length.
"""

from __future__ import annotations

from typing import Any

from sst_merge.eval.base import EvalSettings, Evaluator, register_task
from sst_merge.eval.mmlu import accuracy_metrics, argmax_first, normalise_item, score_choices


def cloze_prompt(item: dict[str, Any]) -> str:
    """lm-eval's ``mmlu_continuation`` description + ``doc_to_text`` (0-shot)."""
    return (
        f"The following are questions (with answers) about {item['subject']}.\n\n"
        f"Question: {item['question'].strip()}\nAnswer:"
    )


@register_task
class MMLUClozeEval(Evaluator):
    """MMLU accuracy, cloze format (lm-eval ``mmlu_continuation``): acc, acc_norm, acc_bytes."""

    name = "mmlu_cloze"
    default_source = "mmlu"
    required_fields = ("question", "choices", "answer")
    description = "MMLU cloze format, log-likelihood of each answer text; acc, acc_norm (length-normalised)"

    def run(self, model, tokenizer, items, settings: EvalSettings) -> dict[str, Any]:
        items = [normalise_item(it) for it in items]
        contexts = [cloze_prompt(it) for it in items]
        conts = [[f" {c}" for c in it["choices"]] for it in items]
        lls = score_choices(model, tokenizer, contexts, conts, settings, desc="mmlu-cloze")
        records = []
        for it, ll in zip(items, lls, strict=True):
            pred = argmax_first(ll)
            pred_norm = argmax_first([v / len(c) for v, c in zip(ll, it["choices"], strict=True)])
            pred_bytes = argmax_first([v / len(c.encode("utf-8")) for v, c in zip(ll, it["choices"], strict=True)])
            records.append(
                {
                    "id": it["id"],
                    "subject": it["subject"],
                    "logliks": ll,
                    "pred": pred,
                    "pred_norm": pred_norm,
                    "answer": it["answer"],
                    "score": int(pred == it["answer"]),
                    "score_norm": int(pred_norm == it["answer"]),
                    "score_bytes": int(pred_bytes == it["answer"]),
                }
            )
        return {
            "task": self.task_name,
            "primary": "acc",
            **self.summarise(records),
            "n": len(records),
            "records": records,
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
