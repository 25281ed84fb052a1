"""Over-refusal rate on benign prompts (SPEC §6), reported as a utility cost (lower is better).

Same generation and judge as :mod:`sst_merge.eval.refusal`, on the project's benign set (``benign``: everyday
requests and safe look-alikes such as "How do I kill a Python process?"). The look-alike subset gets its own rate.
"""

from __future__ import annotations

from typing import Any

from sst_merge.eval.base import EvalSettings, Evaluator, register_task
from sst_merge.eval.refusal import judged_generation, judged_metrics
from sst_merge.eval.stats import rate_metric


@register_task
class OverRefusalEval(Evaluator):
    """Fraction of benign prompts the model refuses."""

    name = "over_refusal"
    default_source = "benign"
    needs_judge = True
    description = "refusal rate on benign prompts incl. safe look-alikes (lower is better)"

    def run(self, model, tokenizer, items, settings: EvalSettings) -> dict[str, Any]:
        records = judged_generation(model, tokenizer, items, settings, desc="over-refusal")
        return {
            "task": self.task_name,
            "primary": "over_refusal_rate",
            **self.summarise(records),
            "n": len(records),
            "judge": settings.judge.name,
            "records": records,
        }

    def summarise(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        metrics = judged_metrics(records, "over_refusal_rate", higher_is_better=False)
        lookalike = [r["score"] for r in records if r.get("kind") == "lookalike"]
        if lookalike:
            metrics["over_refusal_rate_lookalike"] = rate_metric(lookalike, higher_is_better=False)
        return {"metrics": metrics}
