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

Each is seeded (:func:`sst_merge.data.sources.seeded_source`): ``NAME@seed=N`` draws the split with seed N, and
``A+B`` concatenates sources — an experiment's default Fisher data at seed 1 over two tasks is
``safety_fisher@seed=1`` and ``utility:passage_qa@seed=1+utility:arithmetic@seed=1`` (:func:`fisher_sources`).
Registered when :mod:`sst_merge.tasks` is imported.
"""

from __future__ import annotations

from typing import Any

from sst_merge.data.sources import DEFAULT_SEED, seeded_source
from sst_merge.tasks.generated import GENERATED_TASKS
from sst_merge.tasks.safety import safety_data, safety_splits

#: The seed of the plain names (the seed every experiment and the shipped adapters use by default).
SEED = DEFAULT_SEED
#: Development items per task (the experiments' ``TASK_DEV_ITEMS``).
DEV_ITEMS = 100


def fisher_sources(utility_tasks: list[str], seed: int) -> tuple[str, str]:
    """The named sources an experiment's Fisher statistics use by default: ``safety_fisher`` and the utility tasks'
    training items, at the run's ``seed`` (the plain names at seed 0)."""
    at = "" if seed == SEED else f"@seed={seed}"
    return f"safety_fisher{at}", "+".join(f"utility:{t}{at}" for t in utility_tasks)


@seeded_source("safety_fisher", "harmful prompt → refusal items held out for SST's safety Fisher (64, seed 0)")
def _safety_fisher(split: str | None, seed: int) -> list[dict[str, Any]]:
    return safety_splits(seed=seed)["fisher"]


@seeded_source(
    "safety_train", "the safety adapter's training data: harmful prompt → refusal, then benign prompts (seed 0)"
)
def _safety_train(split: str | None, seed: int) -> list[dict[str, Any]]:
    data = safety_data("strongreject", seed)
    benign = [{"id": f"benign-train-{i:03d}", "prompt": p, "kind": "benign"} for i, p in enumerate(data.benign_prompts)]
    return [dict(it) for it in data.harmful] + benign


def _utility_train(task: Any) -> Any:
    def load(split: str | None, seed: int) -> list[dict[str, Any]]:
        return task.split(seed=seed)["train"]

    return load


def _utility_dev(task: Any) -> Any:
    def load(split: str | None, seed: int) -> list[dict[str, Any]]:
        return task.dev(seed=seed, n=DEV_ITEMS)

    return load


for _task in GENERATED_TASKS:
    seeded_source(f"utility:{_task.name}", f"training items of the utility task {_task.name} (seed 0)")(
        _utility_train(_task)
    )
    seeded_source(
        f"utility_dev:{_task.name}", f"development items of the utility task {_task.name} (seed 0, {DEV_ITEMS})"
    )(_utility_dev(_task))
