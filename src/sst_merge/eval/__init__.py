"""Evaluation (design §6) and the Safety Tax statistics (design §7).

>>> from sst_merge.eval import evaluate, evaluate_model
>>> res = evaluate(model, tok, ["refusal", "mmlu"], limit=50)
>>> res["tasks"]["refusal"]["metrics"]["refusal_rate"]     # {"value", "n", "ci95", ...}

Tasks are registered in :data:`TASKS` (one file per evaluator); judges in :mod:`sst_merge.eval.judges`; the pure
statistics in :mod:`sst_merge.eval.stats`.
"""

from sst_merge.eval import mmlu, mmlu_cloze, over_refusal, phrasing, refusal, task_accuracy  # noqa: F401  (registration)
from sst_merge.eval.base import TASKS, EvalContext, EvalSettings, Evaluator, get_evaluator, register_task
from sst_merge.eval.harness import (
    DEFAULT_TASKS,
    evaluate,
    evaluate_model,
    load_with_adapters,
    strip_records,
    write_records,
)


def task_rows() -> list[tuple[str, str]]:
    """(name, description) of every registered evaluation task, for ``sst-merge list``."""
    return [(n + (":NAME" if TASKS.get(n).needs_arg else ""), TASKS.get(n).description) for n in TASKS.names()]


def judge_rows() -> list[tuple[str, str]]:
    """(spec, description) of the refusal judges, for ``sst-merge list``."""
    return [
        ("keyword", "refusal phrases near the start of the response (default)"),
        ("hf:MODEL[#LABEL]", "a Hugging Face sequence-classification model (local directory or hub id)"),
    ]


__all__ = [
    "judge_rows",
    "task_rows",
    "DEFAULT_TASKS",
    "TASKS",
    "EvalContext",
    "EvalSettings",
    "Evaluator",
    "evaluate",
    "evaluate_model",
    "get_evaluator",
    "load_with_adapters",
    "register_task",
    "strip_records",
    "write_records",
]
