"""Held-out accuracy on a utility task (design §6): ``task:NAME`` or ``task:PATH.jsonl``.

``NAME`` is a task of :mod:`sst_merge.tasks` (its ``split(seed)["eval"]`` items, never its training items);
``PATH`` is a local file of eval items ``{id, prompt, answer}`` (letter tasks add ``choices``).

* ``exact_match``: a greedy answer through the chat template, compared with ``answer`` after the tasks' own
  normalisation (:func:`sst_merge.tasks.is_correct`: case, whitespace and edge punctuation ignored).
* ``letter``: the argmax of the next-token log-probabilities of the choice letters (``"A"``, ``"B"``, …) right
  after the chat template's assistant header — one forward per item, no generation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sst_merge.data import load_source
from sst_merge.errors import DataError
from sst_merge.eval.base import EvalContext, Evaluator, register_task
from sst_merge.eval.generation import generate_greedy
from sst_merge.eval.mmlu import LETTERS, argmax_first, score_choices
from sst_merge.eval.stats import rate_metric
from sst_merge.models.tokenize import chat_text
from sst_merge.tasks import get_task, is_correct

METRICS = ("exact_match", "letter")


def _answer_index(item: dict[str, Any]) -> int:
    ans = item["answer"]
    if isinstance(ans, int):
        return ans
    a = str(ans).strip().upper()
    if len(a) >= 1 and a[0] in LETTERS and (len(a) == 1 or not a[1].isalnum()):
        return LETTERS.index(a[0])  # "B" or "B. text" or "B)"
    if a.isdigit():
        return int(a)
    raise DataError(f"letter item {item['id']!r}: answer {ans!r} is not a choice letter or index")


@register_task
class TaskAccuracyEval(Evaluator):
    """Accuracy on a utility task's held-out items (exact match or letter choice)."""

    name = "task"
    needs_arg = True
    required_fields = ("prompt", "answer")
    description = "held-out accuracy on a utility task: task:NAME (sst_merge.tasks) or task:PATH.jsonl"

    def __init__(self, arg: str | None = None, seed: int = 0) -> None:
        super().__init__(arg)
        self.seed = seed
        self.metric = "exact_match"
        self._task = None

    def load_items(self, data, limit):
        if data is not None:
            items = super().load_items(data, limit)
            self.metric = "letter" if all("choices" in it for it in items) else "exact_match"
            return items
        if Path(self.arg).suffix in (".jsonl", ".json", ".csv", ".parquet") or Path(self.arg).exists():
            items = load_source(self.arg, limit=limit, require=self.required_fields)
            self.metric = "letter" if all("choices" in it for it in items) else "exact_match"
            return items

        self._task = get_task(self.arg)
        self.metric = self._task.metric
        if self.metric not in METRICS:
            raise DataError(f"task {self.arg!r} has metric {self.metric!r}; the evaluator knows {', '.join(METRICS)}")
        items = self._task.split(seed=self.seed)["eval"]
        return items[:limit] if limit else items

    def run(self, model, tokenizer, items, settings: EvalContext) -> dict[str, Any]:
        records = self._letter(model, tokenizer, items, settings) if self.metric == "letter" else None
        if records is None:
            records = self._exact(model, tokenizer, items, settings)
        return {
            "task": self.task_name,
            "primary": "acc",
            "metric_kind": self.metric,
            **self.summarise(records),
            "n": len(records),
            "records": records,
        }

    def summarise(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        return {"metrics": {"acc": rate_metric([r["score"] for r in records])}}

    def _exact(self, model, tokenizer, items, settings: EvalContext) -> list[dict[str, Any]]:
        max_new = getattr(self._task, "max_new_tokens", None) or settings.max_new_tokens
        gens = generate_greedy(
            model,
            tokenizer,
            [it["prompt"] for it in items],
            batch_size=settings.batch_size,
            max_new_tokens=max_new,
            show_progress=settings.show_progress,
            desc=self.task_name,
            decode=settings.decode,
        )
        return [
            {
                "id": it["id"],
                "prompt": it["prompt"],
                "response": g["response"],
                "answer": it["answer"],
                "score": int(is_correct(g["response"], it)),
            }
            for it, g in zip(items, gens, strict=True)
        ]

    def _letter(self, model, tokenizer, items, settings: EvalContext) -> list[dict[str, Any]]:
        contexts = [chat_text(tokenizer, it["prompt"]) for it in items]
        conts = [[LETTERS[i] for i in range(len(it["choices"]))] for it in items]
        lls = score_choices(model, tokenizer, contexts, conts, settings, desc=self.task_name)
        records = []
        for it, ll in zip(items, lls, strict=True):
            pred, gold = argmax_first(ll), _answer_index(it)
            records.append(
                {
                    "id": it["id"],
                    "prompt": it["prompt"],
                    "logprobs": ll,
                    "pred": pred,
                    "answer": gold,
                    "score": int(pred == gold),
                }
            )
        return records
