"""Tasks: the project's generated utility tasks (registered by name) and the safety data splits.

>>> from sst_merge.tasks import get_task
>>> split = get_task("passage_qa").split(seed=0)   # {"train": [...], "eval": [...]}

A task has ``.name``, ``.metric`` ("exact_match" or "letter") and ``.split(seed) -> {"train", "eval"}`` of items
``{"id", "prompt", "response", "answer"}``. Adding one is a generator function plus one entry in ``generated.py``.
The safety data (StrongREJECT train / Fisher, HarmBench evaluation) lives in :mod:`sst_merge.tasks.safety`;
:mod:`sst_merge.tasks.sources` names the Fisher data as data sources (``safety_fisher``, ``utility:NAME``).
"""

from __future__ import annotations

from sst_merge.registry import Registry
from sst_merge.tasks import sources as _sources  # noqa: F401  (registers the named Fisher data sources)
from sst_merge.tasks.base import GeneratedTask, Item, is_correct, normalize_answer, normalize_text
from sst_merge.tasks.generated import GENERATED_TASKS

UTILITY_TASKS: Registry[GeneratedTask] = Registry("utility task")
for _task in GENERATED_TASKS:
    UTILITY_TASKS.register(_task.name)(_task)


def get_task(name: str) -> GeneratedTask:
    """Return the task registered as ``name`` (unknown names list the valid ones and the nearest match)."""
    return UTILITY_TASKS.get(name)


__all__ = ["UTILITY_TASKS", "GeneratedTask", "Item", "get_task", "is_correct", "normalize_answer", "normalize_text"]
