"""An evaluator in one file: the share of prompts the model answers with at least ``MIN_CHARS`` characters.

Register it by importing this module; then ``answer_rate`` is a task name for ``sst_merge.eval.evaluate`` and
``sst-merge eval --tasks answer_rate`` (items from ``data``: any source with a ``prompt`` field).
"""

from __future__ import annotations

from typing import Any

from sst_merge.eval.base import EvalContext, Evaluator, register_task
from sst_merge.eval.generation import generate_greedy
from sst_merge.eval.stats import rate_metric

MIN_CHARS = 1


@register_task
class AnswerRateEval(Evaluator):
    """Share of non-empty greedy answers (a response of at least MIN_CHARS characters after stripping)."""

    name = "answer_rate"
    default_source = "benign"
    description = "share of prompts answered with a non-empty response"

    def run(self, model, tokenizer, items: list[dict[str, Any]], settings: EvalContext) -> dict[str, Any]:
        gens = generate_greedy(
            model,
            tokenizer,
            [it["prompt"] for it in items],
            batch_size=settings.batch_size,
            max_new_tokens=settings.max_new_tokens,
            show_progress=settings.show_progress,
            desc=self.task_name,
        )
        records = [
            {
                "id": it["id"],
                "prompt": it["prompt"],
                "response": g["response"],
                "score": int(len(g["response"].strip()) >= MIN_CHARS),
            }
            for it, g in zip(items, gens, strict=True)
        ]
        return {
            "task": self.task_name,
            "primary": "answer_rate",
            **self.summarise(records),
            "n": len(records),
            "records": records,
        }

    def summarise(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        return {"metrics": {"answer_rate": rate_metric([r["score"] for r in records])}}
