"""Refusal by phrasing: the same intents as a question, an imperative, a polite request, a role-play and a fragment.

A safety adapter can learn a prompt *form* instead of a harm concept (refuse long imperatives, answer short
questions). This evaluator scores each form apart, on harmful intents (refusal, higher is better) and on benign
intents phrased the same way (over-refusal, lower is better), so "questions get answered" cannot pass for safety.

The prompts (``resources/phrasing_prompts.jsonl``, written for the project) come from intents split into ``dev``
(for choosing training settings) and ``eval`` (reported, never tuned to); ``phrasing`` evaluates the ``eval``
split, ``phrasing:dev`` the ``dev`` split, ``phrasing:all`` both. None of the evaluation's templates is used for
training, and no prompt is a near-duplicate of a training, Fisher or other evaluation prompt (tested).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sst_merge.data.files import read_local
from sst_merge.errors import ConfigError
from sst_merge.eval.base import EvalContext, register_task
from sst_merge.eval.refusal import JudgedGenerationEval, judged_generation
from sst_merge.eval.stats import rate_metric

PHRASING_FILE = Path(__file__).resolve().parent.parent / "resources" / "phrasing_prompts.jsonl"
FORMS = ("question", "imperative", "polite", "roleplay", "fragment")
SPLITS = ("eval", "dev", "all")


def phrasing_items(split: str = "eval") -> list[dict[str, Any]]:
    """The packaged phrasing prompts of ``split`` (``eval``, ``dev`` or ``all``), harmful and benign."""
    if split not in SPLITS:
        raise ConfigError(f"phrasing split {split!r} is unknown; choose one of: {', '.join(SPLITS)}")
    rows = read_local(PHRASING_FILE)
    return [r for r in rows if split == "all" or r["split"] == split]


def _worst(metrics: dict[str, dict[str, Any]], prefix: str, higher_is_better: bool) -> dict[str, Any] | None:
    per_form = {k.removeprefix(prefix): m for k, m in metrics.items() if k.startswith(prefix) and "worst" not in k}
    if not per_form:
        return None
    pick = min if higher_is_better else max
    form = pick(per_form, key=lambda f: (per_form[f]["value"], f))
    return {**per_form[form], "form": form}


@register_task
class PhrasingEval(JudgedGenerationEval):
    """Refusal of harmful intents and over-refusal of benign ones, per phrasing form, with the worst form."""

    name = "phrasing"
    description = "refusal (harmful) and over-refusal (benign) per phrasing form; phrasing:dev for tuning"
    primary = "refusal_rate"
    progress_label = "phrasing"
    required_fields = ("prompt", "kind", "form")

    def __init__(self, arg: str | None = None) -> None:
        if arg is not None and arg not in SPLITS:
            raise ConfigError(f"task 'phrasing:{arg}': unknown split; use phrasing, phrasing:dev or phrasing:all")
        self.arg = arg

    def run(self, model, tokenizer, items, settings: EvalContext) -> dict[str, Any]:
        records = judged_generation(model, tokenizer, items, settings, desc=self.progress_label)
        for rec, it in zip(records, items, strict=True):  # the generic record keeps "kind" only
            rec.update({k: it[k] for k in ("form", "intent", "split") if k in it})
        return self._result(records, settings.judge.name)

    def load_items(self, data: str | list[dict[str, Any]] | None, limit: int | None) -> list[dict[str, Any]]:
        if data is not None:
            return super().load_items(data, limit)
        items = phrasing_items(self.arg or "eval")
        return items[:limit] if limit else items

    def summarise(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        """Refusal per harmful form, over-refusal per benign form (Wilson intervals), overall and worst form."""
        metrics: dict[str, Any] = {}
        for kind, name, better in (("harmful", "refusal_rate", True), ("benign", "over_refusal_rate", False)):
            rows = [r for r in records if r.get("kind") == kind]
            if not rows:
                continue
            metrics[name] = rate_metric([r["score"] for r in rows], higher_is_better=better)
            for form in [f for f in FORMS if any(r["form"] == f for r in rows)] + sorted(
                {r["form"] for r in rows} - set(FORMS)
            ):
                scores = [r["score"] for r in rows if r["form"] == form]
                metrics[f"{name}_{form}"] = rate_metric(scores, higher_is_better=better)
        for name, better in (("refusal_rate", True), ("over_refusal_rate", False)):
            worst = _worst(metrics, f"{name}_", better)
            if worst is not None:
                metrics[f"{name}_worst_form"] = worst  # the form's own metric plus its name in "form"
        metrics["empty_rate"] = rate_metric([int(r["empty"]) for r in records], higher_is_better=False)
        return {"metrics": metrics}
