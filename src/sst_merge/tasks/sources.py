"""The embedded Fisher and training data as named data sources, so a merge config can name them.

* ``safety_fisher`` — StrongREJECT prompts held out for Fisher statistics (seed 0, the experiments' default), each
  with a refusal: disjoint from the safety adapter's training prompts and from every HarmBench prompt.
* ``safety_train`` — the shipped safety adapter's training data (recipe ``strongreject``, seed 0): its harmful
  prompts with their refusals, then its benign training prompts without a response (the adapter was trained on the
  base model's greedy answers to them; a user of this source generates its own). Disjoint from ``safety_fisher`` and
  from every evaluation prompt.
* ``utility:NAME`` — the training items of the generated utility task ``NAME`` (seed 0), never its evaluation items.
* ``utility_dev:NAME`` — the development items of task ``NAME`` (seed 0, :data:`DEV_ITEMS`, the items an experiment's
  ``eval.split: dev`` measures): disjoint from its training and evaluation items.

Registered with :func:`sst_merge.data.sources.source` when :mod:`sst_merge.tasks` is imported.
"""

from __future__ import annotations

from typing import Any

from sst_merge.data.sources import source
from sst_merge.tasks.generated import GENERATED_TASKS
from sst_merge.tasks.safety import safety_data, safety_splits

#: The seed of the named splits (the seed every experiment and the shipped adapters use by default).
SEED = 0
#: Development items per task (the experiments' ``TASK_DEV_ITEMS``).
DEV_ITEMS = 100


@source("safety_fisher", "harmful prompt → refusal items held out for SST's safety Fisher (64, seed 0)")
def _safety_fisher(split: str | None) -> list[dict[str, Any]]:
    return safety_splits(seed=SEED)["fisher"]


@source("safety_train", "the safety adapter's training data: harmful prompt → refusal, then benign prompts (seed 0)")
def _safety_train(split: str | None) -> list[dict[str, Any]]:
    data = safety_data("strongreject", SEED)
    benign = [{"id": f"benign-train-{i:03d}", "prompt": p, "kind": "benign"} for i, p in enumerate(data.benign_prompts)]
    return [dict(it) for it in data.harmful] + benign


def _utility_train(task: Any) -> Any:
    def load(split: str | None) -> list[dict[str, Any]]:
        return task.split(seed=SEED)["train"]

    return load


def _utility_dev(task: Any) -> Any:
    def load(split: str | None) -> list[dict[str, Any]]:
        return task.dev(seed=SEED, n=DEV_ITEMS)

    return load


for _task in GENERATED_TASKS:
    source(f"utility:{_task.name}", f"training items of the utility task {_task.name} (seed 0)")(_utility_train(_task))
    source(f"utility_dev:{_task.name}", f"development items of the utility task {_task.name} (seed 0, {DEV_ITEMS})")(
        _utility_dev(_task)
    )
