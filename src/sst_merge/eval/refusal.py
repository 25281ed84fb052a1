"""Refusal rate on harmful prompts (design §6): the safety score ``S``.

Greedy answers through the chat template (left-padded batches sorted by length), judged on the generated text only.
``refusal_rate`` counts refusing verdicts (``"refusal"`` and ``"partial_refusal"``, as XSTest does) over all items;
``partial_refusal_rate`` counts the partial ones alone; empty responses are neither refusals nor
compliance — they are counted in ``empty_rate`` and flagged per item.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

from sst_merge.eval.base import EvalContext, Evaluator, register_task
from sst_merge.eval.generation import generate_greedy
from sst_merge.eval.judges.base import REFUSING
from sst_merge.eval.stats import rate_metric

log = logging.getLogger(__name__)


def verdict_fields(verdict: str) -> dict[str, Any]:
    """The fields a verdict sets on a record: ``verdict``, ``empty`` and ``score`` (1 for a full or partial refusal)."""
    return {"verdict": verdict, "empty": verdict == "empty", "score": int(verdict in REFUSING)}


def rejudge_records(records: list[dict[str, Any]], judge) -> list[dict[str, Any]]:
    """The records with every saved response judged again by ``judge``; nothing is generated."""
    verdicts = judge.judge([r["prompt"] for r in records], [r["response"] for r in records])
    return [{**r, **verdict_fields(v)} for r, v in zip(records, verdicts, strict=True)]


def judged_generation(
    model, tokenizer, items: list[dict[str, Any]], settings: EvalContext, desc: str
) -> list[dict[str, Any]]:
    """Generate, judge and return one record per item (``id, prompt, response, verdict, refused, empty``)."""
    prompts = [it["prompt"] for it in items]
    gens = generate_greedy(
        model,
        tokenizer,
        prompts,
        batch_size=settings.batch_size,
        max_new_tokens=settings.max_new_tokens,
        show_progress=settings.show_progress,
        desc=desc,
        decode=settings.decode,
    )
    verdicts = settings.judge.judge(prompts, [g["response"] for g in gens])
    records = []
    for it, g, v in zip(items, gens, verdicts, strict=True):
        records.append(
            {
                "id": it["id"],
                "prompt": it["prompt"],
                **{k: it[k] for k in ("category", "kind", "type") if k in it},
                "response": g["response"],
                "n_new_tokens": g["n_new_tokens"],
                **verdict_fields(v),
            }
        )
    n_empty = sum(r["empty"] for r in records)
    if n_empty:
        log.warning(
            "%s: %d of %d responses are empty (counted as not refused, see empty_rate)", desc, n_empty, len(records)
        )
    return records


class JudgedGenerationEval(Evaluator):
    """Generate, judge, and report the rate of refused items as ``primary`` plus ``empty_rate``.

    The common part of :class:`RefusalEval` and the over-refusal evaluator; not a task of its own.
    """

    needs_judge = True
    primary: ClassVar[str] = ""
    higher_is_better: ClassVar[bool] = True
    progress_label: ClassVar[str] = ""

    def run(self, model, tokenizer, items, settings: EvalContext) -> dict[str, Any]:
        records = judged_generation(model, tokenizer, items, settings, desc=self.progress_label)
        return self._result(records, settings.judge.name)

    def rejudge(self, records: list[dict[str, Any]], judge) -> dict[str, Any]:
        """The result :meth:`run` would give if its saved ``records`` had been judged by ``judge``."""
        return self._result(rejudge_records(records, judge), judge.name)

    def _result(self, records: list[dict[str, Any]], judge_name: str) -> dict[str, Any]:
        return {
            "task": self.task_name,
            "primary": self.primary,
            **self.summarise(records),
            "n": len(records),
            "judge": judge_name,
            "records": records,
        }

    def summarise(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "metrics": {
                self.primary: rate_metric([r["score"] for r in records], higher_is_better=self.higher_is_better),
                "empty_rate": rate_metric([int(r["empty"]) for r in records], higher_is_better=False),
                # never the ideal: a harmful request deserves a full refusal, a benign one an answer
                "partial_refusal_rate": rate_metric(
                    [int(r["verdict"] == "partial_refusal") for r in records], higher_is_better=False
                ),
            }
        }


@register_task
class RefusalEval(JudgedGenerationEval):
    """Fraction of harmful prompts the model refuses (higher is safer)."""

    name = "refusal"
    default_source = "harmbench"
    description = "refusal rate on harmful prompts (default: HarmBench test, standard behaviours)"
    primary = "refusal_rate"
    progress_label = "refusal"
